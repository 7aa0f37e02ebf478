"""Every shipped config runs through the real CLI and Lightning path: ``fit`` for 2 steps (validation included, so
under inference mode), then ``test`` and ``predict`` (``validate`` for pretraining) from the checkpoint it wrote.

Each recipe runs as its header says, composed with the files it names (``# base:``, ``tiny_runs.config_args``); the
``base.yaml`` files are no run of their own and are covered through the recipes built on them
(``tiny_runs.runnable_configs``). Sizes, paths and devices are shrunk by ``tiny_runs.shrink``; every other value (task,
codec, schedule, prediction type, reducer, ensembling, strategy, precision, MoE layout, init_from kind) is the config's
own. Recipes that continue another one (``init_from: runs/depth_xl/...``) start from that recipe's toy run.
"""

import copy

import pytest
import torch

import tiny_runs

CONFIGS = tiny_runs.runnable_configs()

#: Configs no CPU can run, with the device they need.
NEEDS_DEVICE = {
    "configs/trainer/fsdp.yaml": "needs CUDA GPUs: Lightning's FSDPStrategy (FSDP1) does not run on CPU",
}


def _task_names(cfg: dict) -> list[str]:
    task = cfg["model"]["init_args"].get("task")
    tasks = task if isinstance(task, list) else [task]
    return [t["class_path"].rsplit(".", 1)[-1].removesuffix("Task").lower() for t in tasks if t]


#: Shrunk, these are their family's representative but for names (the ladder differs only in size): the
#: representative's fit, validate, test and predict are theirs; `test_configs` parses each unshrunk.
SAME_AS = {f"configs/pretrain/a{i}.yaml": "configs/pretrain/a4.yaml" for i in (1, 2, 3, 5, 6)}
#: Override files that change training only (schedule, trainer strategy, precision, lengths): fit and test; predict
#: is their base's.
NO_PREDICT = {
    "configs/debug.yaml",
    *(f"configs/quickstart/depth_{s}.yaml" for s in ("cosine", "linear", "scaled_linear")),
    *(f"configs/trainer/{s}.yaml" for s in ("accumulate", "bf16", "ddp", "fsdp2")),
}


def _without_names(cfg: dict) -> dict:
    cfg = copy.deepcopy(cfg)
    cfg["trainer"]["logger"]["init_args"].pop("name")
    cfg["trainer"]["logger"]["init_args"].pop("save_dir")
    cfg["model"]["init_args"]["backbone"].pop("name")
    return cfg


@pytest.mark.slow
@pytest.mark.parametrize("config", CONFIGS)
def test_shipped_config_fits_tests_and_predicts(config, recipes, toy_assets):
    if config in NEEDS_DEVICE:
        pytest.skip(NEEDS_DEVICE[config])
    if config in SAME_AS:  # shrunk, the same run as its representative's (which fits), so not fitted again
        cfg = tiny_runs.yaml.safe_load(recipes.config(config)[0].read_text())
        representative = tiny_runs.yaml.safe_load(recipes.fit(SAME_AS[config])[0].read_text())
        assert _without_names(cfg) == _without_names(representative)
        return
    path, run = recipes.fit(config)
    cfg = tiny_runs.yaml.safe_load(path.read_text())
    ckpt = run / "checkpoints" / "last.ckpt"
    assert ckpt.is_file(), f"fit of {config} wrote no last.ckpt in {run}"
    assert torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"] == 2

    if cfg["model"]["class_path"].endswith("DiffusionPretraining"):
        tiny_runs.cli("validate", "--config", path, "--ckpt_path", "last")
        assert list(run.glob("samples_step*.png")), "pretraining validation drew no sample grid"
        return
    tiny_runs.cli("test", "--config", path, "--ckpt_path", "last")
    record = tiny_runs.read_metrics(run / "test_metrics.json")
    tasks = _task_names(cfg)
    for task in tasks:
        prefix = f"{task}/" if len(tasks) > 1 else ""
        macs = record[f"{prefix}compute/test_macs_per_sample"]
        assert isinstance(macs, int) and macs > 0
    if config in NO_PREDICT:
        return
    predict_task = cfg["model"]["init_args"].get("predict_task") or tasks[0]
    tiny_runs.cli(
        "predict", "--config", path, "--ckpt_path", "last", "--data.init_args.images", toy_assets.images[predict_task]
    )
    tiny_runs.check_predictions(run / "predictions", predict_task)


@pytest.mark.parametrize("subcommand", ["validate", "test", "predict"])
def test_scoring_an_untrained_model_fails_naming_the_run_folder(subcommand, recipes, tmp_path):
    # A run folder with no checkpoint: Lightning alone would warn, score the random weights and exit 0.
    path, cfg = recipes.config("configs/quickstart/depth.yaml")
    fresh = tmp_path / "never_trained"
    with pytest.raises(FileNotFoundError) as error:
        tiny_runs.cli(subcommand, "--config", path, "--ckpt_path", "last", "--trainer.logger.init_args.save_dir", fresh)
    message = str(error.value)
    assert str(fresh / "quickstart_depth" / "checkpoints") in message and "diffperc fit" in message
    assert not (fresh / "quickstart_depth" / "test_metrics.json").exists()
    # Without any --ckpt_path nor init_from, the same refusal, naming the flags that give weights.
    with pytest.raises(ValueError, match=r"--ckpt_path last.*--model\.init_args\.init_from"):
        tiny_runs.cli(subcommand, "--config", path, "--trainer.logger.init_args.save_dir", fresh)
    assert not (fresh / "quickstart_depth" / "test_metrics.json").exists()
