"""Evaluation metrics: plain functions in ``functional`` and torchmetrics classes that average per image."""

from diffperc.metrics import functional
from diffperc.metrics.depth import AbsRel, Delta1

__all__ = ["AbsRel", "Delta1", "functional"]
