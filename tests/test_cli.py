"""The ``diffperc`` command line: every command's help, config printing and reading, flag spellings, and the
callbacks the Lightning commands add by default."""

import contextlib
import io
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from diffperc.cli import PROJECT_COMMANDS, DiffpercCLI, main, parse_command
from diffperc.compute import count_macs
from diffperc.models import build_model
from diffperc.models.__main__ import forward_macs, table

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart" / "depth.yaml"

COMMANDS = [
    ["fit"],
    ["validate"],
    ["test"],
    ["predict"],
    *[[name] for name in PROJECT_COMMANDS],
    ["sweep", "run"],
    ["sweep", "report"],
    ["sweep", "tts"],
    ["laws", "plan"],
]


def _run(*args) -> tuple[str, str, int]:
    """``diffperc ARGS`` in this process: (stdout, stderr, exit status)."""
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in args])
        except SystemExit as exit_:
            code = exit_.code or 0
    return out.getvalue(), err.getvalue(), code


@pytest.fixture(autouse=True)
def _short_errors(monkeypatch):
    monkeypatch.delenv("DIFFPERC_DEBUG", raising=False)


# ---------------------------------------------------------------------------------------------------------- help
@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_command_help_names_config_and_print_config(command):
    out, _, code = _run(*command, "--help")
    assert code == 0
    assert "--config" in out and "--print_config" in out, out
    if command[0] in ("fit", "validate", "test", "predict"):
        assert "--model.help diffperc.lit.PerceptionFinetuning" in " ".join(out.split()), out


def test_top_level_help_lists_every_command():
    out, _, code = _run("--help")
    assert code == 0
    listed = [line.split()[0] for line in out.splitlines() if line.startswith("  ")]
    assert listed == ["fit", "validate", "test", "predict", *PROJECT_COMMANDS]


def test_help_of_project_commands_imports_neither_torch_nor_lightning():
    # A fresh interpreter: `diffperc --help` and the project commands' help answer from the parsers alone.
    script = (
        "import contextlib, io, sys\n"
        "from diffperc.cli import main\n"
        "for argv in (['--help'], ['models', '--help'], ['upcycle', '--help'], ['export', '--help'],\n"
        "             ['download', '--help'], ['cache-latents', '--help'], ['sweep', 'tts', '--help'],\n"
        "             ['laws', 'plan', '--help'], ['models', 't1', '--print_config']):\n"
        "    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "        main(argv)\n"
        "print(sorted(m for m in ('torch', 'lightning', 'scipy', 'diffusers') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", result.stdout


def test_unknown_and_missing_commands_are_one_line_errors():
    _, err, code = _run("fitt")
    assert code == 2 and "unknown command 'fitt': the commands are fit, validate, test, predict, models" in err
    _, err, code = _run()
    assert code == 2 and err.startswith("diffperc: error: expected a command: fit, validate")


# ------------------------------------------------------------------------------------------------- print_config
PROJECT_ARGS = {  # a command line of each project command, and values its printed config must hold
    "models": (["models", "t1", "DiT-S/2-8E2A"], {"names": ["t1", "DiT-S/2-8E2A"]}),
    "upcycle": (
        ["upcycle", "--ckpt_path", "dense.ckpt", "--out", "moe.ckpt", "--num_experts", "4", "--top_k", "1"],
        {"ckpt_path": "dense.ckpt", "num_experts": 4, "top_k": 1, "balance_loss_coef": 0.01},
    ),
    "export": (
        ["export", "--ckpt_path", "last.ckpt", "--out", "exports/depth", "--push_to_hub", "org/depth"],
        {"ckpt_path": "last.ckpt", "push_to_hub": "org/depth"},
    ),
    "download": (["download", "DiT-XL/2-256", "--out", "weights"], {"name": "DiT-XL/2-256", "revision": None}),
    "cache-latents": (
        ["cache-latents", "--base", "a.yaml", "--base", "b.yaml", "--out", "latents", "--no_flip"],
        {"base": ["a.yaml", "b.yaml"], "no_flip": True, "shard_size": 1024},
    ),
    "sweep run": (
        ["sweep", "run", "sweeps/tiny/model_size.yaml", "--dry_run", "--launcher", "slurm"],
        {"dry_run": True, "launcher": "slurm", "upstream_dir": None},
    ),
    "sweep report": (
        ["sweep", "report", "sweeps/tiny/model_size.yaml", "--upstream_dir", "up"],
        {"upstream_dir": "up"},
    ),
    "sweep tts": (
        ["sweep", "tts", "--base", "a.yaml", "--ckpt_path", "c.ckpt", "--steps", "1", "4", "--set", "k=1"],
        {"ckpt_path": "c.ckpt", "steps": [1, 4], "ensemble": [1, 2, 5], "set": ["k=1"]},
    ),
    "laws plan": (
        [
            "laws",
            "plan",
            "--train_report",
            "t",
            "--tts_report",
            "s",
            "--train_budget",
            "1e13",
            "--inference_budget",
            "1e9",
        ],
        {"train_budget": 1e13, "inference_budget": 1e9, "metric": None},
    ),
}


@pytest.mark.parametrize("name", sorted(PROJECT_ARGS))
def test_project_print_config_round_trips(name, tmp_path):
    argv, expected = PROJECT_ARGS[name]
    printed, _, code = _run(*argv, "--print_config")
    assert code == 0
    printed_values = yaml.safe_load(printed)
    assert {key: printed_values[key] for key in expected} == expected
    config = tmp_path / "config.yaml"
    config.write_text(printed)
    command = argv[:2] if " " in name else argv[:1]
    again, _, code = _run(*command, "--config", config, "--print_config")
    assert code == 0 and again == printed


def test_lightning_print_config_round_trips_and_lists_the_default_callbacks(tmp_path):
    printed, _, code = _run("fit", "--config", QUICKSTART, "--print_config")
    assert code == 0
    config = tmp_path / "printed.yaml"
    config.write_text(printed)
    again, _, code = _run("fit", "--config", config, "--print_config")
    assert code == 0 and again == printed
    callbacks = [c["class_path"] for c in yaml.safe_load(printed)["trainer"]["callbacks"]]
    assert callbacks == [
        "lightning.pytorch.callbacks.ModelCheckpoint",  # the config's own three, first
        "lightning.pytorch.callbacks.ModelCheckpoint",
        "lightning.pytorch.callbacks.LearningRateMonitor",
        "diffperc.callbacks.PredictionImageLogger",  # then what PerceptionFinetuning adds
        "diffperc.callbacks.PredictionWriter",
        "diffperc.callbacks.MACsCounter",
        "diffperc.callbacks.TrainingThroughput",
        "diffperc.callbacks.PowerLawMonitor",
        "diffperc.callbacks.StepProgressBar",
        "diffperc.callbacks.NonFiniteGuard",
        "diffperc.checkpoint_io.RNGStateCheckpoint",
        "diffperc.callbacks.ExpertLoadLogger",
    ]


def test_a_users_callback_wins_over_the_default_of_its_class(tmp_path):
    override = tmp_path / "override.yaml"
    own = {"class_path": "diffperc.callbacks.nonfinite.NonFiniteGuard", "init_args": {"mode": "skip"}}
    override.write_text(yaml.safe_dump({"trainer": {"callbacks": [own], "enable_progress_bar": False}}))
    printed, _, _ = _run(
        "fit", "--config", QUICKSTART, "--config", override, "--model.init_args.nonfinite", "raise", "--print_config"
    )
    callbacks = yaml.safe_load(printed)["trainer"]["callbacks"]
    guards = [c for c in callbacks if c["class_path"].endswith("NonFiniteGuard")]
    assert [g["init_args"]["mode"] for g in guards] == ["skip"]  # the user's, not the model's `raise`
    assert not any(c["class_path"].endswith("StepProgressBar") for c in callbacks)  # no progress bar asked for


def test_cli_runs_each_default_callback_once(tmp_path):
    printed = yaml.safe_load(_run("fit", "--config", QUICKSTART, "--print_config")[0])
    config = tmp_path / "printed.yaml"  # without fit's own arguments, which `run=False` has no place for
    config.write_text(yaml.safe_dump({k: v for k, v in printed.items() if k not in ("ckpt_path", "weights_only")}))
    for path in (QUICKSTART, config):  # the recipe, and the printed config given back
        cli = DiffpercCLI(args=["--config", str(path), "--trainer.logger.init_args.save_dir", str(tmp_path)], run=False)
        cli.model.trainer = cli.trainer
        added = cli.model.configure_callbacks()  # what Lightning would add at fit: nothing the trainer has
        names = [type(c).__name__ for c in [*cli.trainer.callbacks, *added]]
        for name in ("MACsCounter", "NonFiniteGuard", "PredictionWriter", "RNGStateCheckpoint", "StepProgressBar"):
            assert names.count(name) == 1, names
        assert added == [] and not {"RichProgressBar", "TQDMProgressBar"} & set(names)


def test_a_config_dumped_again_unchanged_reuses_its_text_and_a_changed_one_is_dumped_anew(tmp_path):
    # A command dumps its config for the model's hyper-parameters, then for config.yaml: the second dump of the same,
    # unchanged namespace is the first's text; after a change (or for another namespace) the dump is made again.
    save_dir = ["--trainer.logger.init_args.save_dir", str(tmp_path)]
    cli = DiffpercCLI(args=["--config", str(QUICKSTART), *save_dir], run=False)
    first = cli.parser.dump(cli.config)
    assert cli.parser.dump(cli.config) is first
    shipped = yaml.safe_load(QUICKSTART.read_text())["trainer"]["max_steps"]
    assert yaml.safe_load(first)["trainer"]["max_steps"] == shipped != 7
    cli.config["trainer.max_steps"] = 7
    changed = cli.parser.dump(cli.config)
    assert yaml.safe_load(changed)["trainer"]["max_steps"] == 7
    assert {k for k in yaml.safe_load(changed) if yaml.safe_load(changed)[k] != yaml.safe_load(first)[k]} == {"trainer"}
    other = cli.config.clone()
    other["trainer.max_steps"] = 9
    assert yaml.safe_load(cli.parser.dump(other))["trainer"]["max_steps"] == 9
    assert cli.parser.dump(cli.config) == changed


def test_configure_callbacks_adds_the_defaults_to_a_trainer_without_them():
    from diffperc.callbacks import MACsCounter, NonFiniteGuard

    from helpers import quiet_trainer, tiny_finetuning

    module = tiny_finetuning(nonfinite="skip")
    module.trainer = quiet_trainer(callbacks=[MACsCounter()])
    added = {type(c).__name__: c for c in module.configure_callbacks()}
    assert sorted(added) == [
        "ExpertLoadLogger",
        "NonFiniteGuard",
        "PowerLawMonitor",
        "PredictionImageLogger",
        "PredictionWriter",
        "RNGStateCheckpoint",
        "TrainingThroughput",
    ]  # no bar shown, MACsCounter given
    assert isinstance(added["NonFiniteGuard"], NonFiniteGuard) and added["NonFiniteGuard"].mode == "skip"


# ------------------------------------------------------------------------------------------------ flag spellings
RENAMED = [  # (command line of the previous release, the flag it now is, the parsed key, its value)
    (["export", "--ckpt", "a.ckpt", "--out", "o"], "--ckpt_path", ("ckpt_path",), "a.ckpt"),
    (["upcycle", "--src=a.ckpt", "--out", "o"], "--ckpt_path", ("ckpt_path",), "a.ckpt"),
    (["sweep", "tts", "--base", "b.yaml", "--checkpoint", "a.ckpt"], "--ckpt_path", ("tts", "ckpt_path"), "a.ckpt"),
    (["sweep", "run", "f.yaml", "--dry-run"], "--dry_run", ("run", "dry_run"), True),
    (["sweep", "report", "f.yaml", "--upstream-dir", "u"], "--upstream_dir", ("report", "upstream_dir"), "u"),
    (
        ["laws", "plan", "--train-report", "t", "--tts-report", "s", "--train-budget", "1", "--inference-budget", "2"],
        "--inference_budget",
        ("plan", "inference_budget"),
        2.0,
    ),
]


@pytest.mark.parametrize("argv, new, key, value", RENAMED, ids=lambda v: v[0] if isinstance(v, list) else None)
def test_old_flag_spellings_still_parse_with_a_note(argv, new, key, value, capsys):
    args = parse_command(argv[0], argv[1:])
    for part in key:
        args = args[part]
    assert args == value
    notes = capsys.readouterr().err.splitlines()
    assert any(f"is now `{new}`" in line for line in notes) and all(line.startswith("diffperc ") for line in notes)


def test_a_training_config_given_as_config_is_read_as_base(capsys):
    args = parse_command("cache-latents", ["--config", str(QUICKSTART), "--out", "o"])
    assert args.base == [str(QUICKSTART)]
    assert f"a training config is now given as `--base`, not `--config` ({QUICKSTART})" in capsys.readouterr().err


def test_errors_name_the_new_flags(tmp_path):
    _, err, code = _run("export", "--ckpt", tmp_path / "missing.ckpt", "--out", tmp_path / "out")
    assert code == 2
    assert "`--ckpt` is now `--ckpt_path`" in err
    assert f"diffperc export: error: `--ckpt_path` {tmp_path / 'missing.ckpt'}: no such file" in err
    _, err, code = _run("upcycle", "--ckpt_path", "a.ckpt", "--out", "b.ckpt", "--num_experts", "2", "--top_k", "3")
    assert code == 2 and "`--top_k` must be in 1..`--num_experts` (2), got 3" in err
    _, err, code = _run(
        "laws", "plan", "--train_report", "t", "--tts_report", "s", "--train_budget", "x", "--inference_budget", "1"
    )
    assert code == 2 and "train_budget" in err and len(err.splitlines()) == 2, err


# ------------------------------------------------------------------------------------------------------- models
@pytest.mark.parametrize("name, side, channels", [("t1", 32, 3), ("t3", 64, 3), ("DiT-S/2", 32, 4), ("a1", 32, 4)])
def test_forward_macs_equal_the_counted_macs(name, side, channels):
    with torch.device("meta"):
        model = build_model(name, input_size=side, in_channels=channels)
    x = torch.empty(1, channels, side, side, device="meta")
    t = torch.zeros(1, dtype=torch.long, device="meta")
    assert forward_macs(model, side) == count_macs(model, x, t, t.clone(), device="meta")


def test_models_table_counts_the_dit_paper_gflops():
    # DiT-XL/2 at 256 px (32 x 32 latents) is 118.6 GFLOPs in the DiT paper (Table 4), multiply-accumulates counted.
    rows = {
        line.split("|")[8].strip(): line.split("|")
        for line in table(["DiT-XL/2", "t3-4E2A"]).splitlines()[2:]
        if "DiT-XL/2" in line
    }
    assert rows["256"][9].strip() == "118.621" and rows["256"][6].strip() == "675.1"
    out, _, code = _run("models", "t3-4E2A", "t1")
    assert code == 0 and "| t3-4E2A | 192 | 6 | 4 | 4 | 11.5 | 7.9 | 32 | 0.409 |" in out
    _, err, code = _run("models", "DiT-Q/2")
    assert code == 2 and "Unknown preset(s) ['DiT-Q/2']" in err


def test_a_recipe_of_differences_without_its_base_names_the_full_command(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # bases are found from the recipe's own folder too
    flow, depth = ROOT / "configs/quickstart/flow.yaml", ROOT / "configs/quickstart/depth.yaml"
    out, err, code = _run("fit", "--config", flow, "--print_config")
    assert code == 2 and not out
    assert err.splitlines()[0] == (
        f"diffperc fit: error: `--config {flow}` holds what differs from configs/quickstart/depth.yaml: give its "
        f"bases first, e.g. `--config configs/quickstart/depth.yaml --config {flow}`"
    )
    out, err, code = _run("fit", "--config", depth, "--config", flow, "--print_config")
    assert code == 0 and "FlowTask" in out
