"""ProceduralSceneClasses: depth-scene images labelled by layout x material, and the `SceneStyle` of
`render_depth_scene` behind them (whose default must keep drawing ProceduralDepth's scenes bit for bit)."""

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from diffperc.data import ProceduralDepth, ProceduralSceneClasses
from diffperc.data.procedural import SCENE_CLASS_NAMES, SCENE_CLASSES, SceneStyle, render_depth_scene, split_rng
from diffperc.data.procedural.base import signed_chw

import tiny_runs

ROOT = Path(__file__).resolve().parents[2]
NUM_CLASSES = len(SCENE_CLASS_NAMES)


def _sha256(*arrays) -> str:
    digest = hashlib.sha256()
    for array in arrays:
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------ the default is unchanged
# Golden values: produced by render_depth_scene as it was before `SceneStyle` existed (numpy 2.4, x86-64), from
# np.random.default_rng(seed). The quickstart depth metrics are computed on these scenes.
_PINNED = {
    (0, 32, 32): (
        "e46f1283e23c83380b3fae5091e6360ede4fe71ec8928791eacd2c9e59b4f451",
        "24e96e1afe749927f64286da1d3d93a217814442a32dff46ab07e74e5f3b0da9",
        [0.36857882, 0.26890463, 0.2570627],  # rgb[5, 7]
        4.95706,  # depth[20, 10]
    ),
    (7, 24, 40): (
        "38acb4e65490029c5a15645f2d90db56cc4d6b24599221aa2f99b221fa458b85",
        "f306dcc0129d6dc74c585fb55b8e5912de3bb9d56f0dc8bce98baec88b387e7a",
        [0.28330004, 0.0840625, 0.06987353],
        5.2043576,
    ),
}


@pytest.mark.parametrize("style", [None, SceneStyle()], ids=["no_style", "default_style"])
def test_render_depth_scene_default_output_is_pinned(style):
    for (seed, h, w), (rgb_hash, depth_hash, pixel, depth_value) in _PINNED.items():
        args = () if style is None else (style,)
        rgb, depth = render_depth_scene(np.random.default_rng(seed), h, w, *args)
        # The values first: a mismatch here is a changed scene, not a last-bit difference of another numpy build.
        torch.testing.assert_close(torch.from_numpy(rgb[5, 7]), torch.tensor(pixel), rtol=0, atol=1e-6)
        assert depth[20, 10] == pytest.approx(depth_value, abs=1e-5)
        assert (_sha256(rgb), _sha256(depth)) == (rgb_hash, depth_hash), (seed, h, w)


def test_procedural_depth_samples_are_pinned():
    # Four validation scenes of the depth quickstart, image and depth, hashed as produced before `SceneStyle`.
    ds = ProceduralDepth("val", length=4, resolution=32)
    samples = [ds[i] for i in range(4)]
    arrays = [a for s in samples for a in (s["image"].numpy(), s["depth"].numpy())]
    assert _sha256(*arrays) == "ee8e936f9c62599e074137f09cb03be11d4acaa8cde7243ef3267b0911aef324"


def test_scene_style_without_side_walls_only_opens_the_room():
    # The same draws with and without side walls: the walls only ever occlude, so depth never shrinks without them,
    # and grows where a wall was the first hit (the room's sides at 32 px always show some wall).
    _, walls = render_depth_scene(np.random.default_rng(3), 32, 32, SceneStyle())
    _, open_hall = render_depth_scene(np.random.default_rng(3), 32, 32, SceneStyle(side_walls=False))
    assert (open_hall >= walls).all()
    assert (open_hall > walls + 1e-3).mean() > 0.05


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_boxes=(2, 2)), r"`SceneStyle.num_boxes` must be integers 0 <= low < high, got \(2, 2\)"),
        (dict(texture_kinds=(0, 3)), r"`SceneStyle.texture_kinds` must be a non-empty subset of 0, 1, 2"),
        (dict(room_depth=(2.0, 5.0)), r"`SceneStyle.room_depth` must start beyond 2.5 m"),
        (dict(fov_deg=()), r"`SceneStyle.fov_deg` must be angles in \(0, 180\)"),
    ],
)
def test_scene_style_rejects_bad_ranges(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SceneStyle(**kwargs)


# ------------------------------------------------------------------------------------------------ the data set
def test_scene_classes_are_deterministic_per_index_and_seed():
    a, b = ProceduralSceneClasses("train", 20, 32, seed=3)[13], ProceduralSceneClasses("train", 20, 32, seed=3)[13]
    assert torch.equal(a["image"], b["image"]) and a["label"] == b["label"] == 13 % NUM_CLASSES == 4
    assert a["name"] == "train_000013_hall_tile"
    assert not torch.equal(a["image"], ProceduralSceneClasses("train", 20, 32, seed=4)[13]["image"])
    assert not torch.equal(a["image"], ProceduralSceneClasses("val", 20, 32, seed=3)[13]["image"])


def test_scene_classes_render_with_the_depth_scene_renderer():
    # Sample i is render_depth_scene's image for split_rng(seed, split, i) with the style of class i % num_classes.
    ds = ProceduralSceneClasses("val", 30, (24, 40), seed=2)
    for index in (0, 5, 17):
        rgb, _ = render_depth_scene(split_rng(2, "val", index), 24, 40, SCENE_CLASSES[SCENE_CLASS_NAMES[index % 9]])
        torch.testing.assert_close(ds[index]["image"], signed_chw(rgb), rtol=0, atol=0)


def test_scene_classes_sample_format_and_labels():
    assert SCENE_CLASS_NAMES[:3] == ("room_wood", "room_tile", "room_concrete") and NUM_CLASSES == 9
    ds = ProceduralSceneClasses("test", 12, (16, 24), num_classes=4)
    samples = [ds[i] for i in range(12)]
    assert [s["label"] for s in samples] == [0, 1, 2, 3] * 3
    assert all(isinstance(s["label"], int) for s in samples)
    image = samples[7]["image"]
    assert image.shape == (3, 16, 24) and image.dtype == torch.float32
    assert image.min() >= -1 and image.max() <= 1 and image.std() > 0.05
    batch = torch.utils.data.default_collate(samples[:4])
    assert batch["label"].dtype == torch.int64 and batch["label"].tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match=r"`num_classes` must be in \[1, 9\], got 10"):
        ProceduralSceneClasses(num_classes=10)


def _features(ds, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Per image: an 8-bin histogram per colour channel, and the mean and std of luminance in a 4x4 grid of blocks."""
    feats, labels = [], []
    for i in range(n):
        sample = ds[i]
        img = (sample["image"].numpy() + 1) / 2  # (3, H, W) in [0, 1]
        hist = [np.histogram(img[c], bins=8, range=(0, 1))[0] / img[c].size for c in range(3)]
        blocks = img.mean(0).reshape(4, img.shape[1] // 4, 4, img.shape[2] // 4)  # (4, h, 4, w)
        feats.append(np.concatenate([*hist, blocks.mean((1, 3)).ravel(), blocks.std((1, 3)).ravel()]))
        labels.append(i % NUM_CLASSES)
    return np.array(feats), np.array(labels)


def _nearest_centroid(train: tuple, test: tuple, columns: slice) -> np.ndarray:
    """Test-set predictions of the nearest class mean, on standardised features (train statistics)."""
    (x_train, y_train), (x_test, _) = train, test
    x_train, x_test = x_train[:, columns], x_test[:, columns]
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    centroids = np.stack([x_train[y_train == c].mean(0) for c in range(NUM_CLASSES)])
    return ((x_test[:, None] - centroids[None]) ** 2).sum(-1).argmin(1)


def test_scene_classes_are_told_apart_by_simple_image_statistics():
    # 20 images per class: class means from the train split, scored on the val split (chance: 1/9, 1/3, 1/3).
    n = 20 * NUM_CLASSES
    train = _features(ProceduralSceneClasses("train", n, 32), n)
    val = _features(ProceduralSceneClasses("val", n, 32), n)
    y = val[1]
    colour = _nearest_centroid(train, val, slice(0, 24))  # colour histograms only
    assert (colour % 3 == y % 3).mean() >= 0.9  # the material (palette); measured 0.97
    both = _nearest_centroid(train, val, slice(None))
    assert (both == y).mean() >= 0.5  # all 9 classes; measured 0.63
    assert (both // 3 == y // 3).mean() >= 0.6  # the layout (room, hall, corridor); measured 0.69
    # Control: the same statistic on ProceduralDepth's scenes labelled i % 9 stays near chance; measured 0.13.
    control_train = _features(ProceduralDepth("train", n, 32), n)
    control_val = _features(ProceduralDepth("val", n, 32), n)
    assert (_nearest_centroid(control_train, control_val, slice(None)) == control_val[1]).mean() < 0.25


# ------------------------------------------------------------------------------------------ the recipe, run for real
@pytest.mark.slow
def test_pretrain_scenes_recipe_fits_and_initialises_the_depth_quickstart(recipes, tmp_path):
    # The recipe as its header says (shrunk by tiny_runs), then the depth quickstart from its last.ckpt for 2 steps.
    _, run = recipes.fit("configs/quickstart/pretrain_scenes.yaml")
    ckpt = run / "checkpoints" / "last.ckpt"
    assert run.name == "quickstart_pretrain_scenes"
    pretrained = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert pretrained["global_step"] == 2
    ema = {k.removeprefix("net."): v for k, v in pretrained["state_dict"].items() if k.startswith("net.")}
    table = ema["y_embedder.embedding_table.weight"]
    assert table.shape[0] == NUM_CLASSES + 1  # 9 classes and the null label

    depth = ROOT / "configs/quickstart/depth.yaml"
    _, cfg = recipes.config("configs/quickstart/depth.yaml")
    cfg["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path / "runs")
    cfg["model"]["init_args"]["init_from"] = str(ckpt)
    path = tiny_runs.write_config(cfg, tmp_path / "depth_from_scenes.yaml")
    # The network the fine-tune starts from: the EMA weights, the 9 class rows averaged into the task row.
    start = tiny_runs.DiffpercCLI(args=[*tiny_runs.config_args(depth), "--config", str(path)], run=False).model.net
    state = start.state_dict()
    torch.testing.assert_close(state["blocks.0.attn.qkv.weight"], ema["blocks.0.attn.qkv.weight"])
    torch.testing.assert_close(state["x_embedder.proj.weight"], ema["x_embedder.proj.weight"].repeat(1, 2, 1, 1) / 2)
    torch.testing.assert_close(state["y_embedder.embedding_table.weight"], table[:NUM_CLASSES].mean(0, keepdim=True))

    tiny_runs.cli("fit", *tiny_runs.config_args(depth), "--config", path)
    finetuned = torch.load(
        tmp_path / "runs/quickstart_depth/checkpoints/last.ckpt", map_location="cpu", weights_only=True
    )
    assert finetuned["global_step"] == 2
    assert finetuned["state_dict"]["net.y_embedder.embedding_table.weight"].shape == (1, table.shape[1])
