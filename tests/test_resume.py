"""Exact resume and crash-safe checkpoints: a ``diffperc fit`` killed with SIGKILL, then resumed with ``--ckpt_path
last``, ends with the same weights, EMA, optimizer, LR schedule, step and data order as a run that was never
interrupted: killed while writing a checkpoint, and killed between the periodic checkpoints of the quickstart config
itself. Plus the atomic writer, the RNG-state callback and the resumable loader alone.

Only the killed fits run in a subprocess (SIGKILL would take pytest down); the uninterrupted and resumed fits run in
this process, with one thread as in the subprocess, so all of them compute alike bit for bit.
"""

import io
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from lightning.pytorch import Callback, Trainer

from diffperc.checkpoint_io import AtomicCheckpointIO, RNGStateCheckpoint
from diffperc.cli import DiffpercCLI
from diffperc.data.sampler import ResumableDataLoader, ResumableSampler
from diffperc.scaling.sweep import trim_event_files

from helpers import run_isolated

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart" / "depth.yaml"
MAX_STEPS, KILL_AT_STEP = 12, 7  # 5 batches per epoch: the kill falls mid-epoch 2, the run ends in epoch 3

OVERRIDE = """
trainer:
  max_steps: {max_steps}
  limit_val_batches: 0
  log_every_n_steps: 1
  enable_progress_bar: false
  enable_model_summary: false
  plugins:
    - class_path: diffperc.checkpoint_io.AtomicCheckpointIO
  logger:
    class_path: lightning.pytorch.loggers.TensorBoardLogger
    init_args: {{save_dir: {save_dir}, name: run, version: ""}}
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{save_last: true, save_top_k: 0, every_n_train_steps: 1}}
    - class_path: lightning.pytorch.callbacks.EMAWeightAveraging
      init_args: {{decay: 0.9}}
    - class_path: diffperc.checkpoint_io.RNGStateCheckpoint
{extra_callbacks}
model:
  init_args:
    backbone: {{name: t1, hidden_size: 32, depth: 2, num_heads: 2, patch_size: 2}}
    image_size: 16
    lr_scheduler:
      class_path: diffperc.lit.ExponentialDecayLR
      init_args: {{total_steps: 10, final_lr_ratio: 0.1, warmup_steps: 3}}
data:
  init_args:
    train:
      class_path: diffperc.data.ProceduralDepth
      init_args: {{split: train, length: 20, resolution: 16}}
    batch_size: 4
    num_workers: 1
"""


class _TornSaveKill(Callback):
    """Test helper run inside ``diffperc fit``: at ``step``, the checkpoint write stops half-way and the process gets
    SIGKILL, as when a node dies while saving."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # before ModelCheckpoint's
        if trainer.global_step != self.step:
            return
        real_save = torch.save

        def torn_save(obj, f, *args, **kwargs):
            buf = io.BytesIO()
            real_save(obj, buf, *args, **kwargs)
            f.write(buf.getvalue()[: buf.tell() // 2])
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)

        torch.save = torn_save


class _Kill(Callback):
    """Test helper run inside ``diffperc fit``: SIGKILL once optimizer step ``step`` is done, as ``kill -9`` does."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class _Steps(Callback):
    """Records the global step each training batch starts from."""

    def __init__(self):
        self.steps = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.steps.append(trainer.global_step)


def _fit_killed(run_dir: Path, *config_files: Path) -> subprocess.CompletedProcess:
    """``diffperc fit`` in a subprocess with one thread; its config holds a callback that SIGKILLs it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    cmd = [sys.executable, "-m", "diffperc", "fit", *[a for c in config_files for a in ("--config", str(c))]]
    return run_isolated(cmd, run_dir, env, timeout=300)


def _fit_here(*args) -> Trainer:
    """``diffperc fit ARGS`` in this process, computing as the subprocess does: one thread and ``diffperc.cli.main``'s
    matmul precision (both restored afterwards). Returns the trainer."""
    threads, precision = torch.get_num_threads(), torch.get_float32_matmul_precision()
    torch.set_num_threads(1)
    torch.set_float32_matmul_precision("high")
    try:
        return DiffpercCLI(args=["fit", *map(str, args)]).trainer
    finally:
        torch.set_num_threads(threads)
        torch.set_float32_matmul_precision(precision)


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _assert_equal_trees(a, b, where: str = "checkpoint") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"{where}: keys {sorted(a)} vs {sorted(b)}"
        for key in a:
            _assert_equal_trees(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_equal_trees(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:You're using the WeightAveraging callback with a model that overrides")
def test_sigkill_during_save_then_resume_matches_uninterrupted_run(tmp_path):
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    straight.mkdir(), crashed.mkdir()

    def override(run_dir: Path, name: str, extra: str = "") -> Path:
        path = run_dir / name
        path.write_text(OVERRIDE.format(max_steps=MAX_STEPS, save_dir=run_dir, extra_callbacks=extra))
        return path

    _fit_here("--config", QUICKSTART, "--config", override(straight, "override.yaml"))

    # 1. Killed with SIGKILL half-way through writing the step-7 checkpoint: last.ckpt is still step 6's, whole.
    kill = f"    - class_path: test_resume._TornSaveKill\n      init_args: {{step: {KILL_AT_STEP}}}"
    killed = _fit_killed(crashed, QUICKSTART, override(crashed, "override_kill.yaml", kill))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    ckpt_dir = crashed / "run" / "checkpoints"
    assert _load(ckpt_dir / "last.ckpt")["global_step"] == KILL_AT_STEP - 1
    assert len(list(ckpt_dir.glob(".last.ckpt.*.tmp"))) == 1  # the torn write, never renamed over last.ckpt

    # 2. Resumed: ends where the uninterrupted run ended, bit for bit.
    _fit_here("--config", QUICKSTART, "--config", override(crashed, "override.yaml"), "--ckpt_path", "last")
    assert not list(ckpt_dir.glob(".last.ckpt.*.tmp"))  # cleaned by the next successful save
    a, b = _load(straight / "run" / "checkpoints" / "last.ckpt"), _load(ckpt_dir / "last.ckpt")
    assert a["global_step"] == b["global_step"] == MAX_STEPS
    for key in ("state_dict", "current_model_state", "averaging_state", "optimizer_states", "lr_schedulers"):
        _assert_equal_trees(a[key], b[key], key)  # EMA weights, live weights, EMA count, Adam moments, LR
    loader = b["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    assert loader == {"epoch": 2, "seed": 0, "dataset_length": 20, "global_samples": 8}  # step 12 = epoch 2, batch 2
    assert b["lr_schedulers"][0]["last_epoch"] == MAX_STEPS


PERIOD, KILL_BETWEEN = 4, 6  # checkpoints at steps 4, 8, 12; the kill after step 6 loses steps 5 and 6


def _quickstart_override(path: Path, save_dir: Path, *extra_callbacks: dict) -> Path:
    """configs/quickstart/depth.yaml at toy size (a 32-wide DiT, 16 px, 12 steps of batch 4) with its own checkpoint
    callbacks, only the 100-step period cut to 4 (a callback list is replaced whole, so it is restated here)."""
    callbacks = yaml.safe_load(QUICKSTART.read_text())["trainer"]["callbacks"]
    periodic = [cb["init_args"] for cb in callbacks if cb.get("init_args", {}).get("every_n_train_steps")]
    assert [args["every_n_train_steps"] for args in periodic] == [100]  # the shipped period
    periodic[0]["every_n_train_steps"] = PERIOD
    resolution = {"init_args": {"resolution": 16}}
    override = {
        "trainer": {"max_steps": MAX_STEPS, "limit_val_batches": 0, "log_every_n_steps": 1,
                    "enable_progress_bar": False, "enable_model_summary": False,
                    "logger": {"init_args": {"save_dir": str(save_dir)}},
                    "callbacks": callbacks + list(extra_callbacks)},
        "model": {"init_args": {"backbone": {"hidden_size": 32, "depth": 2, "num_heads": 2}, "image_size": 16,
                                "lr_scheduler": {"init_args": {"total_steps": 10, "warmup_steps": 3}}}},
        "data": {"init_args": {"train": {"init_args": {"length": 20, "resolution": 16}}, "val": resolution,
                               "test": resolution, "batch_size": 4}},
    }
    path.write_text(yaml.safe_dump(override, sort_keys=False))
    return path


def _train_loss_steps(run_dir: Path) -> list[int]:
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    return sorted(e.step for f in run_dir.glob("events.out.tfevents.*") for e in EventFileLoader(str(f)).Load()
                  if any(v.tag == "train/loss" for v in e.summary.value))


@pytest.mark.slow
def test_quickstart_config_killed_between_its_periodic_checkpoints_resumes_from_the_last_one(tmp_path):
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    straight.mkdir(), crashed.mkdir()
    steps = {"class_path": "test_resume._Steps"}
    trainer = _fit_here("--config", QUICKSTART, "--config", _quickstart_override(straight / "o.yaml", straight, steps))
    # Both checkpoint callbacks write the one last.ckpt; the no-period one saves step 12 at the end of fit.
    ckpt_dir = straight / "quickstart_depth" / "checkpoints"
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["last.ckpt"]
    assert next(cb for cb in trainer.callbacks if isinstance(cb, _Steps)).steps == list(range(MAX_STEPS))

    # 1. kill -9 after step 6: last.ckpt is the periodic checkpoint of step 4.
    kill = {"class_path": "test_resume._Kill", "init_args": {"step": KILL_BETWEEN}}
    killed = _fit_killed(crashed, QUICKSTART, _quickstart_override(crashed / "kill.yaml", crashed, kill))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    run, ckpt_dir = crashed / "quickstart_depth", crashed / "quickstart_depth" / "checkpoints"
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["last.ckpt"]
    assert _load(ckpt_dir / "last.ckpt")["global_step"] == PERIOD
    # Lightning logs optimizer step k as step k - 1, after the step's callbacks: the killed run logged steps 0..4, and
    # the resumed run logs 4.. again, so the sweep launcher's cut keeps 0..3.
    assert _train_loss_steps(run) == list(range(KILL_BETWEEN - 1))
    assert [p.name for p in trim_event_files(run, PERIOD)] == [p.name for p in run.glob("events.out.tfevents.*")]

    # 2. Resumed with --ckpt_path last: continues from step 4 (not 0) and ends as the uninterrupted run did.
    override = _quickstart_override(crashed / "o.yaml", crashed, steps)
    trainer = _fit_here("--config", QUICKSTART, "--config", override, "--ckpt_path", "last")
    assert next(cb for cb in trainer.callbacks if isinstance(cb, _Steps)).steps == list(range(PERIOD, MAX_STEPS))
    assert _train_loss_steps(run) == list(range(MAX_STEPS))  # the cut events + the resumed run's: each step once
    a, b = _load(straight / "quickstart_depth" / "checkpoints" / "last.ckpt"), _load(ckpt_dir / "last.ckpt")
    assert a["global_step"] == b["global_step"] == MAX_STEPS
    for key in ("state_dict", "optimizer_states", "lr_schedulers", "loops"):
        _assert_equal_trees(a[key], b[key], key)


def test_atomic_checkpoint_io_keeps_the_previous_file_when_a_save_fails(tmp_path, monkeypatch):
    io_plugin, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io_plugin.save_checkpoint({"global_step": 1, "w": torch.arange(3.0)}, path)

    def crash(src, dst):
        raise OSError("disk vanished")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk vanished"):
        io_plugin.save_checkpoint({"global_step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    loaded = io_plugin.load_checkpoint(path)
    assert loaded["global_step"] == 1 and torch.equal(loaded["w"], torch.arange(3.0))
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary file left behind


def test_atomic_checkpoint_io_names_the_file_of_a_truncated_checkpoint(tmp_path):
    path = tmp_path / "cut.ckpt"
    buf = io.BytesIO()
    torch.save({"w": torch.ones(100)}, buf)
    path.write_bytes(buf.getvalue()[:300])
    with pytest.raises(ValueError, match=r"Cannot read checkpoint .*cut\.ckpt \(`--ckpt_path`\): truncated"):
        AtomicCheckpointIO().load_checkpoint(path)
    with pytest.raises(ValueError, match=r"weights_only=False.*--weights_only"):
        AtomicCheckpointIO().load_checkpoint(path, weights_only=False)


def test_rng_state_checkpoint_restores_torch_numpy_and_python_draws():
    callback = RNGStateCheckpoint()
    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    state = callback.state_dict()
    buf = io.BytesIO()
    torch.save(state, buf)  # the state must survive a weights_only load
    buf.seek(0)
    expected = (torch.randn(4), np.random.rand(2), random.random())
    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    callback.load_state_dict(torch.load(buf, weights_only=True))
    assert not torch.equal(torch.randn(4), expected[0])  # nothing restored before the first training batch
    callback.on_train_batch_start(None, None, None, 0)
    got = (torch.randn(4), np.random.rand(2), random.random())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]


def test_resumable_loader_continues_the_epoch_where_its_state_stopped():
    data = list(range(24))
    loader = ResumableDataLoader(data, ResumableSampler(data, seed=7), batch_size=4)
    loader.sampler.set_epoch(1)
    full = [b.tolist() for b in loader]
    it = iter(loader)
    head = [next(it).tolist() for _ in range(2)]
    state = loader.state_dict()
    assert state == {"epoch": 1, "seed": 7, "dataset_length": 24, "global_samples": 8}

    fresh = ResumableDataLoader(data, ResumableSampler(data, seed=7), batch_size=4)
    fresh.load_state_dict(state)
    assert head + [b.tolist() for b in fresh] == full  # the resumed epoch, exactly
    fresh.sampler.set_epoch(2)
    assert len([b for b in fresh]) == 6  # the offset belonged to epoch 1 only
    with pytest.raises(ValueError, match=r"--data.seed"):
        ResumableDataLoader(data, ResumableSampler(data, seed=8), batch_size=4).load_state_dict(state)
