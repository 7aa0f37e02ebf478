import numpy as np
import pytest
import torch

from diffperc.data import PerceptionDataModule, ProceduralDepth
from diffperc.data.procedural import render_depth_scene, split_rng


def test_procedural_depth_is_deterministic_per_index_and_seed():
    a, b = ProceduralDepth("train", 10, 32, seed=3)[4], ProceduralDepth("train", 10, 32, seed=3)[4]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["depth"], b["depth"])
    c = ProceduralDepth("train", 10, 32, seed=4)[4]
    assert not torch.equal(a["depth"], c["depth"])


def test_procedural_splits_never_share_a_scene():
    depths = {
        split: [ProceduralDepth(split, 20, 16)[i]["depth"] for i in range(20)] for split in ("train", "val", "test")
    }
    keys = {split: {d.numpy().tobytes() for d in ds} for split, ds in depths.items()}
    assert len(keys["train"]) == 20
    assert not keys["train"] & keys["val"] and not keys["train"] & keys["test"] and not keys["val"] & keys["test"]


def test_procedural_sample_format_and_ranges():
    s = ProceduralDepth("val", 5, (24, 40))[2]
    assert s["image"].shape == (3, 24, 40) and s["depth"].shape == (1, 24, 40) and s["valid_mask"].dtype == torch.bool
    assert s["image"].min() >= -1 and s["image"].max() <= 1
    assert s["depth"].min() > 0.1 and s["depth"].max() <= 14.0 + 1e-3  # the back wall is at most 14 m away
    assert s["name"] == "val_000002"


def test_procedural_depth_is_planar_depth_of_the_back_wall():
    # In every scene the pixels whose depth is largest lie on the back wall, at constant z: planar depth means the
    # back wall has one depth value wherever it is visible.
    _, depth = render_depth_scene(split_rng(0, "train", 7), 32, 32)
    far = depth.max()
    assert np.isclose(depth, far, atol=1e-4).sum() > 10


def test_procedural_rejects_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        ProceduralDepth("training")
    with pytest.raises(ValueError, match="resolution"):
        ProceduralDepth("train", 10, -4)
    with pytest.raises(ValueError, match="length"):
        ProceduralDepth("train", 0)


def test_datamodule_batches_and_missing_split_error():
    dm = PerceptionDataModule(train=ProceduralDepth("train", 8, 16), batch_size=4)
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 3, 16, 16) and len(batch["name"]) == 4
    with pytest.raises(ValueError, match="--data.val"):
        dm.val_dataloader()
