"""What a perception task is to the trainer: which images condition it, how its target becomes an image, its metrics.

Every task turns its ground truth into a 3-channel image in [-1, 1] (so a codec can encode it like any RGB image)
and back. The trainer (``lit/finetuning.py``) is the same for every task.
"""

from pathlib import Path

import torch
from torchmetrics import MetricCollection


class Task:
    """Base class of perception tasks; subclasses fill in the conditioning, target coding and metrics."""

    #: Short name used in log keys (``val/<name>/<metric>``) and file names.
    name: str = "task"
    #: Number of 3-channel condition images (each encoded by the codec, concatenated before the noisy target).
    num_conditions: int = 1
    #: Default ensemble reducer for this task's predictions (``diffperc.diffusion.ensemble``).
    reducer: str = "median"
    #: The reducers that apply to this task's predictions (``median_compilation`` needs single-channel depth).
    reducers: tuple[str, ...] = ("median", "mean")
    #: How ``diffperc predict --data.images`` reads a folder (``diffperc.data.real.images.LAYOUTS``).
    predict_layout: str = "single"

    def check_reducer(self, reducer: str | None, flag: str) -> None:
        """Fails naming ``flag`` when ensemble reducer ``reducer`` (None: the task's default) does not apply to this
        task, before any run starts rather than at the first ensemble."""
        if reducer is not None and reducer not in self.reducers:
            raise ValueError(f"`{flag}` {reducer!r} does not apply to {self.name}: choose one of {self.reducers}")

    def conditions(self, batch: dict) -> list[torch.Tensor]:
        """The condition images (N, 3, H, W) in [-1, 1]."""
        return [batch["image"]]

    def encode_target(self, batch: dict) -> torch.Tensor:
        """Ground truth -> target image (N, 3, H, W) in [-1, 1]."""
        raise NotImplementedError

    def decode(self, image: torch.Tensor, batch: dict) -> torch.Tensor:
        """Predicted target image (N, 3, H, W) -> the task's prediction (e.g. depth (N, 1, H, W))."""
        raise NotImplementedError

    def metrics(self) -> MetricCollection:
        """Fresh metric objects; keys are the metric names used in logs."""
        raise NotImplementedError

    def update_metrics(self, metrics: MetricCollection, pred: torch.Tensor, batch: dict) -> None:
        raise NotImplementedError

    def baseline(self, batch: dict) -> torch.Tensor | None:
        """A trivial prediction to compare against (or None)."""
        return None

    def visualize(self, pred: torch.Tensor, batch: dict) -> torch.Tensor:
        """Images (N, 3, H, W) in [0, 1] for logs: input, ground truth and prediction side by side."""
        raise NotImplementedError

    def save_prediction(
        self, pred: torch.Tensor, uncertainty: torch.Tensor | None, out_dir: Path, stem: str
    ) -> list[Path]:
        """Writes one prediction (no batch dim) to files named after ``stem``; returns the paths."""
        raise NotImplementedError

    def resize_prediction(self, pred: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Resizes a prediction (N, C, h, w) to ``size``; tasks whose values scale with the image override this."""
        import torch.nn.functional as F

        return F.interpolate(pred.float(), size=size, mode="bilinear", align_corners=False)
