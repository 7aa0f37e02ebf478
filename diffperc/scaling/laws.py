"""Compute-optimal planning from a training law and a test-time law: an extrapolation, printed with its uncertainty.

To run: ``diffperc laws plan --train_report runs/sweeps/tiny/model_size --tts_report runs/sweeps/tiny/inference_steps
--train_budget 1e14 --inference_budget 1e9``.
"""

import csv
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import stats

from diffperc.scaling.fit import PowerLawFit, fit_power_law
from diffperc.scaling.results import read_results

__all__ = ["Candidate", "Plan", "load_rows", "main", "plan"]

TRAIN_X = "compute/train_macs"
TEST_X = "compute/test_macs_per_sample"
_STEPS, _MEMBERS = "model.inference.num_steps", "model.inference.ensemble_size"

PLAN_DOC = """\
The model (every number it prints is an extrapolation from the fitted laws, not a measurement):
  training law   L_T(C) = a_T * C^b_T    metric vs training MACs, fitted on the training sweep's rows, each tested
                                         with P0 = num_steps x ensemble_size network passes per image
  test-time law  L_I(c) = a_I * c^b_I    metric vs test MACs per image, fitted on the test-time sweep's rows (one
                                         checkpoint): for a fixed model c is proportional to the passes P
  prediction     metric(C, P) = L_T(C) * (P / P0)^b_I  (the test-time gain transfers to other models as a ratio
                                         of passes; the law says nothing about which model size spends C best)
Candidates: every model of the training sweep (its MACs per training step and per network pass are read from its
row) with every (num_steps, ensemble_size) of the test-time sweep that fits the inference budget
(P x MACs per pass <= budget); each is trained on the whole training budget (C = budget, i.e. budget / MACs per step
steps). The best candidate minimises the predicted metric (ties: the cheaper inference). The 95% band combines, in
log space, the training law's band at C and b_I's interval times |log(P / P0)|; it covers parameter uncertainty only,
and widens with the distance from the measured compute, which the output states.
"""


@dataclass(frozen=True)
class Candidate:
    """One configuration the plan considered: a model of the training sweep with one test-time setting."""

    row: Mapping
    train_steps: int
    num_steps: int
    ensemble_size: int
    passes: int
    test_macs: float
    predicted: float
    low: float
    high: float


@dataclass(frozen=True)
class Plan:
    """The best candidate under the budgets, the laws it came from, and every candidate considered."""

    metric: str
    train_law: PowerLawFit
    test_law: PowerLawFit
    reference_passes: float
    train_budget: float
    inference_budget: float
    best: Candidate
    candidates: tuple


def _number(value) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def load_rows(path: str | Path) -> list[dict]:
    """The ok rows of a sweep: ``DIR/results.jsonl`` (a sweep's ``--out``), else ``rows.csv`` in ``DIR`` or
    ``DIR/report`` (a report folder); CSV cells that are numbers become floats."""
    path = Path(path)
    results = path / "results.jsonl"
    if results.is_file():
        return [r for r in read_results(results).values() if r.get("status", "ok") == "ok"]
    for csv_path in (path / "rows.csv", path / "report" / "rows.csv"):
        if csv_path.is_file():
            with open(csv_path, newline="") as f:
                rows = [{k: (_number(v) if _number(v) is not None else v) for k, v in r.items()}
                        for r in csv.DictReader(f)]
            return [r for r in rows if r.get("status", "ok") in ("ok", "")]
    raise FileNotFoundError(f"{path}: no results.jsonl, rows.csv or report/rows.csv (is it a sweep's --out folder?)")


def _fit(rows: Sequence[Mapping], x_key: str, metric: str, what: str) -> tuple[PowerLawFit, list]:
    usable = [r for r in rows if (_number(r.get(x_key)) or 0) > 0 and (_number(r.get(metric)) or 0) > 0]
    if len(usable) < 3:
        raise ValueError(f"{what}: need 3 rows with positive `{x_key}` and `{metric}`, found {len(usable)}")
    return fit_power_law([float(r[x_key]) for r in usable], [float(r[metric]) for r in usable]), usable


def _log_half_width(fit: PowerLawFit, x: float) -> float:
    """Half-width of the fit's 95% band at ``x``, in log units (exact for the log-space OLS fit)."""
    low, high = fit.predict_interval(np.array([x]))
    return float(np.log(high[0] / low[0]) / 2)


def _passes(row: Mapping, what: str) -> float:
    steps, members = _number(row.get(_STEPS)), _number(row.get(_MEMBERS))
    if not steps or not members:
        point = row.get("point", "?")
        raise ValueError(f"{what}: row {point} lacks `{_STEPS}` / `{_MEMBERS}` (from its test_metrics.json)")
    return steps * members


def plan(
    train_rows: Sequence[Mapping],
    tts_rows: Sequence[Mapping],
    train_budget: float,
    inference_budget: float,
    metric: str,
) -> Plan:
    """Picks the configuration the laws predict is best under the budgets (see ``PLAN_DOC``).

    Args:
        train_rows: Rows of a training sweep: ``compute/train_macs``, ``trainer.global_step``,
            ``compute/test_macs_per_sample``, the inference settings and ``metric``.
        tts_rows: Rows of a test-time sweep: ``compute/test_macs_per_sample``, the inference settings and ``metric``.
        train_budget: Training MACs to spend.
        inference_budget: Test MACs per image to spend at most.
        metric: The row key to minimise (an error, e.g. ``test/depth/abs_rel``).

    Raises:
        ValueError: If a law cannot be fitted, a row lacks what the plan needs, or nothing fits the inference budget.
    """
    if not (train_budget > 0 and inference_budget > 0):
        raise ValueError("`--train_budget` and `--inference_budget` must be positive MACs")
    train_law, train_used = _fit(train_rows, TRAIN_X, metric, "training law")
    test_law, tts_used = _fit(tts_rows, TEST_X, metric, "test-time law")
    reference = [_passes(r, "training law") for r in train_used]
    p0 = float(np.exp(np.mean(np.log(reference))))  # the training sweep's passes (equal in a normal sweep)
    settings = sorted({(int(_number(r[_STEPS])), int(_number(r[_MEMBERS]))) for r in tts_used if _passes(r, "tts")})
    # The training law's band at C, and b_I's t-interval half-width (log units per unit of log passes).
    half_t = _log_half_width(train_law, train_budget)
    t_i = stats.t.ppf(0.975, test_law.dof)
    se_b = math.sqrt(max(test_law.param_cov[1][1], 0.0))
    base = math.log(float(train_law.predict(train_budget)))
    candidates = []
    for row in train_used:
        per_pass = float(row[TEST_X]) / _passes(row, "training law")
        steps_done = _number(row.get("trainer.global_step"))
        per_step = float(row[TRAIN_X]) / steps_done if steps_done else float("nan")
        for num_steps, members in settings:
            passes = num_steps * members
            cost = passes * per_pass
            if cost > inference_budget:
                continue
            log_ratio = math.log(passes / p0)
            log_pred = base + test_law.b * log_ratio
            half = math.hypot(half_t, t_i * se_b * log_ratio)
            candidates.append(Candidate(
                row=row,
                train_steps=int(train_budget // per_step) if math.isfinite(per_step) else -1,
                num_steps=num_steps,
                ensemble_size=members,
                passes=passes,
                test_macs=cost,
                predicted=math.exp(log_pred),
                low=math.exp(log_pred - half),
                high=math.exp(log_pred + half),
            ))
    if not candidates:
        cheapest = min(float(r[TEST_X]) / _passes(r, "training law") for r in train_used)
        raise ValueError(f"`--inference_budget` {inference_budget:.3g} MACs/image is below one network pass of the "
                         f"cheapest model ({cheapest:.3g} MACs)")
    candidates.sort(key=lambda c: (c.predicted, c.test_macs))
    return Plan(metric, train_law, test_law, p0, train_budget, inference_budget, candidates[0], tuple(candidates))


def _describe(row: Mapping) -> str:
    overrides = row.get("overrides")
    if isinstance(overrides, Mapping) and overrides:
        keys = [k for k in overrides if "logger" not in k and "init_from" not in k]
        return ", ".join(f"{k}={overrides[k]}" for k in keys[-4:]) or str(row.get("point"))
    return str(row.get("point", "?"))


def format_plan(p: Plan, train_rows: Sequence[Mapping]) -> str:
    """The plan as text: the laws, how far they are extrapolated, the best configuration and its band."""
    measured = [float(r[TRAIN_X]) for r in train_rows if _number(r.get(TRAIN_X))]
    stretch = p.train_budget / max(measured)
    b = p.best
    lines = [
        "Compute-optimal plan: an EXTRAPOLATION from fitted power laws (95% band = parameter uncertainty only).",
        f"  training law:  {p.train_law.format(p.metric, 'C')}  (n={p.train_law.n}, R^2={p.train_law.r2:.3f}, "
        f"b in [{p.train_law.b_ci[0]:.3g}, {p.train_law.b_ci[1]:.3g}])",
        f"  test-time law: {p.test_law.format(p.metric, 'c')}  (n={p.test_law.n}, R^2={p.test_law.r2:.3f}, "
        f"b in [{p.test_law.b_ci[0]:.3g}, {p.test_law.b_ci[1]:.3g}])",
        f"  budgets: training {p.train_budget:.3g} MACs ({stretch:.3g}x the largest measured run), "
        f"inference {p.inference_budget:.3g} MACs/image; training rows were tested with {p.reference_passes:g} passes",
    ]
    if p.train_law.b >= 0 or p.test_law.b >= 0:
        lines.append("  WARNING: a law does not improve with compute (b >= 0); this plan follows it anyway.")
    lines += [
        f"  best: {_describe(b.row)} trained for {b.train_steps} steps, tested with num_steps={b.num_steps}, "
        f"ensemble_size={b.ensemble_size} ({b.passes} passes, {b.test_macs:.3g} MACs/image)",
        f"  predicted {p.metric} = {b.predicted:.4g}  [95% band {b.low:.4g}, {b.high:.4g}]",
        "  runners-up:",
    ]
    for c in p.candidates[1:6]:
        lines.append(f"    {c.predicted:.4g} [{c.low:.4g}, {c.high:.4g}]  {_describe(c.row)}; num_steps={c.num_steps}, "
                     f"ensemble_size={c.ensemble_size} ({c.test_macs:.3g} MACs/image)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """``diffperc laws plan ...``; the flags are declared in ``diffperc.cli`` (its help prints ``PLAN_DOC``)."""
    from diffperc.cli import parse_command

    args = parse_command("laws", argv).plan
    train_rows, tts_rows = load_rows(args.train_report), load_rows(args.tts_report)
    metric = args.metric
    if metric is None:
        common = sorted({k for r in train_rows for k in r if k.startswith("test/")}
                        & {k for r in tts_rows for k in r if k.startswith("test/")})
        if not common:
            raise SystemExit("The two sweeps share no test/... metric; pass `--metric`")
        metric = next((k for k in common if k.endswith("/abs_rel")), common[0])
    try:
        result = plan(train_rows, tts_rows, args.train_budget, args.inference_budget, metric)
    except ValueError as err:
        raise SystemExit(str(err)) from err
    print(format_plan(result, train_rows))
