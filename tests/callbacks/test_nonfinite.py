"""NonFiniteGuard: one device read per optimizer step, and the bad loss or gradient named when it trips (tiny DiT)."""

import pytest
import torch
from lightning.pytorch import Callback

from diffperc.callbacks import NonFiniteGuard
from diffperc.data import PerceptionDataModule, ProceduralDepth
from diffperc.lit import PerceptionFinetuning
from diffperc.profiling import StepSyncs

from helpers import quiet_trainer, tiny_finetuning


class _Poisoned(PerceptionFinetuning):
    """Batch ``bad_batch`` gets a NaN loss (``what="loss"``) or an infinite gradient under a finite loss."""

    def __init__(self, *args, bad_batch: int, what: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.bad_batch, self.what, self._poison = bad_batch, what, False
        # An overflow in backward: the gradient of one weight turns infinite while the loss stays finite.
        self.net.x_embedder.proj.weight.register_hook(lambda g: torch.full_like(g, float("inf")) if self._poison else g)

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self._poison = self.what == "grad" and batch_idx == self.bad_batch
        return loss * float("nan") if self.what == "loss" and batch_idx == self.bad_batch else loss


class _Weights(Callback):
    def __init__(self):
        self.after_step: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after_step.append(torch.cat([p.detach().flatten() for p in pl_module.net.parameters()]))


def _data() -> PerceptionDataModule:
    return PerceptionDataModule(train=ProceduralDepth("train", length=16, resolution=16), batch_size=2)


def test_guard_reads_the_device_once_per_optimizer_step(tmp_path):
    # Two micro-batches per optimizer step: both losses and the gradients are checked in the step's one read.
    counter, guard = StepSyncs(), NonFiniteGuard()
    trainer = quiet_trainer(
        max_steps=2,
        accumulate_grad_batches=2,
        limit_val_batches=0,
        log_every_n_steps=1000,
        default_root_dir=tmp_path,
        callbacks=[counter, guard],
    )
    trainer.fit(tiny_finetuning(), datamodule=_data())
    guard_reads = [sum(n for site, n in s.by_site.items() if "nonfinite.py" in site) for s in counter.per_step]
    assert guard_reads == [0, 1, 0, 1]


def test_guard_names_the_bad_micro_batch_before_any_update(tmp_path):
    module, weights = tiny_finetuning(cls=_Poisoned, bad_batch=2, what="loss"), _Weights()
    trainer = quiet_trainer(
        max_steps=4,
        accumulate_grad_batches=2,
        limit_val_batches=0,
        default_root_dir=tmp_path,
        callbacks=[NonFiniteGuard(), weights],
    )
    # Optimizer step 1 covers batches 2 and 3; the NaN was batch 2's (the samples are those of batch 2).
    with pytest.raises(
        FloatingPointError,
        match=r"^non-finite loss nan at step 1 \(batch index 2, epoch 0\): samples "
        r"\['train_\d+', 'train_\d+'\]$",
    ):
        trainer.fit(module, datamodule=_data())
    assert len(weights.after_step) == 3  # batches 0-2 ended; batch 3's optimizer step raised
    now = torch.cat([p.detach().flatten() for p in module.net.parameters()])
    assert torch.equal(now, weights.after_step[1]) and now.isfinite().all()  # step 1 changed nothing
    assert not torch.equal(now, weights.after_step[0])  # step 0 did update


def test_guard_skips_an_infinite_gradient_under_a_finite_loss(tmp_path):
    module, weights = tiny_finetuning(cls=_Poisoned, bad_batch=1, what="grad"), _Weights()
    guard = NonFiniteGuard("skip")
    trainer = quiet_trainer(max_steps=3, limit_val_batches=0, default_root_dir=tmp_path, callbacks=[guard, weights])
    with pytest.warns(
        UserWarning,
        match=r"^non-finite gradients in \['net\.x_embedder\.proj\.weight'\] at step 1 "
        r"\(batch index 1, epoch 0\); skipped the update \(1 skipped so far\)$",
    ):
        trainer.fit(module, datamodule=_data())
    assert guard.skipped == 1 and trainer.global_step == 3
    assert torch.equal(weights.after_step[1], weights.after_step[0])  # the skipped step left every weight alone
    assert not torch.equal(weights.after_step[2], weights.after_step[1])  # and training went on
    assert {int(s["step"]) for s in trainer.optimizers[0].state.values()} == {2}  # AdamW saw 2 of the 3 steps


class _EmptyParameter(PerceptionFinetuning):
    """A parameter without elements that gets a gradient, as the local shard of a small FSDP2 parameter can be."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.empty = torch.nn.Parameter(torch.zeros(0))

    def training_step(self, batch, batch_idx):
        return super().training_step(batch, batch_idx) + self.empty.sum()


def test_guard_checks_gradients_next_to_an_empty_one(tmp_path):
    # max |g| of an empty tensor has no value: the empty gradient is left out, the others are still checked.
    module = tiny_finetuning(cls=_EmptyParameter)
    trainer = quiet_trainer(max_steps=1, limit_val_batches=0, default_root_dir=tmp_path, callbacks=[NonFiniteGuard()])
    trainer.fit(module, datamodule=_data())
    assert trainer.global_step == 1 and module.empty.grad.shape == (0,)  # the step ran with the empty gradient
