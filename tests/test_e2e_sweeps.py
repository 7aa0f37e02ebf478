"""Every shipped sweep runs through the real CLI and Lightning path: its first point (and its first mixture-of-experts
point, and its upstream stage's first point) is expanded by the sweep machinery, shrunk like the configs
(``tiny_runs.shrink``: the point's own overrides stay, sizes and paths shrink), fitted for 2 steps and tested, and
the result row carries the sweep's x-axis and every metric it fits, finite.
"""

from pathlib import Path

import pytest
import yaml

from diffperc.scaling import sweep as sweeps

import tiny_runs

ROOT = Path(__file__).resolve().parents[1]
SWEEPS = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "sweeps").rglob("*.yaml"))


def _nested(dotted: dict) -> dict:
    """``{"a.b.c": v}`` -> ``{"a": {"b": {"c": v}}}``: CLI overrides as a config file fragment."""
    tree: dict = {}
    for key, value in dotted.items():
        *parents, leaf = key.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value) if isinstance(value, str) and value[:1] in "[{" else value
    return tree


def _is_moe(point) -> bool:
    values = " ".join(f"{k}={v}" for k, v in point.overrides.items())
    return "upcycle" in values or any(c.isdigit() and "E" in values for c in values) and "E2A" in values


def _stand_ins(points, recipes) -> dict:
    """Fine-tunes that continue a shipped recipe's run (``runs/<name>/...``) start from that recipe's toy run."""
    values = {str(v) for p in points for v in p.overrides.values() if str(v).startswith("runs/")}
    return {value: recipes.stand_in(value) for value in values}


def _run_point(point, recipes, checkpoints: dict, upstream_row: dict | None = None) -> dict:
    """Fits (or, for a tts point, tests a toy checkpoint of) ``point`` shrunk; returns its sweep result row."""
    args = [a for path in point.base_paths for a in ("--config", str(path))]
    composed = tiny_runs._merge(tiny_runs.compose(args), _nested(point.overrides))
    cfg = tiny_runs.shrink(composed, recipes.assets, point.run_dir.parent, checkpoints)
    cfg["trainer"]["logger"]["init_args"]["name"] = point.run_dir.name  # the sweep's run folder, as _args sets
    if point.add_macs_counter:
        cfg["trainer"].setdefault("callbacks", []).append({"class_path": "diffperc.callbacks.macs.MACsCounter"})
    path = tiny_runs.write_config(cfg, point.run_dir.parent / f"{point.run_dir.name}.yaml")
    if point.command == "fit":
        tiny_runs.cli("fit", "--config", path)
        if point.test:
            tiny_runs.cli("test", "--config", path, "--ckpt_path", point.run_dir / "checkpoints" / "last.ckpt")
    else:
        tiny_runs.cli("test", "--config", path, "--ckpt_path", point.checkpoint)
    return sweeps.row_from_run(point, upstream_row)


@pytest.mark.slow
@pytest.mark.parametrize("sweep_file", SWEEPS)
def test_shipped_sweep_points_fit_test_and_give_their_rows(sweep_file, recipes, tmp_path):
    sweep = sweeps.load_sweep(ROOT / sweep_file)
    upstream_points, points = sweeps.expand(sweep, tmp_path / "sweep")
    checkpoints, upstream_row = {}, None
    if upstream_points:
        upstream = upstream_points[0]
        upstream_row = _run_point(upstream, recipes, _stand_ins([upstream], recipes))
        checkpoints[str(upstream.run_dir / "checkpoints" / "last.ckpt")] = (
            upstream.run_dir / "checkpoints" / "last.ckpt"
        )
        points = [p for p in points if p.upstream is upstream]
    chosen = [points[0]] + [p for p in points[1:] if _is_moe(p) and not _is_moe(points[0])][:1]
    if sweep.command == "tts" and not upstream_points:  # the checkpoint of the shipped recipe the sweep tests
        for point in chosen:
            point.checkpoint = str(recipes.stand_in(point.checkpoint))
    else:
        checkpoints.update(_stand_ins(chosen, recipes))
    for point in chosen:
        row = _run_point(point, recipes, checkpoints, upstream_row)
        assert row is not None, f"{sweep_file} point {point.id} left no result files in {point.run_dir}"
        for key in [sweep.x, *sweep.metrics]:
            assert key in row and isinstance(row[key], (int, float)), (sweep_file, point.id, key, sorted(row))
            assert row[key] == row[key] and abs(row[key]) != float("inf"), (sweep_file, key, row[key])
