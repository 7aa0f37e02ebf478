"""Tests for diffperc.tasks.depth: target coding, decoding and scoring (at the grid or the native size)."""

from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import default_collate

from diffperc.data import HypersimDataset
from diffperc.tasks import DepthTask


def test_depth_target_maps_quantiles_to_unit_range_and_decodes_by_channel_mean():
    depth = torch.linspace(1.0, 101.0, 101).view(1, 1, 1, 101)
    batch = {"depth": depth, "valid_mask": torch.ones_like(depth, dtype=torch.bool)}
    target = DepthTask(min_depth=0.5, max_depth=200.0).encode_target(batch)
    assert target.shape == (1, 3, 1, 101)
    # 2% quantile = 3, 98% = 99 (linear interpolation): those map to -1 and +1, and the rest is clipped.
    assert target[0, 0, 0, 2].item() == -1.0 and target[0, 0, 0, 98].item() == 1.0
    assert target[0, 0, 0, 50].item() == (51 - 3) / 96 * 2 - 1
    assert target.min() == -1 and target.max() == 1
    decoded = DepthTask().decode(target * torch.tensor([1.0, 0.5, 1.5]).view(1, 3, 1, 1))
    torch.testing.assert_close(decoded, target[:, :1])


def test_depth_target_ignores_invalid_pixels_for_quantiles():
    depth = torch.tensor([[[[1.0, 2.0, 3.0, 1000.0]]]])
    valid = torch.tensor([[[[True, True, True, False]]]])
    target = DepthTask(quantiles=(0.0, 1.0)).encode_target({"depth": depth, "valid_mask": valid})
    torch.testing.assert_close(target[0, 0, 0], torch.tensor([-1.0, 0.0, 1.0, 1.0]))


def test_depth_baseline_is_aligned_constant():
    task = DepthTask(min_depth=0.1, max_depth=10.0)
    depth = torch.tensor([[[[1.0, 2.0, 3.0, 6.0]]]])
    batch = {"depth": depth, "valid_mask": torch.ones_like(depth, dtype=torch.bool)}
    metrics = task.metrics()
    task.update_metrics(metrics, task.baseline(batch), batch)
    # Aligned constant = mean depth 3: abs_rel = (2/1 + 1/2 + 0 + 3/6) / 4 = 0.75.
    assert abs(metrics.compute()["abs_rel"].item() - 0.75) < 1e-6


def _write_hypersim(tmp_path: Path, depth_mm: np.ndarray) -> tuple[Path, Path]:
    """One sample in Marigold's Hypersim layout: uint8 RGB PNG, uint16 planar depth PNG in mm, an "rgb depth" list."""
    root = tmp_path / "val"
    (root / "scene").mkdir(parents=True)
    rgb = np.random.default_rng(0).integers(0, 256, (*depth_mm.shape, 3), dtype=np.uint8)
    cv2.imwrite(str(root / "scene" / "rgb_cam_00_fr0000.png"), rgb)
    cv2.imwrite(str(root / "scene" / "depth_plane_cam_00_fr0000.png"), depth_mm)
    listing = tmp_path / "list.txt"
    listing.write_text("scene/rgb_cam_00_fr0000.png scene/depth_plane_cam_00_fr0000.png\n")
    return root, listing


def test_depth_update_metrics_scores_hypersim_at_native_resolution(tmp_path):
    # Native 2x8 ground truth with a sharp step: 1 m in columns 0-3, 2 m in columns 4-7. The 1x4 grid samples
    # columns 1, 3, 5, 7 (nearest), i.e. [1, 1, 2, 2], and a prediction affine to it is perfect there.
    depth_mm = np.repeat(np.array([[1000] * 4 + [2000] * 4], np.uint16), 2, axis=0)
    root, listing = _write_hypersim(tmp_path, depth_mm)
    batch = default_collate([HypersimDataset(root, listing, resolution=(1, 4), native_gt=True)[0]])
    assert batch["depth"][0, 0].tolist() == [[1.0, 1.0, 2.0, 2.0]] and batch["depth_native"].shape == (1, 1, 2, 8)
    pred = (batch["depth"] - 1.5) * 2  # affine-invariant prediction [-1, -1, 1, 1]
    task = DepthTask(min_depth=1e-3, max_depth=65.0)
    grid_batch = {k: v for k, v in batch.items() if not k.endswith("_native")}
    with torch.inference_mode():
        grid, native = task.metrics(), task.metrics()
        task.update_metrics(grid, pred, grid_batch)
        task.update_metrics(native, pred, batch)
        grid, native = grid.compute(), native.compute()
    assert grid["abs_rel"].item() == 0.0 and grid["delta1"].item() == 1.0
    # At 2x8 the bilinear upsampling (half-pixel centres) of [-1, -1, 1, 1] is p = [-1, -1, -1, -1/2, 1/2, 1, 1, 1]
    # in each row, against g = [1, 1, 1, 1, 2, 2, 2, 2]. Least squares: sum p (g - 3/2) = 7/2 and sum p^2 = 13/2
    # per row, so scale 7/13 and shift 3/2 give [25, 25, 25, 32, 46, 53, 53, 53] / 26 m. Relative errors per row:
    # 3 * 1/26 + 6/26 + 3/26 + 3 * 1/52 = 27/52 over 8 pixels: AbsRel 27/416. Every ratio stays below 1.25.
    assert abs(native["abs_rel"].item() - 27 / 416) < 1e-6
    assert native["delta1"].item() == 1.0
