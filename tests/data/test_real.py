"""Tests for the real-format readers (diffperc.data.real: Hypersim, FlyingChairs, pix2gestalt, the depth eval sets).

Tiny fixtures written here always run; the shared real samples (../shared/fixtures) are used when present.
"""

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from diffperc.data.io import read_flo, read_rgb, write_flo
from diffperc.data.real import (
    DIODEDataset,
    ETH3DDataset,
    FlyingChairsDataset,
    HypersimDataset,
    KITTIDataset,
    NYUv2Dataset,
    Pix2GestaltDataset,
    ScanNetDataset,
    resize_flow,
)
from diffperc.data.real.common import LAYOUT_PAGES

FIXTURES = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures"
needs_fixtures = pytest.mark.skipif(not FIXTURES.is_dir(), reason=f"shared fixtures not found at {FIXTURES}")


def _rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _write_rgb(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), rgb[:, :, ::-1])


def _write_png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), arr)


def _hypersim(tmp_path: Path, depth_mm: np.ndarray, rgb: np.ndarray | None = None, lines: str | None = None):
    root = tmp_path / "val"
    _write_rgb(root / "scene" / "rgb_cam_00_fr0000.png", rgb if rgb is not None else _rgb(*depth_mm.shape[:2]))
    _write_png(root / "scene" / "depth_plane_cam_00_fr0000.png", depth_mm)
    listing = tmp_path / "list.txt"
    listing.write_text(lines or "scene/rgb_cam_00_fr0000.png scene/depth_plane_cam_00_fr0000.png\n")
    return root, listing


# ----------------------------------------------------------------------------------------------------------------------
# Hypersim (and the shared filename-list machinery)
# ----------------------------------------------------------------------------------------------------------------------


def test_hypersim_dataset_decodes_depth_image_and_mask(tmp_path):
    depth_mm = np.array([[0, 1, 1500, 64999], [65000, 65535, 2000, 3]], np.uint16)
    rgb = _rgb(2, 4)
    root, listing = _hypersim(tmp_path, depth_mm, rgb)
    sample = HypersimDataset(root, listing)[0]
    assert sample["name"] == "scene_rgb_cam_00_fr0000"
    assert sample["image"].shape == (3, 2, 4) and sample["image"].dtype == torch.float32
    torch.testing.assert_close(sample["image"], torch.from_numpy(rgb).permute(2, 0, 1).float() / 127.5 - 1)
    assert sample["depth"].shape == (1, 2, 4) and sample["depth"].dtype == torch.float32
    torch.testing.assert_close(sample["depth"][0], torch.from_numpy(depth_mm.astype(np.float32) / 1000))
    # valid: 1e-5 < d < 65 m, so 0 and 65.0 / 65.535 m are out.
    expected = [[False, True, True, True], [False, False, True, True]]
    assert sample["valid_mask"].dtype == torch.bool and sample["valid_mask"][0].tolist() == expected


def test_hypersim_dataset_resize_keeps_depth_values_and_mask_consistent(tmp_path):
    depth_mm = np.arange(1, 7 * 9 + 1, dtype=np.uint16).reshape(7, 9) * 100
    depth_mm[0, :] = 0
    root, listing = _hypersim(tmp_path, depth_mm)
    sample = HypersimDataset(root, listing, resolution=(4, 5))[0]
    assert sample["image"].shape == (3, 4, 5) and sample["valid_mask"].shape == (1, 4, 5)
    depth = sample["depth"][0].numpy()
    # Nearest sampling: every output depth is one of the stored depths, never a blend with the invalid zeros.
    assert set(np.round(depth * 1000).astype(int).ravel()) <= set(depth_mm.astype(int).ravel())
    assert (sample["valid_mask"][0].numpy() == (depth > 1e-5)).all()
    assert HypersimDataset(root, listing, resolution=3)[0]["depth"].shape == (1, 3, 3)


def test_hypersim_dataset_native_gt_returns_original_depth_and_mask(tmp_path):
    depth_mm = np.arange(1, 4 * 6 + 1, dtype=np.uint16).reshape(4, 6) * 250
    depth_mm[0, 0] = 0  # missing, and not among the pixels the 2x3 grid samples (rows 1, 3; columns 1, 3, 5)
    root, listing = _hypersim(tmp_path, depth_mm)
    sample = HypersimDataset(root, listing, resolution=(2, 3), native_gt=True)[0]
    assert sample["valid_mask"][0].all()
    torch.testing.assert_close(sample["depth"][0], torch.from_numpy(depth_mm[1::2, 1::2] / 1000).float())
    torch.testing.assert_close(sample["depth_native"][0], torch.from_numpy(depth_mm / 1000).float())
    assert sample["valid_native"].dtype == torch.bool and sample["valid_native"].shape == (1, 4, 6)
    assert sample["valid_native"].sum().item() == 23 and not sample["valid_native"][0, 0, 0]
    # Training reads (the default) and reads at the native size carry no second copy.
    assert "depth_native" not in HypersimDataset(root, listing, resolution=(2, 3))[0]
    assert "depth_native" not in HypersimDataset(root, listing, native_gt=True)[0]
    assert "depth_native" not in HypersimDataset(root, listing, resolution=(4, 6), native_gt=True)[0]


def test_hypersim_dataset_rejects_8bit_depth(tmp_path):
    root, listing = _hypersim(tmp_path, np.full((2, 3), 9, np.uint8))
    with pytest.raises(ValueError, match=r"depth_plane_cam_00_fr0000\.png.*16-bit"):
        HypersimDataset(root, listing)[0]


@pytest.mark.parametrize("bad", ["../outside/rgb.png", "/etc/rgb.png", "scene/../../rgb.png", "C:\\x\\rgb.png"])
def test_hypersim_dataset_rejects_paths_escaping_root(tmp_path, bad):
    root, listing = _hypersim(tmp_path, np.ones((2, 3), np.uint16))
    listing.write_text(f"scene/rgb_cam_00_fr0000.png scene/depth_plane_cam_00_fr0000.png\n{bad} scene/d.png\n")
    with pytest.raises(ValueError, match=r"list\.txt:2.*escapes the data root"):
        HypersimDataset(root, listing)


def test_hypersim_dataset_rejects_size_mismatch(tmp_path):
    root, listing = _hypersim(tmp_path, np.ones((2, 3), np.uint16), rgb=_rgb(3, 3))
    with pytest.raises(ValueError, match=r"depth_plane_cam_00_fr0000\.png.*rgb_cam_00_fr0000\.png"):
        HypersimDataset(root, listing)[0]


def test_hypersim_dataset_missing_file_and_bad_list_raise(tmp_path):
    root, listing = _hypersim(tmp_path, np.ones((2, 3), np.uint16))
    (root / "scene" / "depth_plane_cam_00_fr0000.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"depth_plane_cam_00_fr0000\.png"):
        HypersimDataset(root, listing)[0]
    listing.write_text("\n# only a comment\n")
    with pytest.raises(ValueError, match=r"list\.txt lists no samples"):
        HypersimDataset(root, listing)
    listing.write_text("scene/rgb_cam_00_fr0000.png\n")
    with pytest.raises(ValueError, match=r"list\.txt:1: expected at least 2 paths"):
        HypersimDataset(root, listing)
    with pytest.raises(FileNotFoundError, match="nolist.txt"):
        HypersimDataset(root, tmp_path / "nolist.txt")
    with pytest.raises(ValueError, match="`resolution`"):
        HypersimDataset(root, tmp_path / "nolist.txt", resolution=(0, 4))


def test_hypersim_dataset_resize_is_area_averaging_of_the_stored_rgb(tmp_path):
    rgb = _rgb(12, 16, seed=3)
    depth_mm = np.arange(12 * 16, dtype=np.uint16).reshape(12, 16) + 1
    root, listing = _hypersim(tmp_path, depth_mm, rgb)
    sample = HypersimDataset(root, listing, resolution=(8, 8))[0]  # 1.5x down in H, 2x in W
    area = cv2.resize(rgb, (8, 8), interpolation=cv2.INTER_AREA)
    torch.testing.assert_close(sample["image"], torch.from_numpy(area).permute(2, 0, 1).float() / 127.5 - 1)
    nearest = cv2.resize(depth_mm, (8, 8), interpolation=cv2.INTER_NEAREST_EXACT).astype(np.float32) / 1000
    torch.testing.assert_close(sample["depth"][0], torch.from_numpy(nearest))
    assert sample["image"].is_contiguous() and sample["depth"].is_contiguous()


@pytest.mark.parametrize(
    "make, page",
    [
        (lambda tmp: HypersimDataset(tmp / "nowhere", tmp / "list.txt"), "Hypersim"),
        (lambda tmp: FlyingChairsDataset(tmp / "nowhere"), "FlyingChairs"),
        (lambda tmp: Pix2GestaltDataset(tmp / "nowhere"), "pix2gestalt"),
    ],
    ids=["hypersim", "flyingchairs", "pix2gestalt"],
)
def test_missing_data_error_names_the_layout_page_once(tmp_path, make, page):
    with pytest.raises(FileNotFoundError) as info:
        make(tmp_path)
    message = str(info.value)
    assert str(tmp_path / "nowhere") in message and "(`root`)" in message
    assert message.count("https://") == 1 and LAYOUT_PAGES[page] in message
    assert info.value.__cause__ is None and info.value.__context__ is None  # one message, nothing chained


def test_hypersim_listed_file_missing_names_the_list_and_the_page_once(tmp_path):
    root, listing = _hypersim(tmp_path, np.ones((2, 3), np.uint16))
    (root / "scene" / "rgb_cam_00_fr0000.png").unlink()
    with pytest.raises(FileNotFoundError) as info:
        HypersimDataset(root, listing)[0]
    message = str(info.value)
    assert message.startswith(f"Image not found: {root / 'scene' / 'rgb_cam_00_fr0000.png'} (listed in {listing}")
    assert message.count("https://github.com/prs-eth/Marigold") == 1 and "dataset_preprocess/hypersim" in message
    assert info.value.__cause__ is None and info.value.__suppress_context__  # raised `from None`: one message


def test_depth_list_jpeg_is_decoded_at_reduced_scale_and_depth_at_full_size(tmp_path):
    y, x = np.mgrid[0:64, 0:96]
    rgb = np.stack([(255 * x / 96), (255 * y / 64), np.full_like(x, 90)], -1).astype(np.uint8)
    (tmp_path / "s" / "color").mkdir(parents=True)
    cv2.imwrite(str(tmp_path / "s/color/000.jpg"), rgb[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])
    depth_mm = np.full((64, 96), 2500, np.uint16)
    _write_png(tmp_path / "s/depth/000.png", depth_mm)
    (tmp_path / "list.txt").write_text("s/color/000.jpg s/depth/000.png\n")
    sample = ScanNetDataset(tmp_path, tmp_path / "list.txt", resolution=(8, 12))[0]  # JPEG read at 1/4: 16x24
    full = cv2.resize(read_rgb(tmp_path / "s/color/000.jpg"), (12, 8), interpolation=cv2.INTER_AREA)
    expected = torch.from_numpy(full).permute(2, 0, 1).float() / 127.5 - 1
    assert (sample["image"] - expected).abs().max().item() <= 2 / 127.5  # within 2 levels of a full decode
    assert sample["depth_native"].shape == (1, 64, 96) and sample["depth"].shape == (1, 8, 12)
    assert sample["valid_mask"].all()


@needs_fixtures
def test_hypersim_dataset_on_shared_fixture_gives_metres():
    root = FIXTURES / "Hypersim_small"
    ds = HypersimDataset(root / "val", root / "filename_list_val.txt")
    assert len(ds) == 1
    sample = ds[0]
    raw = cv2.imread(str(root / "val/ai_015_004/depth_plane_cam_00_fr0002.png"), cv2.IMREAD_UNCHANGED)
    assert raw.dtype == np.uint16 and sample["depth"].shape == (1, 768, 1024)
    for y, x in [(0, 0), (384, 512), (767, 1023)]:
        assert sample["depth"][0, y, x].item() == pytest.approx(raw[y, x] / 1000, rel=1e-6)
    assert sample["valid_mask"][0].numpy().tolist() == ((raw > 0) & (raw < 65000)).tolist()
    assert -1.0 <= sample["image"].min() and sample["image"].max() <= 1.0
    assert sample["name"] == "ai_015_004_rgb_cam_00_fr0002"


# ----------------------------------------------------------------------------------------------------------------------
# FlyingChairs
# ----------------------------------------------------------------------------------------------------------------------


def _chairs(tmp_path: Path, flows: dict[str, np.ndarray], codes: str) -> Path:
    data = tmp_path / "chairs" / "data"
    data.mkdir(parents=True)
    for i, (sample_id, flow) in enumerate(sorted(flows.items())):
        h, w = flow.shape[:2]
        cv2.imwrite(str(data / f"{sample_id}_img1.ppm"), _rgb(h, w, 2 * i))
        cv2.imwrite(str(data / f"{sample_id}_img2.ppm"), _rgb(h, w, 2 * i + 1))
        write_flo(data / f"{sample_id}_flow.flo", flow)
    (tmp_path / "chairs" / "FlyingChairs_train_val.txt").write_text(codes)
    return tmp_path / "chairs"


def test_flyingchairs_dataset_splits_and_format(tmp_path):
    flow = np.random.default_rng(0).normal(0, 3, (6, 8, 2)).astype(np.float32)
    root = _chairs(tmp_path, {"00001": flow, "00002": flow + 1, "00003": flow - 1}, "1\n2\n1\n")
    train, val = FlyingChairsDataset(root, "train"), FlyingChairsDataset(root, "val")
    assert train.ids == ["00001", "00003"] and val.ids == ["00002"]
    sample = val[0]
    assert sample["name"] == "00002" and "flow_orig" not in sample
    assert sample["image"].shape == sample["image2"].shape == (3, 6, 8)
    assert not torch.equal(sample["image"], sample["image2"])
    assert sample["flow"].shape == (2, 6, 8) and sample["flow"].dtype == torch.float32
    torch.testing.assert_close(sample["flow"], torch.from_numpy(flow + 1).permute(2, 0, 1))
    assert sample["valid_mask"].shape == (1, 6, 8) and sample["valid_mask"].all()


def test_flyingchairs_dataset_half_size_halves_vectors(tmp_path):
    flow = np.zeros((6, 8, 2), np.float32)
    flow[..., 0], flow[..., 1] = 4.0, -2.0
    flow[0:2, 0:2, 0] = [[1.0, 2.0], [3.0, 6.0]]  # one 2x2 block averages to 3, which halves to 1.5
    root = _chairs(tmp_path, {"00001": flow}, "1")
    sample = FlyingChairsDataset(root, "train", resolution=(3, 4))[0]
    assert sample["flow"].shape == (2, 3, 4) and sample["valid_mask"].shape == (1, 3, 4)
    u, v = sample["flow"][0].numpy(), sample["flow"][1].numpy()
    assert u[0, 0] == pytest.approx(1.5)
    assert np.allclose(u.ravel()[1:], 2.0) and np.allclose(v, -1.0)
    torch.testing.assert_close(sample["flow_orig"], torch.from_numpy(flow).permute(2, 0, 1))


def test_resize_flow_scales_each_axis_separately():
    flow = np.stack([np.full((4, 4), 8.0), np.full((4, 4), 8.0)], -1).astype(np.float32)
    out = resize_flow(flow, (2, 8))  # half height, double width
    assert out.shape == (2, 8, 2)
    assert np.allclose(out[..., 0], 16.0) and np.allclose(out[..., 1], 4.0)


def test_flyingchairs_dataset_bad_layout_raises(tmp_path):
    flow = np.zeros((4, 4, 2), np.float32)
    root = _chairs(tmp_path, {"00001": flow, "00002": flow}, "1\n")
    with pytest.raises(ValueError, match=r"FlyingChairs_train_val\.txt has 1 lines.*holds 2"):
        FlyingChairsDataset(root)
    (root / "FlyingChairs_train_val.txt").write_text("1\n3\n")
    with pytest.raises(ValueError, match=r"line 2 is '3'"):
        FlyingChairsDataset(root)
    (root / "FlyingChairs_train_val.txt").write_text("1\n1\n")
    with pytest.raises(ValueError, match=r"No 'val' samples"):
        FlyingChairsDataset(root, "val")
    with pytest.raises(ValueError, match="`split`"):
        FlyingChairsDataset(root, "test")
    (root / "data" / "00002_img2.ppm").unlink()
    with pytest.raises(FileNotFoundError, match=r"00002_img2\.ppm"):
        FlyingChairsDataset(root)
    empty = tmp_path / "empty"
    (empty / "data").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"No \*_flow\.flo files"):
        FlyingChairsDataset(empty)


def test_flyingchairs_dataset_flow_image_size_mismatch_raises(tmp_path):
    root = _chairs(tmp_path, {"00001": np.zeros((4, 4, 2), np.float32)}, "1")
    write_flo(root / "data" / "00001_flow.flo", np.zeros((4, 5, 2), np.float32))
    with pytest.raises(ValueError, match=r"00001_flow\.flo"):
        FlyingChairsDataset(root)[0]


@needs_fixtures
def test_flyingchairs_dataset_on_shared_fixture_resize_round_trip():
    root = FIXTURES / "FlyingChairs_small"
    assert FlyingChairsDataset(root, "train").ids == ["00006"]
    assert FlyingChairsDataset(root, "val").ids == ["00018"]
    sample = FlyingChairsDataset(root, "train", resolution=(192, 256))[0]
    original = read_flo(root / "data" / "00006_flow.flo")
    assert sample["flow"].shape == (2, 192, 256) and sample["image2"].shape == (3, 192, 256)
    np.testing.assert_array_equal(sample["flow_orig"].numpy().transpose(1, 2, 0), original)
    back = resize_flow(sample["flow"].numpy().transpose(1, 2, 0), (384, 512))
    epe = np.linalg.norm(back - original, axis=-1)
    # Measured: mean EPE 0.27 px, median ~0; errors concentrate on motion boundaries that area averaging blurs.
    assert epe.mean() < 0.5 and np.median(epe) < 0.01


# ----------------------------------------------------------------------------------------------------------------------
# pix2gestalt
# ----------------------------------------------------------------------------------------------------------------------


def _pix2gestalt(tmp_path: Path, ids: list[str], size: int = 8) -> Path:
    root = tmp_path / "p2g"
    for n, sample_id in enumerate(ids):
        visible = np.zeros((size, size), np.uint8)
        visible[: n + 1, :] = 255
        whole = np.full((size, size, 3), 255, np.uint8)
        whole[2:6, 2:6] = 40
        whole_mask = np.zeros((size, size), np.uint8)
        whole_mask[2:6, 2:6] = 255
        _write_rgb(root / "occlusion" / f"{sample_id}_occlusion.png", _rgb(size, size, n))
        _write_png(root / "visible_object_mask" / f"{sample_id}_visible_mask.png", visible)
        _write_rgb(root / "whole" / f"{sample_id}_whole.png", whole)
        _write_png(root / "whole_mask" / f"{sample_id}_whole_mask.png", whole_mask)
    return root


def test_pix2gestalt_dataset_format(tmp_path):
    root = _pix2gestalt(tmp_path, ["7", "3"])
    ds = Pix2GestaltDataset(root)
    assert ds.ids == ["3", "7"]
    sample = ds[1]  # id "7" was written first: its visible mask is the top row only ("3" has the top 2 rows)
    assert sample["name"] == "7"
    assert sample["visible_mask"].dtype == torch.float32 and sample["visible_mask"].shape == (1, 8, 8)
    assert sample["visible_mask"][0, :, 0].tolist() == [1.0] + [0.0] * 7
    assert ds[0]["visible_mask"][0, :, 0].tolist() == [1.0, 1.0] + [0.0] * 6
    assert sample["whole_mask"].dtype == torch.bool and sample["whole_mask"].sum().item() == 16
    assert sample["whole"][:, 0, 0].tolist() == [1.0, 1.0, 1.0]
    assert sample["whole"][0, 3, 3].item() == pytest.approx(40 / 127.5 - 1)
    resized = Pix2GestaltDataset(root, resolution=4)[0]
    assert resized["image"].shape == resized["whole"].shape == (3, 4, 4)
    assert resized["whole_mask"].sum().item() == 4
    assert resized["visible_mask"][0, :, 0].tolist() == [1.0, 0.0, 0.0, 0.0]  # nearest: masks stay binary


def test_pix2gestalt_dataset_splits_are_disjoint_and_deterministic(tmp_path):
    ids = [f"{i:08d}" for i in range(20)]
    root = _pix2gestalt(tmp_path, ids, size=4)
    train = Pix2GestaltDataset(root, "train", val_fraction=0.3).ids
    val = Pix2GestaltDataset(root, "val", val_fraction=0.3).ids
    assert sorted(train + val) == ids and not set(train) & set(val)
    assert 0 < len(val) < 20
    assert Pix2GestaltDataset(root, "val", val_fraction=0.3).ids == val
    (tmp_path / "val.txt").write_text("00000004\n00000011\n")
    assert Pix2GestaltDataset(root, "val", val_list=tmp_path / "val.txt").ids == ["00000004", "00000011"]
    assert len(Pix2GestaltDataset(root, "train", val_list=tmp_path / "val.txt")) == 18
    (tmp_path / "val.txt").write_text("00000004\nnope\n")
    with pytest.raises(ValueError, match=r"val\.txt.*'nope'"):
        Pix2GestaltDataset(root, "val", val_list=tmp_path / "val.txt")


def test_pix2gestalt_dataset_missing_file_raises(tmp_path):
    root = _pix2gestalt(tmp_path, ["1", "2"])
    (root / "whole" / "2_whole.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"2_whole\.png"):
        Pix2GestaltDataset(root)
    with pytest.raises(FileNotFoundError, match="pix2gestalt folder not found"):
        Pix2GestaltDataset(tmp_path / "nowhere")


@needs_fixtures
def test_pix2gestalt_dataset_whole_mask_matches_white_threshold():
    ds = Pix2GestaltDataset(FIXTURES / "Pix2Gestalt_small")
    assert ds.ids == ["10000015", "10000025", "10000041"]
    ious = []
    for sample in (ds[i] for i in range(len(ds))):
        whole = (sample["whole"] + 1) * 127.5  # back to [0, 255]
        predicted = (255 - whole).abs().amax(dim=0) > 10  # differs from the white background
        target = sample["whole_mask"][0]
        ious.append(((predicted & target).sum() / (predicted | target).sum()).item())
    # Measured IoUs: 0.976, 0.976, 0.981.
    assert min(ious) >= 0.95, ious


# ----------------------------------------------------------------------------------------------------------------------
# Depth evaluation sets
# ----------------------------------------------------------------------------------------------------------------------


def _eval_set(tmp_path: Path, rgb_rel: str, depth_rel: str, rgb: np.ndarray, extra: str = "") -> Path:
    _write_rgb(tmp_path / rgb_rel, rgb)
    listing = tmp_path / "list.txt"
    listing.write_text(f"{rgb_rel} {depth_rel}{extra}\n")
    return listing


def test_nyuv2_dataset_applies_eigen_crop(tmp_path):
    depth = np.full((480, 640), 2000, np.uint16)
    depth[100, 100] = 0
    depth[200, 200] = 10000  # exactly 10 m: out of range (strict upper bound)
    _write_png(tmp_path / "test/k/depth_0001.png", depth)
    listing = _eval_set(tmp_path, "test/k/rgb_0001.png", "test/k/depth_0001.png", _rgb(480, 640), " f.png")
    sample = NYUv2Dataset(tmp_path, listing)[0]
    assert sample["depth"][0, 0, 0].item() == pytest.approx(2.0)
    assert sample["valid_mask"].sum().item() == 426 * 560 - 2
    assert not sample["valid_mask"][0, 44, 300] and sample["valid_mask"][0, 45, 300]
    assert NYUv2Dataset(tmp_path, listing, eigen_crop=False)[0]["valid_mask"].sum().item() == 480 * 640 - 2


def test_kitti_dataset_benchmark_and_eigen_crop(tmp_path):
    depth = np.zeros((375, 1242), np.uint16)
    depth[23:, 13:1229] = 256 * 10  # the benchmark window (bottom 352 rows, centred 1216 columns) at 10 m
    depth[23, 13] = 256 * 90  # beyond 80 m, at the window's top-left corner
    _write_png(tmp_path / "drive/proj_depth/0001.png", depth)
    listing = _eval_set(tmp_path, "d/drive/image_02/data/0001.png", "drive/proj_depth/0001.png", _rgb(375, 1242))
    listing.write_text(listing.read_text().strip() + " 721.5\nd/x.png None 721.5\n")
    ds = KITTIDataset(tmp_path, listing)
    assert len(ds) == 1  # the line without ground truth is dropped
    sample = ds[0]
    assert sample["depth"].shape == (1, 352, 1216) and sample["image"].shape == (3, 352, 1216)
    assert sample["depth"][0, 0, 0].item() == pytest.approx(90.0) and sample["depth"][0, 1, 1].item() == 10.0
    # Eigen crop on 352x1216: rows int(0.3324324 * 352) = 117 to int(0.91351351 * 352) = 321, cols 43 to 1172.
    assert sample["valid_mask"].sum().item() == (321 - 117) * (1172 - 43)
    assert sample["valid_mask"][0, 117, 43] and not sample["valid_mask"][0, 116, 43]
    garg = KITTIDataset(tmp_path, listing, eval_crop="garg")[0]["valid_mask"]
    assert garg.sum().item() == (349 - 143) * (1172 - 43)  # rows int(0.40810811 * 352) = 143 to 349
    no_crop = KITTIDataset(tmp_path, listing, eval_crop=None)[0]["valid_mask"]
    assert no_crop.sum().item() == 352 * 1216 - 1
    # Evaluation sets return the ground truth at its native size by default: for KITTI, the benchmark window.
    half = KITTIDataset(tmp_path, listing, resolution=(176, 608))[0]
    assert half["depth"].shape == (1, 176, 608) and half["depth_native"].shape == (1, 352, 1216)
    torch.testing.assert_close(half["valid_native"], sample["valid_mask"])
    torch.testing.assert_close(half["depth_native"], sample["depth"])
    with pytest.raises(ValueError, match="`eval_crop`"):
        KITTIDataset(tmp_path, listing, eval_crop="zhou")


def test_eth3d_dataset_reads_raw_float_depth(tmp_path):
    depth = np.full((4, 6), 3.5, np.float32)
    depth[0, 0] = np.inf
    (tmp_path / "depth").mkdir()
    (tmp_path / "depth" / "DSC_1.JPG").write_bytes(depth.astype("<f4").tobytes())
    listing = _eval_set(tmp_path, "rgb/DSC_1.png", "depth/DSC_1.JPG", _rgb(4, 6))
    sample = ETH3DDataset(tmp_path, listing)[0]
    assert sample["depth"][0, 0, 0].item() == 0.0 and sample["depth"][0, 3, 5].item() == 3.5
    assert sample["valid_mask"].sum().item() == 23
    depth[1, 1] = np.nan
    (tmp_path / "depth" / "DSC_1.JPG").write_bytes(depth.astype("<f4").tobytes())
    with pytest.raises(ValueError, match=r"DSC_1\.JPG holds NaN"):
        ETH3DDataset(tmp_path, listing)[0]
    (tmp_path / "depth" / "DSC_1.JPG").write_bytes(depth.astype("<f4").tobytes()[:-4])
    with pytest.raises(ValueError, match=r"DSC_1\.JPG has 92 bytes"):
        ETH3DDataset(tmp_path, listing)[0]


def test_scannet_dataset_range(tmp_path):
    _write_png(tmp_path / "s/depth/000.png", np.array([[0, 1, 2, 1500, 9999, 10000]], np.uint16))
    listing = _eval_set(tmp_path, "s/color/000.jpg", "s/depth/000.png", np.full((1, 6, 3), 128, np.uint8))
    sample = ScanNetDataset(tmp_path, listing)[0]
    assert sample["valid_mask"][0].tolist() == [[False, False, True, True, True, False]]
    assert "depth_native" not in sample  # read at its native size: nothing to add
    resized = ScanNetDataset(tmp_path, listing, resolution=(1, 3))[0]
    assert resized["valid_native"][0].tolist() == [[False, False, True, True, True, False]]
    assert resized["depth_native"][0, 0, 3].item() == pytest.approx(1.5) and resized["depth"].shape == (1, 1, 3)
    assert "depth_native" not in ScanNetDataset(tmp_path, listing, resolution=(1, 3), native_gt=False)[0]
    assert sample["depth"][0, 0, 3].item() == pytest.approx(1.5)
    assert sample["name"] == "s_color_000"


def test_diode_dataset_uses_mask_file(tmp_path):
    (tmp_path / "in").mkdir()
    np.save(tmp_path / "in/a_depth.npy", np.array([[[0.5], [2.0], [3.0]], [[400.0], [1.0], [0.0]]], np.float32))
    np.save(tmp_path / "in/a_depth_mask.npy", np.array([[1, 1, 0], [1, 1, 0]], np.float32))
    listing = _eval_set(tmp_path, "in/a.png", "in/a_depth.npy", _rgb(2, 3), " in/a_depth_mask.npy")
    sample = DIODEDataset(tmp_path, listing)[0]
    assert sample["depth"].shape == (1, 2, 3) and sample["depth"][0, 1, 0].item() == 400.0
    assert sample["valid_mask"][0].tolist() == [[True, True, False], [True, True, False]]
    listing.write_text("in/a.png in/a_depth.npy\n")
    with pytest.raises(ValueError, match=r"list\.txt:1: expected at least 3 paths"):
        DIODEDataset(tmp_path, listing)
