"""Bad values, stopped where they enter: checkpoints that do not fit the configured model (task, prediction type,
schedule, codec, network) fail in one line naming the file, field and flag; non-finite ground truth is refused by its
reader; settings that cannot work fail at the start; broken or huge predict inputs are skipped or read at a bounded
size. Every case checks the exact message and that nothing was written."""

import contextlib
import io
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from diffperc.data import (
    DIODEDataset,
    ETH3DDataset,
    FlyingChairsDataset,
    ImageFolder,
    PerceptionDataModule,
    ProceduralDepth,
)
from diffperc.data.io import read_depth_png, read_flo, write_flo
from diffperc.export import export_checkpoint
from diffperc.lit import PerceptionFinetuning
from diffperc.models import DiT
from diffperc.upcycling import upcycle_checkpoint

import tiny_runs
from helpers import quiet_trainer, tiny_finetuning

ROOT = Path(__file__).resolve().parents[1]
DEPTH, FLOW, AMODAL = "configs/quickstart/depth.yaml", "configs/quickstart/flow.yaml", "configs/quickstart/amodal.yaml"


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()} if root.exists() else set()


def _stamps(folder: Path) -> dict:
    """Size and modification time of every file of a shared toy run, which no test here may change."""
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in _files(folder)}


def _cli_error(tmp_path: Path, *args: str, errors=(ValueError, FloatingPointError, SystemExit)) -> str:
    """Runs the real CLI expecting a failure; the run's folder (moved under ``tmp_path/runs``) must stay empty."""
    out = tmp_path / "runs"
    with contextlib.redirect_stderr(io.StringIO()) as err, contextlib.redirect_stdout(io.StringIO()):
        with pytest.raises(errors) as info:
            tiny_runs.cli(*args, "--trainer.logger.init_args.save_dir", out)
    assert _files(out) == set(), f"a failed run wrote {sorted(_files(out))}"
    error = info.value
    while error.__cause__ is not None:  # jsonargparse wraps what a constructor raises
        error = error.__cause__
    return f"{error}\n{err.getvalue()}"


# ----------------------------------------------------------------------------------------------------------------------
# --ckpt_path: a checkpoint is checked against the model the config builds, field by field
# ----------------------------------------------------------------------------------------------------------------------

# override -> (what the depth toy run recorded, what the config builds, flag); the run is v-prediction, linear betas,
# 1000 steps, pixel codec, a dense DiT of width 32, depth 1, 2 heads, patch 2 at 16 px.
_CKPT_CASES = {
    "prediction_type": (["--model.init_args.diffusion.prediction_type", "epsilon"],
                        "prediction_type 'v_prediction', the config builds 'epsilon'",
                        "--model.init_args.diffusion.prediction_type"),
    "beta_schedule": (["--model.init_args.diffusion.beta_schedule", "squaredcos_cap_v2"],
                      "beta_schedule 'linear', the config builds 'squaredcos_cap_v2'",
                      "--model.init_args.diffusion.beta_schedule"),
    "num_train_timesteps": (["--model.init_args.diffusion.num_train_timesteps", "500"],
                            "num_train_timesteps 1000, the config builds 500",
                            "--model.init_args.diffusion.num_train_timesteps"),
    "codec_class": (["--model.init_args.codec", "diffperc.codecs.VAECodec", "--model.init_args.codec.init_args.path",
                     "{sd2}", "--model.init_args.codec.init_args.subfolder", "vae"],
                    "codec 'diffperc.codecs.pixel.PixelCodec', the config builds 'diffperc.codecs.vae.VAECodec'",
                    "--model.init_args.codec"),
    "codec_latent_channels": (["--model.init_args.codec.init_args.unshuffle", "2"],
                              "codec latent_channels 3, the config builds 12", "--model.init_args.codec"),
    "hidden_size": (["--model.init_args.backbone.hidden_size", "64"],
                    "backbone hidden_size 32, the config builds 64", "--model.init_args.backbone.hidden_size"),
    "depth": (["--model.init_args.backbone.depth", "2"],
              "backbone depth 1, the config builds 2", "--model.init_args.backbone.depth"),
    "patch_size": (["--model.init_args.backbone.patch_size", "4"],
                   "backbone patch_size 2, the config builds 4", "--model.init_args.backbone.patch_size"),
    # Same tensor shapes: today this loads silently and samples with the wrong attention split.
    "num_heads": (["--model.init_args.backbone.num_heads", "4"],
                  "backbone num_heads 2, the config builds 4", "--model.init_args.backbone.num_heads"),
    "image_size": (["--model.init_args.image_size", "32"],
                   "image_size 16, the config builds 32", "--model.init_args.image_size"),
}


@pytest.mark.parametrize("case", sorted(_CKPT_CASES))
def test_ckpt_path_that_does_not_fit_the_config_names_file_field_and_flag(case, recipes, toy_assets, tmp_path):
    config, run = recipes.fit(DEPTH)
    ckpt = run / "checkpoints" / "last.ckpt"
    before = _stamps(run)
    override, trained, flag = _CKPT_CASES[case]
    override = [a.format(sd2=toy_assets.sd2) for a in override]
    text = _cli_error(tmp_path, "test", "--config", config, *override, "--ckpt_path", ckpt)
    assert text.splitlines()[0] == f"{ckpt}: checkpoint was trained with {trained} (`{flag}`)"
    assert _stamps(run) == before


def test_ckpt_path_flow_checkpoint_tested_as_amodal_names_the_task(recipes, tmp_path):
    _, flow_run = recipes.fit(FLOW)
    amodal_config, _ = recipes.config(AMODAL)  # flow and amodal both take 2 conditions: the shapes agree
    ckpt = flow_run / "checkpoints" / "last.ckpt"
    text = _cli_error(tmp_path, "test", "--config", amodal_config, "--ckpt_path", ckpt)
    assert text.splitlines()[0] == (
        f"{ckpt}: checkpoint was trained for task 'flow', the config builds 'amodal' (`--model.init_args.task`)"
    )


def test_ckpt_path_dense_checkpoint_into_an_upcycled_config_names_the_layout(recipes, tmp_path):
    config, run = recipes.fit(DEPTH)
    ckpt = run / "checkpoints" / "last.ckpt"
    text = _cli_error(tmp_path, "test", "--config", config, "--model.init_args.upcycle.num_experts", "4",
                      "--model.init_args.upcycle.top_k", "2", "--ckpt_path", ckpt)
    assert text.splitlines()[0] == (
        f"{ckpt}: checkpoint was trained as a dense network, the config builds a mixture of 4 experts "
        "(`--model.init_args.backbone.name` (`-<E>E<k>A`) or `--model.init_args.upcycle`)"
    )


def test_trainer_test_ckpt_path_v_prediction_as_epsilon_names_the_file(recipes, tmp_path):
    # `trainer.test(model, ckpt_path=...)` is what `diffperc sweep tts` runs: on_load_checkpoint checks it.
    config, run = recipes.fit(DEPTH)
    ckpt = str(run / "checkpoints" / "last.ckpt")
    cli = tiny_runs.DiffpercCLI(args=["--config", str(config), "--model.init_args.diffusion.prediction_type",
                                      "epsilon", "--trainer.logger", "false"], run=False)
    trainer = quiet_trainer(default_root_dir=tmp_path)
    with pytest.raises(ValueError) as info:
        trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt)
    assert str(info.value) == (
        f"{ckpt}: checkpoint was trained with prediction_type 'v_prediction', the config builds 'epsilon' "
        "(`--model.init_args.diffusion.prediction_type`)"
    )
    assert _files(tmp_path) == set()


def test_sweep_tts_of_a_checkpoint_for_another_task_fails_naming_it(recipes, tmp_path):
    from diffperc.scaling.sweep import main as sweep_main

    _, flow_run = recipes.fit(FLOW)
    amodal_config, _ = recipes.config(AMODAL)
    ckpt = flow_run / "checkpoints" / "last.ckpt"
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        with contextlib.suppress(SystemExit):  # a sweep with a failed point may end with a non-zero status
            sweep_main(["tts", "--base", str(amodal_config), "--ckpt_path", str(ckpt), "--steps", "1",
                        "--ensemble", "1", "--out", str(tmp_path / "tts")])
    rows = [json.loads(line) for line in (tmp_path / "tts" / "results.jsonl").read_text().splitlines()]
    assert [(r["status"], r["step"]) for r in rows] == [("failed", "tts")]
    log = Path(rows[0]["log"]).read_text().strip().splitlines()
    assert log[-1] == (
        f"ValueError: {ckpt}: checkpoint was trained for task 'flow', the config builds 'amodal' "
        "(`--model.init_args.task`)"
    )
    assert not list((tmp_path / "tts").rglob("test_metrics.json"))


def test_ckpt_path_legacy_non_zip_checkpoint_loads_weights_only(recipes, tmp_path):
    config, run = recipes.fit(DEPTH)
    legacy = tmp_path / "legacy.ckpt"
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    torch.save(checkpoint, legacy, _use_new_zipfile_serialization=False)
    assert legacy.read_bytes()[:4] != b"PK\x03\x04"  # really the legacy format, which cannot be memory-mapped
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        tiny_runs.cli("test", "--config", config, "--ckpt_path", legacy,
                      "--trainer.logger.init_args.save_dir", tmp_path / "runs")
    metrics = tiny_runs.read_metrics(tmp_path / "runs" / "quickstart_depth" / "test_metrics.json")
    assert metrics["task"] == "depth" and metrics["abs_rel"] > 0


# ----------------------------------------------------------------------------------------------------------------------
# --model.init_args.init_from, diffperc export, diffperc upcycle
# ----------------------------------------------------------------------------------------------------------------------


def test_init_from_a_flow_checkpoint_into_a_depth_model_names_the_task(recipes):
    _, flow_run = recipes.fit(FLOW)
    ckpt = flow_run / "checkpoints" / "last.ckpt"
    with pytest.raises(ValueError) as info:
        tiny_finetuning(init_from=str(ckpt))
    assert str(info.value) == (
        f"{ckpt} (`--model.init_args.init_from`): checkpoint was trained for task 'flow', the config builds "
        "'depth' (`--model.init_args.task`)"
    )


def test_init_from_a_v_prediction_checkpoint_as_epsilon_fails_before_writing(recipes, tmp_path):
    config, run = recipes.fit(DEPTH)
    ckpt = run / "checkpoints" / "last.ckpt"
    text = _cli_error(tmp_path, "fit", "--config", config, "--model.init_args.init_from", ckpt,
                      "--model.init_args.diffusion.prediction_type", "epsilon")
    assert text.splitlines()[0] == (
        f"{ckpt} (`--model.init_args.init_from`): checkpoint was trained with prediction_type 'v_prediction', "
        "the config builds 'epsilon' (`--model.init_args.diffusion.prediction_type`)"
    )


@pytest.mark.parametrize(
    "shape, field",
    [
        (dict(hidden_size=48),
         "`hidden_size` is 48 in the file, 32 in the model (`--model.init_args.backbone.hidden_size`)"),
        (dict(depth=2), "`depth` is 2 in the file, 1 in the model (`--model.init_args.backbone.depth`)"),
    ],
    ids=["hidden_size", "depth"],
)
def test_init_from_a_dit_of_another_size_names_the_field_in_one_line(shape, field, tmp_path):
    path = tmp_path / "dit.pt"
    layout = dict(input_size=16, patch_size=2, in_channels=3, hidden_size=32, depth=1, num_heads=2) | shape
    torch.save(DiT(**layout).state_dict(), path)
    with pytest.raises(ValueError) as info:
        tiny_finetuning(init_from=str(path))
    message = str(info.value)
    assert message.startswith(f"{path}: the weights do not fit the model (wrong architecture or size?): {field}")
    assert "\n" not in message


def _tampered(run: Path, tmp_path: Path, **dit_config) -> Path:
    """The toy run's last.ckpt with its `diffperc` record describing another network than its weights."""
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    checkpoint["diffperc"]["dit_config"].update(dit_config)
    path = tmp_path / "tampered.ckpt"
    torch.save(checkpoint, path)
    return path


def test_export_of_a_checkpoint_whose_record_does_not_fit_its_weights_names_the_field(recipes, tmp_path):
    _, run = recipes.fit(DEPTH)
    ckpt = _tampered(run, tmp_path, hidden_size=64, num_heads=2)
    before = _files(tmp_path)
    with pytest.raises(ValueError) as info:
        export_checkpoint(ckpt, tmp_path / "depth.safetensors")
    assert str(info.value) == (
        f"`--ckpt_path` {ckpt}: the weights do not match the network the checkpoint records: `hidden_size` is 32 in "
        "the weights, 64 in the recorded network"
    )
    assert _files(tmp_path) == before


def test_upcycle_of_a_checkpoint_whose_record_does_not_fit_its_weights_names_the_field(recipes, tmp_path):
    _, run = recipes.fit(DEPTH)
    ckpt = _tampered(run, tmp_path, depth=3)
    before = _files(tmp_path)
    with pytest.raises(ValueError) as info:
        upcycle_checkpoint(ckpt, tmp_path / "moe.ckpt", num_experts=4, top_k=2)
    assert str(info.value) == (
        f"`--ckpt_path` {ckpt}: the weights do not match the network the checkpoint records: `depth` is 1 in the "
        "weights, 3 in the recorded network"
    )
    assert _files(tmp_path) == before


# ----------------------------------------------------------------------------------------------------------------------
# Ground truth: NaN and infinite values are refused by the reader, which names the file and the first bad pixel
# ----------------------------------------------------------------------------------------------------------------------


def _rgb(h: int = 4, w: int = 6) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
def test_read_flo_refuses_non_finite_flow_naming_file_and_pixel(value, tmp_path):
    flow = np.zeros((3, 4, 2), np.float32)
    flow[1, 2, 1] = value
    path = tmp_path / "f.flo"
    write_flo(path, flow)
    with pytest.raises(ValueError) as info:
        read_flo(path)
    assert str(info.value) == (
        f"Flow file {path} holds NaN or infinite values (1 of them, the first at row 1, column 2); ground truth must "
        "be finite"
    )


def test_flying_chairs_sample_with_nan_flow_names_the_flo_file(tmp_path):
    data = tmp_path / "chairs" / "data"
    data.mkdir(parents=True)
    for frame in ("img1", "img2"):
        cv2.imwrite(str(data / f"00001_{frame}.ppm"), _rgb())
    flow = np.zeros((4, 6, 2), np.float32)
    flow[3, 0] = np.nan  # both components of one vector
    write_flo(data / "00001_flow.flo", flow)
    (tmp_path / "chairs" / "FlyingChairs_train_val.txt").write_text("1\n")
    with pytest.raises(ValueError) as info:
        FlyingChairsDataset(tmp_path / "chairs", "train")[0]
    assert str(info.value) == (
        f"Flow file {data / '00001_flow.flo'} holds NaN or infinite values (2 of them, the first at row 3, column 0); "
        "ground truth must be finite"
    )


def test_read_depth_refuses_a_float_depth_image_with_nan(tmp_path):
    depth = np.full((4, 6), 2.5, np.float32)
    depth[2, 5] = np.nan
    path = tmp_path / "depth.tiff"
    assert cv2.imwrite(str(path), depth)
    with pytest.raises(ValueError) as info:
        read_depth_png(path, scale=1.0, expect_uint16=False)
    assert str(info.value) == (
        f"Depth {path} holds NaN or infinite values (1 of them, the first at row 2, column 5); ground truth must be "
        "finite"
    )


def test_eth3d_depth_with_nan_is_refused_by_its_reader_naming_the_pixel(tmp_path):
    cv2.imwrite(str(tmp_path / "rgb.png"), _rgb())
    depth = np.full((4, 6), 3.0, "<f4")
    depth[0, 1] = np.nan
    depth[1, 1] = np.inf  # ETH3D's own "no ground truth" code: stays allowed
    (tmp_path / "depth.bin").write_bytes(depth.tobytes())
    (tmp_path / "list.txt").write_text("rgb.png depth.bin\n")
    with pytest.raises(ValueError) as info:
        ETH3DDataset(tmp_path, tmp_path / "list.txt")[0]
    assert str(info.value) == (
        f"Depth {tmp_path / 'depth.bin'} holds NaN or infinite values (1 of them, the first at row 0, column 1); "
        "ground truth must be finite"
    )


def test_diode_depth_with_negative_values_is_refused(tmp_path):
    cv2.imwrite(str(tmp_path / "a.png"), _rgb())
    depth = np.full((4, 6), 5.0, np.float32)
    depth[1, 1] = -2.0
    np.save(tmp_path / "a_depth.npy", depth)
    np.save(tmp_path / "a_depth_mask.npy", np.ones((4, 6), np.float32))
    (tmp_path / "list.txt").write_text("a.png a_depth.npy a_depth_mask.npy\n")
    with pytest.raises(ValueError) as info:
        DIODEDataset(tmp_path, tmp_path / "list.txt")[0]
    assert str(info.value) == (
        f"Depth {tmp_path / 'a_depth.npy'} holds negative values (1 of them, min -2 m); depth is a distance: mark "
        "missing pixels with 0 or the data set's mask"
    )


# ----------------------------------------------------------------------------------------------------------------------
# test_metrics.json is strict JSON: a NaN metric fails naming it and is never written
# ----------------------------------------------------------------------------------------------------------------------


def test_nan_test_metric_fails_naming_it_and_writes_no_metrics_file(tmp_path):
    module = tiny_finetuning()
    module.net.final_layer.linear.bias.data.fill_(float("nan"))  # every prediction is NaN
    dm = PerceptionDataModule(test=ProceduralDepth("test", length=2, resolution=16), batch_size=2)
    with pytest.raises(FloatingPointError) as info:
        quiet_trainer(default_root_dir=tmp_path).test(module, datamodule=dm, verbose=False)
    assert str(info.value) == (
        "Test metric `abs_rel` is nan: non-finite predictions or empty ground truth; test_metrics.json was not written"
    )
    assert _files(tmp_path) == set()


# ----------------------------------------------------------------------------------------------------------------------
# Settings that cannot work fail at the start, naming the flag
# ----------------------------------------------------------------------------------------------------------------------


def test_fit_with_max_steps_zero_fails_before_writing(recipes, tmp_path):
    config, _ = recipes.config(DEPTH)
    text = _cli_error(tmp_path, "fit", "--config", config, "--trainer.max_steps", "0")
    assert text.splitlines()[0] == (
        "`--trainer.max_steps 0` trains nothing: set a positive number of steps, or -1 to train for "
        "`--trainer.max_epochs`"
    )


def test_trainer_fit_with_max_steps_zero_fails(tmp_path):
    dm = PerceptionDataModule(train=ProceduralDepth("train", length=4, resolution=16), batch_size=2)
    with pytest.raises(ValueError, match=r"^`--trainer\.max_steps 0` trains nothing"):
        quiet_trainer(max_steps=0, default_root_dir=tmp_path).fit(tiny_finetuning(), datamodule=dm)
    assert _files(tmp_path) == set()


def test_eval_batch_size_zero_is_refused(recipes, tmp_path):
    with pytest.raises(ValueError) as info:
        PerceptionDataModule(eval_batch_size=0)
    assert str(info.value) == "`--data.eval_batch_size` must be >= 1, got 0"
    config, _ = recipes.config(DEPTH)
    text = _cli_error(tmp_path, "test", "--config", config, "--data.init_args.eval_batch_size", "0")
    assert "`--data.eval_batch_size` must be >= 1, got 0" in text


@pytest.mark.parametrize(
    "override, steps, timesteps",
    [(["--model.init_args.inference.num_steps", "1001"], 1001, 1000),
     (["--model.init_args.diffusion.num_train_timesteps", "1"], 2, 1)],  # the toy config samples 2 steps
    ids=["num_steps", "num_train_timesteps"],
)
def test_more_sampling_steps_than_training_timesteps_fails_before_writing(override, steps, timesteps, recipes,
                                                                          tmp_path):
    config, _ = recipes.config(DEPTH)
    text = _cli_error(tmp_path, "fit", "--config", config, *override)
    assert f"`--model.init_args.inference.num_steps` {steps} is more than the {timesteps} training timesteps " \
           "(`--model.init_args.diffusion.num_train_timesteps`)" in text


def test_predict_multiple_that_cannot_tile_the_patches_fails_naming_the_flag(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    cv2.imwrite(str(images / "a.png"), _rgb(12, 7))
    dm = PerceptionDataModule(images=str(images), predict_resolution=16, predict_multiple=3)
    with pytest.raises(ValueError) as info:
        quiet_trainer(default_root_dir=tmp_path / "out").predict(tiny_finetuning(), datamodule=dm)
    assert str(info.value) == (
        "`--data.init_args.predict_multiple` 3 must be a multiple of the codec's downsample 1 x the patch size 2 = 2: "
        "inputs padded to 3 would not split into whole patches"
    )
    assert _files(tmp_path / "out") == set()


def test_cli_predict_multiple_that_cannot_tile_fails_before_writing(recipes, toy_assets, tmp_path):
    config, run = recipes.fit(DEPTH)  # patch 2, pixel codec
    text = _cli_error(tmp_path, "predict", "--config", config, "--ckpt_path", run / "checkpoints" / "last.ckpt",
                      "--data.init_args.images", toy_assets.images["depth"], "--data.init_args.predict_multiple", "3")
    assert text.splitlines()[0] == (
        "`--data.init_args.predict_multiple` 3 must be a multiple of the codec's downsample 1 x the patch size 2 = 2: "
        "inputs padded to 3 would not split into whole patches"
    )


class _NaNLoss(PerceptionFinetuning):
    def training_step(self, batch, batch_idx):
        return super().training_step(batch, batch_idx) * float("nan")


def test_nonfinite_loss_names_the_samples_of_the_batch(tmp_path):
    dm = PerceptionDataModule(train=ProceduralDepth("train", length=4, resolution=16), batch_size=2)
    with pytest.raises(FloatingPointError) as info:
        quiet_trainer(max_steps=1, limit_val_batches=0, default_root_dir=tmp_path).fit(
            tiny_finetuning(cls=_NaNLoss), datamodule=dm)
    # The first batch of the seed-0 shuffle of the 4 samples (`ResumableSampler`).
    assert str(info.value) == (
        "non-finite loss nan at step 0 (batch index 0, epoch 0): samples ['train_000000', 'train_000001']"
    )
    assert _files(tmp_path) == set()


# ----------------------------------------------------------------------------------------------------------------------
# Predict inputs: a truncated JPEG is skipped and listed; a huge input is read at a bounded size or skipped
# ----------------------------------------------------------------------------------------------------------------------


def _truncated_jpeg(path: Path, progressive: bool) -> Path:
    smooth = np.linspace(0, 255, 40 * 48 * 3).reshape(40, 48, 3).astype(np.uint8)
    ok, buf = cv2.imencode(".jpg", smooth, [cv2.IMWRITE_JPEG_PROGRESSIVE, int(progressive)])
    assert ok
    data = buf.tobytes()
    path.write_bytes(data[: len(data) * 3 // 4])
    assert cv2.imread(str(path)) is not None  # OpenCV decodes the part it has, without an error
    return path


def _oversized(path: Path) -> Path:
    cv2.imwrite(str(path.with_suffix(".png")), _rgb(70, 100))  # 100 px > 8 x `max_image_side` 8 below
    return path.with_suffix(".png")


_TRUNCATED = "Cannot read image {path} (truncated JPEG: no end-of-image marker); skipped"
_TOO_LARGE = ("Image {path} is 100x70 pixels, more than 8x `--data.init_args.max_image_side` 8: skipped (raise the "
              "limit to read it at 1/8 scale)")


@pytest.mark.parametrize(
    "make, reason, limit",
    [
        (lambda p: _truncated_jpeg(p, progressive=False), _TRUNCATED, {}),
        (lambda p: _truncated_jpeg(p, progressive=True), _TRUNCATED, {}),
        (_oversized, _TOO_LARGE, {"max_image_side": 8}),
    ],
    ids=["truncated_jpeg", "truncated_progressive_jpeg", "over_8x_max_image_side"],
)
def test_predict_skips_and_lists_a_broken_or_huge_input(make, reason, limit, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    cv2.imwrite(str(images / "a.png"), _rgb(6, 8))
    bad = make(images / "b.jpg")
    cv2.imwrite(str(images / "c.jpg"), _rgb(8, 5))
    dm = PerceptionDataModule(images=str(images), predict_resolution=8, predict_multiple=2, **limit)
    with pytest.warns(UserWarning, match=r"Skipped 1 unreadable input"):
        quiet_trainer(default_root_dir=tmp_path / "out").predict(tiny_finetuning(), datamodule=dm)
    out = tmp_path / "out" / "predictions"
    assert np.load(next(out.glob("a*_depth.npy"))).shape == (6, 8)
    assert np.load(next(out.glob("c*_depth.npy"))).shape == (8, 5)
    assert not list(out.glob("b*_depth*"))
    line = (out / "skipped.txt").read_text().splitlines()
    assert len(line) == 1 and line[0].split(": ", 1)[1] == reason.format(path=bad)


def test_image_over_max_side_is_decoded_at_a_fraction_and_keeps_its_size(tmp_path):
    smooth = np.dstack([*np.meshgrid(np.arange(100), np.arange(70))[::-1], np.full((70, 100), 50)]).astype(np.uint8)
    cv2.imwrite(str(tmp_path / "big.jpg"), smooth)
    sample = ImageFolder(str(tmp_path), resolution=16, multiple=2, max_image_side=32)[0]
    # 100 px > 32: decoded at 1/4 (25 px, the least reduction within the limit), then resized to 16 px as usual.
    quarter = cv2.imread(str(tmp_path / "big.jpg"), cv2.IMREAD_REDUCED_COLOR_4)
    assert quarter.shape == (18, 25, 3)
    expected = cv2.resize(np.ascontiguousarray(quarter[..., ::-1]), (16, 11), interpolation=cv2.INTER_AREA)
    assert sample["orig_size"].tolist() == [70, 100] and sample["resized_size"].tolist() == [11, 16]
    torch.testing.assert_close(sample["image"][:, :11], torch.from_numpy(expected).permute(2, 0, 1).float() / 127.5 - 1)


_PEAK_RSS = """
import resource, sys
from diffperc.data import ImageFolder
folder = ImageFolder(sys.argv[1], resolution=32, multiple=4)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
sample = folder[0]
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(before, after, sample["error"] or "ok", *sample["orig_size"].tolist())
"""


@pytest.mark.slow
def test_huge_jpeg_is_read_within_a_bounded_memory(tmp_path):
    # A 12000 x 9000 photo is 324 MB decoded at full size; above the default 8192 px side it is decoded at 1/2 scale
    # (81 MB), never at full size. Peak RSS is measured in a fresh process (Linux reports it in KiB).
    (tmp_path / "in").mkdir()
    make = textwrap.dedent(f"""
        import cv2, numpy as np
        row = np.linspace(0, 255, 12000, dtype=np.float32).astype(np.uint8)
        image = np.broadcast_to(row[None, :, None], (9000, 12000, 3))
        assert cv2.imwrite({str(tmp_path / "in" / "photo.jpg")!r}, np.ascontiguousarray(image))
    """)
    subprocess.run([sys.executable, "-c", make], check=True, timeout=120)
    done = subprocess.run([sys.executable, "-c", _PEAK_RSS, str(tmp_path / "in")], check=True, timeout=120,
                          capture_output=True, text=True, cwd=ROOT)
    before, after, status, h, w = done.stdout.split()
    assert (status, int(h), int(w)) == ("ok", 9000, 12000)
    grown_mib = (int(after) - int(before)) / 1024
    assert grown_mib < 300, f"reading the sample grew the peak RSS by {grown_mib:.0f} MiB"  # 622 MiB at full size


def test_json_records_are_strict_and_a_nan_leaves_the_old_file(tmp_path):
    from diffperc.utils import atomic_write_json

    path = atomic_write_json(tmp_path / "metrics.json", {"abs_rel": 0.25})
    with pytest.raises(ValueError, match=r"Refusing to write .*metrics\.json: Out of range float values"):
        atomic_write_json(path, {"abs_rel": float("nan")})
    assert path.read_text() == '{\n  "abs_rel": 0.25\n}\n' and list(tmp_path.iterdir()) == [path]
