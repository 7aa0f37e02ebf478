"""Bad input, tried on purpose: every case fails with a message naming the file, key or flag, and writes nothing
(readers, configs, the CLI, predict folders, checkpoints); non-finite losses stop training or are skipped, never
reaching the weights."""

import contextlib
import io
from functools import partial
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from lightning.pytorch import Callback, Trainer

from diffperc.callbacks.nonfinite import NonFiniteGuard
from diffperc.cli import DiffpercCLI
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
from diffperc.diffusion import InferenceSettings
from diffperc.export import export_checkpoint
from diffperc.lit import PerceptionFinetuning
from diffperc.models import DiT
from diffperc.tasks import DepthTask

from helpers import quiet_trainer, tiny_finetuning

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
        r"`task.min_depth` must be >= 0 and < `task.max_depth`"),
    "write_flo_wrong_shape": lambda tmp: (
        lambda: write_flo(tmp / "out.flo", np.zeros((4, 6, 3))), ValueError, r"Flow for .*out\.flo must have shape"),
    "export_not_safetensors": lambda tmp: (
        lambda: export_checkpoint(tmp / "any.ckpt", tmp / "weights.pt"), ValueError,
        r"`--out` must end in \.safetensors, got .*weights\.pt"),
    "nonfinite_guard_mode": lambda tmp: (
        lambda: NonFiniteGuard(mode="ignore"), ValueError, r"`NonFiniteGuard.mode` must be one of \('raise', 'skip'\)"),
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
