"""Small shared helpers: atomic file writes and in-memory PNG encoding."""

import json
import os
import tempfile
from pathlib import Path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Writes ``data`` to ``path`` through a temporary file in the same folder and ``os.replace``, so a crash
    never leaves a half-written file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_json(path: str | Path, obj) -> Path:
    """Writes ``obj`` as indented JSON atomically."""
    return atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def png_bytes(array) -> bytes:
    """Encodes an image array (H, W) or (H, W, 3 BGR), uint8 or uint16, as PNG bytes for ``atomic_write_bytes``."""
    import cv2
    import numpy as np

    ok, buf = cv2.imencode(".png", np.ascontiguousarray(array))
    if not ok:
        raise RuntimeError(f"PNG encoding failed for an array of shape {getattr(array, 'shape', None)}")
    return buf.tobytes()
