"""Colour coding for inspecting data and predictions: optical flow on the Middlebury colour wheel, depth through a
matplotlib colour map, and image rows and grids for TensorBoard and sample sheets.

Flow (Baker et al., "A Database and Evaluation Methodology for Optical Flow", IJCV 2011; the wheel of their
``colorcode.cpp``): hue = direction, saturation = magnitude. Image axes, v points down: rightward flow (1, 0) is red
(255, 0, 0), downward (0, 1) is orange-yellow (255, 229, 0), leftward (-1, 0) is cyan-blue (0, 209, 255), upward
(0, -1) is violet (88, 0, 255); zero flow is white.
"""

from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch

# ----------------------------------------------------------------------------------------------------------------------
# Optical flow
# ----------------------------------------------------------------------------------------------------------------------

# Colours per hue transition of the 55-colour wheel: red-yellow, yellow-green, green-cyan, cyan-blue, blue-magenta,
# magenta-red. The uneven counts make perceived hue change roughly uniform around the wheel.
WHEEL_SEGMENTS = {"RY": 15, "YG": 6, "GC": 4, "CB": 11, "BM": 13, "MR": 6}


def make_colorwheel() -> np.ndarray:
    """The 55 wheel colours, float64 (55, 3) RGB in 0..255 (integer values), starting at red and turning to yellow."""
    rows = []
    # Each segment ramps one channel up or down (floor of 255 * i / n) while the other two stay at 0 or 255.
    for n, (lead, ramp, rising) in zip(
        WHEEL_SEGMENTS.values(), ((0, 1, True), (1, 0, False), (1, 2, True), (2, 1, False), (2, 0, True), (0, 2, False))
    ):
        seg = np.zeros((n, 3))
        ramp_values = np.floor(255 * np.arange(n) / n)
        seg[:, lead] = 255
        seg[:, ramp] = ramp_values if rising else 255 - ramp_values
        rows.append(seg)
    return np.concatenate(rows)


_WHEEL = make_colorwheel()


def flow_to_color(flow: np.ndarray, max_flow: float | None = None) -> np.ndarray:
    """Colour-codes a flow field.

    Args:
        flow: (H, W, 2) or (2, H, W) array of (u, v) in pixels (u right, v down).
        max_flow: Magnitude shown at full saturation; None = the field's largest finite magnitude. Longer vectors are
            drawn at full saturation and 75% brightness, as in the Middlebury code.

    Returns:
        uint8 (H, W, 3) RGB.
    """
    flow = np.asarray(flow, dtype=np.float64)
    if flow.ndim != 3 or 2 not in (flow.shape[0], flow.shape[-1]):
        raise ValueError(f"flow_to_color expects (H, W, 2) or (2, H, W), got {flow.shape}")
    if flow.shape[-1] != 2:
        flow = flow.transpose(1, 2, 0)
    finite = np.isfinite(flow).all(-1)
    u = np.where(finite, flow[..., 0], 0.0)
    v = np.where(finite, flow[..., 1], 0.0) + 0.0  # + 0.0 turns -0.0 into +0.0, so exact (1, 0) is red, not magenta
    rad = np.sqrt(u * u + v * v)
    if max_flow is None:
        max_flow = float(rad.max())
    rad = rad / max(max_flow, 1e-12)

    # 1. Direction -> fractional wheel index; interpolate between the two neighbouring colours.
    ncols = len(_WHEEL)
    angle = np.arctan2(-v, -u) / np.pi  # in [-1, 1]; rightward flow is -1
    fk = (angle + 1) / 2 * (ncols - 1)
    k0 = np.floor(fk).astype(np.int64)
    k1 = (k0 + 1) % ncols
    f = (fk - k0)[..., None]
    col = ((1 - f) * _WHEEL[k0] + f * _WHEEL[k1]) / 255  # (H, W, 3) in [0, 1]

    # 2. Magnitude -> saturation: blend toward white inside the unit circle, darken beyond it.
    r = rad[..., None]
    col = np.where(r <= 1, 1 - r * (1 - col), col * 0.75)
    col[~finite] = 0.0  # unknown flow is black
    return np.floor(255 * col + 1e-6).astype(np.uint8)


def colorwheel_legend(size: int = 64) -> np.ndarray:
    """A (size, size, 3) uint8 legend: the flow at each pixel points from the centre to it, full saturation at the
    inscribed circle."""
    c = (size - 1) / 2
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    return flow_to_color(np.stack([x - c, y - c], -1), max_flow=c)


# ----------------------------------------------------------------------------------------------------------------------
# Depth
# ----------------------------------------------------------------------------------------------------------------------


@lru_cache(maxsize=8)
def _colormap_lut(cmap: str) -> np.ndarray:
    import matplotlib  # only for the 256 colours of a map; imported on first use

    return (matplotlib.colormaps[cmap](np.arange(256))[:, :3] * 255).astype(np.uint8)  # (256, 3)


def colorize_depth(depth: np.ndarray, cmap: str = "Spectral") -> np.ndarray:
    """Depth (H, W) -> uint8 RGB (H, W, 3), normalised to its 2%..98% range; near is red with ``Spectral``.

    The same colours as ``matplotlib.colormaps[cmap](norm)`` (its 256 bins), through a uint8 lookup table and float32
    arithmetic: a 12000 x 9000 prediction costs a few hundred MB instead of matplotlib's float64 RGBA copy (~3.5 GB).
    """
    finite = depth[np.isfinite(depth)]
    lo, hi = (float(v) for v in np.percentile(finite, [2, 98])) if finite.size else (0.0, 1.0)
    del finite
    index = np.nan_to_num(depth.astype(np.float32, copy=True), nan=lo, posinf=hi, neginf=lo)
    index -= lo
    index *= 256.0 / max(hi - lo, 1e-8)  # bin i holds norm in [i / 256, (i + 1) / 256), as matplotlib's lookup
    np.clip(index, 0, 255, out=index)
    return _colormap_lut(cmap)[index.astype(np.uint8)]


# ----------------------------------------------------------------------------------------------------------------------
# Image rows and grids
# ----------------------------------------------------------------------------------------------------------------------


def rgb_batch(images: Sequence[np.ndarray]) -> torch.Tensor:
    """uint8 RGB images (H, W, 3) of one size -> a float (N, 3, H, W) batch in [0, 1] (e.g. colour-coded targets)."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255


def image_grid(images: torch.Tensor, columns: int, pad: int = 2) -> torch.Tensor:
    """(N, 3, H, W) images in [0, 1] -> one (3, rows * (H + pad) + pad, columns * (W + pad) + pad) grid on white.

    ``columns=1, pad=0`` stacks the images top to bottom, as TensorBoard shows a batch of visuals.
    """
    n, c, h, w = images.shape
    columns = min(columns, n)
    rows = -(-n // columns)
    grid = torch.ones(c, rows * (h + pad) + pad, columns * (w + pad) + pad, dtype=images.dtype, device=images.device)
    for i, image in enumerate(images.clamp(0, 1)):
        r, col = divmod(i, columns)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        grid[:, top : top + h, left : left + w] = image
    return grid
