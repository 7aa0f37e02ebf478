"""The shipped configs compose as documented: a delta file names the files that go before it (``# base:`` on line 1),
every documented command passes them in that order, and the composed values are the recipe's. Every recipe is run
by the real CLI in test_e2e_configs.py; config-file errors name the key.
"""

import re
import shlex
from pathlib import Path

import pytest
import yaml

from diffperc.cli import main

import tiny_runs

ROOT = Path(__file__).resolve().parents[1]
RECIPES = tiny_runs.runnable_configs()
BASES = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "configs").rglob("base.yaml"))
SPLITS = ("train", "val", "test")
QUICKSTART = "configs/quickstart/depth.yaml"
#: Override files for any recipe (a strategy, precision, a smoke run): their `# base:` is the recipe tests use.
OVERLAYS = {"configs/debug.yaml", *(p.relative_to(ROOT).as_posix() for p in (ROOT / "configs/trainer").glob("*.yaml"))}


def _chain(config: str) -> list[str]:
    """The ``--config`` files of a recipe, bases first, as repository paths."""
    return [Path(a).relative_to(ROOT).as_posix() for a in tiny_runs.config_args(ROOT / config)[1::2]]


def _documented_config_lists() -> list[tuple[str, list[str]]]:
    """(where, [--config files]) of every command in the README, docs/, the Makefile, the SLURM example and the config
    headers, and the ``base:`` lists of the sweeps."""
    texts = {p: p.read_text() for p in [ROOT / "README.md", ROOT / "Makefile", *(ROOT / "docs").glob("*.md")]}
    texts.update({p: p.read_text() for p in (ROOT / "configs").rglob("*") if p.suffix in (".yaml", ".sbatch")})
    found = []
    for path, text in texts.items():
        text = re.sub(r"\\\n#?\s*", " ", text)  # continuation lines, in shell and in YAML comments
        for line in text.splitlines():
            words = shlex.split(line.replace("`", " ").replace('"', " ").replace("'", " "), comments=False)
            configs = [b for a, b in zip(words, words[1:]) if a == "--config" and (ROOT / b).is_file()]
            if configs:
                found.append((f"{path.relative_to(ROOT)}: {line.strip()}", configs))
    for path in sorted((ROOT / "sweeps").rglob("*.yaml")):
        spec = yaml.safe_load(path.read_text())
        for stage in (spec, spec.get("from") or {}):
            base = stage.get("base")
            if base:
                found.append((f"{path.relative_to(ROOT)} base:", [base] if isinstance(base, str) else base))
    return found


def test_every_delta_names_an_existing_consistent_chain():
    for config in RECIPES:
        chain = _chain(config)
        assert all((ROOT / c).is_file() for c in chain), (config, chain)
        assert len(set(chain)) == len(chain), (config, chain)
        if len(chain) > 2:  # the base it names last names the ones before it
            assert _chain(chain[-2]) == chain[:-1], (config, chain, _chain(chain[-2]))
    for base in BASES:  # not a run: a base holds what its folder's recipes share and at least one builds on it
        assert any(_chain(config)[0] == base for config in RECIPES), f"no recipe composes {base}"
        assert not yaml.safe_load((ROOT / base).read_text())["trainer"]["logger"]["init_args"].get("name")


def test_documented_commands_pass_each_delta_after_its_bases():
    documented = _documented_config_lists()
    assert len(documented) > 40, len(documented)  # the scan found the commands
    for where, configs in documented:
        recipe_files = [c for c in configs if c not in OVERLAYS]
        assert recipe_files, where
        if recipe_files[0] in BASES and len(recipe_files) == 1:
            continue  # `diffperc cache-latents --base configs/pretrain/base.yaml`: the data set and VAE of a base
        assert recipe_files == _chain(recipe_files[-1]), f"{where}: a recipe runs as {_chain(recipe_files[-1])}"


def test_quickstart_finetuning_recipes_share_the_depth_quickstarts_trainer():
    # One CPU recipe: every quickstart fine-tune composes configs/quickstart/depth.yaml and states no trainer device,
    # precision or checkpointing of its own (pretraining keeps its own: no end-of-fit save under EMA).
    quickstarts = [
        c for c in RECIPES if c.startswith("configs/quickstart/") and not Path(c).stem.startswith("pretrain")
    ]
    assert len(quickstarts) == 9, quickstarts
    for config in quickstarts:
        assert _chain(config)[0] == QUICKSTART, config
        if config != QUICKSTART:
            trainer = yaml.safe_load((ROOT / config).read_text()).get("trainer", {})
            assert set(trainer) <= {"logger", "max_steps", "val_check_interval"}, (config, sorted(trainer))


def _own_callbacks(cfg: dict) -> list[dict]:
    """The recipe's callbacks: `--print_config` also lists the ones diffperc's modules add by default."""
    return [c for c in cfg["trainer"]["callbacks"] if c["class_path"].startswith("lightning.pytorch.callbacks.")]


def _resolved(capsys, config: str, *extra: str) -> dict:
    with pytest.raises(SystemExit) as done:
        main(["fit", *tiny_runs.config_args(ROOT / config), *extra, "--print_config"])
    assert done.value.code == 0
    return yaml.safe_load(capsys.readouterr().out)


def test_flow_quickstart_composes_the_depth_base_with_its_task_and_data(capsys):
    cfg = _resolved(capsys, "configs/quickstart/flow.yaml")
    trainer, model, data = cfg["trainer"], cfg["model"]["init_args"], cfg["data"]["init_args"]
    assert trainer["accelerator"] == "auto" and trainer["max_steps"] == 800 and len(_own_callbacks(cfg)) == 3
    assert trainer["logger"]["init_args"]["name"] == "quickstart_flow"
    assert model["task"]["class_path"] == "diffperc.tasks.FlowTask"
    assert model["task"]["init_args"] == {"max_flow": 4.0, "outlier_thresholds": [1.0, 3.0, 5.0], "reducer": "median"}
    assert model["diffusion"]["prediction_type"] == "sample" and model["inference"]["num_steps"] == 2
    splits = [(data[s]["class_path"], data[s]["init_args"]["split"], data[s]["init_args"]["length"]) for s in SPLITS]
    assert splits == [
        ("diffperc.data.ProceduralFlow", "train", 100000),
        ("diffperc.data.ProceduralFlow", "val", 64),
        ("diffperc.data.ProceduralFlow", "test", 256),
    ]


def test_amodal_xl_replaces_the_depth_recipes_checkpoint_list_and_reducer(capsys):
    # A list is replaced whole by a later file (`callbacks+:` would append): amodal_xl keeps all 1000-step checkpoints.
    cfg = _resolved(capsys, "configs/amodal_xl.yaml")
    callbacks = _own_callbacks(cfg)
    keys = ("every_n_train_steps", "train_time_interval", "save_top_k")
    periods = [tuple(c["init_args"][k] for k in keys) for c in callbacks[:3]]
    assert periods == [(1000, None, -1), (None, "0:30:00", 0), (None, None, 0)] and len(callbacks) == 4
    model, data = cfg["model"]["init_args"], cfg["data"]["init_args"]
    inference = [model["inference"][k] for k in ("num_steps", "ensemble_size", "reducer", "max_batch")]
    assert inference == [200, 5, None, 64]
    assert model["init_from"] == "checkpoints/DiT-XL-2-256x256.pt" and model["image_size"] == 256
    assert data["test"] == data["val"] and "filename_list" not in data["train"]["init_args"]
    assert (data["batch_size"], data["predict_resolution"], data["predict_multiple"]) == (64, 256, 16)


def test_generalist_xl_takes_the_depth_recipes_data_settings_and_its_own_splits(capsys):
    cfg = _resolved(capsys, "configs/generalist_xl.yaml")
    data = cfg["data"]["init_args"]
    assert cfg["data"]["class_path"] == "diffperc.data.MultiTaskDataModule" and data["names"] == [
        "depth",
        "flow",
        "amodal",
    ]
    assert [data[k] for k in ("batch_size", "num_workers", "pin_memory")] == [32, 8, True]
    assert (data["predict_resolution"], data["predict_multiple"]) == (512, 16)  # 512 px latents, patch 2
    assert [len(data[s]) for s in SPLITS] == [3, 3, 3] and data["test"] == data["val"]
    assert cfg["model"]["init_args"]["inference"]["reducer"] is None  # each task's own


def test_one_gpu_recipe_is_the_depth_recipe_at_256_px_on_one_device(capsys):
    cfg = _resolved(capsys, "configs/depth_xl_1gpu.yaml")
    trainer, model, data = cfg["trainer"], cfg["model"]["init_args"], cfg["data"]["init_args"]
    device = [trainer[k] for k in ("accelerator", "devices", "strategy", "precision", "accumulate_grad_batches")]
    assert device == ["gpu", 1, "auto", "bf16-mixed", 1] and trainer["max_steps"] == 10000
    assert model["codec"]["init_args"]["path"] == "stabilityai/sd-vae-ft-mse"
    assert model["codec"]["init_args"]["subfolder"] is None
    assert model["init_from"] == "weights/DiT-XL-2-256x256.pt" and model["image_size"] == 256
    assert model["optimizer"]["init_args"]["lr"] == 3.0e-5
    assert model["lr_scheduler"]["init_args"]["total_steps"] == 10000
    assert model["inference"]["reducer"] == "median_compilation"
    assert model["diffusion"]["beta_schedule"] == "squaredcos_cap_v2"
    assert [data[s]["init_args"]["resolution"] for s in SPLITS] == [256, 256, 256]
    assert data["val"]["init_args"]["native_gt"] and data["predict_resolution"] == 256


def test_ladder_member_is_the_pretraining_base_with_its_preset(capsys):
    cfg = _resolved(capsys, "configs/pretrain/a3.yaml")
    model = cfg["model"]["init_args"]
    assert model["backbone"]["name"] == "a3" and cfg["trainer"]["logger"]["init_args"]["name"] == "pretrain_a3"
    assert model["ema"]["decay"] == 0.9999 and model["codec"]["init_args"]["scaling_factor"] == 0.18215
    assert cfg["trainer"]["max_steps"] == 400000 and len(_own_callbacks(cfg)) == 4


def test_unknown_config_key_is_rejected_naming_the_key(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  max_stepz: 3\n")
    with pytest.raises(SystemExit) as done:
        main(["fit", "--config", str(ROOT / QUICKSTART), "--config", str(bad), "--print_config"])
    assert done.value.code == 2 and "max_stepz" in capsys.readouterr().err


LIMITS = ("limit_train_batches", "limit_val_batches", "limit_test_batches", "limit_predict_batches")


def _trainer_limits(path: str) -> dict:
    """The batch limits a YAML file itself sets."""
    trainer = (yaml.safe_load((ROOT / path).read_text()) or {}).get("trainer") or {}
    return {k: v for k, v in trainer.items() if k in LIMITS}


LIMITED = [c for c in RECIPES if _trainer_limits(c)]


@pytest.mark.parametrize("config", LIMITED)
def test_batch_limits_keep_their_type_so_one_batch_is_not_every_batch(config, capsys):
    # Lightning reads an int as a number of batches and a float as a fraction: `limit_val_batches: 1` parsed as 1.0
    # validated every batch (jsonargparse tried the Trainer's `float | int` in that order).
    expected = {}
    for path in _chain(config):
        expected.update(_trainer_limits(path))
    trainer = _resolved(capsys, config)["trainer"]
    assert expected and {k: (trainer[k], type(trainer[k])) for k in expected} == {
        k: (v, type(v)) for k, v in expected.items()
    }


def test_batch_limits_on_the_command_line_keep_int_and_float_apart(capsys):
    trainer = _resolved(capsys, QUICKSTART, "--trainer.limit_val_batches", "1.0", "--trainer.limit_test_batches", "1",
                        "--trainer.limit_train_batches", "0.25", "--trainer.limit_predict_batches", "3")["trainer"]
    assert [(trainer[k], type(trainer[k])) for k in LIMITS] == [(0.25, float), (1.0, float), (1, int), (3, int)]
