"""Readers of data on disk, in the layouts their authors released: the paper's training sets (Hypersim in Marigold's
preprocessing, FlyingChairs, pix2gestalt), Marigold's depth evaluation sets, ImageNet for pretraining, and folders of
user images for ``diffperc predict``.

Try it: ``python -m diffperc.data.real FlyingChairs <root>`` prints the first sample's keys and shapes.
"""

from diffperc.data.real.amodal import Pix2GestaltDataset
from diffperc.data.real.common import LAYOUT_PAGES, resize_flow, resize_image
from diffperc.data.real.depth import DepthListDataset, HypersimDataset
from diffperc.data.real.depth_eval import (
    DEPTH_EVAL_DATASETS,
    DIODEDataset,
    ETH3DDataset,
    KITTIDataset,
    NYUv2Dataset,
    ScanNetDataset,
)
from diffperc.data.real.flow import FlyingChairsDataset
from diffperc.data.real.imagenet import ImageNetFolder
from diffperc.data.real.images import ImageFolder

__all__ = [
    "DEPTH_EVAL_DATASETS",
    "DIODEDataset",
    "DepthListDataset",
    "ETH3DDataset",
    "FlyingChairsDataset",
    "HypersimDataset",
    "ImageFolder",
    "ImageNetFolder",
    "KITTIDataset",
    "LAYOUT_PAGES",
    "NYUv2Dataset",
    "Pix2GestaltDataset",
    "ScanNetDataset",
    "resize_flow",
    "resize_image",
]
