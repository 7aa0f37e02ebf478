"""Every YAML under configs/ parses into a full config (litgpt's config-hub test, for LightningCLI)."""

import contextlib
import io
from pathlib import Path

import pytest
import yaml

from diffperc.cli import DiffpercCLI

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))


def _config_args(config: Path) -> list[str]:
    """An override file names its base on its first line (``# base: configs/...``); compose it like a user would."""
    first = config.read_text().splitlines()[0] if config.read_text() else ""
    bases = [ROOT / b.strip() for b in first.removeprefix("# base:").split(",")] if first.startswith("# base:") else []
    return [arg for path in [*bases, config] for arg in ("--config", str(path))]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_config_prints_full_config(config):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        DiffpercCLI(args=["fit", *_config_args(config), "--print_config"])
    assert exit_info.value.code in (None, 0)
    resolved = yaml.safe_load(out.getvalue())
    assert resolved["model"]["class_path"].startswith("diffperc.")
    assert "init_args" in resolved["data"] and resolved["trainer"]["max_steps"] > 0


def test_unknown_config_key_is_rejected_naming_the_key(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  max_stepz: 3\n")
    with pytest.raises(SystemExit):
        DiffpercCLI(args=["fit", "--config", str(CONFIGS[0]), "--config", str(bad), "--print_config"])
    assert "max_stepz" in capsys.readouterr().err
