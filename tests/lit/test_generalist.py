import json
import math

import pytest
import torch

from diffperc.data import MultiTaskDataModule, ProceduralAmodal, ProceduralDepth, ProceduralFlow
from diffperc.lit import PerceptionFinetuning
from diffperc.models.router import PatchEmbedRouter
from diffperc.tasks import AmodalTask, DepthTask, FlowTask

from helpers import quiet_trainer, tiny_finetuning


def _generalist() -> PerceptionFinetuning:
    return tiny_finetuning([DepthTask(min_depth=0.1, max_depth=30.0), FlowTask(), AmodalTask()], patch_size=4)


def test_generalist_routes_inputs_by_task_and_uses_task_rows():
    module = _generalist()
    assert isinstance(module.net.x_embedder, PatchEmbedRouter)
    assert module.net.x_embedder.in_channels == [6, 9, 9]  # [RGB, target]; [frame 1, frame 2, target]; ...
    assert module.net.y_embedder.embedding_table.num_embeddings == 3  # one label row per task, no null row


def test_generalist_trains_on_mixed_batches_and_reports_every_task(tmp_path):
    names = ["depth", "flow", "amodal"]
    sets = {
        split: [cls(split, 16, 16) for cls in (ProceduralDepth, ProceduralFlow, ProceduralAmodal)]
        for split in ("train", "test")
    }
    dm = MultiTaskDataModule(
        names=names,
        train=sets["train"],
        test=sets["test"],
        ratios=[1, 1, 1],
        length=64,
        batch_size=12,
        eval_batch_size=8,
    )
    module = _generalist()
    seen = []
    original = module._groups
    module._groups = lambda batch: seen.append(sorted(batch)) or original(batch)
    route_before = [r.proj.weight.detach().clone() for r in module.net.x_embedder.routes]
    trainer = quiet_trainer(max_steps=3, limit_val_batches=0, limit_test_batches=1, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=dm)
    assert any(len(tasks) == 3 for tasks in seen)  # a batch held all three tasks
    assert all(not torch.equal(r.proj.weight, b) for r, b in zip(module.net.x_embedder.routes, route_before))
    trainer.test(module, datamodule=dm)
    results = json.loads((tmp_path / "test_metrics.json").read_text())
    assert results["task"] == names
    for key in ("depth/abs_rel", "flow/epe", "amodal/mask_iou", "baseline/flow/epe"):
        assert math.isfinite(results[key]), key
    # The amodal baseline (the visible mask taken as the whole mask) scored by hand on the one test batch of 8.
    items = [sets["test"][2][i] for i in range(8)]
    visible = torch.stack([it["visible_mask"].bool() for it in items]).flatten(1)
    whole = torch.stack([it["whole_mask"].bool() for it in items]).flatten(1)
    inter, union = (visible & whole).sum(1).double(), (visible | whole).sum(1).double()
    iou = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union)).mean().item()
    assert results["baseline/amodal/mask_iou"] == pytest.approx(iou, rel=1e-6)
    macs = module.test_macs_per_sample((3, 16, 16), module.tasks[0])
    assert results["depth/compute/test_macs_per_sample"] == macs > 0
