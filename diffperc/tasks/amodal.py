"""Amodal segmentation (pix2gestalt's formulation): from the occluded image and the object's visible mask, paint the
whole object on white; the amodal mask is every pixel that differs from white by more than a threshold.

Decoded predictions are the whole-object images (N, 3, H, W) in [-1, 1], so ensembles merge images (pixel median)
and ``AmodalTask.mask`` thresholds the merged image.
"""

from pathlib import Path

import numpy as np
import torch
from torchmetrics import MetricCollection

from diffperc.metrics.amodal import MaskIoU
from diffperc.tasks.base import Task
from diffperc.utils import atomic_write_bytes, png_bytes


class AmodalTask(Task):
    """Whole-object completion on a white background, scored by the mask IoU of the completed object.

    Args:
        threshold: A pixel belongs to the object when its largest channel difference from white exceeds this, in
            the [-1, 1] units of images (2 units = 255 grey levels). The default, 20 / 255, is 10 grey levels: on
            pix2gestalt's ``whole`` images it reproduces ``whole_mask`` at IoU ~0.98 (JPEG-like fringes and
            anti-aliased edges sit within a few levels of white).
        reducer: Ensemble reducer over the whole-object images (``median`` or ``mean``).
    """

    name = "amodal"
    num_conditions = 2
    #: ``diffperc predict --data.images``: <name>.png with <name>_mask.png
    predict_layout = "masks"

    def __init__(self, threshold: float = 20 / 255, reducer: str = "median"):
        if not 0 < threshold < 2:
            raise ValueError(
                f"`--model.task.threshold` must be in (0, 2) (image units, 2 = 255 levels), got {threshold}"
            )
        self.check_reducer(reducer, "--model.task.reducer")
        self.threshold, self.reducer = float(threshold), reducer

    def conditions(self, batch: dict) -> list[torch.Tensor]:
        """The occluded image and the visible mask as an image: -1 off, +1 on, replicated to 3 channels."""
        visible = batch["visible_mask"].float() * 2 - 1
        return [batch["image"], visible.expand(-1, 3, -1, -1)]

    def encode_target(self, batch: dict) -> torch.Tensor:
        return batch["whole"].float()

    def decode(self, image: torch.Tensor, batch: dict | None = None) -> torch.Tensor:
        return image  # the whole-object image; the mask comes from `mask`, after ensembling

    def mask(self, whole: torch.Tensor) -> torch.Tensor:
        """Whole-object images (N, 3, H, W) in [-1, 1] -> amodal masks, bool (N, 1, H, W)."""
        return (whole.float() - 1).abs().amax(dim=1, keepdim=True) > self.threshold

    def metrics(self) -> MetricCollection:
        return MetricCollection({"mask_iou": MaskIoU()})

    def update_metrics(self, metrics: MetricCollection, pred: torch.Tensor, batch: dict) -> None:
        metrics.update(self.mask(pred), batch["whole_mask"].bool())

    def baseline(self, batch: dict) -> torch.Tensor:
        """The visible mask taken as the amodal mask: drawn black on white, so ``mask`` returns it exactly."""
        visible = batch["visible_mask"].bool().expand(-1, 3, -1, -1)
        return torch.where(visible, -1.0, 1.0)

    def visualize(self, pred: torch.Tensor, batch: dict) -> torch.Tensor:
        """Occluded image | true whole | predicted whole | mask errors (white hit, red extra, blue missed)."""
        to01 = lambda x: (x.float().cpu().clamp(-1, 1) + 1) / 2  # noqa: E731
        pm, gm = self.mask(pred).cpu(), batch["whole_mask"].bool().cpu()
        errors = torch.cat([pm, pm & gm, gm], dim=1).float()  # R = predicted, G = hit, B = true
        return torch.cat([to01(batch["image"]), to01(batch["whole"]), to01(pred), errors], dim=3)  # (N, 3, H, 4W)

    def save_prediction(
        self, pred: torch.Tensor, uncertainty: torch.Tensor | None, out_dir: Path, stem: str
    ) -> list[Path]:
        """Writes ``<stem>_whole.png`` (the completed object on white) and ``<stem>_mask.png`` (the amodal mask,
        0/255). ``uncertainty`` is not written."""
        out_dir = Path(out_dir)
        whole = ((pred.float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
        mask = self.mask(pred[None])[0, 0].cpu().numpy().astype(np.uint8) * 255
        paths = [out_dir / f"{stem}_whole.png", out_dir / f"{stem}_mask.png"]
        atomic_write_bytes(paths[0], png_bytes(whole[..., ::-1]))  # RGB -> BGR for OpenCV
        atomic_write_bytes(paths[1], png_bytes(mask))
        return paths
