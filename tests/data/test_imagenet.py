"""ImageNetFolder: sorted class indices, clear errors for bad layouts, and ADM's centre crop without Pillow."""

import importlib.util

import cv2
import numpy as np
import pytest
import torch

from diffperc.data.real.imagenet import ImageNetFolder, center_crop_arr, pil_resize

_HAS_PIL = importlib.util.find_spec("PIL") is not None


def _write_jpeg(path, h, w, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full((h, w, 3), value, np.uint8))


def test_imagenet_folder_maps_classes_by_sorted_folder_names(tmp_path):
    # Created out of order; a stray non-image file is ignored.
    _write_jpeg(tmp_path / "train" / "n02" / "b.JPEG", 20, 30, 200)
    _write_jpeg(tmp_path / "train" / "n02" / "a.JPEG", 40, 24, 100)
    _write_jpeg(tmp_path / "train" / "n01" / "x.JPEG", 16, 16, 50)
    _write_jpeg(tmp_path / "train" / "abc" / "y.jpg", 33, 17, 0)
    (tmp_path / "train" / "n01" / "notes.txt").write_text("not an image")

    ds = ImageNetFolder(str(tmp_path), "train", resolution=16, flip=False)
    assert ds.classes == ["abc", "n01", "n02"]
    assert ds.num_classes == 3
    assert [(s["name"], s["label"]) for s in ds] == [("y", 0), ("x", 1), ("a", 2), ("b", 2)]
    image = ds[2]["image"]
    assert image.shape == (3, 16, 16) and image.dtype == torch.float32
    # A flat grey JPEG stays flat through crop and resize: 100 -> 100 / 127.5 - 1.
    torch.testing.assert_close(image, torch.full_like(image, 100 / 127.5 - 1), atol=2 / 127.5, rtol=0)


def test_imagenet_folder_rejects_empty_and_malformed_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="split folder not found"):
        ImageNetFolder(str(tmp_path), "train")
    (tmp_path / "train").mkdir()
    with pytest.raises(ValueError, match="is empty"):
        ImageNetFolder(str(tmp_path), "train")
    # ImageNet's raw val layout: images directly in the split folder.
    _write_jpeg(tmp_path / "train" / "ILSVRC2012_val_00000001.JPEG", 8, 8, 0)
    with pytest.raises(ValueError, match="no class folders"):
        ImageNetFolder(str(tmp_path), "train")
    _write_jpeg(tmp_path / "val" / "n01" / "a.JPEG", 8, 8, 0)
    (tmp_path / "val" / "n02").mkdir()
    with pytest.raises(ValueError, match="n02 holds no images"):
        ImageNetFolder(str(tmp_path), "val")
    (tmp_path / "val" / "n02" / "bad.JPEG").write_bytes(b"not a jpeg")
    ds = ImageNetFolder(str(tmp_path), "val", resolution=8)
    with pytest.raises(ValueError, match="Cannot read image .*bad.JPEG"):
        ds[1]


def test_imagenet_folder_flip_is_random_and_exact(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "train" / "c" / "a.png"  # lossless, so the flip is checked exactly
    path.parent.mkdir(parents=True)
    cv2.imwrite(str(path), rng.integers(0, 256, (12, 12, 3), dtype=np.uint8))
    plain = ImageNetFolder(str(tmp_path), resolution=8, flip=False)[0]["image"]
    flipping = ImageNetFolder(str(tmp_path), resolution=8, flip=True)
    torch.manual_seed(0)
    flipped = [not torch.equal(flipping[0]["image"], plain) for _ in range(20)]
    for _ in range(5):
        image = flipping[0]["image"]
        assert torch.equal(image, plain) or torch.equal(image, plain.flip(-1))
    assert 0 < sum(flipped) < 20


def test_center_crop_arr_box_halving_by_hand():
    # 64 px -> 32 px is one box halving and no bicubic pass (the size already fits). Pillow rounds each pass:
    # horizontal (a + b + 1) // 2, then vertical the same on the rounded values.
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)
    wide = image.astype(np.int64)
    horizontal = (wide[:, 0::2] + wide[:, 1::2] + 1) // 2  # (64, 48, 3)
    both = (horizontal[0::2] + horizontal[1::2] + 1) // 2  # (32, 48, 3)
    expected = both[:, 8:40]  # centre crop of the 48 columns
    np.testing.assert_array_equal(center_crop_arr(image, 32), expected)


@pytest.mark.skipif(not _HAS_PIL, reason="needs Pillow as the reference")
@pytest.mark.parametrize("kind", ["box", "bicubic"])
def test_pil_resize_matches_pillow_on_one_axis(kind):
    from PIL import Image

    filters = {"box": Image.Resampling.BOX, "bicubic": Image.Resampling.BICUBIC}
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, (23, 37, 3), dtype=np.uint8)
    for height, width in [(23, 11), (23, 64), (9, 37), (50, 37)]:
        expected = np.asarray(Image.fromarray(image).resize((width, height), filters[kind]))
        np.testing.assert_array_equal(pil_resize(image, (height, width), kind), expected)


@pytest.mark.skipif(not _HAS_PIL, reason="needs Pillow as the reference")
def test_center_crop_arr_matches_adm_with_pillow():
    from PIL import Image

    def adm_center_crop(pil_image, image_size):  # guided-diffusion image_datasets.center_crop_arr
        while min(*pil_image.size) >= 2 * image_size:
            pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.Resampling.BOX)
        scale = image_size / min(*pil_image.size)
        pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.Resampling.BICUBIC)
        arr = np.array(pil_image)
        top, left = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
        return arr[top : top + image_size, left : left + image_size]

    # A smooth photo-like image; Pillow 13 may order the two passes differently, which moves a few levels at most.
    y, x = np.mgrid[0:75, 0:131]
    image = np.stack([(127 + 120 * np.sin(x / 9.0)), (127 + 120 * np.cos(y / 7.0)), (x + y) % 256], -1)
    image = image.astype(np.uint8)
    for size in (16, 24, 32):
        ours, ref = center_crop_arr(image, size), adm_center_crop(Image.fromarray(image), size)
        assert ours.shape == ref.shape == (size, size, 3)
        assert np.abs(ours.astype(int) - ref).max() <= 2
