"""Data: procedural generators (the embedded default), real-format readers and the DataModule."""

from diffperc.data.datamodule import PerceptionDataModule
from diffperc.data.depth_eval import (
    DEPTH_EVAL_DATASETS,
    DIODEDataset,
    ETH3DDataset,
    KITTIDataset,
    NYUv2Dataset,
    ScanNetDataset,
)
from diffperc.data.imagenet import ImageNetFolder
from diffperc.data.images import ImageFolder
from diffperc.data.latents import LatentCache, cache_latents
from diffperc.data.mixture import MixtureDataset, MultiTaskDataModule
from diffperc.data.procedural import ProceduralDepth
from diffperc.data.procedural_amodal import ProceduralAmodal
from diffperc.data.procedural_classes import ProceduralClasses
from diffperc.data.procedural_flow import ProceduralFlow
from diffperc.data.real import FlyingChairsDataset, HypersimDataset, Pix2GestaltDataset

__all__ = [
    "DEPTH_EVAL_DATASETS",
    "DIODEDataset",
    "ETH3DDataset",
    "FlyingChairsDataset",
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
    "ScanNetDataset",
    "cache_latents",
]
