"""Guards training against NaN / inf: stop with an error naming the step and batch, or skip the batch and count it.

``diffperc fit ... --trainer.callbacks+=diffperc.callbacks.nonfinite.NonFiniteGuard --trainer.callbacks.mode skip``
"""

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn

MODES = ("raise", "skip")


class NonFiniteGuard(Callback):
    """Checks every loss before backward and every gradient before the optimizer step; never lets NaN reach weights.

    ``raise`` stops training with a ``FloatingPointError`` naming the step and batch index (before any update, so the
    last checkpoint and the weights in memory are clean). ``skip`` drops the update of that step instead: all
    gradients are set to None, which every torch optimizer treats as "leave this parameter alone" (no moment or
    weight-decay update either), the count is logged as ``train/skipped_batches`` and training stops anyway after
    ``max_consecutive`` skips in a row. The decision is reduced over all processes, so DDP / FSDP ranks agree.

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
        self._bad_loss: str | None = None  # a non-finite loss seen since the last optimizer step

    # ----------------------------------------------------------------------- hooks
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx: int) -> None:
        self._batch_idx = batch_idx
        self._names = _sample_names(batch)

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: torch.Tensor) -> None:
        finite = bool(torch.isfinite(loss.detach()).all())
        if trainer.strategy.reduce_boolean_decision(finite, all=True):
            return
        what = f"non-finite loss {float(loss.detach().float().sum())}" if not finite else "non-finite loss elsewhere"
        if self.mode == "raise":
            raise FloatingPointError(self._where(trainer, what) + self._samples())
        self._bad_loss = what

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer) -> None:
        reason = None
        if self._bad_loss is not None:
            reason = self._bad_loss
        elif self.check_grads:
            bad = [name for name, p in pl_module.named_parameters() if p.grad is not None and not _finite(p.grad)]
            if not trainer.strategy.reduce_boolean_decision(not bad, all=True):
                reason = f"non-finite gradients in {bad[:3] or 'another process'}"
        self._bad_loss = None
        if reason is None:
            self._consecutive = 0
            return
        if self.mode == "raise":
            raise FloatingPointError(self._where(trainer, reason) + self._samples())
        # Skip: grads of None make the optimizer leave every parameter (and its state) untouched this step.
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None
        self.skipped += 1
        self._consecutive += 1
        rank_zero_warn(f"{self._where(trainer, reason)}; skipped the update ({self.skipped} skipped so far)")
        if self._consecutive >= self.max_consecutive:
            raise FloatingPointError(self._where(
                trainer, f"{self._consecutive} consecutive non-finite steps (`max_consecutive`); the run has diverged"))

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        if self.mode == "skip":
            pl_module.log("train/skipped_batches", float(self.skipped), on_step=True, on_epoch=False, sync_dist=False)

    def _where(self, trainer: Trainer, what: str) -> str:
        return f"{what} at step {trainer.global_step} (batch index {self._batch_idx}, epoch {trainer.current_epoch})"

    def _samples(self) -> str:
        """The batch's sample names (the files they were read from), for the error that stops training."""
        names = getattr(self, "_names", [])
        return f": samples {names[:8]}{' ...' if len(names) > 8 else ''}" if names else ""

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


def _finite(t: torch.Tensor) -> bool:
    local = getattr(t, "to_local", None)  # FSDP2 / tensor-parallel gradients are DTensors: check this shard
    return bool(torch.isfinite(local() if local else t).all())
