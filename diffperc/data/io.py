"""File readers and writers for the real data formats: Middlebury .flo flow, 8-bit RGB, 16-bit depth PNG, masks.

Every function raises an error that names the offending file, so a bad sample in a 50K-image data set is found fast.
"""

import os
import tempfile
from pathlib import Path

import cv2
import numpy as np

FLO_MAGIC = 202021.25  # "PIEH" read as a little-endian float32: the Middlebury .flo tag
_FLO_HEADER_BYTES = 12  # float32 magic, int32 width, int32 height
_MAX_FLO_SIDE = 1 << 16  # a larger side means a corrupt header, not a real flow field


def read_flo(path: str | os.PathLike) -> np.ndarray:
    """Reads a Middlebury .flo file.

    Layout: float32 magic 202021.25, int32 width, int32 height, then height * width * 2 float32 (u, v) interleaved,
    row-major, all little-endian.

    Args:
        path: the .flo file.

    Returns:
        The flow, float32 (H, W, 2): u (right) then v (down), in pixels.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: wrong magic, non-positive or absurd size, a payload that is shorter or longer than the header
            says, or NaN / infinite vectors (ground truth must be finite; mark missing flow in a separate mask).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Flow file not found: {path}")
    data = path.read_bytes()
    if len(data) < _FLO_HEADER_BYTES:
        raise ValueError(f"Truncated .flo file {path}: {len(data)} bytes, shorter than the 12-byte header")
    magic = float(np.frombuffer(data, dtype="<f4", count=1)[0])
    if magic != FLO_MAGIC:
        raise ValueError(f"Not a Middlebury .flo file: {path} (magic {magic!r}, expected {FLO_MAGIC})")
    width, height = (int(v) for v in np.frombuffer(data, dtype="<i4", count=2, offset=4))
    if not (0 < width <= _MAX_FLO_SIDE and 0 < height <= _MAX_FLO_SIDE):
        raise ValueError(f"Invalid size {width}x{height} (width x height) in the header of .flo file {path}")
    expected = _FLO_HEADER_BYTES + height * width * 2 * 4
    if len(data) != expected:
        kind = "Truncated" if len(data) < expected else "Over-long"
        raise ValueError(
            f"{kind} .flo file {path}: {len(data)} bytes, expected {expected} for a {width}x{height} flow field"
        )
    flow = np.frombuffer(data, dtype="<f4", offset=_FLO_HEADER_BYTES).reshape(height, width, 2)
    check_finite(flow, path, "Flow file")
    return flow.astype(np.float32)  # a writable, native-endian copy


def check_finite(values: np.ndarray, path: Path, what: str) -> None:
    """Rejects ground truth with NaN or infinite values, naming the file and the first bad pixel (row, column)."""
    bad = ~np.isfinite(values)
    if bad.any():
        row, col = (int(i) for i in np.argwhere(bad)[0][:2])
        raise ValueError(
            f"{what} {path} holds NaN or infinite values ({int(bad.sum())} of them, the first at row {row}, column "
            f"{col}); ground truth must be finite"
        )


def write_flo(path: str | os.PathLike, flow: np.ndarray) -> None:
    """Writes a Middlebury .flo file atomically (a temporary file in the same folder, then os.replace).

    Args:
        path: the .flo file to write; its folder must exist.
        flow: (H, W, 2) array of (u, v) in pixels; stored as float32.

    Raises:
        ValueError: `flow` is not (H, W, 2) with a positive size.
    """
    path = Path(path)
    flow = np.asarray(flow)
    if flow.ndim != 3 or flow.shape[2] != 2 or flow.shape[0] == 0 or flow.shape[1] == 0:
        raise ValueError(f"Flow for {path} must have shape (H, W, 2), got {flow.shape}")
    height, width = flow.shape[:2]
    if height > _MAX_FLO_SIDE or width > _MAX_FLO_SIDE:
        raise ValueError(f"Flow for {path} is {width}x{height}; .flo sides are limited to {_MAX_FLO_SIDE}")
    header = np.array([FLO_MAGIC], dtype="<f4").tobytes() + np.array([width, height], dtype="<i4").tobytes()
    payload = np.ascontiguousarray(flow, dtype="<f4").tobytes()
    # A reader never sees a half-written file: write beside the target, then rename over it.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(header)
            f.write(payload)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _imread(path: Path, flags: int, what: str) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    img = cv2.imread(str(path), flags)
    if img is None:
        raise ValueError(f"Could not decode {what.lower()} {path} (corrupt or unsupported format)")
    return img


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """Reads an image as 8-bit RGB (grayscale is replicated, alpha dropped).

    Args:
        path: any format OpenCV reads (PNG, JPEG, PPM, ...).

    Returns:
        uint8 (H, W, 3), RGB channel order.
    """
    bgr = _imread(Path(path), cv2.IMREAD_COLOR, "Image")
    return np.ascontiguousarray(bgr[:, :, ::-1])


def read_depth_png(path: str | os.PathLike, scale: float, expect_uint16: bool = True) -> np.ndarray:
    """Reads a single-channel depth PNG and converts it to metres.

    Args:
        path: the PNG file.
        scale: stored units per metre; metres = stored value / scale (1000 for millimetres, 256 for KITTI).
        expect_uint16: reject anything but a 16-bit PNG; an 8-bit depth map is almost always a wrong file (a
            visualisation), and silently reading it would give depths below 0.26 m.

    Returns:
        float32 (H, W) depth in metres; a stored 0 stays 0 (the usual "no measurement" code).
    """
    path = Path(path)
    raw = _imread(path, cv2.IMREAD_UNCHANGED, "Depth PNG")
    if expect_uint16 and raw.dtype != np.uint16:
        raise ValueError(f"Depth PNG {path} is {raw.dtype}, expected a 16-bit (uint16) PNG")
    if raw.ndim != 2:
        raise ValueError(f"Depth PNG {path} has shape {raw.shape}, expected a single channel (H, W)")
    if raw.dtype.kind == "f":  # a float image (TIFF, EXR) when `expect_uint16` is off
        check_finite(raw, path, "Depth")
    return (raw.astype(np.float32) / np.float32(scale)).astype(np.float32)


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """Reads a binary mask image.

    A pixel is on when its value exceeds half the type's range (0/255 masks), or when it is non-zero in a mask
    that only holds 0 and 1. Colour masks count a pixel as on when any channel is on.

    Args:
        path: the mask image (usually uint8 PNG, 0/255).

    Returns:
        bool (H, W).
    """
    raw = _imread(Path(path), cv2.IMREAD_UNCHANGED, "Mask")
    if raw.ndim == 3:
        raw = raw[:, :, :3].max(axis=2)
    if not np.issubdtype(raw.dtype, np.integer):
        return raw > 0.5
    if raw.max() == 1:  # some tools save masks as 0/1, which would read as all-off against a 0/255 threshold
        return raw > 0
    return raw > np.iinfo(raw.dtype).max // 2
