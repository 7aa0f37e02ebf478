"""``PerceptionPipeline``: predictions equal to ``diffperc predict``'s for the same checkpoint and image, every input
type alike, each task's output, loading from a Hugging Face cache offline, and one-line errors for wrong inputs."""

import shutil
from importlib.util import find_spec
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_export import fit_tiny_run, net_inputs
from torch.utils.data import default_collate

from diffperc import PerceptionOutput, PerceptionPipeline
from diffperc.cli import main
from diffperc.data.real.images import ImageFolder
from diffperc.data.viz import colorize_depth
from diffperc.diffusion import InferenceSettings
from diffperc.export import export_model
from diffperc.predict import restore_size

import tiny_runs

ROOT = Path(__file__).resolve().parents[1]


def _rgb(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict:
    """name -> (fitted module, export folder) for depth, flow, amodal and the MoE generalist (`test_export.TASKS`)."""
    root = tmp_path_factory.mktemp("exports")
    found = {}
    for name in ("depth", "flow", "amodal", "generalist"):
        module, ckpt = fit_tiny_run(root / "runs" / name, name)
        found[name] = module, export_model(str(ckpt), str(root / name))
    return found


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """A folder per task as ``diffperc predict --data.images`` reads it: odd sizes, RGB written as BGR files."""
    root = tmp_path_factory.mktemp("inputs")
    for folder in ("depth", "flow", "amodal"):
        (root / folder).mkdir()
    cv2.imwrite(str(root / "depth" / "room.png"), _rgb(21, 37, 0)[..., ::-1])
    cv2.imwrite(str(root / "flow" / "a_1.png"), _rgb(20, 30, 1)[..., ::-1])
    cv2.imwrite(str(root / "flow" / "a_2.png"), _rgb(20, 30, 2)[..., ::-1])
    cv2.imwrite(str(root / "amodal" / "cup.png"), _rgb(30, 22, 3)[..., ::-1])
    mask = np.zeros((30, 22), np.uint8)
    mask[5:20, 4:15] = 255
    cv2.imwrite(str(root / "amodal" / "cup_mask.png"), mask)
    return root


@pytest.mark.slow
def test_pipeline_predicts_exactly_what_diffperc_predict_writes(recipes, inputs, tmp_path, monkeypatch):
    # The depth quickstart shrunk by tiny_runs (2 steps, 16 px, 2 DDIM steps, an ensemble of 3), exported.
    config, run = recipes.fit("configs/quickstart/depth.yaml")
    ckpt = run / "checkpoints" / "last.ckpt"
    pipe = PerceptionPipeline.from_pretrained(export_model(str(ckpt), str(tmp_path / "export")))
    assert (
        "- Data: `ProceduralDepth(split='train', length=64, resolution=16, seed=0)`"
        in (tmp_path / "export" / "README.md").read_text()
    )

    # `diffperc predict` in this process (the command line's own path, `main`), with the Hub offline.
    args = [
        "predict",
        *tiny_runs.config_args(ROOT / "configs/quickstart/depth.yaml"),
        "--config",
        str(config),
        "--ckpt_path",
        str(ckpt),
        "--data.init_args.images",
        str(inputs / "depth"),
        "--trainer.logger.init_args.save_dir",
        str(tmp_path / "cli"),
    ]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    precision = torch.get_float32_matmul_precision()
    try:
        main([str(a) for a in args])
    finally:
        torch.set_float32_matmul_precision(precision)  # `main` sets it for the command
    written = tmp_path / "cli" / "quickstart_depth" / "predictions"

    out = pipe(inputs / "depth" / "room.png")
    assert out.prediction.shape == (21, 37) and out.prediction.dtype == np.float32
    np.testing.assert_array_equal(out.prediction, np.load(written / "room_depth.npy"))  # bit for bit
    # The ensemble's spread: the file holds its colour coding.
    colours = cv2.imread(str(written / "room_uncertainty.png"))[..., ::-1]
    np.testing.assert_array_equal(colorize_depth(out.uncertainty, "magma"), colours)


def _folder_prediction(module, folder: Path, layout: str, resolution: int, multiple: int):
    """What ``diffperc predict`` computes for the first input of ``folder``: its reader, ``predict_batch`` and the
    writer's size restoring, without Lightning."""
    batch = default_collate([ImageFolder(str(folder), resolution, multiple, layout)[0]])
    with torch.inference_mode():
        pred, unc = module.predict_batch(batch)
        return restore_size(module.task, pred, unc, batch["resized_size"][0], batch["orig_size"][0])


@pytest.mark.parametrize("name", ["depth", "flow", "amodal"])
def test_pipeline_matches_the_predict_folder_reader_for_each_task(exports, inputs, name):
    module, folder = exports[name]
    pipe = PerceptionPipeline.from_pretrained(folder)
    layout = module.task.predict_layout
    pred, _ = _folder_prediction(module, inputs / name, layout, 16, 2)
    files = sorted(p for p in (inputs / name).iterdir())  # room.png; a_1.png, a_2.png; cup.png, cup_mask.png
    out = pipe(*files)
    assert out.task == name and out.uncertainty is None  # an ensemble of 1 has no spread
    if name == "depth":
        assert out.prediction.shape == (21, 37) and out.prediction.dtype == np.float32
        np.testing.assert_array_equal(out.prediction, pred[0, 0].numpy())
    elif name == "flow":
        assert out.prediction.shape == (20, 30, 2) and out.prediction.dtype == np.float32
        np.testing.assert_array_equal(out.prediction, pred[0].permute(1, 2, 0).numpy())
    else:
        assert out.prediction.shape == (30, 22) and out.prediction.dtype == np.bool_
        np.testing.assert_array_equal(out.prediction, module.task.mask(pred)[0, 0].numpy())


def test_pipeline_input_types_give_the_same_prediction(exports, inputs):
    _, folder = exports["depth"]
    pipe = PerceptionPipeline.from_pretrained(folder)
    path = inputs / "depth" / "room.png"
    rgb = _rgb(21, 37, 0)
    expected = pipe(path, ensemble_size=3).prediction
    as_float = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255
    for image in (str(path), rgb, as_float, as_float.double(), torch.from_numpy(rgb).permute(2, 0, 1)):
        np.testing.assert_array_equal(pipe(image, ensemble_size=3).prediction, expected)

    # Flow frames and amodal masks too: files, then arrays and tensors of the same pixels.
    _, flow_folder = exports["flow"]
    flow = PerceptionPipeline.from_pretrained(flow_folder)
    first, second = _rgb(20, 30, 1), _rgb(20, 30, 2)
    np.testing.assert_array_equal(
        flow(first, torch.from_numpy(second).permute(2, 0, 1).float() / 255).prediction,
        flow(inputs / "flow" / "a_1.png", inputs / "flow" / "a_2.png").prediction,
    )
    _, amodal_folder = exports["amodal"]
    amodal = PerceptionPipeline.from_pretrained(amodal_folder)
    mask = cv2.imread(str(inputs / "amodal" / "cup_mask.png"), cv2.IMREAD_GRAYSCALE)
    expected = amodal(inputs / "amodal" / "cup.png", inputs / "amodal" / "cup_mask.png").prediction
    for m in (mask, mask > 127, torch.from_numpy(mask > 127), torch.from_numpy(mask > 127).float()[None]):
        np.testing.assert_array_equal(amodal(_rgb(30, 22, 3), m).prediction, expected)


@pytest.mark.skipif(find_spec("PIL") is None, reason="PIL is optional")
def test_pipeline_takes_pil_images(exports, inputs):
    from PIL import Image

    pipe = PerceptionPipeline.from_pretrained(exports["depth"][1])
    path = inputs / "depth" / "room.png"
    np.testing.assert_array_equal(pipe(Image.open(path)).prediction, pipe(path).prediction)


def test_pipeline_flow_is_in_pixels_of_the_input_and_the_ensemble_gives_an_uncertainty(exports):
    module, folder = exports["flow"]
    pipe = PerceptionPipeline.from_pretrained(folder)
    first, second = _rgb(32, 32, 1), _rgb(32, 32, 2)
    out = pipe(first, second, processing_resolution=16, ensemble_size=3, reducer="mean", seed=5)
    # At 16 px the network sees half the input's size: its flow, upsampled, doubles to be in the input's pixels.
    small = [
        torch.from_numpy(cv2.resize(x, (16, 16), interpolation=cv2.INTER_AREA)).permute(2, 0, 1)[None]
        for x in (first, second)
    ]
    batch = {"image": small[0].float() / 127.5 - 1, "image2": small[1].float() / 127.5 - 1}
    settings = InferenceSettings(num_steps=1, ensemble_size=3, reducer="mean", seed=5)
    with torch.inference_mode():
        raw, spread = module.predict_batch(batch, settings)
    expected = F.interpolate(raw, size=(32, 32), mode="bilinear", align_corners=False) * 2
    torch.testing.assert_close(torch.from_numpy(out.prediction), expected[0].permute(1, 2, 0), rtol=0, atol=1e-6)
    assert out.uncertainty.shape == (32, 32) and out.uncertainty.dtype == np.float32
    up = F.interpolate(spread, size=(32, 32), mode="bilinear", align_corners=False)[0, 0]
    torch.testing.assert_close(torch.from_numpy(out.uncertainty), up, rtol=0, atol=1e-6)
    assert float(up.max()) > 0  # three members from different noise differ

    # The seed decides the noise: the same seed, the same flow; another seed, another.
    again = pipe(first, second, processing_resolution=16, ensemble_size=3, reducer="mean", seed=5)
    np.testing.assert_array_equal(again.prediction, out.prediction)
    other = pipe(first, second, processing_resolution=16, ensemble_size=3, reducer="mean", seed=6)
    assert not np.array_equal(other.prediction, out.prediction)


def test_generalist_pipeline_predicts_the_task_asked(exports, inputs):
    module, folder = exports["generalist"]
    pipe = PerceptionPipeline.from_pretrained(folder)
    assert pipe.tasks == ["depth", "flow", "amodal"] and pipe.to("cpu") is pipe and pipe.device.type == "cpu"
    depth = pipe(inputs / "depth" / "room.png", task="depth")
    assert depth.task == "depth" and depth.prediction.shape == (21, 37)
    frames = sorted((inputs / "flow").iterdir())
    flow = pipe(*frames)  # the export's predict task
    assert flow.task == "flow" and flow.prediction.shape == (20, 30, 2)
    # The same numbers as the module itself through the predict folder reader (task id 1: flow's route and row).
    pred, _ = _folder_prediction(module, inputs / "flow", "pairs", 16, 2)
    np.testing.assert_array_equal(flow.prediction, pred[0].permute(1, 2, 0).numpy())
    amodal = pipe(inputs / "amodal" / "cup.png", inputs / "amodal" / "cup_mask.png", task="amodal")
    assert amodal.prediction.dtype == np.bool_ and amodal.prediction.shape == (30, 22)


def test_pipeline_loads_a_hub_id_from_the_cache_offline(exports, tmp_path, monkeypatch):
    import huggingface_hub.constants as hub

    module, folder = exports["depth"]
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--tiny-org--tiny-depth"
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))  # read once when huggingface_hub is imported
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)

    pipe = PerceptionPipeline.from_pretrained("tiny-org/tiny-depth")
    with torch.inference_mode():
        torch.testing.assert_close(pipe.net(*net_inputs(pipe.net)), module.net(*net_inputs(module.net)), rtol=0, atol=0)
    assert isinstance(pipe(_rgb(8, 8, 0)), PerceptionOutput)
    with pytest.raises(FileNotFoundError, match=r"tiny-org/absent is not in the Hugging Face cache.*hf download"):
        PerceptionPipeline.from_pretrained("tiny-org/absent")


@pytest.mark.parametrize(
    "call, error, match",
    [
        (
            lambda p: p(np.zeros((8, 8), np.uint8), task="depth"),
            ValueError,
            r"image must be a uint8 \(H, W, 3\) RGB array, got uint8 of shape \(8, 8\)",
        ),
        (
            lambda p: p(np.zeros((8, 8, 3)), task="depth"),
            ValueError,
            r"image must be a uint8 \(H, W, 3\) RGB array, got float64",
        ),
        (
            lambda p: p(torch.full((3, 8, 8), 255.0), task="depth"),
            ValueError,
            r"image must hold values in \[0, 1\], got \[255, 255\]",
        ),
        (
            lambda p: p(torch.rand(8, 8, 3), task="depth"),
            ValueError,
            r"image must be a \(3, H, W\) tensor, got shape \(8, 8, 3\)",
        ),
        (lambda p: p([[0]], task="depth"), TypeError, r"image must be a path, a PIL image"),
        (lambda p: p("absent.png", task="depth"), FileNotFoundError, r"image absent.png: no such file"),
        (
            lambda p: p(_rgb(8, 8, 0), task="flow"),
            ValueError,
            r"flow takes 2 inputs \(frame 1 and frame 2: "
            r"pipe\(frame1, frame2\)\), got 1",
        ),
        (lambda p: p(_rgb(8, 8, 0), _rgb(8, 9, 0), task="flow"), ValueError, r"frame 2 is 9x8 pixels, frame 1 8x8"),
        (
            lambda p: p(_rgb(8, 8, 0), np.zeros((8, 8), np.float32), task="amodal"),
            ValueError,
            r"mask must be a \(H, W\) bool or uint8 array",
        ),
        (
            lambda p: p(_rgb(8, 8, 0), task="segmentation"),
            ValueError,
            r"`task` 'segmentation' is not one of this model's tasks \['depth', 'flow', 'amodal'\]",
        ),
        (lambda p: p(_rgb(8, 8, 0), task="depth", num_steps=0), ValueError, r"`num_steps` must be >= 1, got 0"),
        (lambda p: p(_rgb(8, 8, 0), task="depth", reducer="max"), ValueError, r"`reducer` must be one of"),
        (
            lambda p: p(_rgb(8, 8, 0), _rgb(8, 8, 0), task="flow", reducer="median_compilation"),
            ValueError,
            r"`reducer` 'median_compilation' does not apply to flow: choose one of \('median', 'mean'\)",
        ),
        (lambda p: p(_rgb(8, 8, 0), task="depth", num_steps=5000), ValueError, r"`num_steps` 5000 is more than"),
    ],
)
def test_pipeline_wrong_inputs_fail_in_one_line(exports, call, error, match):
    pipe = PerceptionPipeline.from_pretrained(exports["generalist"][1])
    with pytest.raises(error, match=match) as raised:
        call(pipe)
    assert "\n" not in str(raised.value)


def test_from_pretrained_of_what_is_not_an_export_fails_in_one_line(exports, tmp_path):
    config = PerceptionPipeline.from_pretrained(exports["depth"][1]).config
    with pytest.raises(RuntimeError, match=r"holds no trained network: load one with `PerceptionPipeline.from_pre"):
        PerceptionPipeline(config)(_rgb(8, 8, 0))  # built from a config alone: untrained, never used
    with pytest.raises(FileNotFoundError, match=r"No export folder .*absent, and it is not a Hub id"):
        PerceptionPipeline.from_pretrained(tmp_path / "absent")
    with pytest.raises(TypeError, match=r"takes no `torch_dtype`: its keywords are `cache_dir`, `device`, "):
        PerceptionPipeline.from_pretrained(exports["depth"][1], torch_dtype=torch.float16)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty has no config.json: not a diffperc export"):
        PerceptionPipeline.from_pretrained(tmp_path / "empty")
    broken = tmp_path / "broken"
    shutil.copytree(exports["depth"][1], broken)
    (broken / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"broken has no model.safetensors"):
        PerceptionPipeline.from_pretrained(broken)
    # The weights of another export under this one's config: the first differing field, in one line.
    shutil.copy(exports["flow"][1] / "model.safetensors", broken / "model.safetensors")
    with pytest.raises(ValueError, match=r"`from_pretrained` .*the weights do not match the network") as raised:
        PerceptionPipeline.from_pretrained(broken)
    assert "\n" not in str(raised.value)
