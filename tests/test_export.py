"""``diffperc export``: Hugging Face model folders (``export_model``) and the older single-file format
(``export_checkpoint``), from tiny runs fitted and tested in-process."""

import json
import os
import shutil
import stat
from pathlib import Path
from unittest.mock import Mock

import pytest
import torch
import yaml
from safetensors import safe_open

from diffperc import PerceptionPipeline
from diffperc.codecs import VAECodec
from diffperc.data import (
    MultiTaskDataModule,
    PerceptionDataModule,
    ProceduralAmodal,
    ProceduralDepth,
    ProceduralFlow,
)
from diffperc.diffusion import InferenceSettings
from diffperc.export import export_checkpoint, export_model, load_exported
from diffperc.lit import Backbone, PerceptionFinetuning, Upcycle
from diffperc.tasks import AmodalTask, DepthTask, FlowTask
from diffperc.upcycling import upcycle_checkpoint

from helpers import quiet_trainer, tiny_finetuning, tiny_vae


def _module(**kw) -> PerceptionFinetuning:
    return tiny_finetuning(depth=2, lr=3e-3, **kw)


def _fit(module, tmp_path, steps=3, logger=False):
    trainer = quiet_trainer(
        max_steps=steps,
        logger=logger,
        enable_checkpointing=True,
        limit_val_batches=0,
        default_root_dir=tmp_path,
        log_every_n_steps=1,
    )
    trainer.fit(module, datamodule=PerceptionDataModule(train=ProceduralDepth("train", 64, 16), batch_size=4))
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    return path


def _inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 6, 16, 16, generator=g), torch.tensor([3, 600]), torch.zeros(2, dtype=torch.long)


def test_export_round_trips_to_an_identical_model(tmp_path):
    module = _module()
    ckpt = _fit(module, tmp_path)
    weights, meta = export_checkpoint(ckpt, tmp_path / "depth.safetensors")
    record = json.loads(meta.read_text())
    assert record["task"] == "depth" and record["dit_config"]["in_channels"] == 6 and record["moe"] is None
    loaded = load_exported(weights).eval()
    module.net.eval()
    torch.testing.assert_close(loaded(*_inputs()), module.net(*_inputs()), rtol=0, atol=0)


def test_upcycled_checkpoint_starts_equal_to_dense_and_trains_with_aux_loss(tmp_path):
    dense = _module()
    ckpt = _fit(dense, tmp_path)
    moe_ckpt = upcycle_checkpoint(ckpt, tmp_path / "moe.ckpt", num_experts=4, top_k=2)
    moe = _module(init_from=str(moe_ckpt), upcycle=Upcycle(num_experts=4, top_k=2))
    assert moe.is_moe and len(moe.net.blocks[0].mlp.experts) == 4
    dense.net.eval(), moe.net.eval()
    torch.testing.assert_close(moe.net(*_inputs()), dense.net(*_inputs()), rtol=1e-5, atol=1e-5)

    # Upcycling inside the module from the dense checkpoint gives the same function too.
    direct = _module(init_from=str(ckpt), upcycle=Upcycle(num_experts=4, top_k=2)).eval()
    torch.testing.assert_close(direct.net(*_inputs()), dense.net(*_inputs()), rtol=1e-5, atol=1e-5)

    logger = Mock()
    logger.save_dir, logger.log_dir, logger.name, logger.version = str(tmp_path), str(tmp_path), "mock", 0
    router_before = moe.net.blocks[0].mlp.router.weight.detach().clone()
    moe.train()
    _fit(moe, tmp_path / "moe_run", steps=3, logger=logger)
    logged = {
        k for call in logger.log_metrics.call_args_list for k in (call.args[0] if call.args else call.kwargs["metrics"])
    }
    assert "train/moe_aux_loss" in logged and "moe/blocks.0.mlp/expert_0" in logged
    assert not torch.equal(moe.net.blocks[0].mlp.router.weight, router_before)  # the router trains

    weights, meta = export_checkpoint(tmp_path / "moe_run" / "model.ckpt", tmp_path / "moe.safetensors")
    assert json.loads(meta.read_text())["moe"]["num_experts"] == 4
    moe.net.eval()
    torch.testing.assert_close(load_exported(weights).eval()(*_inputs()), moe.net(*_inputs()), rtol=0, atol=0)


# ------------------------------------------------------------------------------------ Hugging Face model folders
def _data(cls):
    return lambda: PerceptionDataModule(train=cls("train", 64, 16), test=cls("test", 4, 16), batch_size=4)


def _mixed():
    sets = (ProceduralDepth, ProceduralFlow, ProceduralAmodal)
    return MultiTaskDataModule(
        ["depth", "flow", "amodal"],
        [c("train", 64, 16) for c in sets],
        test=[c("test", 4, 16) for c in sets],
        length=64,
        batch_size=6,
    )


TASKS = {  # name -> (tasks, data module, other arguments of the module)
    "depth": (lambda: DepthTask(min_depth=0.1, max_depth=30.0), _data(ProceduralDepth), {}),
    "flow": (lambda: FlowTask(max_flow=4.0), _data(ProceduralFlow), {}),
    "amodal": (lambda: AmodalTask(threshold=0.5), _data(ProceduralAmodal), {}),
    # A generalist of the three tasks, upcycled to a mixture of 2 experts, top-1, predicting flow by default.
    "generalist": (
        lambda: [DepthTask(min_depth=0.1, max_depth=30.0), FlowTask(max_flow=4.0), AmodalTask(threshold=0.5)],
        _mixed,
        {"upcycle": Upcycle(num_experts=2, top_k=1), "predict_task": "flow"},
    ),
}


def fit_tiny_run(root: Path, name: str, steps: int = 2, **kwargs) -> tuple[PerceptionFinetuning, Path]:
    """A tiny model of ``TASKS[name]`` fitted for ``steps`` steps and tested, in a run folder laid out as the CLI's:
    ``root/checkpoints/last.ckpt`` beside ``test_metrics.json`` and ``train_macs.json`` (no config.yaml)."""
    make_task, make_data, extra = TASKS[name]
    torch.manual_seed(0)
    module = tiny_finetuning(make_task(), lr=3e-3, **{**extra, **kwargs})
    trainer = quiet_trainer(max_steps=steps, default_root_dir=root, limit_val_batches=0, limit_test_batches=1)
    datamodule = make_data()
    trainer.fit(module, datamodule=datamodule)
    trainer.test(module, datamodule=datamodule, verbose=False)
    ckpt = root / "checkpoints" / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    return module.eval(), ckpt


def net_inputs(net) -> tuple:
    """(x, t, y) for ``net`` with 3 samples of task ids 0, 1, 2 (modulo the model's tasks)."""
    g = torch.Generator().manual_seed(1)
    c, rows = net.config["in_channels"], net.y_embedder.embedding_table.num_embeddings
    return torch.randn(3, c, 16, 16, generator=g), torch.tensor([3, 500, 999]), torch.arange(3) % rows


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """name -> (fitted module, checkpoint), fitted once for this file."""
    root = tmp_path_factory.mktemp("runs")
    return {name: fit_tiny_run(root / name, name) for name in TASKS}


@pytest.mark.parametrize("name", list(TASKS))
def test_export_model_writes_a_hub_folder_that_rebuilds_the_network_exactly(runs, name, tmp_path):
    module, ckpt = runs[name]
    out = export_model(str(ckpt), str(tmp_path / "export"))
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "a temporary folder was left behind"

    config = json.loads((out / "config.json").read_text())
    assert {"network", "tasks", "codec", "diffusion", "inference", "processing", "predict_task"} <= set(config)
    assert config["network"]["dit_config"] == module.net.config
    assert config["diffusion"]["prediction_type"] == "v_prediction"
    assert config["inference"]["num_steps"] == 1 and config["training"]["global_step"] == 2
    # No config.yaml: the training image size, and the pixel codec's factor 1 x patch 2.
    assert config["processing"] == {"resolution": 16, "multiple": 2}
    assert config["codec"] == {"class_path": "diffperc.codecs.pixel.PixelCodec", "init_args": {"unshuffle": 1}}
    args = {t["class_path"].rsplit(".", 1)[-1]: t["init_args"] for t in config["tasks"]}
    expected = {
        "DepthTask": {"min_depth": 0.1, "max_depth": 30.0, "quantiles": [0.02, 0.98], "reducer": "median"},
        "FlowTask": {"max_flow": 4.0, "outlier_thresholds": [1.0, 3.0, 5.0], "reducer": "median"},
        "AmodalTask": {"threshold": 0.5, "reducer": "median"},
    }
    assert args == {k: v for k, v in expected.items() if k in args} and len(args) == len(module.tasks)
    if name == "generalist":
        assert config["network"]["moe"]["num_experts"] == 2 and config["network"]["task_routes"] == [6, 9, 9]
        assert config["predict_task"] == "flow"
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert sorted(f.keys()) == sorted(module.net.state_dict()) and f.metadata()["format"] == "diffperc"

    # The model card: the test metrics of the run's test_metrics.json, its train MACs, how to load it.
    card = (out / "README.md").read_text()
    record = json.loads((ckpt.parents[1] / "test_metrics.json").read_text())
    for key, value in record["metrics"].items():
        if key.startswith("test/"):
            assert f"| {key.removeprefix('test/')} | {value:.4g} |" in card
    train_macs = json.loads((ckpt.parents[1] / "train_macs.json").read_text())["compute/train_macs"]
    assert f"{train_macs / 1e6:.3g} MMACs" in card and "- Steps: 2" in card
    assert "PerceptionPipeline.from_pretrained(" in card and "library_name: diffperc" in card

    pipe = PerceptionPipeline.from_pretrained(out)
    assert pipe.tasks == [t.name for t in module.tasks]
    with torch.inference_mode():
        torch.testing.assert_close(pipe.net(*net_inputs(pipe.net)), module.net(*net_inputs(module.net)), rtol=0, atol=0)


def test_model_card_lists_the_metrics_of_the_exported_checkpoint_only(runs, tmp_path):
    _, ckpt = runs["depth"]  # tested in memory at its last step: the card lists its metrics and how they were tested
    record = json.loads((ckpt.parents[1] / "test_metrics.json").read_text())
    assert record["ckpt_path"] is None and record["global_step"] == 2
    card = (export_model(str(ckpt), str(tmp_path / "same")) / "README.md").read_text()
    inference = record["inference"]
    assert f"Tested with {inference['num_steps']} DDIM steps, an ensemble of {inference['ensemble_size']}" in card
    assert f"| depth/abs_rel | {record['metrics']['test/depth/abs_rel']:.4g} |" in card

    # A copy of the run whose test scored another run's checkpoint (as `diffperc test --config <this run's config>
    # --ckpt_path <other run's last.ckpt>` does): same step, another file. Its scores are not this model's.
    run = tmp_path / "run"
    shutil.copytree(ckpt.parents[1], run)
    other_module, other = fit_tiny_run(tmp_path / "other", "depth", steps=2)
    trainer = quiet_trainer(default_root_dir=run, limit_test_batches=1)
    trainer.test(other_module, datamodule=TASKS["depth"][1](), ckpt_path=other, verbose=False)
    tested = json.loads((run / "test_metrics.json").read_text())
    assert tested["ckpt_path"] == str(other.resolve()) and tested["global_step"] == 2
    card = (export_model(str(run / "checkpoints" / "last.ckpt"), str(tmp_path / "other_scored")) / "README.md")
    text = card.read_text()
    assert f"Not evaluated: the run folder's test_metrics.json scored {other.resolve()} (step 2)" in text
    assert "| depth/abs_rel |" not in text and "Tested with" not in text

    # A test of this run's own checkpoint, named relative to the run: its metrics are listed again.
    trainer.test(other_module, datamodule=TASKS["depth"][1](), ckpt_path=run / "checkpoints" / "last.ckpt",
                 verbose=False)
    assert json.loads((run / "test_metrics.json").read_text())["ckpt_path"] == "checkpoints/last.ckpt"
    text = (export_model(str(run / "checkpoints" / "last.ckpt"), str(tmp_path / "own")) / "README.md").read_text()
    assert "| depth/abs_rel |" in text and "Not evaluated" not in text


def test_export_model_refuses_a_non_empty_folder_and_honours_the_umask(runs, tmp_path):
    _, ckpt = runs["depth"]
    old = os.umask(0o027)
    try:
        out = export_model(str(ckpt), str(tmp_path / "a"))
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o750
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == dict.fromkeys(
        ["README.md", "config.json", "model.safetensors"], 0o640
    )
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(FileExistsError, match=r"`--out` .*/a exists and is not empty.*remove it or choose another"):
        export_model(str(ckpt), str(out))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    (tmp_path / "empty").mkdir()  # an empty folder is no one's output: written
    assert (export_model(str(ckpt), str(tmp_path / "empty")) / "config.json").is_file()
    with pytest.raises(FileNotFoundError, match=r"`--ckpt_path` .*missing.ckpt: no such file"):
        export_model(str(tmp_path / "missing.ckpt"), str(tmp_path / "b"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "empty"]


def test_export_of_an_older_checkpoint_reads_the_runs_config_yaml_else_fails_in_one_line(runs, tmp_path):
    # A checkpoint written before tasks and codecs recorded their constructor arguments.
    _, ckpt = runs["flow"]
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    del checkpoint["diffperc"]["task_args"]
    del checkpoint["diffperc"]["codec"]
    old = tmp_path / "run" / "checkpoints" / "last.ckpt"
    old.parent.mkdir(parents=True)
    torch.save(checkpoint, old)
    with pytest.raises(ValueError) as error:
        export_model(str(old), str(tmp_path / "out"))
    message = str(error.value)
    assert "\n" not in message and "`--ckpt_path`" in message and "task constructor arguments" in message
    assert str(tmp_path / "run") in message and not (tmp_path / "out").exists()

    config = {
        "model": {
            "init_args": {
                "task": {"class_path": "diffperc.tasks.FlowTask", "init_args": {"max_flow": 4.0}},
                "codec": {"class_path": "diffperc.codecs.PixelCodec", "init_args": {"unshuffle": 1}},
            }
        },
        "data": {
            "init_args": {
                "train": {"class_path": "diffperc.data.ProceduralFlow"},
                "predict_resolution": 24,
                "predict_multiple": 4,
            }
        },
    }
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump(config))
    out = export_model(str(old), str(tmp_path / "out"))
    written = json.loads((out / "config.json").read_text())
    assert written["tasks"] == [{"class_path": "diffperc.tasks.flow.FlowTask", "init_args": {"max_flow": 4.0}}]
    assert written["codec"]["class_path"] == "diffperc.codecs.pixel.PixelCodec"
    assert written["processing"] == {"resolution": 24, "multiple": 4}
    assert "- Data: `ProceduralFlow()`" in (out / "README.md").read_text()
    assert PerceptionPipeline.from_pretrained(out).module.tasks[0].max_flow == 4.0


def test_export_references_the_vae_and_refuses_one_with_other_weights(tmp_path):
    vae_dir = tmp_path / "vae"
    tiny_vae().save_pretrained(vae_dir)
    torch.manual_seed(0)
    module = PerceptionFinetuning(
        task=DepthTask(),
        codec=VAECodec(str(vae_dir)),
        backbone=Backbone(name="t1", hidden_size=32, depth=1, num_heads=2, patch_size=2),
        image_size=16,
        inference=InferenceSettings(num_steps=1),
    )
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    trainer = quiet_trainer(max_steps=1, default_root_dir=ckpt.parents[1], limit_val_batches=0)
    trainer.fit(module, datamodule=PerceptionDataModule(train=ProceduralDepth("train", 8, 16), batch_size=4))
    trainer.save_checkpoint(ckpt)
    out = export_model(str(ckpt), str(tmp_path / "export"))
    codec = json.loads((out / "config.json").read_text())["codec"]
    assert codec["class_path"] == "diffperc.codecs.vae.VAECodec"
    assert codec["init_args"]["path"] == str(vae_dir) and codec["init_args"]["scaling_factor"] == 0.18215
    assert json.loads((out / "config.json").read_text())["processing"]["multiple"] == 4  # VAE factor 2 x patch 2
    pipe = PerceptionPipeline.from_pretrained(out)
    image = torch.rand(1, 3, 16, 16) * 2 - 1
    torch.testing.assert_close(pipe.module.codec.encode(image), module.codec.encode(image), rtol=0, atol=0)

    other = tiny_vae()  # the same architecture, other weights: a silent wrong decode if it were accepted
    torch.manual_seed(1)
    other.decoder.conv_out.weight.data.normal_()
    other.save_pretrained(vae_dir)
    with pytest.raises(ValueError, match=r"`--ckpt_path` .*holds other weights than the run trained with"):
        export_model(str(ckpt), str(tmp_path / "export2"))
