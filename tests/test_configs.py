"""Config-file errors name the key. Every shipped YAML is parsed and run by the real CLI in test_e2e_configs.py."""

from pathlib import Path

import pytest

from diffperc.cli import DiffpercCLI

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))


def test_unknown_config_key_is_rejected_naming_the_key(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  max_stepz: 3\n")
    with pytest.raises(SystemExit):
        DiffpercCLI(args=["fit", "--config", str(CONFIGS[0]), "--config", str(bad), "--print_config"])
    assert "max_stepz" in capsys.readouterr().err
