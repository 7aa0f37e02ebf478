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
from diffperc.data.images import ImageFolder
from diffperc.data.procedural import ProceduralDepth
from diffperc.data.real import FlyingChairsDataset, HypersimDataset, Pix2GestaltDataset

__all__ = [
    "DEPTH_EVAL_DATASETS",
    "DIODEDataset",
    "ETH3DDataset",
    "FlyingChairsDataset",
    "HypersimDataset",
    "ImageFolder",
    "KITTIDataset",
    "NYUv2Dataset",
    "PerceptionDataModule",
    "Pix2GestaltDataset",
    "ProceduralDepth",
    "ScanNetDataset",
]
