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
    """Tests write into tmp_path only: nothing new may appear at the repo root."""
    before = {p.name for p in ROOT.iterdir()}
    yield
    new = {p.name for p in ROOT.iterdir()} - before
    assert not new, f"test left files in the repository root: {sorted(new)}"


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
