"""Sweep report: power-law fits of chosen metrics against compute, as ``report.md`` + one PNG per fit + ``rows.csv``.

write_report(rows, [("train_macs", "val/depth/abs_rel", False)], "runs/sweep/report")
report(load_sweep("sweeps/tiny/model_size.yaml"), "runs/sweeps/tiny/model_size")   # a sweep's fits, per group too
"""

import csv
import io
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from diffperc.scaling.fit import PowerLawFit, fit_power_law
from diffperc.scaling.plots import plot_fit, plot_groups
from diffperc.scaling.results import collect, failed_rows
from diffperc.scaling.spec import Sweep, normalize_key, slug
from diffperc.utils import atomic_write_text, is_number


@dataclass
class _FitResult:
    """What one entry of ``fits_spec`` produced: a fit and its plot, or the reason there is none."""

    x_key: str
    y_key: str
    offset: bool
    fit: PowerLawFit | None = None
    png: str | None = None
    error: str | None = None
    skipped: list[str] = field(default_factory=list)
    x: list[float] = field(default_factory=list)
    y: list[float] = field(default_factory=list)


def write_report(
    rows: Sequence[Mapping[str, object]],
    fits_spec: Sequence[tuple[str, str, bool]],
    out_dir: str | os.PathLike,
    failed: Sequence[Mapping[str, object]] = (),
) -> Path:
    """Fits each ``(x_key, y_key, offset)`` of ``fits_spec`` over ``rows`` and writes the report into ``out_dir``.

    Rows that lack ``x_key`` or ``y_key``, or whose values are not usable numbers (non-finite, or non-positive
    where the law needs positive values), are left out of that fit and listed under it in the report; a fit that
    cannot be made (e.g. too few points) is reported with its reason instead of raising. Every file is written
    atomically, and ``report.md`` last, so its presence means the PNGs and ``rows.csv`` are complete.

    Args:
        rows: Raw sweep results, one mapping per run, e.g. ``{"point": "t1", "train_macs": 1e12,
            "val/depth/abs_rel": 0.3}``. A ``point`` key, if present, names the row in notes.
        fits_spec: ``(x_key, y_key, offset)`` triples; ``offset=True`` fits ``y = e + a * x^b``.
        out_dir: Output folder, created if needed.
        failed: Runs that failed, listed at the top of the report: mappings with ``point``, ``step``, ``returncode``,
            ``error`` (one line) and ``log`` (a path), as a sweep's failed rows hold.

    Returns:
        The path of ``report.md``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for i, spec in enumerate(fits_spec):
        if len(spec) != 3:
            raise ValueError(f"`fits_spec[{i}]` must be (x_key, y_key, offset); got {spec!r}")
        x_key, y_key, offset = spec
        result = _fit_one(rows, x_key, y_key, bool(offset))
        if result.fit is not None:
            result.png = f"fit_{i:02d}_{_file_slug(y_key)}_vs_{_file_slug(x_key)}{'_offset' if offset else ''}.png"
            plot_fit(
                result.x,
                result.y,
                result.fit,
                out_dir / result.png,
                xlabel=x_key,
                ylabel=y_key,
                title=f"{y_key}: {result.fit}",
            )
        results.append(result)
    _write_csv(rows, out_dir / "rows.csv")
    return atomic_write_text(out_dir / "report.md", _markdown(rows, results, failed))


def report(sweep: Sweep, out: str | os.PathLike, upstream_dir: str | os.PathLike | None = None, echo=print) -> Path:
    """Fits ``sweep.metrics`` against ``sweep.x`` over the ok rows and writes ``<out>/report/report.md`` (and one
    report per group under ``<out>/report/<group>/`` with ``group_by``), listing the failed points first."""
    out = Path(out)
    rows = [{k: v for k, v in r.items() if k != "overrides"} for r in collect(sweep, out, upstream_dir, echo)]
    failed = failed_rows(sweep, out, upstream_dir)
    x = normalize_key(sweep.x)
    metrics = [normalize_key(m) for m in sweep.metrics] or sorted(
        {k for r in rows for k in r if k.startswith("test/") and is_number(r[k])}
    )
    specs = [(x, m, sweep.offset) for m in metrics]
    path = write_report(rows, specs, out / "report", failed=failed)
    groups = [normalize_key(g) for g in sweep.group_by]
    if groups:
        by_group: dict[tuple, list] = {}
        for r in rows:
            by_group.setdefault(tuple(r.get(g) for g in groups), []).append(r)
        for values, group_rows in by_group.items():
            label = "_".join(f"{g.split('.')[-1]}-{slug(v)}" for g, v in zip(groups, values, strict=True))
            write_report(group_rows, specs, out / "report" / label)
        # The groups overlaid in one figure per metric, as the paper's figures show model sizes against compute.
        figures = []
        for i, (x_key, y_key, offset) in enumerate(specs):
            series = []
            for values, group_rows in by_group.items():
                fit = _fit_one(group_rows, x_key, y_key, offset)
                if fit.x is not None and len(fit.x):
                    series.append((", ".join(f"{g.split('.')[-1]}={v}" for g, v in zip(groups, values)), fit.x,
                                   fit.y, fit.fit))
            if series:
                name = f"groups_{i:02d}_{_file_slug(y_key)}_vs_{_file_slug(x_key)}.png"
                plot_groups(series, out / "report" / name, xlabel=x_key, ylabel=y_key, title=y_key)
                figures.append(f"![{y_key} by {', '.join(groups)}]({name})")
        if figures:
            overlaid = f"\n## By {', '.join(groups)}, overlaid\n\n" + "\n\n".join(figures) + "\n"
            path = atomic_write_text(path, path.read_text() + overlaid)
    echo(f"report: {path}")
    return path


def _row_name(row: Mapping[str, object], index: int) -> str:
    return f"row {index} (point={row['point']})" if "point" in row else f"row {index}"


def _as_float(value: object) -> float | None:
    if isinstance(value, bool):  # True would silently become 1.0
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _fit_one(rows: Sequence[Mapping[str, object]], x_key: str, y_key: str, offset: bool) -> _FitResult:
    result = _FitResult(x_key=x_key, y_key=y_key, offset=offset)
    xs, ys = result.x, result.y
    for i, row in enumerate(rows):
        missing = [k for k in (x_key, y_key) if k not in row or row[k] is None]
        if missing:
            result.skipped.append(f"{_row_name(row, i)}: missing {', '.join(f'`{k}`' for k in missing)}")
            continue
        x, y = _as_float(row[x_key]), _as_float(row[y_key])
        # the same domain as fit_power_law: x > 0 always, y > 0 unless there is an offset
        bad = []
        if x is None or not math.isfinite(x) or x <= 0:
            bad.append(f"`{x_key}` = {row[x_key]!r}")
        if y is None or not math.isfinite(y) or (not offset and y <= 0):
            bad.append(f"`{y_key}` = {row[y_key]!r}")
        if bad:
            result.skipped.append(f"{_row_name(row, i)}: bad value {', '.join(bad)}")
            continue
        xs.append(x)
        ys.append(y)
    try:
        result.fit = fit_power_law(xs, ys, offset=offset)
    except (ValueError, RuntimeError) as err:
        result.error = " ".join(str(err).split())  # one line, so it fits a table cell
    return result


def _file_slug(key: str) -> str:
    """A row key as part of a PNG name: readable (``test_depth_abs_rel``), unlike the shorter point-id ``slug``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", key).strip("_") or "value"


def _write_csv(rows: Sequence[Mapping[str, object]], path: Path) -> None:
    columns = list(dict.fromkeys(k for row in rows for k in row))  # union of keys, in order of first appearance
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=columns, restval="")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, text.getvalue())


def _num(value: float | None) -> str:
    return "" if value is None else f"{value:.4g}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _markdown(rows: Sequence[Mapping[str, object]], results: list[_FitResult], failed: Sequence[Mapping]) -> str:
    lines = [
        "# Scaling report",
        "",
        f"{len(rows)} rows (raw values in [rows.csv](rows.csv)). Laws: y = a * x^b, or y = e + a * x^b where an e",
        "is given. Intervals are 95% (Student-t). R^2 is in log space for y = a * x^b and in linear space with e.",
        "",
    ]
    if failed:
        lines += [
            f"**{len(failed)} failed point(s)**, not in the fits (a rerun of the sweep retries them):",
            "",
            "| point | step | return code | error | log |",
            "|---|---|---|---|---|",
        ]
        for row in failed:
            code = "" if row.get("returncode") is None else str(row["returncode"])
            lines.append(f"| `{_cell(str(row.get('point', '')))}` | {_cell(str(row.get('step', '')))} | {code} | "
                         f"{_cell(str(row.get('error', '')))} | `{_cell(str(row.get('log', '')))}` |")
        lines.append("")
    lines += [
        "| metric | x-axis | a | b | b 95% CI | e | R^2 | n | plot |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        key_cells = f"| `{_cell(r.y_key)}` | `{_cell(r.x_key)}` |"
        if r.fit is None:
            lines.append(f"{key_cells} not fitted: {_cell(r.error)} |" + " |" * 4 + f" {len(r.x)} | |")
            continue
        f = r.fit
        ci = f"[{_num(f.b_ci[0])}, {_num(f.b_ci[1])}]"
        lines.append(
            f"{key_cells} {_num(f.a)} | {_num(f.b)} | {ci} | {_num(f.e)} | {_num(f.r2)} | {f.n} | [png]({r.png}) |"
        )
    for r in results:
        title = f"`{r.y_key}` vs `{r.x_key}`" + (" (with offset)" if r.offset else "")
        lines += ["", f"## {title}", ""]
        if r.fit is not None:
            f = r.fit
            cis = [("a", f.a_ci), ("b", f.b_ci)] + ([("e", f.e_ci)] if f.offset else [])
            ci_text = ", ".join(f"{name} in [{_num(lo)}, {_num(hi)}]" for name, (lo, hi) in cis)
            lines.append(f"{f.format()} (x = `{r.x_key}`); 95% CIs: {ci_text}.")
            lines += ["", f"![{r.y_key} vs {r.x_key}]({r.png})"]
        else:
            lines.append(f"Not fitted: {r.error}")
        if r.skipped:
            lines += ["", f"Skipped {len(r.skipped)} row(s):"] + [f"- {s}" for s in r.skipped]
    return "\n".join(lines) + "\n"
