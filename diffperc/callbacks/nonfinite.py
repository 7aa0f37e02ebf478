"""Guards training against NaN / inf: stop with an error naming the step and batch, or skip the batch and count it.

``diffperc fit ... --trainer.callbacks+=diffperc.callbacks.nonfinite.NonFiniteGuard --trainer.callbacks.mode skip``
"""

import math

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn

MODES = ("raise", "skip")


class NonFiniteGuard(Callback):
    """Checks every loss and gradient before the optimizer step, in one read from the device; never lets NaN reach
    weights.

    ``raise`` stops training with a ``FloatingPointError`` naming the step and batch index (before any update, so the
    last checkpoint and the weights in memory are clean). ``skip`` drops the update of that step instead: all
    gradients are set to None, which every torch optimizer treats as "leave this parameter alone" (no moment or
    weight-decay update either), the count is logged as ``train/skipped_batches`` and training stops anyway after
    ``max_consecutive`` skips in a row. The decision is reduced over all processes, so DDP / FSDP ranks agree.

    The check costs one host sync per optimizer step: the losses since the last step (all micro-batches of gradient
    accumulation) and a fused max-abs pass over the gradients are counted on the device, summed over processes and
    read once. Only a bad step reads more, to name the loss, batch and samples (or the gradients) at fault.

    Args:
        mode: ``raise`` or ``skip``.
        max_consecutive: In ``skip`` mode, raise after this many consecutive skipped steps (the run has diverged).
        check_grads: Also check gradients (an overflow in backward can make them non-finite under a finite loss).
    """

    def __init__(self, mode: str = "raise", max_consecutive: int = 10, check_grads: bool = True):
        if mode not in MODES:
            raise ValueError(f"NonFiniteGuard mode (`--model.nonfinite`, or `--trainer.callbacks.mode` after "
                             f"`--trainer.callbacks+=NonFiniteGuard`) must be one of {MODES}, got {mode!r}")
        if max_consecutive < 1:
            raise ValueError(f"NonFiniteGuard `--trainer.callbacks.max_consecutive` must be >= 1, got "
                             f"{max_consecutive}")
        self.mode, self.max_consecutive, self.check_grads = mode, max_consecutive, check_grads
        self.skipped = 0
        self._consecutive = 0
        self._batch_idx = -1
        self._names: list[str] = []
        # (batch index, sample names, detached loss) of every backward since the last optimizer step.
        self._losses: list[tuple[int, list[str], torch.Tensor]] = []

    # ----------------------------------------------------------------------- hooks
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx: int) -> None:
        self._batch_idx = batch_idx
        self._names = _sample_names(batch)

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: torch.Tensor) -> None:
        # Only kept here: the optimizer step checks it together with the gradients, in one read from the device.
        self._losses.append((self._batch_idx, self._names, loss.detach()))

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer) -> None:
        losses, self._losses = self._losses, []
        # 1. Count the non-finite losses and gradient tensors on the device, then over all processes.
        flags = [torch.isfinite(loss).all() for _, _, loss in losses]
        grads = [_local(p.grad) for p in pl_module.parameters() if p.grad is not None] if self.check_grads else []
        grads = [g for g in grads if g.numel()]  # a sharded parameter's local piece may be empty
        if grads:
            # max |g| per tensor is NaN or inf exactly when the tensor holds one: one fused pass over the gradients.
            flags.append(torch.stack([n.float() for n in torch._foreach_norm(grads, ord=math.inf)]).isfinite().all())
        if not flags:
            return
        bad = trainer.strategy.reduce(torch.stack(flags).logical_not().sum().float(), reduce_op="sum")
        # 2. The one host sync of the step: every process reads the same total, so all of them agree.
        if not bool(bad):
            self._consecutive = 0
            return
        where, samples = self._what_went_wrong(trainer, pl_module, losses)  # host reads only on this rare path
        if self.mode == "raise":
            raise FloatingPointError(where + samples)
        # Skip: grads of None make the optimizer leave every parameter (and its state) untouched this step.
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None
        self.skipped += 1
        self._consecutive += 1
        rank_zero_warn(f"{where}; skipped the update ({self.skipped} skipped so far)")
        if self._consecutive >= self.max_consecutive:
            raise FloatingPointError(self._where(
                trainer, f"{self._consecutive} consecutive non-finite steps (`max_consecutive`); the run has diverged"))

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        if self.mode == "skip":
            pl_module.log("train/skipped_batches", float(self.skipped), on_step=True, on_epoch=False, sync_dist=False)

    def _what_went_wrong(self, trainer: Trainer, pl_module: LightningModule, losses: list) -> tuple[str, str]:
        """What a bad step saw, where, and the samples of that batch: the first non-finite loss of this process,
        else its non-finite gradients, else another process's."""
        for batch_idx, names, loss in losses:
            if not bool(torch.isfinite(loss).all()):
                return self._where(trainer, f"non-finite loss {float(loss.float().sum())}", batch_idx), _samples(names)
        bad = [name for name, p in pl_module.named_parameters() if p.grad is not None and not _finite(p.grad)]
        what = f"non-finite gradients in {bad[:3]}" if bad else "a non-finite loss or gradients in another process"
        return self._where(trainer, what), _samples(self._names)

    def _where(self, trainer: Trainer, what: str, batch_idx: int | None = None) -> str:
        batch_idx = self._batch_idx if batch_idx is None else batch_idx
        return f"{what} at step {trainer.global_step} (batch index {batch_idx}, epoch {trainer.current_epoch})"

    # ----------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return {"skipped": self.skipped}

    def load_state_dict(self, state_dict: dict) -> None:
        self.skipped = int(state_dict.get("skipped", 0))


def _sample_names(batch) -> list[str]:
    """The ``name`` of every sample in a batch (the file it was read from), mixed task batches included."""
    if not isinstance(batch, dict):
        return []
    if isinstance(batch.get("name"), (list, tuple)):
        return [str(n) for n in batch["name"]]
    return [n for sub in batch.values() if isinstance(sub, dict) for n in _sample_names(sub)]


def _samples(names: list[str]) -> str:
    """The batch's sample names (the files they were read from), for the error that stops training."""
    return f": samples {names[:8]}{' ...' if len(names) > 8 else ''}" if names else ""


def _local(t: torch.Tensor) -> torch.Tensor:
    local = getattr(t, "to_local", None)  # FSDP2 / tensor-parallel gradients are DTensors: check this shard
    return local() if local else t


def _finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(_local(t)).all())
