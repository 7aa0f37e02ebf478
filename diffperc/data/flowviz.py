"""Optical-flow visualisation with the Middlebury colour wheel (Baker et al., "A Database and Evaluation Methodology
for Optical Flow", IJCV 2011; the wheel of their ``colorcode.cpp``): hue = direction, saturation = magnitude.

Conventions (image axes, v points down): rightward flow (1, 0) is red (255, 0, 0), downward (0, 1) is orange-yellow
(255, 229, 0), leftward (-1, 0) is cyan-blue (0, 209, 255), upward (0, -1) is violet (88, 0, 255); zero flow is white.
"""

import numpy as np

# Colours per hue transition of the 55-colour wheel: red-yellow, yellow-green, green-cyan, cyan-blue, blue-magenta,
# magenta-red. The uneven counts make perceived hue change roughly uniform around the wheel.
WHEEL_SEGMENTS = {"RY": 15, "YG": 6, "GC": 4, "CB": 11, "BM": 13, "MR": 6}


def make_colorwheel() -> np.ndarray:
    """The 55 wheel colours, float64 (55, 3) RGB in 0..255 (integer values), starting at red and turning to yellow."""
    rows = []
    # Each segment ramps one channel up or down (floor of 255 * i / n) while the other two stay at 0 or 255.
    for n, (lead, ramp, rising) in zip(WHEEL_SEGMENTS.values(), (
            (0, 1, True), (1, 0, False), (1, 2, True), (2, 1, False), (2, 0, True), (0, 2, False))):
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
