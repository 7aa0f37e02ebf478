"""Amodal segmentation metric as a torchmetrics class: mask intersection over union, averaged over images (mIoU)."""

import torch
from torchmetrics import Metric

from diffperc.metrics import functional as MF


class MaskIoU(Metric):
    """Intersection over union of predicted and ground-truth masks per image, mean over images (two empty masks
    score 1)."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, pred: torch.Tensor, target: torch.Tensor, valid_mask: torch.Tensor | None = None) -> None:
        """Scores boolean masks ``pred`` and ``target`` (N, 1, H, W), optionally only on ``valid_mask``."""
        if pred.shape != target.shape:
            raise ValueError(f"MaskIoU takes pred and target of the same shape, got {tuple(pred.shape)} and "
                             f"{tuple(target.shape)}")
        values = MF.mask_iou(pred, target, valid_mask)
        self.total += values.double().sum()
        self.count += values.numel()

    def compute(self) -> torch.Tensor:
        return (self.total / self.count.clamp(min=1)).float()
