"""Procedural flow and amodal generators: determinism per (seed, split, index), independent splits, exact flow
(warping frame 2 back reproduces frame 1 where nothing occludes) and consistent amodal masks."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffperc.data.procedural import (
    ProceduralAmodal,
    ProceduralFlow,
    render_amodal_scene,
    render_flow_pair,
    split_rng,
)
from diffperc.tasks.amodal import AmodalTask

GENERATORS = [ProceduralFlow, ProceduralAmodal]


@pytest.mark.parametrize("cls", GENERATORS, ids=lambda c: c.__name__)
def test_procedural_task_generators_are_deterministic_per_seed_split_index(cls):
    a, b = cls("train", 10, 24, seed=3)[4], cls("train", 10, 24, seed=3)[4]
    assert a.keys() == b.keys()
    for key, value in a.items():
        assert torch.equal(value, b[key]) if torch.is_tensor(value) else value == b[key]
    for other in (cls("train", 10, 24, seed=4)[4], cls("val", 10, 24, seed=3)[4], cls("train", 10, 24, seed=3)[5]):
        assert not torch.equal(a["image"], other["image"])


@pytest.mark.parametrize("cls", GENERATORS, ids=lambda c: c.__name__)
def test_procedural_task_splits_never_share_a_sample(cls):
    splits = ("train", "val", "test")
    keys = {split: {cls(split, 8, 16)[i]["image"].numpy().tobytes() for i in range(8)} for split in splits}
    assert len(keys["train"]) == 8
    assert not keys["train"] & keys["val"] and not keys["train"] & keys["test"] and not keys["val"] & keys["test"]


def test_procedural_flow_sample_format_matches_flyingchairs():
    s = ProceduralFlow("val", 5, (24, 40))[2]
    assert set(s) == {"image", "image2", "flow", "valid_mask", "name"} and s["name"] == "val_000002"
    assert s["image"].shape == s["image2"].shape == (3, 24, 40) and s["flow"].shape == (2, 24, 40)
    assert s["image"].dtype == s["flow"].dtype == torch.float32 and s["valid_mask"].dtype == torch.bool
    assert s["image"].min() >= -1 and s["image"].max() <= 1 and s["valid_mask"].all()


def test_procedural_flow_magnitudes_are_a_few_percent_of_the_image():
    mags = torch.cat([ProceduralFlow("train", 20, 32)[i]["flow"].norm(dim=0).flatten() for i in range(20)]) / 32
    assert 0.01 < mags.median() < 0.05 and torch.quantile(mags, 0.99) < 0.2


def test_procedural_flow_warps_frame1_to_frame2():
    h = w = 48
    errors, zero_flow_errors = [], []
    for index in range(3):
        pair = render_flow_pair(split_rng(0, "test", index), h, w)
        flow = torch.from_numpy(pair["flow"])
        y, x = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
        tx, ty = x + flow[..., 0], y + flow[..., 1]
        # 1. Sample frame 2 where each frame-1 pixel moved to (bilinear).
        grid = torch.stack([(tx + 0.5) / w * 2 - 1, (ty + 0.5) / h * 2 - 1], -1)[None]
        frame2 = torch.from_numpy(pair["image2"]).permute(2, 0, 1)[None]
        warped = F.grid_sample(frame2, grid, mode="bilinear", align_corners=False)[0].permute(1, 2, 0)
        # 2. Keep pixels that stay visible: inside frame 2 and all four bilinear neighbours show the same layer.
        x0, y0 = tx.floor().long().clamp(0, w - 2), ty.floor().long().clamp(0, h - 2)
        layers1, layers2 = torch.from_numpy(pair["layers"]), torch.from_numpy(pair["layers2"])
        keep = (tx >= 0) & (tx <= w - 1) & (ty >= 0) & (ty <= h - 1)
        for dy in (0, 1):
            for dx in (0, 1):
                keep &= layers2[y0 + dy, x0 + dx] == layers1
        assert keep.float().mean() > 0.5
        frame1 = torch.from_numpy(pair["image"])
        errors.append((warped - frame1).abs()[keep].mean())
        zero_flow_errors.append((frame2[0].permute(1, 2, 0) - frame1).abs()[keep].mean())
    # The exact flow leaves only bilinear-interpolation error; ignoring the motion leaves far more.
    assert max(errors) < 0.015 and min(zero_flow_errors) > 5 * max(errors)


def test_procedural_amodal_sample_format_matches_pix2gestalt():
    s = ProceduralAmodal("val", 5, (24, 40))[1]
    assert set(s) == {"image", "visible_mask", "whole", "whole_mask", "name"} and s["name"] == "val_000001"
    assert s["image"].shape == s["whole"].shape == (3, 24, 40)
    assert s["visible_mask"].shape == s["whole_mask"].shape == (1, 24, 40)
    assert s["visible_mask"].dtype == torch.float32 and s["whole_mask"].dtype == torch.bool
    assert s["whole"].min() >= -1 and s["whole"].max() <= 1


def test_procedural_amodal_masks_are_consistent():
    for index in range(5):
        scene = render_amodal_scene(split_rng(0, "train", index), 32, 32)
        visible, whole, occluder = scene["visible_mask"], scene["whole_mask"], scene["occluder_mask"]
        assert visible.any() and (visible & ~whole).sum() == 0  # visible within whole
        hidden = whole & ~visible
        assert hidden.any() and (hidden & ~occluder).sum() == 0  # every hidden pixel lies under an occluder
        assert (visible & occluder).sum() == 0
        # The occluded scene shows the whole object's own colours wherever it is visible.
        np.testing.assert_array_equal(scene["image"][visible], scene["whole"][visible])
        assert (scene["whole"][~whole] == 1).all()


def test_procedural_amodal_whole_decodes_to_the_exact_whole_mask():
    task = AmodalTask()
    for index in range(5):
        s = ProceduralAmodal("test", 5, 32)[index]
        assert torch.equal(task.mask(s["whole"][None])[0], s["whole_mask"])
