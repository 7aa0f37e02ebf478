"""What a run shows: TensorBoard holds training throughput and the test scores at the trained step, the progress bar
counts optimizer steps of ``max_steps``."""

import glob

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from diffperc.callbacks.progress import StepProgressBar, batch_rows
from diffperc.compute import count_train_macs

from helpers import quiet_trainer, tiny_finetuning

STEPS = 12  # more than the throughput window (10 batches)


def _scalars(folder) -> dict[str, list[tuple[int, float]]]:
    out = {}
    for path in sorted(glob.glob(f"{folder}/**/events.out.tfevents.*", recursive=True)):
        events = EventAccumulator(path)
        events.Reload()
        for tag in events.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in events.Scalars(tag))
    return out


def test_batch_rows_counts_single_and_mixed_batches():
    assert batch_rows({"image": torch.zeros(5, 3, 4, 4), "depth": torch.zeros(5, 1, 4, 4)}) == 5
    assert batch_rows({"depth": {"image": torch.zeros(2, 3, 4, 4)}, "flow": {"image1": torch.zeros(3, 3, 4, 4)}}) == 5


def test_fit_logs_throughput_and_test_logs_at_the_trained_step(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger

    from diffperc.data import PerceptionDataModule, ProceduralDepth

    dm = PerceptionDataModule(train=ProceduralDepth("train", 64, 16), test=ProceduralDepth("test", 8, 16), batch_size=4)
    logger = TensorBoardLogger(tmp_path, name="run", version="", default_hp_metric=False)
    trainer = quiet_trainer(max_steps=STEPS, logger=logger, log_every_n_steps=1, limit_val_batches=0,
                            enable_progress_bar=True, default_root_dir=tmp_path)
    module = tiny_finetuning()
    trainer.fit(module, datamodule=dm)
    bars = [cb for cb in trainer.callbacks if isinstance(cb, StepProgressBar)]
    assert len(bars) == 1 and bars[0].total_train_batches == STEPS  # one bar, in steps of max_steps
    shown = bars[0].train_progress_bar  # 64 samples in batches of 4: the 12 steps span one epoch of 16 batches
    assert (shown.desc, shown.n, shown.total) == ("Training: ", STEPS, STEPS)  # tqdm shows "Training: 12/12"
    ckpt = tmp_path / "last.ckpt"
    trainer.save_checkpoint(ckpt)

    tester = quiet_trainer(logger=TensorBoardLogger(tmp_path, name="run", version="", default_hp_metric=False))
    tester.test(tiny_finetuning(), datamodule=dm, ckpt_path=ckpt)
    scalars = _scalars(tmp_path / "run")
    # Samples per second over the window of the last batches: 4 rows per batch, all measured steps positive.
    rates = scalars["train/device/samples_per_sec"]
    assert rates and all(rate > 0 for _, rate in rates)
    batches = dict(scalars["train/device/batches_per_sec"])
    assert all(abs(rate / 4 - batches[step]) < 1e-3 * rate for step, rate in rates)
    # FLOPs per second = 2 x the training MACs of a batch (forward and backward) x batches per second.
    batch = next(iter(dm.train_dataloader()))
    per_batch = 2 * count_train_macs(module.net, *module.net_inputs(batch))
    for step, flops in scalars["train/device/flops_per_sec"]:
        assert abs(flops - per_batch * batches[step]) <= 1e-3 * flops
    # The gradient norm on every logged step (log_every_n_steps 1), positive and finite.
    norms = scalars["train/grad_norm"]
    assert [step for step, _ in norms] == list(range(STEPS)) and all(0 < n < float("inf") for _, n in norms)
    # Test scores land at the step the weights were trained to, not at 0; no stray hp_metric.
    assert [step for step, _ in scalars["test/depth/abs_rel"]] == [STEPS]
    assert [step for step, _ in scalars["compute/test_macs_per_sample"]] == [STEPS]
    assert "hp_metric" not in scalars


def test_step_bar_counts_steps_across_epochs_and_resumes_at_the_checkpoints_step(tmp_path):
    from diffperc.data import PerceptionDataModule, ProceduralDepth

    starts = []  # (bar position, rate origin) at each epoch start

    class Watched(StepProgressBar):
        def on_train_epoch_start(self, trainer, *args):
            super().on_train_epoch_start(trainer, *args)
            starts.append((self.train_progress_bar.n, self.train_progress_bar.initial))

    dm = PerceptionDataModule(train=ProceduralDepth("train", 16, 16), batch_size=4)  # 4 steps per epoch
    kw = dict(enable_progress_bar=True, limit_val_batches=0, default_root_dir=tmp_path)  # the MACs file goes there
    first = quiet_trainer(max_steps=6, callbacks=[Watched()], **kw)
    first.fit(tiny_finetuning(), datamodule=dm)
    first.save_checkpoint(tmp_path / "step6.ckpt")
    assert starts == [(0, 0), (4, 4)] and first.progress_bar_callback.train_progress_bar.n == 6
    starts.clear()
    resumed = quiet_trainer(max_steps=10, callbacks=[Watched()], **kw)
    resumed.fit(tiny_finetuning(), datamodule=dm, ckpt_path=tmp_path / "step6.ckpt")
    bar = resumed.progress_bar_callback.train_progress_bar
    assert starts[0] == (6, 6) and (bar.n, bar.total) == (10, 10)
