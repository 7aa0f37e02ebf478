"""The claims ``make reproduce-tiny`` tests and the rules that judge them from sweep rows (one row per run).

A row is one trained (and tested) model: every seed's run is its own row, so the fits and intervals below carry the
seed-to-seed spread. ``judge_*`` return a ``Verdict``; ``CLAIMS`` lists the claims with their sweeps and rules.
"""

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

from diffperc.scaling.fit import fit_power_law

__all__ = ["CLAIMS", "Claim", "Verdict", "judge_cosine", "judge_decreasing", "judge_e2e", "judge_upcycling", "seed_of"]

HOLDS, FAILS, UNSURE = "holds", "does not hold", "inconclusive"
METRICS = ("test/depth/abs_rel", "test/depth/delta1_error")
STEPS, MEMBERS = "model.inference.num_steps", "model.inference.ensemble_size"

RULE = """\
Verdict rule, per metric (both are errors, so the claim is that they fall). Every training seed's run is one
observation, so the intervals carry the seed-to-seed spread:
- a power-law claim fits metric = a * x^b by least squares in log space over every run (points x seeds; 95%
  Student-t interval on b with n - 2 degrees of freedom, whose residuals hold the seed spread and any lack of fit):
  it holds if the whole interval is below 0, does not hold if it is above 0, and is inconclusive if it contains 0.
  Where the runs of one seed test one trained model at several test-time settings (claims 5 and 6), the fit has
  one intercept per model and one exponent (n - models - 1 degrees of freedom): a model's own level is not noise
  of the exponent;
- upcycling pairs each upcycled run with the dense continuation of the same backbone and seed, d = log(upcycled /
  dense): it holds only if the 95% t-interval of the mean d is below 0 (upcycling wins) and the fit over total
  training MACs holds, does not hold if that interval is above 0 (dense wins), else inconclusive;
- cosine vs linear pairs the two schedules at each tested step count and seed, d = log(cosine / linear): it holds if
  the 95% t-interval of the mean d is below 0, does not hold if above 0, else inconclusive;
- the one-step control (claim 8) pairs, per seed, the diffusion model tested at each (steps, members) with the
  one-step model of the same training MACs, d = log(diffusion / one-step); the best setting is the lowest mean
  error: the claim holds if its interval of the mean d is below 0 (diffusion's best beats the one-step model),
  does not hold if above 0. The best setting is chosen on the same runs, so "holds" is optimistic by that choice.
A claim holds if it holds on every metric and does not hold if it does not hold on every metric; otherwise it is
inconclusive. With 3 seeds of tiny CPU runs, wide intervals (inconclusive) are the honest outcome for small effects."""


@dataclass(frozen=True)
class Verdict:
    """The outcome of one claim on one metric: the verdict, what was measured, and the fit."""

    verdict: str
    measured: str
    fit: str


def _num(row: Mapping, key: str) -> float | None:
    value = row.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        return None
    return float(value)


def seed_of(row: Mapping) -> int:
    """The training seed of a row: its own ``seed_everything``, else its upstream run's, else 0."""
    for key in ("seed_everything", "from/seed_everything"):
        if isinstance(row.get(key), int):
            return row[key]
    return 0


def _interval_verdict(low: float, high: float) -> str:
    return HOLDS if high < 0 else FAILS if low > 0 else UNSURE


def mean_interval(d: Sequence[float]) -> tuple[float, float, float]:
    """The mean of ``d`` and its 95% Student-t interval (infinite for a single value)."""
    d = np.asarray(d, dtype=float)
    half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d)) if len(d) > 1 else math.inf
    mean = float(d.mean())
    return mean, mean - half, mean + half


def _within_group_fit(runs: Sequence[tuple[float, float, object]]) -> tuple[float, tuple[float, float], int]:
    """log y = alpha_g + b log x with one intercept per group g: b, its 95% t-interval, and the runs used."""
    by: dict[object, list[tuple[float, float]]] = {}
    for x, y, g in runs:
        by.setdefault(g, []).append((math.log(x), math.log(y)))
    sxx = sxy = 0.0
    centred = []
    for pts in by.values():
        lx, ly = np.array(pts).T
        dx, dy = lx - lx.mean(), ly - ly.mean()
        sxx, sxy = sxx + float(dx @ dx), sxy + float(dx @ dy)
        centred.append((dx, dy))
    dof = len(runs) - len(by) - 1
    if sxx <= 0 or dof < 1:
        return math.nan, (-math.inf, math.inf), len(runs)
    b = sxy / sxx
    ssr = sum(float(((dy - b * dx) ** 2).sum()) for dx, dy in centred)
    half = stats.t.ppf(0.975, dof) * math.sqrt(ssr / dof / sxx)
    return b, (b - half, b + half), len(runs)


def judge_decreasing(rows: Sequence[Mapping], metric: str, x: str, within: Callable | None = None) -> Verdict:
    """The power-law rule: metric = a * x^b over every run, with b's 95% interval below 0.

    ``within``: a row's group when the runs of one group share a trained model (a test-time sweep: the seed), so the
    law is fitted within groups (one intercept per group, one exponent): a model's own seed effect is not noise of b.
    """
    runs = [(_num(r, x), _num(r, metric), seed_of(r)) for r in rows if _num(r, x) and _num(r, metric)]
    if len(runs) < 3 or len({x for x, _, _ in runs}) < 2:
        return Verdict(UNSURE, f"{len(runs)} usable runs (need 3, at 2 or more x)", "-")
    fit = fit_power_law([r[0] for r in runs], [r[1] for r in runs])
    xs = sorted({r[0] for r in runs})
    mean_at = {v: float(np.mean([y for x_, y, _ in runs if x_ == v])) for v in xs}
    seeds = sorted({s for _, _, s in runs})
    per_seed = []
    for s in seeds:
        own = [(x_, y) for x_, y, seed in runs if seed == s]
        if len({x_ for x_, _ in own}) >= 2 and len(own) >= 3:
            per_seed.append(fit_power_law([p[0] for p in own], [p[1] for p in own]).b)
    measured = (
        f"{mean_at[xs[0]]:.4g} at {xs[0]:.3g} -> {mean_at[xs[-1]]:.4g} at {xs[-1]:.3g} "
        f"(mean of {len(seeds)} seed{'s' if len(seeds) > 1 else ''})"
    )
    if within is None:
        b, interval = fit.b, fit.b_ci
        text = f"b = {fit.b:.3g} [{fit.b_ci[0]:.3g}, {fit.b_ci[1]:.3g}], R^2 = {fit.r2:.2f}, n = {fit.n}"
    else:
        grouped = [(_num(r, x), _num(r, metric), within(r)) for r in rows if _num(r, x) and _num(r, metric)]
        b, interval, n = _within_group_fit(grouped)
        groups = len({g for _, _, g in grouped})
        text = f"b = {b:.3g} [{interval[0]:.3g}, {interval[1]:.3g}] within {groups} models, n = {n}"
    if len(per_seed) > 1:
        text += "; per seed b = " + ", ".join(f"{v:.3g}" for v in per_seed)
    return Verdict(_interval_verdict(*interval), measured, text)


def judge_upcycling(rows: Sequence[Mapping], metric: str) -> Verdict:
    """Upcycled runs beat the dense continuation of the same backbone and seed, and scale with total compute."""
    dense = {
        (r.get("model.backbone.name"), seed_of(r)): _num(r, metric) for r in rows if r.get("model.upcycle", 0) is None
    }
    upcycled = [r for r in rows if r.get("model.upcycle.num_experts") is not None]
    d = [
        math.log(_num(r, metric) / dense[(r.get("model.backbone.name"), seed_of(r))])
        for r in upcycled
        if _num(r, metric) and dense.get((r.get("model.backbone.name"), seed_of(r)))
    ]
    scaling = judge_decreasing(upcycled, metric, "compute/total_train_macs")  # across sizes, as Fig. 6
    if not d:
        return Verdict(UNSURE, "no upcycled run with a dense control", scaling.fit)
    mean, low, high = mean_interval(d)
    versus_dense = _interval_verdict(low, high)
    verdict = versus_dense if versus_dense == FAILS or scaling.verdict == versus_dense else UNSURE
    gain = lambda v: 100 * (1 - math.exp(v))  # log-ratio -> % lower error than dense
    measured = (
        f"mean gain over dense {gain(mean):+.1f}% [{gain(high):+.1f}%, {gain(low):+.1f}%] ({len(d)} runs); "
        f"{scaling.measured}"
    )
    return Verdict(verdict, measured, scaling.fit)


def judge_cosine(rows: Sequence[Mapping], metric: str) -> Verdict:
    """Cosine (squaredcos_cap_v2) vs linear at matched step counts and seeds: the mean log-ratio's interval below 0."""
    by = {}
    for r in rows:
        value = _num(r, metric)
        if value:
            by[(r.get("model.diffusion.beta_schedule"), r.get(STEPS), seed_of(r))] = value
    pairs = sorted(
        {(s, seed) for sched, s, seed in by if sched == "squaredcos_cap_v2"}
        & {(s, seed) for sched, s, seed in by if sched == "linear"}
    )
    steps = sorted({s for s, _ in pairs})
    if len(steps) < 2:
        return Verdict(UNSURE, f"{len(steps)} step counts with both schedules (need 2)", "-")
    d = np.log([by[("squaredcos_cap_v2", s, seed)] / by[("linear", s, seed)] for s, seed in pairs])
    mean, low, high = mean_interval(d)
    others = ", ".join(
        f"{sched} {np.mean([v for (sc, s, _), v in by.items() if sc == sched and s in steps]):.4g}"
        for sched in ("linear", "scaled_linear", "squaredcos_cap_v2")
        if any(sc == sched for sc, _, _ in by)
    )
    measured = f"mean over steps {steps}: {others}"
    fit = f"mean log(cos/lin) = {mean:.3g} [{low:.3g}, {high:.3g}], n = {len(d)}"
    return Verdict(_interval_verdict(low, high), measured, fit)


def judge_e2e(rows: Sequence[Mapping], metric: str) -> Verdict:
    """Claim 8: the diffusion model's best test-time setting against the one-step model, paired by seed.

    Rows with ``kind: e2e`` are one-step runs; the others are test-time rows of diffusion models trained alike.
    """
    e2e = {seed_of(r): r for r in rows if r.get("kind") == "e2e" and _num(r, metric)}
    settings: dict[tuple, dict[int, Mapping]] = {}
    for r in rows:
        if r.get("kind") != "e2e" and _num(r, metric) and r.get(STEPS) and r.get(MEMBERS):
            settings.setdefault((int(r[STEPS]), int(r[MEMBERS])), {})[seed_of(r)] = r
    if not e2e or not settings:
        return Verdict(UNSURE, f"{len(e2e)} one-step runs, {len(settings)} diffusion settings", "-")
    scored = []
    for (steps, members), by_seed in settings.items():
        d = [math.log(_num(r, metric) / _num(e2e[s], metric)) for s, r in by_seed.items() if s in e2e]
        if d:
            macs = float(np.mean([r.get("compute/test_macs_per_sample") or math.nan for r in by_seed.values()]))
            scored.append((float(np.mean([_num(r, metric) for r in by_seed.values()])), steps, members, macs, d))
    scored.sort(key=lambda s: s[0])
    best_value, steps, members, macs, d = scored[0]
    mean, low, high = mean_interval(d)
    one = float(np.mean([_num(r, metric) for r in e2e.values()]))
    one_macs = float(np.mean([r.get("compute/test_macs_per_sample") or math.nan for r in e2e.values()]))
    beats = sorted((s[3], s[1], s[2]) for s in scored if mean_interval(s[4])[2] < 0)
    train = [_num(r, "compute/train_macs") for r in rows if _num(r, "compute/train_macs")]
    measured = (
        f"one-step {one:.4g} ({one_macs:.3g} MACs/image); diffusion best {best_value:.4g} at {steps} steps x "
        f"{members} ({macs:.3g} MACs/image, {macs / one_macs:.3g}x)"
    )
    if beats:
        measured += f"; beats it from {beats[0][0]:.3g} MACs/image ({beats[0][1]} steps x {beats[0][2]})"
    if train:
        measured += f"; training MACs ratio max/min {max(train) / min(train):.3g}"
    fit = f"best: mean log(diffusion/one-step) = {mean:.3g} [{low:.3g}, {high:.3g}], n = {len(d)}"
    return Verdict(_interval_verdict(low, high), measured, fit)


@dataclass(frozen=True)
class Claim:
    """One claim, the sweep(s) that test it at CPU scale, and its rule.

    ``upstream_arm``: the sweep's ``from:`` stage trains the fine-tuned model (the recipe arm applies to it) rather
    than pretraining it (shared by both arms). ``arms``: False runs the sweep once for both arms (no diffusion
    settings in it). ``with_rows``: other claims' sweeps (same arm) whose rows the rule also reads.
    """

    number: int
    sweep: str
    title: str
    paper: str
    predicts: str
    judge: Callable[[Sequence[Mapping], str], Verdict]
    x: str = "compute/train_macs"
    upstream_arm: bool = True
    arms: bool = True
    with_rows: tuple[str, ...] = ()


def _decreasing(x: str, within: Callable | None = None) -> Callable[[Sequence[Mapping], str], Verdict]:
    return lambda rows, metric: judge_decreasing(rows, metric, x, within)


_TEST_X = "compute/test_macs_per_sample"
CLAIMS = (
    Claim(
        1,
        "model_size",
        "Model size (§4.1, Fig. 3)",
        "larger dense DiTs (a1-a6) reach lower AbsRel and delta1 error, a power law in fine-tuning MACs",
        "error falls with training MACs over three sizes, t1 to t2 (8x MACs; b < 0)",
        _decreasing("compute/train_macs"),
    ),
    Claim(
        2,
        "pretrain_steps",
        "Pretraining compute, shape classes (§4.2, Fig. 4)",
        "a4 pretrained 60K-120K steps fine-tunes to lower error, a power law in pretraining compute",
        "error falls with pretraining MACs on 10 procedural shape classes, 8x span (b < 0)",
        _decreasing("from/compute/train_macs"),
        x="from/compute/train_macs",
        upstream_arm=False,
    ),
    Claim(
        2,
        "pretrain_scenes",
        "Pretraining compute, scene classes (§4.2, Fig. 4)",
        "as above; the paper pretrains on ImageNet, images of the world its depth scenes come from",
        "error falls with pretraining MACs on procedural-scene classes, 8x span (b < 0)",
        _decreasing("from/compute/train_macs"),
        x="from/compute/train_macs",
        upstream_arm=False,
    ),
    Claim(
        3,
        "resolution",
        "Image resolution (§4.3, Fig. 5)",
        "512 px (4x the tokens) beats 256 px for dense DiT-XL and DiT-MoE",
        "error falls with training MACs as resolution grows 16 -> 32 px (b < 0)",
        _decreasing("compute/train_macs"),
    ),
    Claim(
        4,
        "upcycling",
        "Upcycling (§4.4, Fig. 6)",
        "upcycled a2-a4 improve AbsRel 5.3% and delta1 error 8.6% on average; more experts help",
        "upcycled runs (4E top-1, 8E top-2) beat the dense continuation and fall with total training MACs (b < 0)",
        judge_upcycling,
        x="compute/total_train_macs",
    ),
    Claim(
        5,
        "inference_steps",
        "Inference steps (§5.1, Fig. 8)",
        "more DDIM steps (1..100) give lower error, a power law in test compute",
        "error falls with test MACs over 1..20 steps (b < 0)",
        _decreasing(_TEST_X, seed_of),
        x=_TEST_X,
    ),
    Claim(
        6,
        "ensemble_size",
        "Test-time ensembling (§5.2, Fig. 9)",
        "more ensemble members (1..20) give lower error, a power law in test compute",
        "error falls with test MACs over N = 1..10 (b < 0)",
        _decreasing(_TEST_X, seed_of),
        x=_TEST_X,
    ),
    Claim(
        7,
        "beta_schedule",
        "Noise schedule (§5.3, Fig. 10)",
        "the cosine schedule beats linear and scaled linear at a fixed test compute",
        "cosine has lower error than linear at matched step counts and seeds",
        judge_cosine,
        x=_TEST_X,
    ),
    Claim(
        8,
        "e2e",
        "One-step end-to-end control (no anchor)",
        "not in the paper; Garcia et al. (2024) found one-step fine-tuning matches multi-step Marigold",
        "diffusion's best test-time point beats the one-step model trained with equal MACs",
        judge_e2e,
        x=_TEST_X,
        arms=False,
        with_rows=("inference_steps", "ensemble_size"),
    ),
)


def combine(verdicts: Sequence[str]) -> str:
    """A claim's verdict from its per-metric verdicts."""
    if verdicts and all(v == HOLDS for v in verdicts):
        return HOLDS
    if verdicts and all(v == FAILS for v in verdicts):
        return FAILS
    return UNSURE
