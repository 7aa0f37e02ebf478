"""Evaluation metrics: plain functions in ``functional`` and torchmetrics classes that average per image."""

from diffperc.metrics import functional
from diffperc.metrics.amodal import MaskIoU
from diffperc.metrics.depth import AbsRel, Delta1
from diffperc.metrics.flow import EPE, OutlierRate

__all__ = ["EPE", "AbsRel", "Delta1", "MaskIoU", "OutlierRate", "functional"]
