"""Small shared helpers: atomic file writes (bytes, text, JSON) with the usual permissions, JSON Lines records, a
number check and in-memory PNG encoding."""

import contextlib
import errno
import functools
import json
import os
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object], clean_stale: bool = False) -> Path:
    """Calls ``write(f)`` on a temporary file in ``path``'s folder, fsyncs it and ``os.replace``s it onto ``path``, so
    a crash (SIGKILL, power loss, full disk) never leaves a half-written file: readers see the old file or the new.

    The file gets the permissions of a plain new file (``0666 & ~umask``: 0644 under the usual umask 022), not
    ``mkstemp``'s 0600. The folder is fsynced too, so the rename itself is durable. ``clean_stale`` also removes the
    temporary files of earlier writes to ``path`` that were killed before their rename; only for a file with a single
    writer (a checkpoint), since it would delete another process's write in progress.

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
            # mkstemp makes 0600; a plain open() gives 0666 & ~umask. Some mounts (SMB, vfat) refuse chmod: no matter.
            with contextlib.suppress(OSError):
                os.fchmod(f.fileno(), new_file_mode())
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
    fsync_path(path.parent)
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


def fsync_path(folder: Path) -> None:
    """fsyncs a file or folder (a folder: so a rename in it is durable); a no-op where the platform can't."""
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


def new_file_mode() -> int:
    """The permissions ``open()`` gives a new file: ``0o666 & ~umask``."""
    return 0o666 & ~_umask()


def _umask() -> int:
    """The process umask. Linux states it in ``/proc/self/status``; elsewhere it can only be read by setting it,
    which is done once per process under a lock (a file another thread creates meanwhile would get the wrong mode)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    return _umask_by_setting()


_UMASK_LOCK = threading.Lock()


@functools.cache
def _umask_by_setting() -> int:
    with _UMASK_LOCK:
        umask = os.umask(0o022)
        os.umask(umask)
    return umask


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Writes ``data`` to ``path`` atomically (see `atomic_write`)."""
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Writes ``text`` as UTF-8 to ``path`` atomically (see `atomic_write`)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj) -> Path:
    """Writes ``obj`` as indented, strict JSON atomically: a NaN or infinity raises ``ValueError`` (naming ``path``)
    instead of becoming a bare ``NaN`` that other JSON readers reject, and the file is left as it was."""
    try:
        text = json.dumps(obj, indent=2, sort_keys=True, allow_nan=False)
    except ValueError as err:
        raise ValueError(f"Refusing to write {path}: {err} (a number that was never measured)") from err
    return atomic_write_bytes(path, (text + "\n").encode())


def append_jsonl(path: str | Path, record: dict) -> None:
    """Appends ``record`` to a JSON Lines file as one line, in a single ``O_APPEND`` write + fsync, so concurrent
    writers never interleave a line and a crash leaves at most a torn last line (which `read_jsonl` skips)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = (json.dumps(record, sort_keys=True, default=str) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)  # the umask applies, as for open()
    try:
        if os.write(fd, data) != len(data):
            raise OSError(f"short write to {path}")
        os.fsync(fd)
    finally:
        os.close(fd)


def read_jsonl(path: str | Path) -> Iterator[dict]:
    """The JSON objects of a JSON Lines file, in order; lines that are not a JSON object (a torn last line) are
    skipped, and a missing file has none."""
    path = Path(path)
    if not path.is_file():
        return
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            record = json.loads(line)
            if isinstance(record, dict):
                yield record


def is_number(value: Any) -> bool:
    """An int or float, but not a bool (``True`` is an ``int`` to Python, never a measurement here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def png_bytes(array) -> bytes:
    """Encodes an image array (H, W) or (H, W, 3 BGR), uint8 or uint16, as PNG bytes for ``atomic_write_bytes``."""
    import cv2
    import numpy as np

    ok, buf = cv2.imencode(".png", np.ascontiguousarray(array))
    if not ok:
        raise RuntimeError(f"PNG encoding failed for an array of shape {getattr(array, 'shape', None)}")
    return buf.tobytes()
