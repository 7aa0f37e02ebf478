import cv2
import numpy as np
import pytest

from diffperc.data import ImageFolder


def _write(folder, name, shape, value=None):
    rng = np.random.default_rng(len(name))
    img = rng.integers(0, 255, shape, dtype=np.uint8) if value is None else np.full(shape, value, np.uint8)
    cv2.imwrite(str(folder / name), img)


def _grey_levels(image):
    """The distinct 0..255 values of an input image in [-1, 1]."""
    return ((image + 1) * 127.5).round().unique().tolist()


def test_image_folder_single_resizes_long_edge_and_pads(tmp_path):
    _write(tmp_path, "a.png", (21, 37, 3))
    s = ImageFolder(str(tmp_path), resolution=16, multiple=4)[0]
    # long edge 37 -> 16, short 21 -> round(21 * 16 / 37) = 9, padded to 12
    assert s["image"].shape == (3, 12, 16) and s["resized_size"].tolist() == [9, 16]
    assert s["orig_size"].tolist() == [21, 37] and s["name"] == "a" and s["error"] == ""


def test_image_folder_pairs_are_consecutive_frames(tmp_path):
    for name in ("f0.png", "f1.png", "f2.png"):
        _write(tmp_path, name, (10, 20, 3))
    folder = ImageFolder(str(tmp_path), resolution=8, multiple=4, layout="pairs")
    assert len(folder) == 2 and folder[1]["name"] == "f1_f2"
    assert folder[0]["image"].shape == folder[0]["image2"].shape == (3, 4, 8)


def test_image_folder_masks_pairs_image_with_its_mask(tmp_path):
    _write(tmp_path, "x.png", (8, 8, 3))
    mask = np.zeros((8, 8), np.uint8)
    mask[:4] = 255
    cv2.imwrite(str(tmp_path / "x_mask.png"), mask)
    s = ImageFolder(str(tmp_path), resolution=8, multiple=4, layout="masks")[0]
    assert s["visible_mask"].shape == (1, 8, 8) and s["visible_mask"].sum() == 32
    _write(tmp_path, "y.png", (8, 8, 3))
    with pytest.raises(ValueError, match="y.png"):
        ImageFolder(str(tmp_path), layout="masks")


def test_image_folder_unreadable_file_becomes_a_reported_placeholder(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not a png")
    s = ImageFolder(str(tmp_path), resolution=8, multiple=4)[0]
    assert "bad.png" in s["error"] and s["image"].shape == (3, 8, 8)


def test_image_folder_named_pairs_never_cross_samples(tmp_path):
    # One value per frame, so each sample shows which two files it was read from.
    frames = {"a_1.png": 10, "a_2.png": 20, "chair_img1.ppm": 30, "chair_img2.ppm": 40}
    for name, value in frames.items():
        _write(tmp_path, name, (8, 12, 3) if name.startswith("a") else (12, 6, 3), value)
    folder = ImageFolder(str(tmp_path), resolution=8, multiple=2, layout="pairs")
    assert len(folder) == 2  # consecutive frames would give 3, one of them a_2 -> chair_img1
    for sample, (first, second) in zip(folder, [(10, 20), (30, 40)]):
        assert sample["error"] == ""
        assert _grey_levels(sample["image"]) == [first] and _grey_levels(sample["image2"]) == [second]
    assert [s["name"] for s in folder] == ["a", "chair"]
    assert [s["orig_size"].tolist() for s in folder] == [[8, 12], [12, 6]]


@pytest.mark.parametrize("lone", ["b_1.png", "b_2.png", "b_img1.png", "b_img2.png"])
def test_image_folder_named_frame_without_its_partner_names_the_file(tmp_path, lone):
    for name in ("a_1.png", "a_2.png", lone):
        _write(tmp_path, name, (8, 8, 3))
    with pytest.raises(ValueError, match=rf"{lone}.* has no `b_(img)?[12]\.<ext>`"):
        ImageFolder(str(tmp_path), layout="pairs")


def test_image_folder_named_pairs_reject_an_image_outside_them(tmp_path):
    for name in ("a_img1.png", "a_img2.png", "extra.png"):
        _write(tmp_path, name, (8, 8, 3))
    with pytest.raises(ValueError, match=r"extra\.png does not"):
        ImageFolder(str(tmp_path), layout="pairs")
    (tmp_path / "extra.png").unlink()
    _write(tmp_path, "a_1.png", (8, 8, 3))  # `a_1` and `a_img1` pairs would both write `a_flow.*`
    _write(tmp_path, "a_2.png", (8, 8, 3))
    with pytest.raises(ValueError, match=r"both name the pair `a`"):
        ImageFolder(str(tmp_path), layout="pairs")


def test_image_folder_frames_without_pair_names_are_consecutive(tmp_path):
    # `_0001`-style numbering and `img1` without an underscore are not pair names: one video, frames i and i + 1.
    for i, name in enumerate(("clip_0001.png", "clip_0002.png", "img1.png", "img2.png")):
        _write(tmp_path, name, (8, 8, 3), 10 * (i + 1))
    folder = ImageFolder(str(tmp_path), resolution=8, multiple=2, layout="pairs")
    assert [s["name"] for s in folder] == ["clip_0001_clip_0002", "clip_0002_img1", "img1_img2"]
    assert _grey_levels(folder[1]["image"]) == [20] and _grey_levels(folder[1]["image2"]) == [30]
