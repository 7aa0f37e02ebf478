"""PowerLawMonitor: exact and noisy synthetic laws, a real fit into TensorBoard and train_macs.json, and resume."""

import glob
import json
import math

import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from diffperc.callbacks import MACsCounter, PowerLawMonitor
from diffperc.data import PerceptionDataModule, ProceduralDepth
from diffperc.scaling.fit import fit_power_law

from helpers import quiet_trainer, tiny_finetuning


def _monitor(points: dict, **kwargs) -> PowerLawMonitor:
    monitor = PowerLawMonitor(**kwargs)
    monitor.load_state_dict({"points": points})
    return monitor


def test_power_law_monitor_recovers_an_exact_law():
    # y = 3 * C^-0.5 at 10 points over 1e9..1e12 MACs: the log-space fit is exact, its interval has zero width.
    macs = np.geomspace(1e9, 1e12, 10)
    monitor = _monitor({"val/loss": [[10 * (i + 1), c, 3 * c**-0.5] for i, c in enumerate(macs)]}, skip_fraction=0)
    law = monitor.record()["laws"]["val/loss"]
    assert law["b"] == pytest.approx(-0.5, abs=1e-12) and law["a"] == pytest.approx(3.0, rel=1e-9)
    assert law["b_high"] - law["b_low"] < 1e-9 and law["r2"] == pytest.approx(1.0)
    assert (law["n"], law["x_min"], law["x_max"]) == (10, 1e9, pytest.approx(1e12))


def test_power_law_monitor_noisy_law_interval_holds_the_truth_and_skips_the_start():
    rng = np.random.default_rng(0)
    macs = np.geomspace(1e9, 1e12, 40)
    loss = 3 * macs**-0.5 * np.exp(rng.normal(0, 0.05, macs.size))
    points = [[10 * (i + 1), c, y] for i, (c, y) in enumerate(zip(macs, loss, strict=True))]
    points[0][2] = 50.0  # a warm-up outlier at step 10: left out with the first 10% of 400 steps
    monitor = _monitor({"train/loss": points, "val/flat": [[10, 1.0, 0.5], [20, 2.0, 0.5], [30, 3.0, 0.5]]})
    monitor._total_steps = 400.0  # set by on_train_start from max_steps
    assert monitor.first_step() == 40.0
    record = monitor.record()
    law = record["laws"]["train/loss"]
    direct = fit_power_law(macs[3:], loss[3:])  # steps 40..400: the first three points (steps 10-30) skipped
    assert law["n"] == 37 and law["b"] == pytest.approx(direct.b, rel=1e-12)
    assert law["b_low"] < -0.5 < law["b_high"] and law["b_high"] - law["b_low"] < 0.1  # seeded: b = -0.507
    assert "val/flat" not in record["laws"]  # a constant series has no R^2: not reported rather than NaN
    # loss/train: the mean of the last ceil(10% of 40) = 4 logged values.
    assert record["loss/train"] == pytest.approx(float(np.mean(loss[-4:])), rel=1e-12)
    assert "loss/val" not in record
    assert _monitor({}, min_step=200).first_step() == 200.0  # min_step replaces the fraction


def test_power_law_monitor_never_records_non_finite_values():
    monitor = PowerLawMonitor()
    monitor._counter = MACsCounter()
    monitor._counter.train_macs = 100
    for value in (0.5, float("nan"), float("inf"), 0.25):
        monitor._add("train/loss", 1, value)
    assert monitor.points == {"train/loss": [(1, 100.0, 0.5), (1, 100.0, 0.25)]}


def test_power_law_monitor_without_a_macs_counter_says_so_once():
    monitor = PowerLawMonitor()
    trainer = quiet_trainer(callbacks=[monitor])
    with pytest.warns(UserWarning, match="no MACsCounter"):
        monitor.setup(trainer, None, "fit")
    monitor.setup(trainer, None, "fit")  # no second warning (pytest would not fail on it: checked by the flag)
    assert monitor._counter is None and monitor._warned
    trainer.callbacks.append(MACsCounter())
    monitor.setup(trainer, None, "fit")
    assert monitor._counter.add_to_record.__self__ is trainer.callbacks[-1]
    assert trainer.callbacks[-1]._record_sources == [monitor.record]


def _data() -> PerceptionDataModule:
    return PerceptionDataModule(
        train=ProceduralDepth("train", 64, 16), val=ProceduralDepth("val", 4, 16), batch_size=4, eval_batch_size=4
    )


def _fit(root, max_steps: int, ckpt_path=None, save: str | None = None, figures: bool = True):
    torch.manual_seed(0)
    module = tiny_finetuning(patch_size=4, num_images_logged=0)
    logger = TensorBoardLogger(save_dir=root, name="run", version="", default_hp_metric=False)
    trainer = quiet_trainer(
        max_steps=max_steps,
        logger=logger,
        log_every_n_steps=1,
        val_check_interval=2,
        check_val_every_n_epoch=None,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        default_root_dir=root,
        callbacks=[PowerLawMonitor(figures=figures)],
    )
    trainer.fit(module, datamodule=_data(), ckpt_path=ckpt_path)  # MACsCounter: a module default
    if save:
        trainer.save_checkpoint(root / save)
    return trainer


def _scalars(run) -> dict[str, list[tuple[int, float]]]:
    (events,) = glob.glob(str(run / "events.out.tfevents.*"))
    acc = EventAccumulator(events, size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    scalars = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    return scalars, acc.Tags()["images"]


def test_power_law_monitor_in_a_real_fit_logs_laws_figures_and_the_record(tmp_path):
    trainer = _fit(tmp_path, max_steps=8)
    run = tmp_path / "run"
    scalars, images = _scalars(run)
    # Validations after steps 2, 4, 6, 8 (logged under steps 1, 3, 5, 7); a law needs 3 points: from the third on.
    assert [s for s, _ in scalars["laws/val/loss/b"]] == [5, 7]
    assert [s for s, _ in scalars["laws/train/loss/b_high"]] == [3, 5, 7]  # train/loss: a point per step
    for series in ("train/loss", "val/loss", "val/depth/abs_rel", "val/depth/delta1"):
        assert f"laws/{series}" in images

    record = json.loads((run / "train_macs.json").read_text())
    assert record["global_step"] == 8 and set(record["laws"]) >= {"train/loss", "val/loss", "val/depth/abs_rel"}
    # The same numbers from the event file: (compute/train_macs, val/loss) joined by step, fitted here.
    macs = dict(scalars["compute/train_macs"])
    val = scalars["val/loss"]
    direct = fit_power_law([macs[s] for s, _ in val], [v for _, v in val])
    law = record["laws"]["val/loss"]
    assert law["n"] == 4 and law["x_max"] == record["compute/train_macs"] == macs[7]
    assert law["b"] == pytest.approx(direct.b, rel=1e-4) and law["b_low"] == pytest.approx(direct.b_ci[0], rel=1e-4)
    assert scalars["laws/val/loss/b"][-1][1] == pytest.approx(law["b"], rel=1e-6)
    # train/loss points at steps 1..8, all fitted (10% of 8 steps: from step 0.8 on); x_min = one step's MACs.
    assert record["laws"]["train/loss"]["n"] == 8 and record["laws"]["train/loss"]["x_min"] == macs[0]
    # loss/train: the last ceil(10% of 8) = 1 logged value; loss/val: the last validation's.
    assert record["loss/train"] == pytest.approx(scalars["train/loss"][-1][1], rel=1e-6)
    assert record["loss/val"] == pytest.approx(val[-1][1], rel=1e-6)
    assert record["loss/val"] == pytest.approx(trainer.callback_metrics["val/loss"].item(), rel=1e-7)
    assert all(math.isfinite(v) for law in record["laws"].values() for v in law.values())


def test_power_law_monitor_resume_keeps_the_points(tmp_path):
    _fit(tmp_path, max_steps=4, save="four.ckpt", figures=False)
    state = torch.load(tmp_path / "four.ckpt", weights_only=True)["callbacks"]["PowerLawMonitor"]["points"]
    assert [p[0] for p in state["val/loss"]] == [2, 4] and [p[0] for p in state["train/loss"]] == [1, 2, 3, 4]
    trainer = _fit(tmp_path / "resumed", max_steps=8, ckpt_path=tmp_path / "four.ckpt", figures=False)
    (monitor,) = [cb for cb in trainer.callbacks if isinstance(cb, PowerLawMonitor)]
    assert [p[0] for p in monitor.points["val/loss"]] == [2, 4, 6, 8]
    assert monitor.points["val/loss"][:2] == [tuple(p) for p in state["val/loss"]]
    record = json.loads((tmp_path / "resumed" / "run" / "train_macs.json").read_text())
    assert record["laws"]["val/loss"]["n"] == 4  # two points from before the resume, two after
