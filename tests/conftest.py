"""Shared fixtures: every test starts from the same seed and default dtype, and leaves no files in the repo."""

import os
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP; see diffperc/cli/__init__.py

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT.parent / "shared" / "fixtures"


@pytest.fixture(autouse=True)
def _seed_and_dtype():
    torch.manual_seed(0)
    dtype = torch.get_default_dtype()
    yield
    torch.set_default_dtype(dtype)


@pytest.fixture(autouse=True)
def _ensure_clean_repo():
    """Tests write into tmp_path only: nothing may appear or be rewritten at the repo root. A stray file left there
    by an earlier run would hide a new one of the same name, so rewritten files count too."""
    before = _root_files()
    yield
    after = _root_files()
    touched = {name for name, mtime in after.items() if before.get(name, mtime - 1) != mtime}
    assert not touched, f"test wrote files in the repository root: {sorted(touched)}"


def _root_files() -> dict[str, int]:
    """Each entry at the repo root -> its file's modification time (0 for folders, whose times change with use)."""
    return {p.name: 0 if p.is_dir() else p.stat().st_mtime_ns for p in ROOT.iterdir()}


@pytest.fixture(scope="session")
def toy_assets(tmp_path_factory):
    """The toy data sets, weights and predict folders the shipped recipes are run on (``tiny_runs.make_assets``)."""
    import tiny_runs

    return tiny_runs.make_assets(tmp_path_factory.mktemp("toy_assets"))


@pytest.fixture(scope="session")
def recipes(toy_assets, tmp_path_factory):
    """Toy runs of the shipped recipes, each fitted once per session (``tiny_runs.Recipes``)."""
    import tiny_runs

    return tiny_runs.Recipes(toy_assets, tmp_path_factory.mktemp("recipes"))
