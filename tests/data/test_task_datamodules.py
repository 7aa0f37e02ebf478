"""The named DataModules (one per task, and the generalist's): the data sets each name builds, the batches they give
against the spelled-out `PerceptionDataModule`, config parsing as LightningCLI does it, and errors naming the flag."""

import pytest
import torch
from jsonargparse import ArgumentParser
from lightning.pytorch import LightningDataModule, LightningModule, Trainer

from diffperc.data import (
    AmodalDataModule,
    DepthDataModule,
    FlowDataModule,
    FlyingChairsDataset,
    GeneralistDataModule,
    HypersimDataset,
    MultiTaskDataModule,
    PerceptionDataModule,
    Pix2GestaltDataset,
    ProceduralAmodal,
    ProceduralDepth,
    ProceduralFlow,
)
from diffperc.tasks import DepthTask


def _splits(dm) -> list[tuple[str, str, int]]:
    return [(type(d).__name__, getattr(d, "split", None), len(d)) for d in (dm.train_set, dm.val_set, dm.test_set)]


@pytest.mark.parametrize(
    "module, generator",
    [(DepthDataModule, "ProceduralDepth"), (FlowDataModule, "ProceduralFlow"), (AmodalDataModule, "ProceduralAmodal")],
)
def test_task_datamodule_defaults_to_the_quickstart_procedural_splits(module, generator):
    dm = module(resolution=16, batch_size=4)
    assert _splits(dm) == [(generator, "train", 100000), (generator, "val", 64), (generator, "test", 256)]
    assert (dm.train_set.height, dm.train_set.width) == (16, 16)
    assert dm.predict_resolution == 16 and dm.batch_size == 4 and dm.eval_batch_size == 4
    assert module(resolution=16, predict_resolution=24).predict_resolution == 24


def test_depth_datamodule_batches_equal_the_spelled_out_perception_datamodule():
    named = DepthDataModule(resolution=16, train_length=12, val_length=3, test_length=5, batch_size=4, seed=7)
    spelled = PerceptionDataModule(
        train=ProceduralDepth("train", 12, 16),
        val=ProceduralDepth("val", 3, 16),
        test=ProceduralDepth("test", 5, 16),
        batch_size=4,
        seed=7,
    )
    for a, b in zip(named.train_dataloader(), spelled.train_dataloader(), strict=True):
        assert a["name"] == b["name"] and torch.equal(a["image"], b["image"]) and torch.equal(a["depth"], b["depth"])
    assert [b["name"] for b in named.test_dataloader()] == [b["name"] for b in spelled.test_dataloader()]


def test_named_datamodules_on_the_real_formats(toy_assets):
    depth = DepthDataModule(
        dataset="hypersim",
        root=str(toy_assets.hypersim / "processed"),
        train_list=str(toy_assets.hypersim / "filename_list_train.txt"),
        val_list=str(toy_assets.hypersim / "filename_list_val.txt"),
        resolution=16,
    )
    assert isinstance(depth.train_set, HypersimDataset) and depth.test_set is depth.val_set
    assert depth.train_set.root == toy_assets.hypersim / "processed" / "train"
    assert not depth.train_set.native_gt and depth.val_set.native_gt  # val/test scored at the native 24x32
    sample = depth.val_set[0]
    assert sample["depth"].shape == (1, 16, 16) and sample["depth_native"].shape == (1, 24, 32)

    flow = FlowDataModule(dataset="flying_chairs", root=str(toy_assets.chairs), resolution=16)
    assert isinstance(flow.train_set, FlyingChairsDataset) and flow.test_set is flow.val_set
    assert (len(flow.train_set), len(flow.val_set)) == (4, 2)  # the split file's 1s and 2s
    assert flow.val_set[0]["flow_orig"].shape == (2, 24, 32)

    val_list = str(toy_assets.pix2gestalt / "val.txt")
    amodal = AmodalDataModule(dataset="pix2gestalt", root=str(toy_assets.pix2gestalt), val_list=val_list)
    assert isinstance(amodal.train_set, Pix2GestaltDataset) and amodal.test_set is amodal.val_set
    assert amodal.val_set.ids == ["10000004", "10000005"] and len(amodal.train_set) == 4


def test_generalist_datamodule_builds_each_named_task_in_order(toy_assets):
    dm = GeneralistDataModule(names=["flow", "depth"], resolution=16, train_length=8, val_length=2, test_length=3)
    assert isinstance(dm, MultiTaskDataModule) and dm.names == ["flow", "depth"]
    assert [type(d) for d in dm.train_set.datasets] == [ProceduralFlow, ProceduralDepth]
    assert [len(d) for d in dm.val_sets] == [2, 2] and [len(d) for d in dm.test_sets] == [3, 3]
    assert dm.predict_resolution == 16
    assert [type(d) for d in GeneralistDataModule().train_set.datasets] == [
        ProceduralDepth,
        ProceduralFlow,
        ProceduralAmodal,
    ]
    real = GeneralistDataModule(
        dataset="real",
        hypersim_root=str(toy_assets.hypersim / "processed"),
        hypersim_train_list=str(toy_assets.hypersim / "filename_list_train.txt"),
        hypersim_val_list=str(toy_assets.hypersim / "filename_list_val.txt"),
        flying_chairs_root=str(toy_assets.chairs),
        pix2gestalt_root=str(toy_assets.pix2gestalt),
        pix2gestalt_val_list=str(toy_assets.pix2gestalt / "val.txt"),
        resolution=16,
        length=8,
        batch_size=4,
    )
    kinds = [HypersimDataset, FlyingChairsDataset, Pix2GestaltDataset]
    assert [type(d) for d in real.train_set.datasets] == kinds and [type(d) for d in real.test_sets] == kinds
    batch = next(iter(real.train_dataloader()))
    assert sum(len(group["name"]) for group in batch.values()) == 4


@pytest.mark.parametrize(
    "build, flag",
    [
        (lambda: DepthDataModule(dataset="hypersim", root="x", val_list="v"), "`--data.train_list` is required"),
        (lambda: FlowDataModule(dataset="flying_chairs"), "`--data.root` is required with `dataset: flying_chairs`"),
        (lambda: GeneralistDataModule(dataset="real"), "`--data.hypersim_root` is required"),
        (lambda: GeneralistDataModule(names=["flow"], dataset="real"), "`--data.flying_chairs_root` is required"),
        (lambda: GeneralistDataModule(names=["depth", "normals"]), r"`--data.names` holds \['normals'\]"),
        (lambda: AmodalDataModule(val_length=0), "`--data.val_length` must be >= 1, got 0"),
        (lambda: DepthDataModule(dataset="nyu"), r"`--data.dataset` must be one of \['procedural', 'hypersim'\]"),
        (lambda: GeneralistDataModule(dataset="hypersim"), r"`--data.dataset` must be one of \['procedural', 'real'\]"),
    ],
)
def test_named_datamodule_errors_name_the_flag(build, flag):
    with pytest.raises(ValueError, match=flag):
        build()


def test_named_datamodule_parses_from_a_config_as_lightning_cli_does():
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--data", type=LightningDataModule)  # LightningCLI's subclass mode for `data:`
    config = parser.parse_object(
        {"data": {"class_path": "diffperc.data.FlowDataModule", "init_args": {"resolution": 16, "batch_size": 3}}}
    )
    assert config.data.init_args.num_workers == 0  # PerceptionDataModule's arguments are the named module's too
    dm = parser.instantiate(config).data
    assert isinstance(dm, FlowDataModule) and dm.batch_size == 3 and dm.predict_resolution == 16
    with pytest.raises(Exception, match="flying_chair"):
        parser.parse_object({"data": {"class_path": "diffperc.data.FlowDataModule", "init_args": {"dataset": "x"}}})


class _DepthModule(LightningModule):
    """The least a predict loader needs from the model: its task (which sets the folder layout)."""

    def __init__(self):
        super().__init__()
        self.task = DepthTask()


@pytest.mark.parametrize("module", ["multitask", "generalist"])
def test_multitask_datamodule_passes_max_image_side_to_the_predict_folder(tmp_path, module):
    import cv2
    import numpy as np

    cv2.imwrite(str(tmp_path / "room.png"), np.zeros((40, 30, 3), np.uint8))
    args = dict(images=str(tmp_path), predict_resolution=16, predict_multiple=4, max_image_side=12)
    if module == "multitask":
        dm = MultiTaskDataModule(["depth"], [ProceduralDepth("train", 4, 16)], **args)
    else:
        dm = GeneralistDataModule(names=["depth"], train_length=4, **args)
    trainer = Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(_DepthModule())
    dm.trainer = trainer
    folder = dm.predict_dataloader().dataset
    assert folder.max_image_side == 12
    sample = folder[0]  # 40 px > 12: decoded at 1/4 scale (10 x 8), still reported at its full size
    assert sample["error"] == "" and sample["orig_size"].tolist() == [40, 30]
    with pytest.raises(ValueError, match="`--data.max_image_side` must be >= 1"):
        MultiTaskDataModule(["depth"], [ProceduralDepth("train", 4, 16)], max_image_side=0)
