import cv2
import numpy as np
import pytest

from diffperc.data import ImageFolder


def _write(folder, name, shape, value=None):
    rng = np.random.default_rng(len(name))
    img = rng.integers(0, 255, shape, dtype=np.uint8) if value is None else np.full(shape, value, np.uint8)
    cv2.imwrite(str(folder / name), img)


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
