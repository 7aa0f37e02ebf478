"""Bad input, tried on purpose: every case fails with a message naming the file, key or flag, and writes nothing
(readers, configs, the CLI, predict folders, checkpoints); non-finite losses stop training or are skipped, never
reaching the weights. The ``diffperc`` command prints such an error as one short message (exit status 2), and
nothing it runs overwrites what a run recorded: scoring and predicting keep the fit's files, a second fresh fit into
a run is refused, a full disk keeps the last checkpoint."""

import contextlib
import errno
import io
import os
import re
import shutil
import sys
from functools import partial
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml
from lightning.pytorch import Callback, Trainer

import diffperc.cli
import diffperc.utils
from diffperc.callbacks import PredictionWriter
from diffperc.callbacks.nonfinite import NonFiniteGuard
from diffperc.checkpoint_io import AtomicCheckpointIO
from diffperc.cli import DiffpercCLI, main, user_error
from diffperc.codecs import PixelCodec
from diffperc.data import (
    DIODEDataset,
    FlyingChairsDataset,
    HypersimDataset,
    ImageFolder,
    PerceptionDataModule,
    Pix2GestaltDataset,
    ProceduralDepth,
)
from diffperc.data.io import read_depth_png, read_flo, read_rgb, write_flo
from diffperc.data.real.images import output_names
from diffperc.diffusion import InferenceSettings
from diffperc.export import export_checkpoint
from diffperc.lit import ExponentialDecayLR, PerceptionFinetuning
from diffperc.models import DiT
from diffperc.tasks import DepthTask, FlowTask

import tiny_runs
from helpers import quiet_trainer, run_isolated, tiny_finetuning

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart" / "depth.yaml"


# ----------------------------------------------------------------------------------------------------------------------
# Readers and data sets: each builder writes the bad input under `tmp` and returns (call, error type, message regex)
# ----------------------------------------------------------------------------------------------------------------------


def _png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), array)
    return path


def _rgb(h: int = 4, w: int = 6) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _flo_header(magic: float = 202021.25, w: int = 2, h: int = 2) -> bytes:
    return np.array([magic], "<f4").tobytes() + np.array([w, h], "<i4").tobytes()


def _hypersim(tmp: Path, lines: str, depth: np.ndarray | None = None, rgb: np.ndarray | None = None):
    _png(tmp / "val" / "s" / "rgb.png", rgb if rgb is not None else _rgb())
    _png(tmp / "val" / "s" / "depth.png", depth if depth is not None else np.full((4, 6), 1500, np.uint16))
    (tmp / "list.txt").write_text(lines)
    return lambda: HypersimDataset(tmp / "val", tmp / "list.txt")[0]


def _chairs(tmp: Path, flow_hw=(4, 6), drop: str | None = None, codes: str = "1\n"):
    data = tmp / "chairs" / "data"
    data.mkdir(parents=True)
    _png(data / "00001_img1.ppm", _rgb())
    _png(data / "00001_img2.ppm", _rgb())
    write_flo(data / "00001_flow.flo", np.zeros((*flow_hw, 2), np.float32))
    if drop:
        (data / drop).unlink()
    (tmp / "chairs" / "FlyingChairs_train_val.txt").write_text(codes)
    return lambda: FlyingChairsDataset(tmp / "chairs", "train")[0]


def _pix2gestalt(tmp: Path, drop: str | None = None):
    for folder, suffix in (("occlusion", "_occlusion.png"), ("visible_object_mask", "_visible_mask.png"),
                           ("whole", "_whole.png"), ("whole_mask", "_whole_mask.png")):
        (tmp / "p2g" / folder).mkdir(parents=True)
        if f"{folder}/a{suffix}" != drop:
            _png(tmp / "p2g" / folder / f"a{suffix}", _rgb(8, 8))
    return lambda: Pix2GestaltDataset(tmp / "p2g")[0]


def _diode_nan(tmp: Path):
    root = tmp / "diode"
    _png(root / "s" / "x.png", _rgb())
    depth = np.full((4, 6), 3.0, np.float32)
    depth[1, 2] = np.nan
    np.save(root / "s" / "x_depth.npy", depth)
    np.save(root / "s" / "x_depth_mask.npy", np.ones((4, 6), np.float32))
    (tmp / "list.txt").write_text("s/x.png s/x_depth.npy s/x_depth_mask.npy\n")
    return lambda: DIODEDataset(root, tmp / "list.txt")[0]


def _empty_images(tmp: Path):
    (tmp / "imgs").mkdir()
    (tmp / "imgs" / "notes.txt").write_text("not an image")
    return lambda: ImageFolder(str(tmp / "imgs"))


READER_CASES = {
    "flo_truncated": lambda tmp: (
        partial(read_flo, _write_bytes(tmp / "t.flo", _flo_header() + b"\0" * 8)),
        ValueError, r"Truncated \.flo file .*t\.flo: 20 bytes, expected 44"),
    "flo_wrong_magic": lambda tmp: (
        partial(read_flo, _write_bytes(tmp / "m.flo", _flo_header(magic=1.0) + b"\0" * 32)),
        ValueError, r"Not a Middlebury \.flo file: .*m\.flo \(magic 1\.0"),
    "flo_absurd_header_size": lambda tmp: (
        partial(read_flo, _write_bytes(tmp / "s.flo", _flo_header(w=-3))),
        ValueError, r"Invalid size -3x2 .* header of \.flo file .*s\.flo"),
    "flo_shorter_than_header": lambda tmp: (
        partial(read_flo, _write_bytes(tmp / "h.flo", b"PIEH")),
        ValueError, r"Truncated \.flo file .*h\.flo: 4 bytes, shorter than the 12-byte header"),
    "depth_png_8bit": lambda tmp: (
        partial(read_depth_png, _png(tmp / "d8.png", np.full((4, 6), 9, np.uint8)), 1000.0),
        ValueError, r"Depth PNG .*d8\.png is uint8, expected a 16-bit \(uint16\) PNG"),
    "depth_png_three_channels": lambda tmp: (
        partial(read_depth_png, _png(tmp / "d3.png", np.full((4, 6, 3), 9, np.uint16)), 1000.0),
        ValueError, r"Depth PNG .*d3\.png has shape \(4, 6, 3\), expected a single channel"),
    "image_corrupt": lambda tmp: (
        partial(read_rgb, _write_bytes(tmp / "x.png", b"\x89PNG\r\n\x1a\n garbage")),
        ValueError, r"Could not decode image .*x\.png"),
    "list_entry_escapes_root": lambda tmp: (
        _hypersim(tmp, "s/rgb.png ../../etc/depth.png\n"),
        ValueError, r"list\.txt:1: path '\.\./\.\./etc/depth\.png' escapes the data root"),
    "list_entry_absolute": lambda tmp: (
        _hypersim(tmp, "# comment\n/etc/rgb.png s/depth.png\n"),
        ValueError, r"list\.txt:2: path '/etc/rgb\.png' escapes the data root"),
    "list_too_few_fields": lambda tmp: (
        _hypersim(tmp, "s/rgb.png\n"),
        ValueError, r"list\.txt:1: expected at least 2 paths per line"),
    "list_empty": lambda tmp: (
        _hypersim(tmp, "# nothing\n\n"),
        ValueError, r"Filename list .*list\.txt lists no samples"),
    "list_missing": lambda tmp: (
        lambda: HypersimDataset(tmp, tmp / "nope.txt"),
        FileNotFoundError, r"Filename list not found: .*nope\.txt"),
    "pair_file_missing": lambda tmp: (
        _hypersim(tmp, "s/rgb.png s/missing_depth.png\n"),
        FileNotFoundError, r"Depth PNG not found: .*missing_depth\.png"),
    "image_depth_size_mismatch": lambda tmp: (
        _hypersim(tmp, "s/rgb.png s/depth.png\n", depth=np.full((5, 6), 1500, np.uint16)),
        ValueError, r"Depth .*depth\.png is \(5, 6\) but image .*rgb\.png is \(4, 6\)"),
    "depth_nan": lambda tmp: (
        _diode_nan(tmp), ValueError, r"Depth .*x_depth\.npy holds NaN or infinite values"),
    "chairs_pair_image_missing": lambda tmp: (
        _chairs(tmp, drop="00001_img2.ppm"), FileNotFoundError, r"FlyingChairs image missing: .*00001_img2\.ppm"),
    "chairs_flow_size_mismatch": lambda tmp: (
        _chairs(tmp, flow_hw=(4, 5)), ValueError, r"00001_flow\.flo is \(4, 5\) but .*00001_img1\.ppm is \(4, 6\)"),
    "chairs_split_file_wrong_length": lambda tmp: (
        _chairs(tmp, codes="1\n2\n"), ValueError, r"FlyingChairs_train_val\.txt has 2 lines but .*data holds 1"),
    "chairs_empty_folder": lambda tmp: (
        _chairs(tmp, drop="00001_flow.flo"), ValueError, r"No \*_flow\.flo files in .*chairs/data"),
    "pix2gestalt_mask_missing": lambda tmp: (
        _pix2gestalt(tmp, drop="whole_mask/a_whole_mask.png"),
        FileNotFoundError, r"pix2gestalt file missing: .*whole_mask/a_whole_mask\.png"),
    "images_folder_empty": lambda tmp: (
        _empty_images(tmp), ValueError, r"`--data.images` folder .*imgs holds no images"),
    "images_folder_missing": lambda tmp: (
        lambda: PerceptionDataModule(images=str(tmp / "nowhere")),
        FileNotFoundError, r"`--data.images` folder not found: .*nowhere"),
    "procedural_negative_size": lambda tmp: (
        lambda: ProceduralDepth("train", 8, -16), ValueError, r"`resolution` must be positive, got -16"),
    "procedural_unknown_split": lambda tmp: (
        lambda: ProceduralDepth("tran"), ValueError, r"Unknown split 'tran' \(`split`\)"),
    "train_set_smaller_than_a_batch": lambda tmp: (
        lambda: PerceptionDataModule(train=ProceduralDepth("train", 3, 16), batch_size=4).train_dataloader(),
        ValueError, r"train data set has 3 samples, fewer than one global batch .*`--data.batch_size` 4"),
    "negative_batch_size": lambda tmp: (
        lambda: PerceptionDataModule(batch_size=-1), ValueError, r"`--data.batch_size` must be >= 1, got -1"),
    "zero_predict_resolution": lambda tmp: (
        lambda: PerceptionDataModule(predict_resolution=0), ValueError, r"`--data.predict_resolution` must be >= 1"),
    "ensemble_size_zero": lambda tmp: (
        lambda: InferenceSettings(ensemble_size=0), ValueError,
        r"`--model.inference.ensemble_size` must be >= 1, got 0"),
    "depth_range_inverted": lambda tmp: (
        lambda: DepthTask(min_depth=10, max_depth=1), ValueError,
        r"`--model.task.min_depth` must be >= 0 and < `--model.task.max_depth`"),
    "flow_max_flow_zero": lambda tmp: (
        lambda: FlowTask(max_flow=0), ValueError, r"`--model.task.max_flow` must be positive \(pixels\), got 0"),
    "pixel_codec_unshuffle_zero": lambda tmp: (
        lambda: PixelCodec(unshuffle=0), ValueError, r"`--model.codec.unshuffle` must be >= 1, got 0"),
    "lr_schedule_without_steps": lambda tmp: (
        lambda: ExponentialDecayLR(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0), total_steps=0),
        ValueError, r"`--model.lr_scheduler.total_steps` must be >= 1, got 0"),
    "write_flo_wrong_shape": lambda tmp: (
        lambda: write_flo(tmp / "out.flo", np.zeros((4, 6, 3))), ValueError, r"Flow for .*out\.flo must have shape"),
    "export_not_safetensors": lambda tmp: (
        lambda: export_checkpoint(tmp / "any.ckpt", tmp / "weights.pt"), ValueError,
        r"`--out` must end in \.safetensors, got .*weights\.pt"),
    "nonfinite_guard_mode": lambda tmp: (
        lambda: NonFiniteGuard(mode="ignore"), ValueError,
        r"NonFiniteGuard mode \(`--model.nonfinite`, or `--trainer.callbacks.mode` after .*\) must be one of "
        r"\('raise', 'skip'\), got 'ignore'"),
    "nonfinite_guard_max_consecutive": lambda tmp: (
        lambda: NonFiniteGuard(max_consecutive=0), ValueError,
        r"NonFiniteGuard `--trainer.callbacks.max_consecutive` must be >= 1, got 0"),
}


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("case", sorted(READER_CASES))
def test_bad_input_fails_naming_the_file_key_or_flag_and_writes_nothing(case, tmp_path):
    call, error, message = READER_CASES[case](tmp_path)
    before = _files(tmp_path)
    with pytest.raises(error, match=message):
        call()
    assert _files(tmp_path) == before  # nothing partial: no output, no temporary file


# ----------------------------------------------------------------------------------------------------------------------
# CLI and configs: the error names the key or flag, and no run directory is created
# ----------------------------------------------------------------------------------------------------------------------


def _cli_fit(tmp_path: Path, *extra: str) -> str:
    """Runs ``diffperc fit`` expecting a failure; returns the error text (exception or argument-parser output)."""
    args = ["fit", "--config", str(QUICKSTART), "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
            "--trainer.max_steps", "1", "--data.init_args.num_workers", "0", *extra]
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        with pytest.raises((SystemExit, ValueError, FileNotFoundError)) as info:
            DiffpercCLI(args=args)
    assert not (tmp_path / "runs").exists(), "a failed run must not leave a run directory behind"
    return f"{info.value}\n{err.getvalue()}"


def _wrong_architecture_checkpoint(tmp_path: Path) -> Path:
    path = tmp_path / "dit_b.pt"
    torch.save(DiT(input_size=8, patch_size=2, in_channels=3, hidden_size=48, depth=1, num_heads=2).state_dict(), path)
    return path


CLI_CASES = {
    "unknown_preset": (["--model.init_args.backbone.name", "t9"],
                       r"Unknown model preset 't9' \(`--model.backbone.name`\)"),
    "unknown_task_class": (["--model.init_args.task", "diffperc.tasks.Nope"],
                           r"(?s)diffperc\.tasks\.Nope.*has no attribute 'Nope'"),
    "key_typo_on_command_line": (["--model.init_args.image_sise", "16"], r"Option 'image_sise' is not accepted"),
    "negative_batch_size": (["--data.init_args.batch_size", "-4"], r"`--data.batch_size` must be >= 1, got -4"),
    "ensemble_size_zero": (["--model.init_args.inference.ensemble_size", "0"],
                           r"`--model.inference.ensemble_size` must be >= 1, got 0"),
    "missing_images_folder": (["--data.init_args.images", "/nonexistent/photos"],
                              r"`--data.images` folder not found: /nonexistent/photos"),
    "missing_init_from": (["--model.init_args.init_from", "/nonexistent/dit.pt"],
                          r"Checkpoint file not found: /nonexistent/dit\.pt"),
}


@pytest.mark.parametrize("case", sorted(CLI_CASES))
def test_cli_bad_value_fails_naming_the_flag_before_writing(case, tmp_path):
    extra, message = CLI_CASES[case]
    assert _search(message, _cli_fit(tmp_path, *extra))


def test_cli_key_typo_in_a_config_file_is_named(tmp_path):
    bad = tmp_path / "override.yaml"
    bad.write_text("model:\n  init_args:\n    num_images_loged: 2\n")
    assert _search(r"num_images_loged", _cli_fit(tmp_path, "--config", str(bad)))


def test_cli_wrong_architecture_checkpoint_names_the_file_and_tensors(tmp_path):
    path = _wrong_architecture_checkpoint(tmp_path)
    text = _cli_fit(tmp_path, "--model.init_args.init_from", str(path))
    assert _search(r"dit_b\.pt: the weights do not fit the model \(wrong architecture or size\?\): `.*` file \(", text)


def _search(pattern: str, text: str) -> bool:
    import re

    assert re.search(pattern, text), f"{pattern!r} not in:\n{text[-2000:]}"
    return True


# ----------------------------------------------------------------------------------------------------------------------
# Predict: an unreadable image is reported and skipped; the other inputs still get their outputs
# ----------------------------------------------------------------------------------------------------------------------


def _tiny_module(cls=PerceptionFinetuning, **kwargs) -> PerceptionFinetuning:
    return tiny_finetuning(cls=cls, **kwargs)


def _trainer(tmp_path: Path, **kwargs) -> Trainer:
    return quiet_trainer(limit_val_batches=0, default_root_dir=tmp_path, **kwargs)


def test_predict_skips_an_unreadable_image_and_keeps_the_others(tmp_path):
    images = tmp_path / "images"
    _png(images / "a.png", _rgb(12, 20))
    (images / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    _png(images / "c.png", _rgb(20, 9))
    dm = PerceptionDataModule(images=str(images), predict_resolution=16, predict_multiple=2)
    with pytest.warns(UserWarning, match=r"Cannot read image .*b\.png"):
        _trainer(tmp_path).predict(_tiny_module(), datamodule=dm)
    out = tmp_path / "predictions"
    assert np.load(out / "a_depth.npy").shape == (12, 20) and np.load(out / "c_depth.npy").shape == (20, 9)
    assert not list(out.glob("b_*"))  # nothing for the unreadable file
    assert (out / "skipped.txt").read_text().startswith("b: Cannot read image ")


# ----------------------------------------------------------------------------------------------------------------------
# Non-finite loss: stop naming the step and batch, or skip the update and count it; weights never become NaN
# ----------------------------------------------------------------------------------------------------------------------


class _NaNAtBatch(PerceptionFinetuning):
    """The loss of one batch is NaN, as after a corrupt sample or an overflow."""

    def __init__(self, *args, nan_batch: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.nan_batch = nan_batch

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if batch_idx == self.nan_batch else loss


class _Snapshots(Callback):
    def __init__(self):
        self.weights: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.weights.append({k: v.detach().clone() for k, v in pl_module.net.state_dict().items()})


def _all_finite(module) -> bool:
    return all(torch.isfinite(p).all() for p in module.parameters())


def test_nonfinite_loss_raise_names_step_and_batch_before_any_update(tmp_path):
    module, snaps = _tiny_module(_NaNAtBatch, nan_batch=2), _Snapshots()
    dm = PerceptionDataModule(train=ProceduralDepth("train", 32, 16), batch_size=4)
    with pytest.raises(FloatingPointError, match=r"non-finite loss nan at step 2 \(batch index 2, epoch 0\)"):
        _trainer(tmp_path, max_steps=4, callbacks=[NonFiniteGuard(), snaps]).fit(module, datamodule=dm)
    assert len(snaps.weights) == 2 and _all_finite(module)
    for key, value in module.net.state_dict().items():  # the NaN step changed nothing
        assert torch.equal(value, snaps.weights[-1][key]), key


def test_nonfinite_loss_skip_drops_the_update_and_logs_the_count(tmp_path):
    module, snaps, guard = _tiny_module(_NaNAtBatch, nan_batch=1), _Snapshots(), NonFiniteGuard(mode="skip")
    dm = PerceptionDataModule(train=ProceduralDepth("train", 32, 16), batch_size=4)
    trainer = _trainer(tmp_path, max_steps=4, callbacks=[guard, snaps], log_every_n_steps=1)
    with pytest.warns(UserWarning, match=r"non-finite loss nan at step 1 \(batch index 1, epoch 0\); skipped"):
        trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 4 and len(snaps.weights) == 4 and _all_finite(module)
    assert guard.skipped == 1 and float(trainer.callback_metrics["train/skipped_batches"]) == 1.0
    for key in snaps.weights[0]:
        assert torch.equal(snaps.weights[1][key], snaps.weights[0][key]), key  # step 1 left the weights alone
    moved = max((snaps.weights[3][k] - snaps.weights[1][k]).abs().max().item() for k in snaps.weights[0])
    assert moved > 0  # and training went on afterwards
    adam_steps = {int(s["step"]) for s in trainer.optimizers[0].state.values()}
    assert adam_steps == {3}  # 4 steps, one skipped: Adam's moments saw 3 updates


def test_nonfinite_guard_stops_after_too_many_consecutive_skips(tmp_path):
    module = _tiny_module(_NaNAtBatch, nan_batch=0)
    dm = PerceptionDataModule(train=ProceduralDepth("train", 32, 16), batch_size=4)
    guard = NonFiniteGuard(mode="skip", max_consecutive=1)
    with pytest.warns(UserWarning), pytest.raises(FloatingPointError, match=r"1 consecutive non-finite steps"):
        _trainer(tmp_path, max_steps=2, callbacks=[guard]).fit(module, datamodule=dm)
    assert _all_finite(module)


# ----------------------------------------------------------------------------------------------------------------------
# The `diffperc` command: a user error is one short message naming the flag or file, exit status 2, nothing written
# ----------------------------------------------------------------------------------------------------------------------


def _fit_args(tmp: Path, *extra) -> list:
    return ["fit", "--config", QUICKSTART, "--trainer.logger.init_args.save_dir", tmp / "runs", *extra]


def _config_file(tmp: Path, content: bytes) -> Path:
    return _write_bytes(tmp / "override.yaml", content)


# Each builder returns (diffperc arguments, the exact message it must print once).
MAIN_CASES = {
    "bad_flag_value": lambda tmp: (
        _fit_args(tmp, "--data.init_args.batch_size", "-4"), "`--data.batch_size` must be >= 1, got -4"),
    "settings_dataclass_value": lambda tmp: (  # jsonargparse wraps it twice: model, then InferenceSettings
        _fit_args(tmp, "--model.init_args.inference.ensemble_size", "0"),
        "`--model.inference.ensemble_size` must be >= 1, got 0"),
    "callback_setting": lambda tmp: (
        _fit_args(tmp, "--trainer.callbacks+=diffperc.callbacks.NonFiniteGuard", "--trainer.callbacks.mode", "ignore"),
        "`--trainer.callbacks.mode` after `--trainer.callbacks+=NonFiniteGuard`) must be one of ('raise', 'skip'), "
        "got 'ignore'"),
    "missing_vae_folder": lambda tmp: (
        _fit_args(tmp, "--model.init_args.codec", "diffperc.codecs.VAECodec",
                  "--model.init_args.codec.init_args.path", tmp / "sd2"),
        f"VAE folder not found: {tmp / 'sd2'} (`--model.codec.path`)"),
    "missing_data_root": lambda tmp: (
        ["predict", "--config", QUICKSTART, "--trainer.logger.init_args.save_dir", tmp / "runs", "--ckpt_path", "last",
         "--data.init_args.images", tmp / "photos"],
        f"`--data.images` folder not found: {tmp / 'photos'}"),
    "missing_checkpoint": lambda tmp: (
        ["test", "--config", QUICKSTART, "--trainer.logger.init_args.save_dir", tmp / "runs",
         "--ckpt_path", tmp / "last.ckpt"],
        f"Checkpoint file not found: {tmp / 'last.ckpt'} (`--ckpt_path`)"),
    "untrained_run": lambda tmp: (
        ["test", "--config", QUICKSTART, "--trainer.logger.init_args.save_dir", tmp / "runs", "--ckpt_path", "last"],
        f"`--ckpt_path last`: no checkpoint in {tmp / 'runs' / 'quickstart_depth' / 'checkpoints'}. Train first"),
    "reducer_of_another_task": lambda tmp: (
        ["test", "--config", QUICKSTART, "--config", "configs/quickstart/flow.yaml", "--ckpt_path", "last",
         "--trainer.logger.init_args.save_dir", tmp / "runs", "--model.init_args.inference.reducer",
         "median_compilation"],
        "`--model.inference.reducer` 'median_compilation' does not apply to flow: choose one of ('median', 'mean')"),
    "abbreviated_flag": lambda tmp: (  # argparse would take it for `--trainer.max_steps`
        _fit_args(tmp, "--trainer.max_step", "3"), "unrecognized arguments: --trainer.max_step 3"),
    "abbreviated_project_flag": lambda tmp: (
        ["upcycle", "--ckpt_path", tmp / "a.ckpt", "--out", tmp / "b.ckpt", "--num_expert", "4"],
        "unrecognized arguments: --num_expert 4"),
    "sweep_file_missing": lambda tmp: (
        ["sweep", "run", tmp / "nope.yaml"], f"Sweep file not found: {tmp / 'nope.yaml'}"),
    "sweep_file_bad_key": lambda tmp: (
        ["sweep", "run", _write_bytes(tmp / "s.yaml", b"base: configs/quickstart/depth.yaml\ngrids: {}\n")],
        f"sweep file {tmp / 's.yaml'}: unknown key(s) ['grids']; see `diffperc sweep --help`"),
    "upcycle_onto_its_input": lambda tmp: (
        ["upcycle", "--ckpt_path", _write_bytes(tmp / "dense.ckpt", b"dense"), "--out", tmp / "dense.ckpt",
         "--num_experts", "4", "--top_k", "2"],
        f"`--out` {tmp / 'dense.ckpt'} exists: upcycle never replaces a file; name a new one"),
    "key_typo": lambda tmp: (
        _fit_args(tmp, "--model.init_args.image_sise", "16"),
        "`--model` (diffperc.lit.PerceptionFinetuning): Option 'image_sise' is not accepted"),
    "wrong_type": lambda tmp: (
        _fit_args(tmp, "--trainer.max_steps", "many"),
        "`--trainer.max_steps`: Expected a <class 'int'>. Got value: many"),
    "binary_config": lambda tmp: (
        _fit_args(tmp, "--config", _config_file(tmp, bytes(range(128, 256)))),
        f"`--config {tmp / 'override.yaml'}` is not a YAML file: it holds binary data, not UTF-8 text"),
    "config_not_yaml": lambda tmp: (
        _fit_args(tmp, "--config", _config_file(tmp, b"trainer: [1, 2\n  max_steps: }\n")),
        f"`--config {tmp / 'override.yaml'}` is not valid YAML at line 2, column 12"),
    "config_not_a_mapping": lambda tmp: (
        _fit_args(tmp, "--config", _config_file(tmp, b"max_steps 3\n")),
        f"`--config {tmp / 'override.yaml'}` holds a YAML str, not keys such as `trainer:`"),
}


@pytest.fixture(autouse=True)
def _short_errors(monkeypatch):
    monkeypatch.delenv("DIFFPERC_DEBUG", raising=False)  # a developer's DIFFPERC_DEBUG=1 would keep the tracebacks


def _main_stderr(args: list) -> str:
    """Runs ``diffperc.cli.main(args)`` expecting a user error: exit status 2; returns what it printed to stderr."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        with pytest.raises(SystemExit) as info:
            main([str(a) for a in args])
    assert info.value.code == 2, err.getvalue()
    return err.getvalue()


@pytest.mark.parametrize("case", sorted(MAIN_CASES))
def test_main_prints_a_user_error_once_naming_the_flag_or_file(case, tmp_path):
    args, message = MAIN_CASES[case](tmp_path)
    before = _files(tmp_path)
    text = _main_stderr(args)
    assert text.count(message) == 1, text
    assert len(text.splitlines()) < 5 and "Traceback" not in text, text
    assert _files(tmp_path) == before and not (tmp_path / "runs").exists()  # no run folder, no partial file
    assert case != "upcycle_onto_its_input" or (tmp_path / "dense.ckpt").read_bytes() == b"dense"


def test_a_diverged_fit_stops_with_one_line_naming_the_step(tmp_path):
    text = _main_stderr(_fit_args(tmp_path, "--model.init_args.optimizer.init_args.lr", "1e20", "--trainer.max_steps",
                                  "3", "--data.init_args.batch_size", "4", "--trainer.enable_progress_bar", "false"))
    assert re.search(r"diffperc fit: error: non-finite loss (inf|nan) at step \d \(batch index \d, epoch 0\)", text)
    assert len(text.splitlines()) < 5 and "Traceback" not in text, text


def test_main_error_is_short_on_the_real_command_line(tmp_path):
    cmd = [sys.executable, "-m", "diffperc", *map(str, _fit_args(tmp_path, "--data.init_args.batch_size", "-4"))]
    env = {k: v for k, v in os.environ.items() if k != "DIFFPERC_DEBUG"}
    done = run_isolated(cmd, tmp_path, env, timeout=120)
    assert done.returncode == 2 and done.stderr.count("`--data.batch_size` must be >= 1, got -4") == 1, done.stderr
    assert len(done.stderr.splitlines()) < 5 and "Traceback" not in done.stderr, done.stderr
    assert not (tmp_path / "runs").exists()


def test_main_keeps_the_traceback_of_a_bug_and_under_debug(tmp_path, monkeypatch):
    # A ValueError NumPy raises, an AssertionError or a RuntimeError is a bug: its traceback is what to report.
    with pytest.raises(ValueError) as numpy_error:
        np.zeros(2) + np.zeros(3)
    for bug in (numpy_error.value, AssertionError("shapes differ"), RuntimeError("CUDA error: an illegal access")):
        assert user_error(bug) is None, bug
    with monkeypatch.context() as patch:
        patch.setattr(diffperc.cli, "DiffpercCLI", lambda **kwargs: torch.zeros(2) @ torch.zeros(3))
        with pytest.raises(RuntimeError, match="inconsistent tensor size"):
            main(["fit"])
    # `--debug` or DIFFPERC_DEBUG=1: a user error propagates too (Python prints its traceback) as jsonargparse raised it
    args = [str(a) for a in _fit_args(tmp_path, "--data.init_args.batch_size", "-4")]
    wrapped = r"(?s)Does not validate.*`--data.batch_size` must be >= 1, got -4"
    with pytest.raises(ValueError, match=wrapped):
        main([*args, "--debug"])
    monkeypatch.setenv("DIFFPERC_DEBUG", "1")
    with pytest.raises(ValueError, match=wrapped):
        main(args)
    assert not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------------------------------------------------------
# Nothing overwrites what a run recorded (a copy of the shared toy run, so the shared one stays as it is)
# ----------------------------------------------------------------------------------------------------------------------


def _run_copy(recipes, tmp: Path) -> tuple[Path, Path]:
    """The quickstart toy fit copied under ``tmp``: (its config file, the copy's save_dir)."""
    path, run = recipes.fit("configs/quickstart/depth.yaml")
    shutil.copytree(run, tmp / "runs" / run.name, ignore=shutil.ignore_patterns("predictions*", "config_*"))
    return path, tmp / "runs"


def _digests(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in run.rglob("*") if p.is_file()}


@pytest.mark.parametrize("subcommand", ["validate", "test"])
def test_scoring_a_run_keeps_its_config_hparams_and_checkpoints(subcommand, recipes, tmp_path):
    path, save_dir = _run_copy(recipes, tmp_path)
    run = save_dir / "quickstart_depth"
    before = _digests(run)
    cli = tiny_runs.cli(subcommand, "--config", path, "--ckpt_path", "last", "--trainer.logger.init_args.save_dir",
                        save_dir, "--model.init_args.inference.num_steps", "1")
    after = _digests(run)
    for name in ("config.yaml", "hparams.yaml", "checkpoints/last.ckpt"):
        assert after[name] == before[name], f"{subcommand} rewrote {name}"
    # Its own record beside the fit's, with this command's values; the model's hyper-parameters are not logged again.
    record = yaml.safe_load((run / f"config_{subcommand}.yaml").read_text())
    assert record["ckpt_path"] == "last" and record["model"]["init_args"]["inference"]["num_steps"] == 1
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["init_args"]["inference"]["num_steps"] == 2
    assert dict(cli.trainer.logger.hparams) == {}


def _image_folder(folder: Path, sizes: dict[str, tuple[int, int]]) -> Path:
    """Writes the images ``name: (h, w)`` into ``folder``; (0, 0) writes a file that is not an image."""
    for name, (h, w) in sizes.items():
        if h:
            _png(folder / name, _rgb(h, w))
        else:
            folder.mkdir(parents=True, exist_ok=True)
            _write_bytes(folder / name, b"\x89PNG\r\n\x1a\n not an image")
    return folder


def test_predict_names_same_stem_inputs_apart_and_a_rerun_starts_a_fresh_folder(recipes, tmp_path):
    path, save_dir = _run_copy(recipes, tmp_path)
    run = save_dir / "quickstart_depth"
    before = _digests(run)
    first = _image_folder(tmp_path / "first", {"scene.png": (12, 20), "scene.jpg": (20, 9), "bad.png": (0, 0)})
    args = ["predict", "--config", path, "--ckpt_path", "last", "--trainer.logger.init_args.save_dir", save_dir]
    with pytest.warns(UserWarning, match=r"Cannot read image .*bad\.png"):
        tiny_runs.cli(*args, "--data.init_args.images", first)
    out = run / "predictions"
    assert np.load(out / "scene.png_depth.npy").shape == (12, 20)  # both, each from its own input
    assert np.load(out / "scene.jpg_depth.npy").shape == (20, 9)
    assert not list(out.glob("scene_*")) and (out / "skipped.txt").read_text().startswith("bad: Cannot read image")

    second = _image_folder(tmp_path / "second", {"room.png": (10, 14)})
    tiny_runs.cli(*args, "--data.init_args.images", second)
    assert sorted(p.name for p in out.glob("*.npy")) == ["room_depth.npy"]  # no stale outputs, no stale skipped.txt
    assert not (out / "skipped.txt").exists()
    (aside,) = run.glob("predictions.*")  # the first predict's files, moved aside whole
    assert sorted(p.name for p in aside.glob("*.npy")) == ["scene.jpg_depth.npy", "scene.png_depth.npy"]
    assert (aside / "skipped.txt").is_file()
    after = _digests(run)
    for name in ("config.yaml", "hparams.yaml", "checkpoints/last.ckpt"):
        assert after[name] == before[name], f"predict rewrote {name}"
    assert yaml.safe_load((run / "config_predict.yaml").read_text())["data"]["init_args"]["images"] == str(second)


def test_predict_on_a_folder_without_usable_inputs_fails_in_one_line_and_keeps_the_runs_record(
    recipes, tmp_path, capfd
):
    path, save_dir = _run_copy(recipes, tmp_path)
    run = save_dir / "quickstart_depth"
    args = ["predict", "--config", path, "--ckpt_path", "last", "--trainer.logger.init_args.save_dir", save_dir]
    good = _image_folder(tmp_path / "good", {"room.png": (10, 14)})
    tiny_runs.cli(*args, "--data.init_args.images", good)
    before = _digests(run)
    # No input at all: refused before anything is written (no config_predict.yaml naming the empty folder, no
    # TensorBoard file, the earlier predictions where they were).
    (tmp_path / "empty").mkdir()
    text = _main_stderr([*args, "--data.init_args.images", tmp_path / "empty"])
    assert f"`--data.images` folder {tmp_path / 'empty'} holds no images" in text and len(text.splitlines()) < 5
    assert _digests(run) == before
    # Inputs, none readable: an error after predict (exit 2), not a success holding only skipped.txt, and OpenCV's
    # own warning lines do not reach the terminal.
    capfd.readouterr()
    broken = _image_folder(tmp_path / "broken", {"a.png": (0, 0), "b.png": (0, 0)})
    with pytest.warns(UserWarning, match="Cannot read image"):
        text = _main_stderr([*args, "--data.init_args.images", broken])
    assert f"None of the 2 input(s) could be read, so nothing was predicted: see skipped.txt in {run / 'predictions'}" \
        in text
    assert "WARN" not in capfd.readouterr().err
    assert len((run / "predictions" / "skipped.txt").read_text().splitlines()) == 2
    (aside,) = run.glob("predictions.*")  # the good predict's outputs, kept
    assert [p.name for p in aside.glob("*.npy")] == ["room_depth.npy"]


def test_image_folder_names_inputs_that_share_a_stem_by_their_whole_name(tmp_path):
    # `hall.png.jpg`'s stem is `hall.png`, the other input's whole name: it keeps its own whole name instead.
    names = output_names([Path("scene.png"), Path("scene.jpg"), Path("room.png"), Path("hall.png.jpg"),
                          Path("hall.png")])
    assert names == {Path("scene.png"): "scene.png", Path("scene.jpg"): "scene.jpg", Path("room.png"): "room",
                     Path("hall.png.jpg"): "hall.png.jpg", Path("hall.png"): "hall"}
    folder = _image_folder(tmp_path / "images", {"scene.png": (4, 6), "scene.jpg": (4, 6), "room.png": (4, 6)})
    assert sorted(name for name, _ in ImageFolder(str(folder)).items) == ["room", "scene.jpg", "scene.png"]


def test_predict_refuses_a_given_output_dir_that_is_not_empty(tmp_path):
    images = _image_folder(tmp_path / "images", {"a.png": (12, 20)})
    out = tmp_path / "mine"
    out.mkdir()
    _write_bytes(out / "notes.txt", b"the user's own file")
    dm = PerceptionDataModule(images=str(images), predict_resolution=16, predict_multiple=2)
    trainer = _trainer(tmp_path, callbacks=[PredictionWriter(output_dir=str(out))])
    with pytest.raises(FileExistsError, match=rf"`output_dir` {out} is not empty.*`--trainer.callbacks.output_dir`"):
        trainer.predict(_tiny_module(), datamodule=dm)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_a_second_fresh_fit_into_a_run_is_refused_naming_the_folder_and_the_ways_out(recipes, tmp_path):
    path, save_dir = _run_copy(recipes, tmp_path)
    run = save_dir / "quickstart_depth"
    before = _digests(run)
    text = _main_stderr(["fit", "--config", path, "--trainer.logger.init_args.save_dir", save_dir])
    message = (f"{run} already holds a run (config.yaml, last.ckpt). Resume it with `--ckpt_path last`, or start a "
               "new run with another `--trainer.logger.init_args.name` or `--trainer.logger.init_args.version`.")
    assert text.count(message) == 1 and "Traceback" not in text, text
    assert _digests(run) == before  # no last-v1.ckpt, no second set of TensorBoard curves, config.yaml as it was


# ----------------------------------------------------------------------------------------------------------------------
# A full disk while saving a checkpoint: the error names the file, the previous last.ckpt is intact
# ----------------------------------------------------------------------------------------------------------------------


class _FullDisk:
    """The file ``os.fdopen`` returns, on a disk that fills up after ``room`` bytes."""

    def __init__(self, f, room: int):
        self._f, self._room = f, room

    def write(self, data) -> int:
        self._room -= len(data)
        if self._room < 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def test_full_disk_while_saving_a_checkpoint_names_it_and_keeps_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "checkpoints" / "last.ckpt"
    io_plugin = AtomicCheckpointIO()
    io_plugin.save_checkpoint({"global_step": 2, "w": torch.ones(4)}, path)
    previous = path.read_bytes()
    fdopen = os.fdopen
    monkeypatch.setattr(diffperc.utils.os, "fdopen", lambda fd, mode: _FullDisk(fdopen(fd, mode), room=64))
    # torch.save meets the OSError inside its zip writer and raises a RuntimeError that names no file.
    with pytest.raises(OSError, match=rf"No space left on device while writing {path}: any previous last\.ckpt is "
                                      "kept") as info:
        io_plugin.save_checkpoint({"global_step": 3, "w": torch.zeros(4096)}, path)
    assert info.value.errno == errno.ENOSPC and user_error(info.value) == str(info.value)
    assert path.read_bytes() == previous and sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]


def test_full_disk_during_a_resumed_fit_is_one_message_and_last_ckpt_survives(recipes, tmp_path, monkeypatch):
    path, save_dir = _run_copy(recipes, tmp_path)
    last = save_dir / "quickstart_depth" / "checkpoints" / "last.ckpt"
    previous = last.read_bytes()

    def save_on_a_full_disk(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 a partial zip")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", save_on_a_full_disk)
    # `--ckpt_path last` is a resume: allowed into the run; the checkpoint at step 4 finds the disk full.
    text = _main_stderr(["fit", "--config", path, "--trainer.logger.init_args.save_dir", save_dir,
                         "--ckpt_path", "last", "--trainer.max_steps", "4"])
    assert text.count(f"No space left on device while writing {last}: any previous last.ckpt is kept") == 1, text
    assert "Traceback" not in text and len(text.splitlines()) < 5, text
    assert last.read_bytes() == previous and sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt"]
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 2
