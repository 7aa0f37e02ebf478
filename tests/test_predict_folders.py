"""``diffperc predict --data.images`` on flow and amodal folders, through the CLI: a 2-step quickstart fit (tiny model,
16 px, the shared toy runs of ``tiny_runs.Recipes``) per model, then predict reads the folder in the task's layout
and writes exactly the task's files at each input's own size."""

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from diffperc.cli import main
from diffperc.data.io import read_flo
from diffperc.data.viz import flow_to_color

QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart"
FLOW_PAIRS = {"a": ("a_1.png", "a_2.png", (21, 37)), "chair": ("chair_img1.ppm", "chair_img2.ppm", (40, 13))}
AMODAL_INPUTS = {"obj": (18, 30), "obj.v2": (33, 12)}  # a dot in a name must not cut the output name to `obj`


def _fitted(recipes, config: str) -> tuple[list[str], Path]:
    """The shared toy fit of ``configs/quickstart/<config>`` (``tiny_runs.Recipes``): its config arguments and run."""
    path, run = recipes.fit(f"configs/quickstart/{config}")
    return ["--config", str(path)], run


def _predict(fitted: tuple[list[str], Path], images: Path, *extra: str) -> Path:
    """Predicts ``images`` with the fit's last checkpoint; returns the predictions folder, holding only this call's
    files (a run's earlier predictions are removed first)."""
    args, run = fitted
    shutil.rmtree(run / "predictions", ignore_errors=True)
    main(["predict", *args, "--ckpt_path", "last", "--data.images", str(images), *extra])
    return run / "predictions"


def _rgb(path: Path, hw: tuple[int, int], seed: int) -> None:
    cv2.imwrite(str(path), np.random.default_rng(seed).integers(0, 255, (*hw, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def flow_folder(tmp_path_factory) -> Path:
    """Two independent named pairs of different sizes; pairing across them would mix sizes and names."""
    folder = tmp_path_factory.mktemp("flow_images")
    for seed, (first, second, hw) in enumerate(FLOW_PAIRS.values()):
        _rgb(folder / first, hw, seed)
        _rgb(folder / second, hw, seed + 10)
    return folder


@pytest.fixture(scope="module")
def flow_run(recipes) -> tuple[list[str], Path]:
    return _fitted(recipes, "flow.yaml")


def _assert_flow_outputs(out: Path) -> None:
    assert sorted(p.name for p in out.iterdir()) == ["a_flow.flo", "a_flow.png", "chair_flow.flo", "chair_flow.png"]
    for name, (_, _, (h, w)) in FLOW_PAIRS.items():
        flow = read_flo(out / f"{name}_flow.flo")
        assert flow.shape == (h, w, 2) and np.isfinite(flow).all()
        # The PNG is the Middlebury colouring of the written flow, at the same size (OpenCV reads BGR).
        np.testing.assert_array_equal(cv2.imread(str(out / f"{name}_flow.png"))[..., ::-1], flow_to_color(flow))


def test_predict_flow_named_pairs_write_flo_and_png_at_input_size(flow_run, flow_folder):
    _assert_flow_outputs(_predict(flow_run, flow_folder))


def test_predict_flow_consecutive_frames_of_a_video_folder(flow_run, tmp_path):
    for i in range(3):
        _rgb(tmp_path / f"frame{i:03d}.png", (12, 20), i)
    out = _predict(flow_run, tmp_path)
    names = ["frame000_frame001", "frame001_frame002"]
    assert sorted(p.name for p in out.iterdir()) == [f"{n}_flow.{ext}" for n in names for ext in ("flo", "png")]
    assert read_flo(out / "frame001_frame002_flow.flo").shape == (12, 20, 2)


def test_predict_amodal_writes_whole_and_binary_mask_at_input_size(recipes, tmp_path):
    fitted = _fitted(recipes, "amodal.yaml")
    images = tmp_path / "images"
    images.mkdir()
    for seed, (name, (h, w)) in enumerate(AMODAL_INPUTS.items()):
        _rgb(images / f"{name}.png", (h, w), seed)
        visible = np.zeros((h, w), np.uint8)
        visible[h // 4 : h // 2, w // 4 : w // 2] = 255
        cv2.imwrite(str(images / f"{name}_mask.png"), visible)
    out = _predict(fitted, images)
    assert sorted(p.name for p in out.iterdir()) == [
        "obj.v2_mask.png",
        "obj.v2_whole.png",
        "obj_mask.png",
        "obj_whole.png",
    ]
    for name, (h, w) in AMODAL_INPUTS.items():
        assert cv2.imread(str(out / f"{name}_whole.png")).shape == (h, w, 3)
        mask = cv2.imread(str(out / f"{name}_mask.png"), cv2.IMREAD_UNCHANGED)
        assert mask.shape == (h, w) and mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255}


def test_predict_generalist_flow_reads_named_pairs(recipes, flow_folder):
    fitted = _fitted(recipes, "generalist.yaml")
    _assert_flow_outputs(_predict(fitted, flow_folder, "--model.init_args.predict_task", "flow"))
