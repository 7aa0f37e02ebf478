"""Compute-optimal planning from a training law and a test-time law: an extrapolation, printed with its uncertainty.

To run: ``diffperc laws plan --train_report runs/sweeps/tiny/model_size --tts_report runs/sweeps/tiny/inference_steps
--train_budget 1e14 --inference_budget 1e9``.
"""

import csv
import functools
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import stats

from diffperc.scaling.fit import PowerLawFit, fit_power_law
from diffperc.scaling.results import read_results

__all__ = ["Candidate", "ModelLaw", "Plan", "describe_model", "format_plan", "load_rows", "main", "plan"]

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
                                         of passes)
One law for all sizes (L_T above) says nothing about which model size spends C best: every model gets the same
L_T(C), so the model choice follows inference cost only (a cheaper pass affords more passes). Per-model laws replace
it when EVERY training row carries its run's in-training fit of the metric's validation counterpart
(test/depth/abs_rel -> law/val/depth/abs_rel/{a,b,b_low,b_high,n}, n >= 3 validations): model m's own law
a_m * C^b_m, carried to the test metric by its row's ratio test metric / (a_m * M^b_m) at the run's measured MACs
M, gives L_m(C) = test metric * (C / M)^b_m (a longer run assumed to follow the run's own curve), and the model
size whose law predicts the lowest metric at C wins (P0: the model's own runs' passes); runs of one model (seeds)
are averaged in log space.
Candidates: every model of the training sweep (its MACs per training step and per network pass are read from its
rows) with every (num_steps, ensemble_size) of the test-time sweep that fits the inference budget
(P x MACs per pass <= budget); each is trained on the whole training budget (C = budget, i.e. budget / MACs per step
steps). The best candidate minimises the predicted metric (ties: the cheaper inference). The 95% band combines, in
log space, the training law's band at C (a per-model law: b_m's interval times log(C / M)) and b_I's interval times
|log(P / P0)|; it covers parameter uncertainty only, and widens with the distance from the measured compute, which
the output states.
Verdict: UNDECIDED ("too uncertain to choose between ...", exit status 0) when (a) the exponent interval of a law
the best prediction rests on (the test-time law; the training law, or the best model's own law) contains 0 or lies
above it: the error does not clearly fall with compute; or (b) another candidate (another model or another
(num_steps, ensemble_size)) predicts a value inside the best's band for the choice: the 95% band above without one
law's band at C, which every candidate shares and which cannot reorder them (a per-model law's band stays: it differs
between models). Otherwise DECIDED.
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
    model: str = ""  # the model as printed, e.g. "t2 (hidden 128, depth 4)"; its runs share it
    choice_low: float = math.nan  # the band the choice is judged by: [low, high] less what all candidates share
    choice_high: float = math.nan


@dataclass(frozen=True)
class ModelLaw:
    """One model's own training law (its runs' in-training fits), carried to the test metric at the training budget
    with the runs' own passes ``reference_passes``."""

    model: str
    rows: tuple
    b: float
    b_low: float
    b_high: float
    n: int
    reference_passes: float
    predicted: float
    low: float
    high: float


@dataclass(frozen=True)
class Plan:
    """The best candidate under the budgets, the laws it came from, every candidate considered, and whether the laws
    are sure enough to choose (``decided``, with the ``reason``)."""

    metric: str
    train_law: PowerLawFit | None  # None only with per-model laws and fewer than 3 training rows
    test_law: PowerLawFit
    reference_passes: float
    train_budget: float
    inference_budget: float
    best: Candidate
    candidates: tuple
    decided: bool = True
    reason: str = ""
    close: tuple = ()  # the other candidates whose prediction lies inside the best's band for the choice
    model_laws: tuple = ()  # a ModelLaw per model when per-model laws were used, else empty
    one_law_why: str = ""  # why per-model laws were not used (empty when they were)

    @property
    def per_model(self) -> bool:
        """Whether each model's own law made the prediction (else one law for all sizes)."""
        return bool(self.model_laws)


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
                rows = [
                    {k: (_number(v) if _number(v) is not None else v) for k, v in r.items()} for r in csv.DictReader(f)
                ]
            return [r for r in rows if r.get("status", "ok") in ("ok", "")]
    raise FileNotFoundError(f"{path}: no results.jsonl, rows.csv or report/rows.csv (is it a sweep's --out folder?)")


def _usable(rows: Sequence[Mapping], x_key: str, metric: str) -> list:
    return [r for r in rows if (_number(r.get(x_key)) or 0) > 0 and (_number(r.get(metric)) or 0) > 0]


def _fit(rows: Sequence[Mapping], x_key: str, metric: str, what: str) -> PowerLawFit:
    if len(rows) < 3:
        raise ValueError(f"{what}: need 3 rows with positive `{x_key}` and `{metric}`, found {len(rows)}")
    return fit_power_law([float(r[x_key]) for r in rows], [float(r[metric]) for r in rows])


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


def _geomean(values) -> float:
    return float(np.exp(np.mean(np.log(np.asarray(values, dtype=np.float64)))))


def _law_prefix(metric: str) -> str | None:
    """``test/depth/abs_rel`` -> ``law/val/depth/abs_rel/``: where a run's in-training fit of the metric's validation
    counterpart lives in its row; None for a metric that is not a ``test/...`` key."""
    return f"law/val/{metric[len('test/') :]}/" if metric.startswith("test/") else None


def _missing_laws(rows: Sequence[Mapping], metric: str) -> str:
    """Why the rows cannot use per-model laws, or "" when every row carries a usable one."""
    prefix = _law_prefix(metric)
    if prefix is None:
        return f"`{metric}` has no validation counterpart (law/val/...)"
    lacking = [
        str(r.get("point", "?"))
        for r in rows
        if any(_number(r.get(prefix + k)) is None for k in ("b", "b_low", "b_high"))
        or (_number(r.get(prefix + "a")) or 0) <= 0
        or (_number(r.get(prefix + "n")) or 0) < 3
    ]
    if not lacking:
        return ""
    return f"{len(lacking)} of {len(rows)} training runs lack `{prefix}b` with n >= 3 ({', '.join(lacking[:4])})"


def _model_law(model: str, rows: Sequence[Mapping], metric: str, budget: float) -> ModelLaw:
    """A model's own law at ``budget`` (see ``PLAN_DOC``): per run, log L = log(test metric) + b * log(C / M) with
    half-width (b_high - b_low) / 2 * |log(C / M)|; runs (seeds) averaged in log space."""
    prefix = _law_prefix(metric)
    logs, halves = [], []
    for r in rows:
        a, b = float(r[prefix + "a"]), float(r[prefix + "b"])
        measured = float(r[TRAIN_X])
        # the test metric over the run's own law at its measured MACs carries the val law to the test metric
        ratio = float(r[metric]) / (a * measured**b)
        logs.append(math.log(a * budget**b * ratio))
        halves.append((float(r[prefix + "b_high"]) - float(r[prefix + "b_low"])) / 2 * abs(math.log(budget / measured)))
    log_pred, half = float(np.mean(logs)), float(np.mean(halves))
    return ModelLaw(
        model=model,
        rows=tuple(rows),
        b=float(np.mean([float(r[prefix + "b"]) for r in rows])),
        b_low=float(np.mean([float(r[prefix + "b_low"]) for r in rows])),
        b_high=float(np.mean([float(r[prefix + "b_high"]) for r in rows])),
        n=int(min(_number(r[prefix + "n"]) for r in rows)),
        reference_passes=_geomean([_passes(r, "training law") for r in rows]),
        predicted=math.exp(log_pred),
        low=math.exp(log_pred - half),
        high=math.exp(log_pred + half),
    )


def _does_not_fall(what: str, low: float, high: float) -> str:
    """Why a law with exponent interval ``[low, high]`` cannot rank (the metric is an error), or "" when it can."""
    if high < 0:
        return ""
    where = "contains 0" if low <= 0 else "lies above 0 (the error grows with compute)"
    return f"{what}'s exponent 95% interval [{low:.3g}, {high:.3g}] {where}"


def plan(
    train_rows: Sequence[Mapping],
    tts_rows: Sequence[Mapping],
    train_budget: float,
    inference_budget: float,
    metric: str,
) -> Plan:
    """Picks the configuration the laws predict is best under the budgets, and says whether they are sure enough to
    choose (see ``PLAN_DOC``).

    Args:
        train_rows: Rows of a training sweep: ``compute/train_macs``, ``trainer.global_step``,
            ``compute/test_macs_per_sample``, the inference settings and ``metric``; optionally each run's own law
            ``law/val/<task>/<name>/{a,b,b_low,b_high,n}`` and ``model.backbone.{name,hidden_size,depth}``.
        tts_rows: Rows of a test-time sweep: ``compute/test_macs_per_sample``, the inference settings and ``metric``.
        train_budget: Training MACs to spend.
        inference_budget: Test MACs per image to spend at most.
        metric: The row key to minimise (an error, e.g. ``test/depth/abs_rel``).

    Raises:
        ValueError: If a law cannot be fitted, a row lacks what the plan needs, or nothing fits the inference budget.
    """
    if not (train_budget > 0 and inference_budget > 0):
        raise ValueError("`--train_budget` and `--inference_budget` must be positive MACs")
    # 1. the laws: per-model when every run carries its own, else one training law for all sizes
    train_used = _usable(train_rows, TRAIN_X, metric)
    one_law_why = _missing_laws(train_used, metric) if train_used else "no training row"
    per_model = not one_law_why
    train_law = _fit(train_used, TRAIN_X, metric, "training law") if len(train_used) >= 3 or not per_model else None
    tts_used = _usable(tts_rows, TEST_X, metric)
    test_law = _fit(tts_used, TEST_X, metric, "test-time law")
    settings = sorted({(int(_number(r[_STEPS])), int(_number(r[_MEMBERS]))) for r in tts_used if _passes(r, "tts")})
    t_i = stats.t.ppf(0.975, test_law.dof)
    se_b = math.sqrt(max(test_law.param_cov[1][1], 0.0))  # b_I's standard error: log units per unit of log passes
    # 2. the models: runs that describe the same network (seeds) are one model
    models: dict[str, list] = {}
    for row in train_used:
        models.setdefault(describe_model(row), []).append(row)
    p0 = _geomean([_passes(r, "training law") for r in train_used])  # the training sweep's passes
    model_laws = tuple(_model_law(m, rows, metric, train_budget) for m, rows in models.items()) if per_model else ()
    if not per_model:
        base, half_t = math.log(float(train_law.predict(train_budget))), _log_half_width(train_law, train_budget)
    # 3. every model with every test-time setting that fits the inference budget
    candidates = []
    for k, (model, rows) in enumerate(models.items()):
        if per_model:
            law = model_laws[k]
            base, half_t, reference = math.log(law.predicted), math.log(law.high / law.predicted), law.reference_passes
        else:
            reference = p0
        per_pass = float(np.mean([float(r[TEST_X]) / _passes(r, "training law") for r in rows]))
        steps_done = [_number(r.get("trainer.global_step")) for r in rows]
        per_step = (
            float(np.mean([float(r[TRAIN_X]) / s for r, s in zip(rows, steps_done)])) if all(steps_done) else math.nan
        )
        for num_steps, members in settings:
            passes = num_steps * members
            cost = passes * per_pass
            if cost > inference_budget:
                continue
            log_ratio = math.log(passes / reference)
            log_pred = base + test_law.b * log_ratio
            half = math.hypot(half_t, t_i * se_b * log_ratio)
            # one law for all sizes gives every candidate the same L_T(C): its band moves them all together and
            # cannot reorder them, so the band the choice is judged by leaves it out
            choice = math.hypot(half_t if per_model else 0.0, t_i * se_b * log_ratio)
            candidates.append(
                Candidate(
                    row=rows[0],
                    train_steps=int(train_budget // per_step) if math.isfinite(per_step) else -1,
                    num_steps=num_steps,
                    ensemble_size=members,
                    passes=passes,
                    test_macs=cost,
                    predicted=math.exp(log_pred),
                    low=math.exp(log_pred - half),
                    high=math.exp(log_pred + half),
                    model=model,
                    choice_low=math.exp(log_pred - choice),
                    choice_high=math.exp(log_pred + choice),
                )
            )
    if not candidates:
        cheapest = min(float(r[TEST_X]) / _passes(r, "training law") for r in train_used)
        raise ValueError(
            f"`--inference_budget` {inference_budget:.3g} MACs/image is below one network pass of the "
            f"cheapest model ({cheapest:.3g} MACs)"
        )
    candidates.sort(key=lambda c: (c.predicted, c.test_macs))
    best = candidates[0]
    # 4. the verdict: (a) a law the best prediction rests on does not clearly fall; (b) a rival inside the band
    if per_model:
        own = next(law for law in model_laws if law.model == best.model)
        train_doubt = _does_not_fall(f"{best.model}'s own law", own.b_low, own.b_high)
    else:
        train_doubt = _does_not_fall("the training law", *train_law.b_ci)
    doubts = [d for d in (train_doubt, _does_not_fall("the test-time law", *test_law.b_ci)) if d]
    close = tuple(c for c in candidates[1:] if c.predicted <= best.choice_high)
    if close:
        many = len(close) > 1
        doubts.append(
            f"{len(close)} other candidate{'s' if many else ''} predict{'' if many else 's'} a value inside the "
            f"best's 95% band for the choice [{best.choice_low:.4g}, {best.choice_high:.4g}]"
        )
        if not per_model and any(c.model != best.model and c.passes == best.passes for c in close):
            doubts.append("one law for all sizes predicts the same for every model at the same passes")
    if doubts:
        reason = "; ".join(doubts)
    elif len(candidates) > 1:
        rival = candidates[1]
        reason = (
            f"the runner-up ({_setting(rival)}) predicts {rival.predicted:.4g}, outside the best's 95% band "
            f"for the choice [{best.choice_low:.4g}, {best.choice_high:.4g}]"
        )
    else:
        reason = "the only candidate under the inference budget"
    return Plan(
        metric=metric,
        train_law=train_law,
        test_law=test_law,
        reference_passes=p0,
        train_budget=train_budget,
        inference_budget=inference_budget,
        best=best,
        candidates=tuple(candidates),
        decided=not doubts,
        reason=reason,
        close=close,
        model_laws=model_laws,
        one_law_why=one_law_why,
    )


@functools.cache
def _preset(name: str) -> tuple[int, int] | None:
    """(hidden_size, depth) of a preset name (an MoE suffix ``-8E2A`` names its dense base), or None if unknown."""
    from diffperc.models.dit import DiT_models  # imports torch: only for rows that name a preset without its sizes

    base = re.sub(r"-\d+E\d+A$", "", name)
    preset = DiT_models.get(name) or DiT_models.get(base)
    return (preset["hidden_size"], preset["depth"]) if preset else None


def describe_model(row: Mapping) -> str:
    """The model of a training row as printed: ``t2 (hidden 128, depth 4)`` from ``model.backbone.name`` and
    ``model.backbone.hidden_size`` / ``.depth`` (the preset's when the row does not set them) plus any other
    ``model.backbone.*`` override; else the row's last overrides (seed, logger and init_from left out)."""
    name = row.get("model.backbone.name")
    if name is not None:
        hidden, depth = _number(row.get("model.backbone.hidden_size")), _number(row.get("model.backbone.depth"))
        if hidden is None or depth is None:
            preset = _preset(str(name))
            if preset is not None:
                hidden = preset[0] if hidden is None else hidden
                depth = preset[1] if depth is None else depth
        parts = [f"hidden {hidden:g}"] if hidden is not None else []
        parts += [f"depth {depth:g}"] if depth is not None else []
        skip = {"model.backbone.name", "model.backbone.hidden_size", "model.backbone.depth"}
        parts += [
            f"{k.rsplit('.', 1)[1]} {v}" for k, v in row.items() if k.startswith("model.backbone.") and k not in skip
        ]
        return f"{name} ({', '.join(parts)})" if parts else str(name)
    overrides = row.get("overrides")
    if isinstance(overrides, Mapping) and overrides:
        keys = [k for k in overrides if not any(s in k for s in ("logger", "init_from", "seed_everything"))]
        return ", ".join(f"{k}={overrides[k]}" for k in keys[-4:]) or str(row.get("point"))
    return str(row.get("point", "?"))


def _setting(c: Candidate) -> str:
    return f"{c.model}; num_steps={c.num_steps}, ensemble_size={c.ensemble_size}"


def format_plan(p: Plan, train_rows: Sequence[Mapping]) -> str:
    """The plan as text: the laws, how far they are extrapolated, the best configuration and its band, the verdict."""
    measured = [float(r[TRAIN_X]) for r in train_rows if _number(r.get(TRAIN_X))]
    stretch = p.train_budget / max(measured)
    b = p.best
    lines = ["Compute-optimal plan: an EXTRAPOLATION from fitted power laws (95% band = parameter uncertainty only)."]
    if p.train_law is not None:
        law = p.train_law
        lines.append(
            f"  training law:  {law.format(p.metric, 'C')}  (n={law.n}, R^2={law.r2:.3f}, "
            f"b in [{law.b_ci[0]:.3g}, {law.b_ci[1]:.3g}])" + ("  [not used: per-model laws]" if p.per_model else "")
        )
    lines += [
        f"  test-time law: {p.test_law.format(p.metric, 'c')}  (n={p.test_law.n}, R^2={p.test_law.r2:.3f}, "
        f"b in [{p.test_law.b_ci[0]:.3g}, {p.test_law.b_ci[1]:.3g}])",
        f"  budgets: training {p.train_budget:.3g} MACs ({stretch:.3g}x the largest measured run), "
        f"inference {p.inference_budget:.3g} MACs/image; training rows were tested with {p.reference_passes:g} passes",
    ]
    if p.per_model:
        series = _law_prefix(p.metric)[len("law/") : -1]
        lines.append(f"  per-model laws ({series} vs training MACs in each run, carried to {p.metric} at C):")
        for law in sorted(p.model_laws, key=lambda m: m.predicted):
            runs = f"{len(law.rows)} run{'s' if len(law.rows) > 1 else ''}"
            lines.append(
                f"    {law.predicted:.4g} [{law.low:.4g}, {law.high:.4g}]  {law.model}: b = {law.b:.3g} "
                f"[{law.b_low:.3g}, {law.b_high:.3g}] (n>={law.n}, {runs}, {law.reference_passes:g} passes)"
            )
        lines.append(f"  model size that wins: {b.model} (its own law predicts the lowest {p.metric})")
    else:
        lines.append(f"  one law for all sizes: the model choice follows inference cost only ({p.one_law_why})")
    lines += [
        f"  best: {b.model} trained for {b.train_steps} steps, tested with num_steps={b.num_steps}, "
        f"ensemble_size={b.ensemble_size} ({b.passes} passes, {b.test_macs:.3g} MACs/image)",
        f"  predicted {p.metric} = {b.predicted:.4g}  [95% band {b.low:.4g}, {b.high:.4g}]",
        "  runners-up:",
    ]
    for c in p.candidates[1:6]:
        lines.append(f"    {c.predicted:.4g} [{c.low:.4g}, {c.high:.4g}]  {_setting(c)} ({c.test_macs:.3g} MACs/image)")
    if p.decided:
        lines.append(
            f"VERDICT: decided: {b.model} with num_steps={b.num_steps}, ensemble_size={b.ensemble_size}: {p.reason}."
        )
        return "\n".join(lines)
    if p.close:
        lines.append(f"VERDICT: UNDECIDED: too uncertain to choose between {len(p.close) + 1} candidates:")
        for c in (b, *p.close[:7]):
            lines.append(f"    {c.predicted:.4g}  {_setting(c)} ({c.passes} passes, {c.test_macs:.3g} MACs/image)")
        if len(p.close) > 7:
            lines.append(f"    ... and {len(p.close) - 7} more")
    else:
        others = len(p.candidates) - 1
        lines.append(
            f"VERDICT: UNDECIDED: too uncertain to choose between {_setting(b)} (ranked first) and the {others} other "
            f"candidate{'s' if others != 1 else ''}"
        )
    lines.append(f"  why: {p.reason}.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """``diffperc laws plan ...``; the flags are declared in ``diffperc.cli`` (its help prints ``PLAN_DOC``)."""
    from diffperc.cli import parse_command

    args = parse_command("laws", argv).plan
    train_rows, tts_rows = load_rows(args.train_report), load_rows(args.tts_report)
    metric = args.metric
    if metric is None:
        common = sorted(
            {k for r in train_rows for k in r if k.startswith("test/")}
            & {k for r in tts_rows for k in r if k.startswith("test/")}
        )
        if not common:
            raise ValueError("The two sweeps share no test/... metric; pass `--metric`")
        metric = next((k for k in common if k.endswith("/abs_rel")), common[0])
    result = plan(train_rows, tts_rows, args.train_budget, args.inference_budget, metric)
    print(format_plan(result, train_rows))
