"""Every YAML under configs/ parses into a full config (litgpt's config-hub test, for LightningCLI)."""

import contextlib
import io
from pathlib import Path

import pytest
import yaml

from diffperc.cli import DiffpercCLI

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_config_prints_full_config(config):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        DiffpercCLI(args=["fit", "--config", str(config), "--print_config"])
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
