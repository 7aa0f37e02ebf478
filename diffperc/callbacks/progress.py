"""What a run shows while it trains: a progress bar in optimisation steps, and samples/s (and MFU) in TensorBoard.

Recipes train for ``max_steps`` over one long epoch, so Lightning's bar ("Epoch 0/-2", batches of the epoch) says
nothing useful; ``StepProgressBar`` counts optimizer steps out of ``max_steps`` and starts at the resumed step.
``TrainingThroughput`` is Lightning's ``ThroughputMonitor`` for the training loop only, fed with the exact training
FLOPs of each batch (2 x the MACs ``MACsCounter`` counts), so a device with a known peak also logs MFU.
"""

import time
from collections.abc import Mapping
from typing import Any

import torch
from lightning.pytorch.callbacks import ThroughputMonitor, TQDMProgressBar
from lightning.pytorch.trainer.states import RunningStage


class StepProgressBar(TQDMProgressBar):
    """Lightning's tqdm progress bar (tqdm comes with Lightning), with the training bar in optimizer steps out of
    ``max_steps``: ``Training 120/800``, from the resumed step on, across epochs."""

    @property
    def total_train_batches(self) -> int | float:
        max_steps = self.trainer.max_steps
        return max_steps if max_steps and max_steps > 0 else super().total_train_batches

    def on_train_epoch_start(self, trainer, *args) -> None:
        super().on_train_epoch_start(trainer, *args)  # a fresh bar of total_train_batches, at 0
        self.train_progress_bar.set_description("Training")
        # Where the run is (its resumed step, or the steps of the epochs before); the rate counts from there.
        self.train_progress_bar.initial = trainer.global_step
        self._show_step(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self.train_progress_bar is not None and self._should_update(trainer.global_step, self.total_train_batches):
            self._show_step(trainer)
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))

    def _show_step(self, trainer) -> None:
        if not self.train_progress_bar.disable:
            self.train_progress_bar.n = trainer.global_step
            self.train_progress_bar.refresh()

    def get_metrics(self, trainer, pl_module) -> dict:
        # The training loss as last logged (every `log_every_n_steps`): reading it every step would cost a host sync.
        metrics = super().get_metrics(trainer, pl_module)
        loss = trainer.logged_metrics.get("train/loss")
        if loss is not None:
            metrics["train/loss"] = f"{float(loss):.4g}"
        return metrics


def batch_rows(batch: Any) -> int:
    """Samples in a batch: the rows of its first tensor, summed over the tasks of a mixed ``{task: batch}``."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    if isinstance(batch, Mapping):
        if batch and all(isinstance(v, Mapping) for v in batch.values()):
            return sum(batch_rows(v) for v in batch.values())
        return next((batch_rows(v) for v in batch.values() if isinstance(v, torch.Tensor)), 0)
    if isinstance(batch, (list, tuple)) and batch:
        return batch_rows(batch[0])
    return 0


class TrainingThroughput(ThroughputMonitor):
    """``train/samples_per_sec``, ``train/batches_per_sec`` and, where the device's peak is known (CUDA devices),
    ``train/device/mfu`` from the module's ``flops_per_batch`` (set by ``MACsCounter``), averaged over the last
    ``window_size`` batches and logged on the trainer's logging interval. Validation, test and predict are not
    measured (sampling costs differ from a training step)."""

    def __init__(self, window_size: int = 10):
        super().__init__(batch_size_fn=batch_rows, window_size=window_size)

    def on_validation_start(self, trainer, *_: Any) -> None:
        self._validation_start = time.perf_counter()

    def on_validation_batch_end(self, *_: Any, **__: Any) -> None:
        pass

    def on_validation_end(self, trainer, *_: Any) -> None:
        # Validation inside fit is not training time: move the training clock's origin forward by its duration.
        if not trainer.sanity_checking and RunningStage.TRAINING in self._t0s:
            self._t0s[RunningStage.TRAINING] += time.perf_counter() - self._validation_start

    def on_test_start(self, *_: Any) -> None:
        pass

    def on_test_batch_end(self, *_: Any, **__: Any) -> None:
        pass

    def on_predict_start(self, *_: Any) -> None:
        pass

    def on_predict_batch_end(self, *_: Any, **__: Any) -> None:
        pass
