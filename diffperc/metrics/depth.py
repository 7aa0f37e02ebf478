"""Depth metrics as torchmetrics classes: align, clip to the depth range, score each image, average over images."""

import torch
from torchmetrics import Metric

from diffperc.metrics import functional as MF


class _PerImageDepthMetric(Metric):
    """Mean over images of a per-image depth metric after scale-and-shift alignment (Marigold's protocol).

    Args:
        min_depth: Lower clip of the aligned prediction (the data set's depth range), metres.
        max_depth: Upper clip of the aligned prediction, metres.
        align: Align the prediction by least-squares scale and shift first (for affine-invariant predictions).
    """

    full_state_update = False
    higher_is_better: bool

    def __init__(self, min_depth: float = 1e-3, max_depth: float = 100.0, align: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.min_depth, self.max_depth, self.align = min_depth, max_depth, align
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    @staticmethod
    def _per_image(output: torch.Tensor, target: torch.Tensor, valid_mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def update(self, pred: torch.Tensor, target: torch.Tensor, valid_mask: torch.Tensor) -> None:
        valid = valid_mask.bool() & (target > self.min_depth) & (target < self.max_depth)
        if self.align:
            pred = MF.align_scale_shift(pred, target, valid)
        pred = pred.clamp(self.min_depth, self.max_depth)
        values = self._per_image(pred, target, valid)
        has_pixels = valid.reshape(valid.shape[0], -1).any(1)  # images without valid pixels are not scored
        self.total += values[has_pixels].double().sum()
        self.count += int(has_pixels.sum())

    def compute(self) -> torch.Tensor:
        return (self.total / self.count.clamp(min=1)).float()


class AbsRel(_PerImageDepthMetric):
    """Absolute relative error, mean over images."""

    higher_is_better = False
    _per_image = staticmethod(MF.abs_rel)


class Delta1(_PerImageDepthMetric):
    """Fraction of pixels within a factor 1.25 of the truth, mean over images."""

    higher_is_better = True
    _per_image = staticmethod(MF.delta1)
