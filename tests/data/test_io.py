"""Tests for diffperc.data.io: the .flo format byte by byte, and the image/depth/mask readers' decoding and errors."""

import struct

import cv2
import numpy as np
import pytest

from diffperc.data.io import (
    FLO_MAGIC,
    read_depth_png,
    read_flo,
    read_mask,
    read_rgb,
    read_rgb_at_least,
    write_flo,
)


def _flo_bytes(width: int, height: int, values: np.ndarray, magic: float = FLO_MAGIC) -> bytes:
    return struct.pack("<fii", magic, width, height) + np.asarray(values, dtype="<f4").tobytes()


def test_read_flo_decodes_hand_built_file(tmp_path):
    # 3 wide, 2 high, payload 0..11: pixel (row 0, col 1) holds (u, v) = (2, 3), pixel (row 1, col 0) holds (6, 7).
    path = tmp_path / "a.flo"
    path.write_bytes(_flo_bytes(3, 2, np.arange(12)))
    flow = read_flo(path)
    assert flow.shape == (2, 3, 2) and flow.dtype == np.float32
    assert flow[0, 1].tolist() == [2.0, 3.0]
    assert flow[1, 0].tolist() == [6.0, 7.0]
    flow[0, 0, 0] = 99.0  # the result must be a writable copy, not a view of read-only bytes


def test_write_flo_read_flo_round_trip(tmp_path):
    flow = np.random.default_rng(0).normal(0, 20, (5, 7, 2)).astype(np.float32)
    path = tmp_path / "b.flo"
    write_flo(path, flow)
    data = path.read_bytes()
    assert len(data) == 12 + 5 * 7 * 2 * 4
    assert struct.unpack("<fii", data[:12]) == (FLO_MAGIC, 7, 5)
    np.testing.assert_array_equal(read_flo(path), flow)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.flo"]  # no temporary file left behind


def test_write_flo_overwrites_atomically_and_rejects_bad_shape(tmp_path):
    path = tmp_path / "c.flo"
    write_flo(path, np.ones((2, 2, 2)))
    write_flo(path, np.full((3, 1, 2), -1.5))
    assert read_flo(path).shape == (3, 1, 2) and (read_flo(path) == -1.5).all()
    with pytest.raises(ValueError, match="d.flo"):
        write_flo(tmp_path / "d.flo", np.zeros((4, 4, 3)))
    assert not (tmp_path / "d.flo").exists()


def test_read_flo_truncated_raises_naming_file(tmp_path):
    path = tmp_path / "short.flo"
    path.write_bytes(_flo_bytes(3, 2, np.arange(11)))  # one float short
    with pytest.raises(ValueError, match=r"Truncated.*short\.flo"):
        read_flo(path)
    path.write_bytes(b"\x00" * 5)  # shorter than the header
    with pytest.raises(ValueError, match=r"short\.flo"):
        read_flo(path)


def test_read_flo_overlong_raises_naming_file(tmp_path):
    path = tmp_path / "long.flo"
    path.write_bytes(_flo_bytes(3, 2, np.arange(13)))
    with pytest.raises(ValueError, match=r"Over-long.*long\.flo"):
        read_flo(path)


def test_read_flo_wrong_magic_raises_naming_file(tmp_path):
    path = tmp_path / "magic.flo"
    path.write_bytes(_flo_bytes(3, 2, np.arange(12), magic=1.0))
    with pytest.raises(ValueError, match=r"magic\.flo"):
        read_flo(path)


@pytest.mark.parametrize("width, height", [(0, 2), (3, -1), (1 << 20, 2)])
def test_read_flo_bad_size_raises_naming_file(tmp_path, width, height):
    path = tmp_path / "size.flo"
    path.write_bytes(_flo_bytes(width, height, np.arange(12)))
    with pytest.raises(ValueError, match=r"Invalid size.*size\.flo"):
        read_flo(path)


def test_read_flo_missing_raises_naming_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nothere\.flo"):
        read_flo(tmp_path / "nothere.flo")


def test_read_rgb_returns_rgb_order(tmp_path):
    bgr = np.zeros((2, 3, 3), np.uint8)
    bgr[..., 0] = 10  # blue
    bgr[..., 2] = 200  # red
    cv2.imwrite(str(tmp_path / "x.png"), bgr)
    rgb = read_rgb(tmp_path / "x.png")
    assert rgb.shape == (2, 3, 3) and rgb.dtype == np.uint8
    assert rgb[0, 0].tolist() == [200, 0, 10]


def test_read_rgb_missing_or_corrupt_raises_naming_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"gone\.png"):
        read_rgb(tmp_path / "gone.png")
    (tmp_path / "junk.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"junk\.png"):
        read_rgb(tmp_path / "junk.png")


def _photo(h: int, w: int) -> np.ndarray:
    """A BGR image with smooth gradients and sharp edges (as a photo has), red brighter than blue."""
    y, x = np.mgrid[0:h, 0:w]
    bgr = np.stack([30 + 20 * (x % 16 < 8), (255 * x / w).astype(int), 120 + (120 * y / h).astype(int)], -1)
    return bgr.astype(np.uint8)


@pytest.mark.parametrize(
    "size, factor",
    [((8, 12), 4), ((16, 24), 2), ((12, 24), 2), ((33, 12), 1), ((64, 96), 1)],
    ids=["quarter", "half", "half_by_width", "too_tall_for_half", "full_size"],
)
def test_read_rgb_at_least_decodes_a_large_jpeg_at_the_scale_that_keeps_2x_the_size(tmp_path, size, factor):
    bgr = _photo(64, 96)
    cv2.imwrite(str(tmp_path / "x.jpg"), bgr, [cv2.IMWRITE_JPEG_QUALITY, 95])
    rgb, full = read_rgb_at_least(tmp_path / "x.jpg", size)
    assert full == (64, 96) and rgb.shape == (64 // factor, 96 // factor, 3)
    reference = read_rgb(tmp_path / "x.jpg")
    assert rgb[..., 0].mean() > rgb[..., 2].mean()  # RGB order at every scale
    # After area averaging to `size`, reduced and full decode differ by a few levels at most on this image.
    ours = cv2.resize(rgb, size[::-1], interpolation=cv2.INTER_AREA).astype(int)
    full_decode = cv2.resize(reference, size[::-1], interpolation=cv2.INTER_AREA).astype(int)
    assert np.abs(ours - full_decode).max() <= (0 if factor == 1 else 3)  # measured: 2


def test_read_rgb_at_least_decodes_png_at_full_size(tmp_path):
    cv2.imwrite(str(tmp_path / "x.png"), _photo(64, 96))
    rgb, full = read_rgb_at_least(tmp_path / "x.png", (8, 12))
    assert full == (64, 96) and np.array_equal(rgb, read_rgb(tmp_path / "x.png"))
    assert rgb[0, 0].tolist() == _photo(64, 96)[0, 0, ::-1].tolist()
    with pytest.raises(FileNotFoundError, match=r"gone\.jpg"):
        read_rgb_at_least(tmp_path / "gone.jpg", (8, 8))


def test_read_depth_png_divides_by_scale(tmp_path):
    raw = np.array([[0, 1000, 65535]], np.uint16)
    cv2.imwrite(str(tmp_path / "d.png"), raw)
    np.testing.assert_allclose(read_depth_png(tmp_path / "d.png", 1000.0), [[0.0, 1.0, 65.535]], rtol=1e-6)
    np.testing.assert_allclose(read_depth_png(tmp_path / "d.png", 256.0), [[0.0, 1000 / 256, 65535 / 256]], rtol=1e-6)
    assert read_depth_png(tmp_path / "d.png", 1000.0).dtype == np.float32


def test_read_depth_png_rejects_8bit_naming_file(tmp_path):
    cv2.imwrite(str(tmp_path / "vis.png"), np.full((2, 2), 7, np.uint8))
    with pytest.raises(ValueError, match=r"vis\.png.*16-bit"):
        read_depth_png(tmp_path / "vis.png", 1000.0)
    assert read_depth_png(tmp_path / "vis.png", 1.0, expect_uint16=False)[0, 0] == 7.0


def test_read_mask_thresholds_255_and_01_masks(tmp_path):
    cv2.imwrite(str(tmp_path / "m255.png"), np.array([[0, 255], [100, 200]], np.uint8))
    cv2.imwrite(str(tmp_path / "m01.png"), np.array([[0, 1], [1, 0]], np.uint8))
    colour = np.zeros((1, 2, 3), np.uint8)
    colour[0, 1, 1] = 255
    cv2.imwrite(str(tmp_path / "mc.png"), colour)
    assert read_mask(tmp_path / "m255.png").tolist() == [[False, True], [False, True]]
    assert read_mask(tmp_path / "m01.png").tolist() == [[False, True], [True, False]]
    assert read_mask(tmp_path / "mc.png").tolist() == [[False, True]]
    assert read_mask(tmp_path / "m255.png").dtype == np.bool_
