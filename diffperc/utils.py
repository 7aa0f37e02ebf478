"""Small shared helpers: atomic file writes and in-memory PNG encoding."""

import errno
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

    Raises:
        OSError: a full disk, quota, read-only or I/O error, naming ``path`` (the errno is kept); ``path`` is left as
            it was and the temporary file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        disk = _disk_error(err)
        if disk is None:
            raise
        # torch.save reports a failed write as a RuntimeError from its zip writer, naming no file.
        raise OSError(disk.errno, f"{disk.strerror or disk} while writing {path}: any previous {path.name} is kept, "
                                  "the partial file was removed") from err
    _fsync_dir(path.parent)
    if clean_stale:
        for stale in path.parent.glob(f".{path.name}.*.tmp"):
            stale.unlink(missing_ok=True)
    return path


# A full disk or quota, a read-only file system, a file too large or an I/O error: the disk's fault, not the caller's.
DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EIO}


def _disk_error(err: BaseException) -> OSError | None:
    """The disk-side ``OSError`` behind ``err`` (itself, or what it was raised from or during), if any."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in DISK_ERRNOS:
            return err
        err = err.__cause__ or err.__context__
    return None


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
    """Writes ``obj`` as indented, strict JSON atomically: a NaN or infinity raises ``ValueError`` (naming ``path``)
    instead of becoming a bare ``NaN`` that other JSON readers reject, and the file is left as it was."""
    try:
        text = json.dumps(obj, indent=2, sort_keys=True, allow_nan=False)
    except ValueError as err:
        raise ValueError(f"Refusing to write {path}: {err} (a number that was never measured)") from err
    return atomic_write_bytes(path, (text + "\n").encode())


def png_bytes(array) -> bytes:
    """Encodes an image array (H, W) or (H, W, 3 BGR), uint8 or uint16, as PNG bytes for ``atomic_write_bytes``."""
    import cv2
    import numpy as np

    ok, buf = cv2.imencode(".png", np.ascontiguousarray(array))
    if not ok:
        raise RuntimeError(f"PNG encoding failed for an array of shape {getattr(array, 'shape', None)}")
    return buf.tobytes()
