"""Optical-flow metrics as torchmetrics classes: end-point error and n-pixel outlier rates, averaged over images."""

import torch
from torchmetrics import Metric

from diffperc.metrics import functional as MF


class _PerImageFlowMetric(Metric):
    """Mean over images of a per-image flow metric on the valid pixels; images without valid pixels are skipped."""

    full_state_update = False
    higher_is_better = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def _per_image(self, pred: torch.Tensor, target: torch.Tensor, valid_mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def update(self, pred: torch.Tensor, target: torch.Tensor, valid_mask: torch.Tensor | None = None) -> None:
        """Scores flows ``pred`` and ``target`` (N, 2, H, W) in pixels on ``valid_mask`` (N, 1, H, W)."""
        if pred.shape != target.shape or pred.dim() != 4 or pred.shape[1] != 2:
            raise ValueError(f"Flow metrics take pred and target of the same shape (N, 2, H, W), got "
                             f"{tuple(pred.shape)} and {tuple(target.shape)}")
        n, _, h, w = target.shape
        valid = (torch.ones(n, 1, h, w, dtype=torch.bool, device=target.device) if valid_mask is None
                 else valid_mask.reshape(n, 1, h, w).bool())
        values = self._per_image(pred, target, valid)
        has_pixels = valid.reshape(n, -1).any(1)
        self.total += values[has_pixels].double().sum()
        self.count += int(has_pixels.sum())

    def compute(self) -> torch.Tensor:
        return (self.total / self.count.clamp(min=1)).float()


class EPE(_PerImageFlowMetric):
    """End-point error ||pred - target||_2 in pixels, mean over valid pixels, then over images."""

    def _per_image(self, pred: torch.Tensor, target: torch.Tensor, valid_mask: torch.Tensor) -> torch.Tensor:
        return MF.epe(pred, target, valid_mask)


class OutlierRate(_PerImageFlowMetric):
    """Fraction of valid pixels whose end-point error exceeds ``threshold`` pixels, mean over images.

    Args:
        threshold: End-point error in pixels above which a pixel is an outlier (1, 3 and 5 px are usual).
    """

    def __init__(self, threshold: float = 3.0, **kwargs):
        super().__init__(**kwargs)
        if threshold < 0:
            raise ValueError(f"`threshold` of OutlierRate must be >= 0, got {threshold}")
        self.threshold = threshold

    def _per_image(self, pred: torch.Tensor, target: torch.Tensor, valid_mask: torch.Tensor) -> torch.Tensor:
        err = (pred.double() - target.double()).pow(2).sum(1, keepdim=True).sqrt()  # (N, 1, H, W)
        outliers = ((err > self.threshold) & valid_mask).flatten(1).double().sum(1)
        return (outliers / valid_mask.flatten(1).double().sum(1).clamp(min=1)).float()
