"""Checkpoints that survive crashes and resume exactly: an atomic, weights-only ``CheckpointIO`` plugin and a callback
that carries the global RNG states through a checkpoint.

``diffperc fit ... --trainer.plugins diffperc.checkpoint_io.AtomicCheckpointIO
--trainer.callbacks+=diffperc.checkpoint_io.RNGStateCheckpoint``
"""

import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch import Callback

from diffperc.utils import atomic_write


class AtomicCheckpointIO(TorchCheckpointIO):
    """Saves through a temporary file in the target's folder, fsync and ``os.replace``; loads with ``weights_only``.

    A crash (SIGKILL, power loss, full disk) while saving leaves the previous ``last.ckpt`` intact: the new file only
    replaces it once it is complete on disk, and a full disk stops training with an ``OSError`` naming the file.
    Lightning's own writer goes through fsspec's temporary file in ``/tmp``, which is copied (not renamed) onto the
    target when ``/tmp`` is another file system, as on most clusters.
    Loading never unpickles arbitrary objects, so a checkpoint from elsewhere cannot run code. Remote paths
    (``s3://...``) go through Lightning's fsspec writer, whose object-store uploads are atomic already.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO.save_checkpoint takes no `storage_options`")
        atomic_write(path, lambda f: torch.save(checkpoint, f), clean_stale=True)

    def load_checkpoint(self, path, map_location: Any = lambda storage, loc: storage, weights_only: bool | None = None):
        if weights_only is False:
            raise ValueError(f"Refusing to load {path} with `weights_only=False` (`--weights_only`): unpickling "
                             "arbitrary objects can run code; diffperc checkpoints load with weights_only=True")
        check_ckpt_path(path)
        try:
            if "://" in str(path):
                return super().load_checkpoint(path, map_location=map_location, weights_only=True)
            return torch.load(path, map_location=map_location, weights_only=True)
        except LOAD_ERRORS as err:
            raise load_error(path, err) from err


# torch.load fails with UnpicklingError (a refused global, or garbage), RuntimeError (a truncated zip), EOFError (an
# empty file) and KeyError / ValueError on other garbage: any of them means the file cannot be used.
LOAD_ERRORS = (Exception,)
_SPECIAL_CKPT_PATHS = ("last", "best", "hpc")  # resolved by Lightning to a file of the run


def check_ckpt_path(ckpt_path) -> None:
    """Raises ``FileNotFoundError`` naming ``--ckpt_path`` when it is a path (not ``last``/``best``/``hpc`` or a URL)
    that does not exist; call it before anything is written. A folder (a sharded checkpoint) is accepted."""
    if ckpt_path is None or str(ckpt_path) in _SPECIAL_CKPT_PATHS or "://" in str(ckpt_path):
        return
    if not Path(ckpt_path).exists():
        raise FileNotFoundError(f"Checkpoint file not found: {ckpt_path} (`--ckpt_path`)")


def load_error(path, err: BaseException) -> ValueError:
    """The error to raise when ``torch.load(path, weights_only=True)`` failed with ``err``: names the file and flag."""
    text = str(err)
    if isinstance(err, pickle.UnpicklingError) and "Weights only load failed" in text:
        # Quote only the refused global: torch's advice to retry with weights_only=False is exactly what not to do.
        detail = next((line.strip() for line in text.splitlines() if "Unsupported global" in line), "")
        detail = detail.split(" was not an allowed global")[0].removeprefix("WeightsUnpickler error: ")
        return ValueError(f"Refusing to load {path} (`--ckpt_path`): it holds Python objects other than tensors and "
                          f"plain containers, and unpickling them could run code ({detail or 'not weights only'})")
    return ValueError(f"Cannot read checkpoint {path} (`--ckpt_path`): truncated or not a torch checkpoint "
                      f"({type(err).__name__}: {text.splitlines()[0] if text else ''})")


class RNGStateCheckpoint(Callback):
    """Saves the global RNG states (torch CPU and CUDA, NumPy, Python) in checkpoints and restores them on resume.

    Lightning does not checkpoint RNG states, so timesteps and noise drawn from torch's global generator would differ
    after ``--ckpt_path last``. The states are taken when the checkpoint is written (after the step's draws) and
    put back just before the first training batch of the resumed run, after anything that draws while setting up.
    Under DDP every rank was seeded alike and draws alike, so rank 0's states, the ones saved, hold for all ranks.
    """

    def __init__(self):
        self._pending: dict | None = None

    def state_dict(self) -> dict[str, Any]:
        state = {
            "torch": torch.get_rng_state(),
            "numpy": _numpy_state_to_plain(np.random.get_state()),
            "python": _python_state_to_plain(random.getstate()),
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if self._pending is None:
            return
        state, self._pending = self._pending, None
        torch.set_rng_state(state["torch"])
        np.random.set_state(_numpy_state_from_plain(state["numpy"]))
        random.setstate(_python_state_from_plain(state["python"]))
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


# The states are stored as tensors, ints and strings only, so the checkpoint loads with weights_only=True.
def _numpy_state_to_plain(state: tuple) -> dict:
    kind, keys, pos, has_gauss, gauss = state
    return {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "gauss": float(gauss)}


def _numpy_state_from_plain(state: dict) -> tuple:
    keys = state["keys"].numpy().astype(np.uint32)
    return state["kind"], keys, state["pos"], state["has_gauss"], state["gauss"]


def _python_state_to_plain(state: tuple) -> dict:
    version, internal, gauss = state
    return {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss": gauss}


def _python_state_from_plain(state: dict) -> tuple:
    return state["version"], tuple(int(v) for v in state["internal"].tolist()), state["gauss"]
