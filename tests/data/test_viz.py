"""Colour coding (diffperc.data.viz): the depth colour map against matplotlib, image rows and grids. The flow colour
wheel's conventions are tested with the flow task (tests/tasks/test_flow.py)."""

import matplotlib
import numpy as np
import torch

from diffperc.data.viz import colorize_depth, flow_to_color, image_grid, rgb_batch


def test_colorize_depth_matches_matplotlib_on_the_2_98_percent_range():
    depth = np.linspace(1.0, 5.0, 100, dtype=np.float32).reshape(10, 10)
    depth[0, 0] = np.nan  # coloured as the near end, not an error
    out = colorize_depth(depth)
    lo, hi = np.percentile(depth[np.isfinite(depth)], [2, 98])
    norm = np.clip((np.nan_to_num(depth, nan=lo) - lo) / (hi - lo), 0, 1)
    expected = (matplotlib.colormaps["Spectral"](norm)[..., :3] * 255).astype(np.uint8)
    assert out.dtype == np.uint8 and out.shape == (10, 10, 3)
    # Bin edges: float32 vs matplotlib's float64 may put a pixel exactly on an edge into the neighbouring bin.
    assert (np.abs(out.astype(int) - expected.astype(int)).max(-1) > 0).sum() <= 2
    assert out[0, 0].tolist() == out[0, 1].tolist() == expected[0, 1].tolist()  # NaN -> the near end's colour
    assert not np.array_equal(colorize_depth(depth, "magma"), out)


def test_rgb_batch_and_image_grid_layout():
    a = np.zeros((2, 3, 3), np.uint8)
    b = np.full((2, 3, 3), 255, np.uint8)
    b[0, 0] = (255, 0, 51)
    batch = rgb_batch([a, b])
    assert batch.shape == (2, 3, 2, 3) and batch.dtype == torch.float32
    torch.testing.assert_close(batch[1, :, 0, 0], torch.tensor([1.0, 0.0, 0.2]))
    stacked = image_grid(batch, columns=1, pad=0)  # TensorBoard's visuals: images stacked top to bottom
    assert torch.equal(stacked, torch.cat([batch[0], batch[1]], dim=1))
    grid = image_grid(batch, columns=2, pad=1)  # (3, 1 + 2 + 1, 1 + 3 + 1 + 3 + 1) on white
    assert grid.shape == (3, 4, 9)
    assert torch.equal(grid[:, 1:3, 1:4], batch[0]) and torch.equal(grid[:, 1:3, 5:8], batch[1])
    assert grid[:, 0].eq(1).all() and grid[:, :, 4].eq(1).all()


def test_flow_to_color_zero_flow_is_white_and_shapes_are_accepted_both_ways():
    flow = np.zeros((2, 4, 5), np.float32)
    flow[0, 0, 0] = 1.0  # rightward: red at full saturation
    out = flow_to_color(flow)
    assert out.shape == (4, 5, 3) and out[1, 1].tolist() == [255, 255, 255]
    assert out[0, 0].tolist() == [255, 0, 0]
    assert np.array_equal(flow_to_color(flow.transpose(1, 2, 0)), out)
