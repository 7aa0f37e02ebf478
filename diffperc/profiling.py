"""Counts device-to-host syncs: the points where the host waits for the accelerator to hand back a value.

``with SyncCounter() as syncs: step()`` then ``syncs.total``, ``syncs.by_op`` and ``syncs.by_site`` (where in the code);
``Trainer(callbacks=[StepSyncs(), ...])`` counts every training step. It watches the ATen ops under a
``TorchDispatchMode``, so it works on CPU too: there it reports the syncs the same code would make on a GPU.
Benchmark: ``python benchmarks/bench_syncs.py``.
"""

import traceback
from collections import Counter
from pathlib import Path

import torch
from lightning.pytorch import Callback
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["SYNC_OPS", "StepSyncs", "SyncCounter"]

_aten = torch.ops.aten
# Ops that hand a tensor's value to the host (a Python number or bool) ...
_SCALAR_READS = ("_local_scalar_dense", "item", "is_nonzero", "equal", "allclose")
# ... or whose output shape depends on the values, so the host must read them to allocate the output.
_DATA_DEPENDENT_SHAPES = (
    "nonzero",
    "masked_select",
    "bincount",
    "_unique",
    "_unique2",
    "unique_dim",
    "unique_consecutive",
    "argwhere",
)
SYNC_OPS = frozenset(getattr(_aten, name) for name in _SCALAR_READS + _DATA_DEPENDENT_SHAPES if hasattr(_aten, name))
"""Op packets that always sync. Besides these, ``SyncCounter`` counts boolean-mask indexing (``x[mask]``,
``x[mask] = v``), ``repeat_interleave`` without ``output_size``, copies from the device to the host, and the
``Tensor.tolist()`` / ``Tensor.numpy()`` calls that dispatch no op on CPU."""

_MASK_INDEXING = frozenset({_aten.index, _aten.index_put, _aten.index_put_, _aten._index_put_impl_})
_COPIES = frozenset({_aten._to_copy, _aten.copy_, _aten._copy_from})
_PYTHON_READS = ("tolist", "numpy")
_OWN_FILES = (str(Path(torch.__file__).parent) + "/", __file__)
_OPTIM = str(Path(torch.optim.__file__).parent) + "/"


def _has_mask(indices) -> bool:
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ())


class SyncCounter(TorchDispatchMode):
    """A dispatch mode that counts the device-to-host syncs of the code run under it, by op and by call site.

    A read counts when its tensor lives on the watched ``device`` type: on a CPU-only run every read counts (it
    would be a sync with the tensors on a GPU), on a GPU run only reads of GPU tensors do. The mode can be entered
    in one Lightning hook and left in another (``counter.__enter__()`` ... ``counter.__exit__(None, None, None)``).

    Args:
        device: Device type whose reads count; None = ``"cuda"`` when CUDA is available, else ``"cpu"``.
    """

    def __init__(self, device: str | torch.device | None = None):
        super().__init__()
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device).type
        self.by_op: Counter[str] = Counter()
        self.by_site: Counter[str] = Counter()
        self._quiet = 0  # > 0 inside a patched Python read: its inner ops are part of that one sync
        self._saved: dict[str, object] = {}

    @property
    def total(self) -> int:
        return sum(self.by_op.values())

    def reset(self) -> None:
        self.by_op.clear()
        self.by_site.clear()

    # ------------------------------------------------------------------ counting
    def _watched(self, *tensors) -> bool:
        return any(isinstance(t, torch.Tensor) and t.device.type == self.device for t in tensors)

    def _count(self, name: str) -> None:
        stack = traceback.extract_stack()[:-2]
        # The innermost frame outside torch and this file is the line that asked for the value.
        caller = next(f for f in reversed(stack) if _OPTIM in f.filename or not f.filename.startswith(_OWN_FILES))
        if self.device == "cpu" and _OPTIM in caller.filename:
            # torch.optim keeps its step counters on the host unless `capturable` or `fused`: reading them is no
            # sync on a GPU, so it is left out on a CPU run too.
            return
        self.by_op[name] += 1
        self.by_site[f"{name} at {_short(caller.filename)}:{caller.lineno} ({caller.name})"] += 1

    def _syncs(self, func, args, kwargs) -> bool:
        packet = func.overloadpacket
        if packet in SYNC_OPS:
            return self._watched(*args)
        if packet in _MASK_INDEXING:  # x[mask] and x[mask] = v run nonzero(mask) first
            return _has_mask(args[1] if len(args) > 1 else kwargs.get("indices")) and self._watched(args[0])
        if packet is _aten.repeat_interleave:  # tensor repeats: the output length is their sum
            tensor_repeats = func._overloadname in ("Tensor", "self_Tensor")
            return tensor_repeats and kwargs.get("output_size") is None and self._watched(*args[:2])
        if packet in _COPIES and self.device != "cpu" and not kwargs.get("non_blocking", False):
            # A blocking copy from the watched device to the host (`.cpu()`, `.to("cpu")`, `cpu_tensor.copy_(x)`).
            if packet is _aten._to_copy:
                target = kwargs.get("device")
                return self._watched(args[0]) and target is not None and torch.device(target).type == "cpu"
            dst, src = (args[1], args[0]) if packet is _aten._copy_from else (args[0], args[1])
            return dst.device.type == "cpu" and self._watched(src)
        return False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self._quiet and self._syncs(func, args, kwargs):
            self._count(func.overloadpacket.__name__)
        return func(*args, **kwargs)

    # ----------------------------------------------- reads that dispatch no op on CPU
    def _patched(self, name: str):
        original = getattr(torch.Tensor, name)
        counter = self

        def read(tensor: torch.Tensor, *args, **kwargs):
            if counter._quiet or not counter._watched(tensor):
                return original(tensor, *args, **kwargs)
            counter._count(name)
            counter._quiet += 1
            try:
                return original(tensor, *args, **kwargs)
            finally:
                counter._quiet -= 1

        return read

    def __enter__(self):
        for name in _PYTHON_READS:
            self._saved[name] = torch.Tensor.__dict__.get(name)
            setattr(torch.Tensor, name, self._patched(name))
        return super().__enter__()

    def __exit__(self, exc_type, exc, tb):
        try:
            return super().__exit__(exc_type, exc, tb)
        finally:
            for name in _PYTHON_READS:
                saved = self._saved.pop(name, None)
                if saved is None:
                    delattr(torch.Tensor, name)  # the method was inherited from torch._C.TensorBase
                else:
                    setattr(torch.Tensor, name, saved)

    def report(self, limit: int = 10) -> str:
        """``total`` and the ``limit`` most frequent call sites, one per line."""
        lines = [f"{self.total} syncs"]
        lines += [f"  {n} x {site}" for site, n in self.by_site.most_common(limit)]
        return "\n".join(lines)


class StepSyncs(Callback):
    """Counts the syncs of every training step, from one ``on_train_batch_start`` to the next: the other callbacks'
    hooks, forward, backward, the optimizer step, logging and checkpointing. Put it first in the trainer's callbacks.

    ``per_step[i]`` is the ``SyncCounter`` of the i-th step of the run.
    """

    def __init__(self):
        self.per_step: list[SyncCounter] = []
        self._current: SyncCounter | None = None

    def _close(self) -> None:
        if self._current is not None:
            self._current.__exit__(None, None, None)
            self.per_step.append(self._current)
            self._current = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self._close()
        self._current = SyncCounter(device=pl_module.device)
        self._current.__enter__()

    def on_train_end(self, trainer, pl_module) -> None:
        self._close()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._close()


def _short(filename: str) -> str:
    """``.../site-packages/lightning/pytorch/loops/x.py`` -> ``lightning/pytorch/loops/x.py``."""
    parts = Path(filename).parts
    for anchor in ("diffperc", "lightning", "benchmarks", "tests", "diffusers", "torchmetrics"):
        if anchor in parts:
            return "/".join(parts[len(parts) - 1 - parts[::-1].index(anchor) :])
    return Path(filename).name
