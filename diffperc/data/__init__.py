"""Data: the DataModules a config names (`diffperc.data.<ClassName>`) and what feeds them.

- ``procedural/``: generators for every task, computed from (seed, split, index): the embedded default.
- ``real/``: readers of data on disk in their released layouts (Hypersim, FlyingChairs, pix2gestalt, Marigold's
  depth evaluation sets, ImageNet) and of folders of user images for ``diffperc predict``.
- ``io.py``: the file formats (``.flo``, RGB, 16-bit depth PNG, masks); ``viz.py``: flow and depth colour coding.
- Loaders: ``datamodule.py`` (`PerceptionDataModule`), ``task_datamodules.py`` (one per task, chosen by name),
  ``mixture.py`` (multi-task mixing), ``sampler.py`` (resumable training order), ``latents.py`` (latent cache).
"""

from diffperc.data.datamodule import PerceptionDataModule
from diffperc.data.latents import LatentCache, cache_latents
from diffperc.data.mixture import MixtureDataset, MultiTaskDataModule
from diffperc.data.procedural import (
    ProceduralAmodal,
    ProceduralClasses,
    ProceduralDepth,
    ProceduralFlow,
    ProceduralSceneClasses,
)
from diffperc.data.real import (
    DEPTH_EVAL_DATASETS,
    DIODEDataset,
    ETH3DDataset,
    FlyingChairsDataset,
    HypersimDataset,
    ImageFolder,
    ImageNetFolder,
    KITTIDataset,
    NYUv2Dataset,
    Pix2GestaltDataset,
    ScanNetDataset,
)
from diffperc.data.task_datamodules import AmodalDataModule, DepthDataModule, FlowDataModule, GeneralistDataModule

__all__ = [
    "DEPTH_EVAL_DATASETS",
    "AmodalDataModule",
    "DIODEDataset",
    "DepthDataModule",
    "ETH3DDataset",
    "FlowDataModule",
    "FlyingChairsDataset",
    "GeneralistDataModule",
    "HypersimDataset",
    "ImageFolder",
    "ImageNetFolder",
    "KITTIDataset",
    "LatentCache",
    "MixtureDataset",
    "MultiTaskDataModule",
    "NYUv2Dataset",
    "PerceptionDataModule",
    "Pix2GestaltDataset",
    "ProceduralAmodal",
    "ProceduralClasses",
    "ProceduralDepth",
    "ProceduralFlow",
    "ProceduralSceneClasses",
    "ScanNetDataset",
    "cache_latents",
]
