"""Resuming a killed sweep point: its fit continues from ``last.ckpt`` (``--ckpt_path last``), and what the killed
attempt logged to TensorBoard after that checkpoint is cut, so no step shows twice.

trim_event_files("runs/sweeps/tiny/model_size/<point id>", step=40)
"""

import os
import struct
from pathlib import Path

from diffperc.scaling.spec import Point
from diffperc.utils import atomic_write_bytes


def trim_event_files(run_dir: str | os.PathLike, step: int) -> list[Path]:
    """Cuts the TensorBoard event files in ``run_dir`` back to what was logged before ``step``; returns the files cut.

    A fit resumed from a checkpoint of global step ``step`` logs steps ``step, step + 1, ...`` again (Lightning logs
    optimizer step ``k`` as ``k - 1``), so what a killed attempt logged from there on would show twice. Kept records
    are copied byte for byte; a record torn by the kill is dropped. TFRecord framing: length (u64), its CRC (u32),
    the ``Event`` protobuf, its CRC (u32).
    """
    try:
        from tensorboard.compat.proto.event_pb2 import Event
    except ImportError:  # no TensorBoard, so no event files to cut
        return []
    cut = []
    for path in sorted(Path(run_dir).glob("events.out.tfevents.*")):
        data, kept, pos = path.read_bytes(), [], 0
        while pos + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            end = pos + 12 + length + 4
            if end > len(data):
                break
            try:
                event = Event.FromString(data[pos + 12:end - 4])
            except Exception:  # protobuf's DecodeError: garbage from a torn write
                break
            if event.step < step:
                kept.append(data[pos:end])
            pos = end
        trimmed = b"".join(kept)
        if trimmed != data:
            atomic_write_bytes(path, trimmed)
            cut.append(path)
    return cut



def prepare_resume(point: Point, log: Path, echo) -> None:
    """A point whose run directory holds a last.ckpt (an attempt was killed, or failed after saving) resumes from it
    (``--ckpt_path last``): cut that attempt's TensorBoard events back to the checkpoint's step first."""
    last = point.run_dir / "checkpoints" / "last.ckpt"
    if not last.is_file():
        return
    import torch

    try:
        step = int(torch.load(last, map_location="cpu", weights_only=True, mmap=True)["global_step"])
    except Exception:  # unreadable: the fit itself reports it, naming the file
        return
    cut = trim_event_files(point.run_dir, step)
    message = f"resuming from {last} (step {step})" + (f"; cut {len(cut)} event file(s) back to it" if cut else "")
    echo(f"[{point.id}] {message}")
    with open(log, "a") as f:
        f.write(f"# {message}\n")

