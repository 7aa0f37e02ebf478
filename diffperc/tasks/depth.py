"""Monocular depth: condition on the RGB image, predict affine-invariant depth (Marigold's target coding)."""

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics import MetricCollection

from diffperc.data.viz import colorize_depth, rgb_batch
from diffperc.metrics import AbsRel, Delta1
from diffperc.tasks.base import Task
from diffperc.utils import atomic_write_bytes, png_bytes


class DepthTask(Task):
    """Affine-invariant monocular depth with per-image 2%/98% quantile normalisation.

    Args:
        min_depth: Lower end of the data set's evaluation depth range, metres.
        max_depth: Upper end of the evaluation depth range, metres.
        quantiles: Lower and upper depth quantiles mapped to -1 and +1 in the target image.
        reducer: Ensemble reducer for test-time ensembles (``median``, ``mean`` or ``median_compilation``).
    """

    name = "depth"
    num_conditions = 1
    reducers = ("median", "mean", "median_compilation")

    def __init__(
        self,
        min_depth: float = 1e-3,
        max_depth: float = 100.0,
        quantiles: tuple[float, float] = (0.02, 0.98),
        reducer: str = "median",
    ):
        self.check_reducer(reducer, "--model.task.reducer")
        if not 0 <= quantiles[0] < quantiles[1] <= 1:
            raise ValueError(f"`--model.task.quantiles` must satisfy 0 <= low < high <= 1, got {quantiles}")
        if not 0 <= min_depth < max_depth:
            raise ValueError(
                f"`--model.task.min_depth` must be >= 0 and < `--model.task.max_depth`, got {min_depth}, {max_depth}"
            )
        self.min_depth, self.max_depth, self.quantiles, self.reducer = min_depth, max_depth, tuple(quantiles), reducer

    def _valid(self, batch: dict, native: bool = False) -> torch.Tensor:
        d, mask = (batch["depth_native"], batch["valid_native"]) if native else (batch["depth"], batch["valid_mask"])
        return mask.bool() & (d > self.min_depth) & (d < self.max_depth)

    def encode_target(self, batch: dict) -> torch.Tensor:
        depth, valid = batch["depth"], self._valid(batch)
        flat = depth.reshape(depth.shape[0], -1).float()  # nanquantile has no bf16 kernel
        # 1. Per-image quantiles over valid pixels (invalid ones are set to NaN and ignored).
        masked = torch.where(valid.reshape(flat.shape), flat, torch.full_like(flat, float("nan")))
        q = torch.nanquantile(masked, torch.tensor(self.quantiles, dtype=flat.dtype, device=flat.device), dim=1)
        lo, hi = q[0].nan_to_num(0.0), q[1].nan_to_num(1.0)
        # 2. Map [lo, hi] to [-1, 1], clip, and fill invalid pixels with the far end; replicate to 3 channels.
        norm = (flat - lo[:, None]) / (hi - lo).clamp(min=1e-6)[:, None] * 2 - 1
        norm = torch.where(valid.reshape(flat.shape), norm.clamp(-1, 1), torch.ones_like(norm))
        return norm.reshape(depth.shape).expand(-1, 3, -1, -1).contiguous()

    def decode(self, image: torch.Tensor, batch: dict | None = None) -> torch.Tensor:
        return image.mean(1, keepdim=True)  # (N, 1, H, W), affine-invariant depth in about [-1, 1]

    def metrics(self) -> MetricCollection:
        return MetricCollection(
            {
                "abs_rel": AbsRel(self.min_depth, self.max_depth),
                "delta1": Delta1(self.min_depth, self.max_depth),
            }
        )

    def update_metrics(self, metrics: MetricCollection, pred: torch.Tensor, batch: dict) -> None:
        """Scores at the ground truth's native size when the reader resized it (``depth_native``, ``valid_native``):
        the prediction is resized there bilinearly (antialiased, as Marigold's pipeline does) before alignment;
        otherwise it is scored at the working grid (procedural data, or a reader that kept the native size)."""
        if "depth_native" not in batch:
            metrics.update(pred, batch["depth"], self._valid(batch))
            return
        target = batch["depth_native"]
        size = tuple(target.shape[-2:])
        pred = F.interpolate(pred.float(), size=size, mode="bilinear", align_corners=False, antialias=True)
        metrics.update(pred, target.float(), self._valid(batch, native=True))

    def baseline(self, batch: dict) -> torch.Tensor:
        """A constant prediction: after alignment it is each image's mean valid depth."""
        return torch.zeros_like(batch["depth"])

    def visualize(self, pred: torch.Tensor, batch: dict) -> torch.Tensor:
        rgb = (batch["image"].float().cpu() + 1) / 2
        gt = [colorize_depth(d[0].numpy()) for d in batch["depth"].float().cpu()]
        pr = [colorize_depth(p[0].numpy()) for p in pred.float().cpu()]
        return torch.cat([rgb, rgb_batch(gt), rgb_batch(pr)], dim=3)  # (N, 3, H, 3W)

    def save_prediction(
        self, pred: torch.Tensor, uncertainty: torch.Tensor | None, out_dir: Path, stem: str
    ) -> list[Path]:
        depth = pred[0].float().cpu().numpy()
        # Affine-invariant depth in [-1, 1] -> [0, 1] for the 16-bit PNG (0 = near end, 65535 = far end).
        unit = np.clip((depth + 1) / 2, 0, 1)
        paths = [out_dir / f"{stem}_depth.png", out_dir / f"{stem}_depth16.png", out_dir / f"{stem}_depth.npy"]
        atomic_write_bytes(paths[0], png_bytes(colorize_depth(depth)[..., ::-1]))
        atomic_write_bytes(paths[1], png_bytes((unit * 65535).round().astype(np.uint16)))
        atomic_write_bytes(paths[2], _npy(depth))
        if uncertainty is not None:
            u = uncertainty[0].float().cpu().numpy()
            paths.append(out_dir / f"{stem}_uncertainty.png")
            atomic_write_bytes(paths[-1], png_bytes(colorize_depth(u, "magma")[..., ::-1]))
        return paths


def _npy(array: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()
