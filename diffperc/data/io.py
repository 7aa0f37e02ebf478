"""File readers and writers for the real data formats: Middlebury .flo flow, 8-bit RGB, 16-bit depth PNG, masks.

Every function raises an error that names the offending file, so a bad sample in a 50K-image data set is found fast.
Images are decoded straight to RGB; ``read_rgb_at_least`` decodes a large JPEG at 1/2, 1/4 or 1/8 scale when the
size it is read for leaves enough margin (see its docstring for how close that is to a full decode).
"""

import contextlib
import os
import tempfile
from pathlib import Path

import cv2
import numpy as np

FLO_MAGIC = 202021.25  # "PIEH" read as a little-endian float32: the Middlebury .flo tag
_FLO_HEADER_BYTES = 12  # float32 magic, int32 width, int32 height
_MAX_FLO_SIDE = 1 << 16  # a larger side means a corrupt header, not a real flow field
# OpenCV >= 4.10 decodes straight to RGB; older versions decode BGR and the readers swap the channels.
_RGB_FLAG = getattr(cv2, "IMREAD_COLOR_RGB", cv2.IMREAD_COLOR)
REDUCED_FLAGS = {  # read flag -> {scale-down factor: the flag that decodes at that scale}
    cv2.IMREAD_COLOR: {2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8},
    cv2.IMREAD_GRAYSCALE: {
        2: cv2.IMREAD_REDUCED_GRAYSCALE_2,
        4: cv2.IMREAD_REDUCED_GRAYSCALE_4,
        8: cv2.IMREAD_REDUCED_GRAYSCALE_8,
    },
}


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
    with open(path, "rb") as f:
        header = f.read(_FLO_HEADER_BYTES)
        size = os.fstat(f.fileno()).st_size
        if len(header) < _FLO_HEADER_BYTES:
            raise ValueError(f"Truncated .flo file {path}: {size} bytes, shorter than the 12-byte header")
        magic = float(np.frombuffer(header, dtype="<f4", count=1)[0])
        if magic != FLO_MAGIC:
            raise ValueError(f"Not a Middlebury .flo file: {path} (magic {magic!r}, expected {FLO_MAGIC})")
        width, height = (int(v) for v in np.frombuffer(header, dtype="<i4", count=2, offset=4))
        if not (0 < width <= _MAX_FLO_SIDE and 0 < height <= _MAX_FLO_SIDE):
            raise ValueError(f"Invalid size {width}x{height} (width x height) in the header of .flo file {path}")
        expected = _FLO_HEADER_BYTES + height * width * 2 * 4
        if size != expected:
            kind = "Truncated" if size < expected else "Over-long"
            raise ValueError(
                f"{kind} .flo file {path}: {size} bytes, expected {expected} for a {width}x{height} flow field"
            )
        flow = np.empty((height, width, 2), dtype="<f4")
        if f.readinto(flow) != flow.nbytes:  # read straight into the array: no bytes object, no second copy
            raise ValueError(f"Truncated .flo file {path}: it shrank while being read")
    check_finite(flow, path, "Flow file")
    return flow.astype(np.float32, copy=False)  # a no-op on little-endian machines


def check_finite(values: np.ndarray, path: Path, what: str) -> None:
    """Rejects ground truth with NaN or infinite values, naming the file and the first bad pixel (row, column)."""
    if np.isfinite(values.sum()):  # one pass, no mask; NaN and inf (or an overflowing sum) fall through
        return
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


@contextlib.contextmanager
def _opencv_errors_only():
    logging = cv2.utils.logging
    level = logging.getLogLevel()
    logging.setLogLevel(logging.LOG_LEVEL_ERROR)
    try:
        yield
    finally:
        logging.setLogLevel(level)


def decode_image(data: np.ndarray, flags: int) -> np.ndarray | None:
    """``cv2.imdecode`` without OpenCV's own warnings (``[ WARN:0@1.9] ... PNG input buffer is incomplete``): a
    reader that gets None names the file and the problem itself, once."""
    with _opencv_errors_only():
        return cv2.imdecode(data, flags)


def _imread(path: Path, flags: int, what: str) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    with _opencv_errors_only():
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
    img = _imread(Path(path), _RGB_FLAG, "Image")
    return img if _RGB_FLAG != cv2.IMREAD_COLOR else cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def read_rgb_at_least(path: str | os.PathLike, size: tuple[int, int]) -> tuple[np.ndarray, tuple[int, int]]:
    """Reads an image as 8-bit RGB that will be shrunk to ``size``: a JPEG at least twice ``size`` at 1/2, 1/4 or 1/8
    scale is decoded at that scale (the smallest that keeps 2x ``size`` on both sides); anything else at full size.

    libjpeg scales in the DCT domain, so the decode itself is cheaper: a 4032x6048 (ETH3D) JPEG read for 512 px is
    decoded at 1/2 scale, 2.6x faster than full decode + resize, and for 256 px at 1/4 scale, 4.5x faster. After
    area-averaging to ``size`` it differs from full decode + area averaging by a mean of 0.2-0.3 and at most 8 levels
    of 255 there (``benchmarks/bench_data.py``; a margin of only 2x, e.g. 1/4 scale for 384 px, gave a mean of 0.4
    and at most 14), about what JPEG quality 95 itself changes at that size. PNG and PPM gain nothing from OpenCV's
    reduced modes (it decodes fully, then resizes), so they are always decoded at full size.

    Args:
        path: The image file.
        size: (H, W) the caller will resize the image to.

    Returns:
        The RGB image (at least ``size`` when the file is), and the image's full (H, W) as stored (EXIF rotation
        applied).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Image not found: {path}")
    data = path.read_bytes()
    full = image_header_size(data) if data[:2] == b"\xff\xd8" else None
    factor = 1
    if full is not None:
        factor = next((f for f in (8, 4, 2) if min(-(-full[0] // f) / size[0], -(-full[1] // f) / size[1]) >= 2), 1)
    flags = REDUCED_FLAGS[cv2.IMREAD_COLOR][factor] if factor > 1 else _RGB_FLAG
    img = decode_image(np.frombuffer(data, np.uint8), flags)
    if img is None:
        raise ValueError(f"Could not decode image {path} (corrupt or unsupported format)")
    if flags != _RGB_FLAG or _RGB_FLAG == cv2.IMREAD_COLOR:
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)  # after the reduced decode: a quarter of the pixels or fewer
    if factor == 1:
        full = img.shape[:2]
    elif (img.shape[0] > img.shape[1]) != (full[0] > full[1]) and full[0] != full[1]:
        full = full[::-1]  # EXIF orientation turned the stored image by 90 degrees
    return img, (int(full[0]), int(full[1]))


def truncated_jpeg(data: bytes) -> bool:
    """A JPEG whose last scan (SOS marker 0xFFDA) is not followed by the end-of-image marker 0xFFD9. Entropy-coded
    data never holds 0xFFD9, and an EXIF thumbnail's own end marker comes before the main image's scan."""
    return data.rfind(b"\xff\xd9") < max(data.rfind(b"\xff\xda"), 2)


def image_header_size(data: bytes) -> tuple[int, int] | None:
    """(H, W) as stored in a PNG or JPEG header, without decoding; None for other formats or a header it can't parse."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        if data[12:16] != b"IHDR" or len(data) < 24:
            return None  # a broken header: left to the decoder, which reports the file unreadable
        return int.from_bytes(data[20:24], "big"), int.from_bytes(data[16:20], "big")
    if data[:2] != b"\xff\xd8":
        return None
    i = 2
    while i + 9 <= len(data):  # walk the marker segments up to the frame header (SOF0..SOF15 but DHT, JPG, DAC)
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
        elif marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
        elif 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return int.from_bytes(data[i + 5 : i + 7], "big"), int.from_bytes(data[i + 7 : i + 9], "big")
        else:
            i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    return None


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
    depth = raw.astype(np.float32)
    depth /= np.float32(scale)  # in place, in float32
    return depth


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
