import json

import pytest

from diffperc.data import MultiTaskDataModule, ProceduralAmodal, ProceduralDepth, ProceduralFlow
from diffperc.scaling.results import read_results, row_from_run
from diffperc.scaling.spec import Point
from diffperc.tasks import AmodalTask, DepthTask, FlowTask
from diffperc.utils import append_jsonl

from helpers import quiet_trainer, tiny_finetuning

# The row keys of a depth + flow + amodal generalist's test: what it logs, one spelling for one task or several.
GENERALIST_KEYS = [
    "baseline/amodal/mask_iou",
    "baseline/depth/abs_rel",
    "baseline/depth/delta1",
    "baseline/depth/delta1_error",
    "baseline/flow/epe",
    "baseline/flow/outlier_1px",
    "baseline/flow/outlier_3px",
    "baseline/flow/outlier_5px",
    "compute/amodal/test_macs_per_sample",
    "compute/depth/test_macs_per_sample",
    "compute/flow/test_macs_per_sample",
    "test/amodal/mask_iou",
    "test/depth/abs_rel",
    "test/depth/delta1",
    "test/depth/delta1_error",
    "test/flow/epe",
    "test/flow/outlier_1px",
    "test/flow/outlier_3px",
    "test/flow/outlier_5px",
]


def test_row_from_run_of_a_generalist_test_has_one_key_per_task_and_metric(tmp_path):
    names = ["depth", "flow", "amodal"]
    test = [cls("test", 16, 16) for cls in (ProceduralDepth, ProceduralFlow, ProceduralAmodal)]
    dm = MultiTaskDataModule(
        names=names, train=test, test=test, ratios=[1, 1, 1], length=8, batch_size=4, eval_batch_size=4
    )
    module = tiny_finetuning([DepthTask(min_depth=0.1, max_depth=30.0), FlowTask(), AmodalTask()], patch_size=4)
    run = tmp_path / "tts" / "point"
    trainer = quiet_trainer(limit_test_batches=1, default_root_dir=run)
    trainer.test(module, datamodule=dm)
    point = Point(
        "point",
        "tts",
        {"model.init_args.inference.num_steps": 1},
        {},
        {"tokens": 16},
        run,
        [],
        checkpoint=str(tmp_path / "fit" / "checkpoints" / "last.ckpt"),
    )  # a fit with no train_macs.json

    row = row_from_run(point)

    assert sorted(k for k in row if k.split("/")[0] in ("test", "baseline", "compute")) == GENERALIST_KEYS
    assert row["task"] == names and row["model.inference.num_steps"] == 1 and row["tokens"] == 16
    # The same numbers as the flat keys kept in test_metrics.json (`depth/abs_rel`), and as logged.
    record = json.loads((run / "test_metrics.json").read_text())
    flat = {k: v for k, v in record.items() if k.split("/")[0] in names and "/compute/" not in k}
    assert len(flat) == 8
    for key, value in flat.items():
        assert row[f"test/{key}"] == value == pytest.approx(trainer.callback_metrics[f"test/{key}"].item())
        assert row[f"baseline/{key}"] == record[f"baseline/{key}"]
    for task in names:
        assert row[f"compute/{task}/test_macs_per_sample"] == record[f"{task}/compute/test_macs_per_sample"] > 0
    # One network for every task: flow and amodal, with two conditions, take one input more than depth.
    assert row["compute/flow/test_macs_per_sample"] == row["compute/amodal/test_macs_per_sample"]
    assert row["compute/flow/test_macs_per_sample"] > row["compute/depth/test_macs_per_sample"]


def test_read_results_keeps_the_last_row_of_a_point_and_skips_a_torn_line(tmp_path):
    path = tmp_path / "results.jsonl"
    append_jsonl(path, {"point": "a", "status": "failed"})
    append_jsonl(path, {"point": "b", "status": "ok", "x": 1.5})
    append_jsonl(path, {"point": "a", "status": "ok"})
    with open(path, "a") as f:
        f.write('{"point": "b", "status": "fa')  # a writer killed mid-line
    assert read_results(path) == {"a": {"point": "a", "status": "ok"}, "b": {"point": "b", "status": "ok", "x": 1.5}}
    assert read_results(tmp_path / "missing.jsonl") == {}


def test_row_from_run_copies_final_losses_and_flattened_laws_and_reads_older_files(tmp_path):
    run = tmp_path / "fit" / "p"
    run.mkdir(parents=True)
    point = Point("p", "fit", {}, {}, {}, run, [], test=False)
    law = {"a": 2.0, "b": -0.1, "b_low": -0.2, "b_high": 0.0, "r2": 0.9, "n": 4, "x_min": 10.0, "x_max": 1000.0}
    record = {
        "compute/train_macs": 1000,
        "global_step": 3,
        "loss/train": 0.25,
        "loss/val": 0.5,
        "laws": {"val/depth/abs_rel": law, "train/loss": {**law, "b": -0.3}},
    }
    (run / "train_macs.json").write_text(json.dumps(record))
    row = row_from_run(point)
    new = {k: v for k, v in row.items() if k.startswith(("loss/", "law/"))}
    assert len(new) == 2 + 2 * 8
    assert (new["loss/train"], new["loss/val"]) == (0.25, 0.5)
    assert new["law/val/depth/abs_rel/b"] == -0.1 and new["law/train/loss/b"] == -0.3
    assert new["law/val/depth/abs_rel/n"] == 4 and new["law/val/depth/abs_rel/x_max"] == 1000.0
    # A train_macs.json from before the losses and laws: those keys are absent from the row, not NaN or None.
    (run / "train_macs.json").write_text(json.dumps({"compute/train_macs": 1000, "global_step": 3}))
    row = row_from_run(point)
    assert not [k for k in row if k.startswith(("loss/", "law/"))]
    assert (row["compute/train_macs"], row["trainer.global_step"], row["compute/total_train_macs"]) == (1000, 3, 1000)
