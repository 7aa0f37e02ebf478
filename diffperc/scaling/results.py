"""Sweep results: one JSON row per point in ``<out>/results.jsonl`` (appended, the last row of a point wins), built
from a finished run's ``train_macs.json`` and ``test_metrics.json``; ``collect`` adds the rows of runs finished
elsewhere (SLURM).

rows = collect(load_sweep("sweeps/tiny/model_size.yaml"), "runs/sweeps/tiny/model_size")
"""

import json
import os
import time
from pathlib import Path
from typing import Any

from diffperc.scaling.spec import Point, Sweep, expand, normalize_key
from diffperc.utils import append_jsonl, is_number, read_jsonl

RESULTS = "results.jsonl"


def read_results(path: str | os.PathLike) -> dict[str, dict]:
    """Rows of a ``results.jsonl`` by point id (the last line of a point wins; a torn last line is ignored)."""
    return {row["point"]: row for row in read_jsonl(path) if "point" in row}


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def row_from_run(point: Point, upstream_row: dict | None = None) -> dict | None:
    """The result row of a finished point from its run directory, or None when its files are missing.

    The metric keys are those of the ``metrics`` block of ``test_metrics.json`` as written (``test/<task>/<metric>``,
    ``baseline/<task>/<metric>``, ``compute/test_macs_per_sample``: see ``PerceptionFinetuning.on_test_epoch_end``),
    for one task and for several alike; a ``test_metrics.json`` without that block counts as missing. From the
    training run's ``train_macs.json`` come ``compute/train_macs``, ``trainer.global_step``, the final losses
    ``loss/train`` and ``loss/val`` and, flattened, the power laws fitted while it trained (``PowerLawMonitor``):
    ``law/<series>/<field>``, e.g. ``law/val/depth/abs_rel/b``. A key an older file lacks is left out of the row.
    """
    row: dict[str, Any] = {
        "point": point.id,
        "status": "ok",
        "command": point.command,
        "run_dir": str(point.run_dir),
        "overrides": point.overrides,
    }
    row.update({normalize_key(k): v for k, v in point.overrides.items()})
    row.update(point.tags)
    train_dir = point.run_dir if point.command == "fit" else Path(point.checkpoint).parent.parent
    train = _read_json(train_dir / "train_macs.json")
    if point.command == "fit" and train is None:
        return None
    if train is not None:
        row["compute/train_macs"] = train.get("compute/train_macs")
        row["trainer.global_step"] = train.get("global_step")
        row.update({key: train[key] for key in ("loss/train", "loss/val") if is_number(train.get(key))})
        laws = train.get("laws") if isinstance(train.get("laws"), dict) else {}
        for series, fit in laws.items():
            if isinstance(fit, dict):
                row.update({f"law/{series}/{field}": v for field, v in fit.items() if is_number(v)})
    if point.command == "tts" or point.test:
        record = _read_json(point.run_dir / "test_metrics.json")
        if record is None or not isinstance(record.get("metrics"), dict):
            return None
        row["task"] = record.get("task")
        row.update(record["metrics"])
        row.update({f"model.inference.{k}": v for k, v in (record.get("inference") or {}).items()})
    if upstream_row is not None:
        row["from"] = upstream_row["point"]
        for key, value in upstream_row.items():
            if key not in ("point", "status", "overrides", "from") and not key.startswith("from/"):
                row[f"from/{key}"] = value
        up_macs = upstream_row.get("compute/train_macs")
        if point.command == "fit" and is_number(up_macs) and is_number(row.get("compute/train_macs")):
            row["compute/total_train_macs"] = up_macs + row["compute/train_macs"]
        elif point.command == "tts" and is_number(up_macs):
            row["compute/total_train_macs"] = up_macs
    elif is_number(row.get("compute/train_macs")):
        row["compute/total_train_macs"] = row["compute/train_macs"]
    return row


def failed_row(
    point: Point, step: str, returncode: int | None, log: Path, error: str, start: float | None = None
) -> dict:
    """The row of a point that failed at ``step`` (``fit``, ``test``, ``tts``, ``collect`` or ``upstream``)."""
    row = {
        "point": point.id,
        "status": "failed",
        "step": step,
        "returncode": returncode,
        "log": str(log),
        "error": error,
        "overrides": point.overrides,
    }
    if start is not None:
        row["wall_s"] = round(time.perf_counter() - start, 2)
    return row


def collect(sweep: Sweep, out: str | os.PathLike, upstream_dir: str | os.PathLike | None = None, echo=print) -> list:
    """Adds a row to ``results.jsonl`` for every point whose run finished (e.g. under SLURM) but has no ``ok`` row
    yet, and returns the ok rows of the sweep's points in expansion order."""
    out = Path(out)
    upstream_points, points = expand(sweep, out, upstream_dir)
    done: dict[str, dict] = {}
    for stage_points in (upstream_points, points):
        if not stage_points:
            continue
        results = stage_points[0].run_dir.parent / RESULTS
        previous = read_results(results)
        for point in stage_points:
            row = previous.get(point.id)
            if row is None or row.get("status") != "ok":
                upstream_row = done.get(point.upstream.id) if point.upstream else None
                row = row_from_run(point, upstream_row) if point.upstream is None or upstream_row else None
                if row is None:
                    echo(f"not finished: {point.id} ({point.run_dir})")
                    continue
                append_jsonl(results, row)
            done[point.id] = row
    return [done[p.id] for p in points if p.id in done]


def failed_rows(sweep: Sweep, out: str | os.PathLike, upstream_dir: str | os.PathLike | None = None) -> list[dict]:
    """The failed rows (the last row of a point in ``results.jsonl`` has status ``failed``) of the sweep's points,
    upstream stage first, in expansion order."""
    upstream_points, points = expand(sweep, Path(out), upstream_dir)
    failed = []
    for stage_points in (upstream_points, points):
        if stage_points:
            previous = read_results(stage_points[0].run_dir.parent / RESULTS)
            failed += [previous[p.id] for p in stage_points if previous.get(p.id, {}).get("status") == "failed"]
    return failed
