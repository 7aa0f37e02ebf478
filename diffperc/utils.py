"""Small shared helpers: atomic file writes and in-memory PNG encoding."""

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object], clean_stale: bool = False) -> Path:
    """Calls ``write(f)`` on a temporary file in ``path``'s folder, fsyncs it and ``os.replace``s it onto ``path``, so
    a crash (SIGKILL, power loss, full disk) never leaves a half-written file: readers see the old file or the new.

    The folder is fsynced too, so the rename itself is durable. ``clean_stale`` also removes the temporary files of
    earlier writes to ``path`` that were killed before their rename; only for a file with a single writer (a
    checkpoint), since it would delete another process's write in progress.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    if clean_stale:
        for stale in path.parent.glob(f".{path.name}.*.tmp"):
            stale.unlink(missing_ok=True)
    return path


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some platforms and file systems cannot open folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Writes ``data`` to ``path`` atomically (see `atomic_write`)."""
    return atomic_write(path, lambda f: f.write(data))


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
