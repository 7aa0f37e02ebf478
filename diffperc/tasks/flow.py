"""Optical flow: condition on both frames, predict (u, v) in one denoising run; scored in pixels at the original size.

Target image: channel 0 = u / max_flow, channel 1 = v / max_flow (clipped to [-1, 1]), channel 2 = 0. The authors
predict u and v in two separate runs; here both ride in one 3-channel image. The constant third channel carries no
information on purpose: it costs the network nothing to learn and decoding never reads it, so its noise can't leak
into the flow.
"""

from pathlib import Path

import torch
import torch.nn.functional as F
from torchmetrics import MetricCollection

from diffperc.data.io import write_flo
from diffperc.data.viz import flow_to_color, rgb_batch
from diffperc.metrics.flow import EPE, OutlierRate
from diffperc.tasks.base import Task
from diffperc.utils import atomic_write_bytes, png_bytes


class FlowTask(Task):
    """Dense optical flow from frame 1 to frame 2, both components predicted jointly.

    Args:
        max_flow: Flow magnitude per component, in pixels at the working (training) resolution, mapped to +-1 in the
            target image; larger components are clipped. Pick it from the data set's flow statistics: too small
            clips fast motions, too large wastes the target's precision on values that never occur.
        outlier_thresholds: End-point errors in pixels for the outlier-rate metrics (``outlier_<t>px``).
        reducer: Ensemble reducer. ``median`` (default) takes the per-component pixel median: an ensemble member
            that lands on a wrong match (common at occlusions and in textureless regions) then moves the result
            much less than it would move a mean; ``mean`` is smoother but averages such outliers in.
    """

    name = "flow"
    num_conditions = 2
    #: ``diffperc predict --data.images``: named pairs or consecutive frames (``diffperc.data.real.images``)
    predict_layout = "pairs"

    def __init__(
        self, max_flow: float = 8.0, outlier_thresholds: tuple[float, ...] = (1.0, 3.0, 5.0), reducer: str = "median"
    ):
        if max_flow <= 0:
            raise ValueError(f"`--model.task.max_flow` must be positive (pixels), got {max_flow}")
        self.max_flow = float(max_flow)
        self.outlier_thresholds = tuple(float(t) for t in outlier_thresholds)
        self.check_reducer(reducer, "--model.task.reducer")
        self.reducer = reducer

    def conditions(self, batch: dict) -> list[torch.Tensor]:
        return [batch["image"], batch["image2"]]

    def encode_target(self, batch: dict) -> torch.Tensor:
        flow = batch["flow"].float()
        uv = (flow / self.max_flow).clamp(-1, 1)
        if "valid_mask" in batch:  # unknown flow is taught as zero motion rather than as whatever the file holds
            uv = uv * batch["valid_mask"].to(uv.dtype)
        return torch.cat([uv, torch.zeros_like(uv[:, :1])], dim=1)  # (N, 3, H, W)

    def decode(self, image: torch.Tensor, batch: dict | None = None) -> torch.Tensor:
        return image[:, :2] * self.max_flow  # (N, 2, H, W) pixels at the working resolution; channel 2 is ignored

    def metrics(self) -> MetricCollection:
        metrics = {"epe": EPE()}
        metrics.update({f"outlier_{_fmt(t)}px": OutlierRate(t) for t in self.outlier_thresholds})
        return MetricCollection(metrics)

    def update_metrics(self, metrics: MetricCollection, pred: torch.Tensor, batch: dict) -> None:
        """Scores at the original resolution when the reader resized (``flow_orig``): the prediction is upsampled and
        its vectors rescaled to it, and the valid mask is resized by nearest neighbour."""
        target, valid = batch["flow"], batch.get("valid_mask")
        if "flow_orig" in batch:
            target = batch["flow_orig"]
            size = tuple(target.shape[-2:])
            pred = self.resize_prediction(pred, size)
            if valid is not None:
                valid = F.interpolate(valid.float(), size=size, mode="nearest").bool()
        metrics.update(pred.float(), target.float(), valid)

    def baseline(self, batch: dict) -> torch.Tensor:
        """Zero flow: its EPE is the mean flow magnitude."""
        return torch.zeros_like(batch["flow"], dtype=torch.float32)

    def resize_prediction(self, pred: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Resizes flows (N, 2, h, w) to ``size`` = (H, W) and rescales them: u by W / w, v by H / h."""
        h, w = pred.shape[-2:]
        out = F.interpolate(pred.float(), size=tuple(size), mode="bilinear", align_corners=False)
        factor = torch.tensor([size[1] / w, size[0] / h], dtype=out.dtype, device=out.device)
        return out * factor.view(1, 2, 1, 1)

    def visualize(self, pred: torch.Tensor, batch: dict) -> torch.Tensor:
        """Frame 1 | ground truth | prediction, flows colour-coded on the ground truth's scale (N, 3, H, 3W)."""
        rgb = (batch["image"].float().cpu() + 1) / 2
        gt, pr = [], []
        for g, p in zip(batch["flow"].float().cpu(), pred.float().cpu()):
            scale = max(float(g.norm(dim=0).max()), 1e-6)  # one scale for both, so colours compare
            gt.append(flow_to_color(g.numpy(), scale))
            pr.append(flow_to_color(p.numpy(), scale))
        return torch.cat([rgb, rgb_batch(gt), rgb_batch(pr)], dim=3)

    def save_prediction(
        self, pred: torch.Tensor, uncertainty: torch.Tensor | None, out_dir: Path, stem: str
    ) -> list[Path]:
        """Writes ``<stem>_flow.png`` (Middlebury colours, scaled to this flow's largest vector) and
        ``<stem>_flow.flo`` ((u, v) in pixels of ``pred``, which the writer has resized and rescaled to the input's
        original size). ``uncertainty`` is not written."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)  # write_flo needs the folder
        flow = pred.float().cpu().numpy()  # (2, H, W)
        paths = [out_dir / f"{stem}_flow.png", out_dir / f"{stem}_flow.flo"]
        atomic_write_bytes(paths[0], png_bytes(flow_to_color(flow)[..., ::-1]))  # RGB -> BGR for OpenCV
        write_flo(paths[1], flow.transpose(1, 2, 0))
        return paths


def _fmt(threshold: float) -> str:
    return f"{threshold:g}".replace(".", "p")  # 1.0 -> "1", 0.5 -> "0p5": safe in log keys and file names
