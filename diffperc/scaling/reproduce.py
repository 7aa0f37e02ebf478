"""``make reproduce-tiny``: runs every sweep under ``sweeps/tiny/`` and writes one report on the paper's seven claims.

To run: ``python -m diffperc.scaling.reproduce [--out runs/reproduce_tiny] [--only model_size ...]``.
Each claim gets what the paper reports, what it predicts here, what was measured, the fit and a verdict (rule below).
"""

import argparse
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import stats

from diffperc.scaling.fit import fit_power_law
from diffperc.scaling.launch import run_local
from diffperc.scaling.report import report
from diffperc.scaling.results import collect
from diffperc.scaling.spec import load_sweep
from diffperc.utils import atomic_write_text

__all__ = ["CLAIMS", "Claim", "Verdict", "judge_cosine", "judge_decreasing", "judge_upcycling", "main"]

HOLDS, FAILS, UNSURE = "holds", "does not hold", "inconclusive"
METRICS = ("test/depth/abs_rel", "test/depth/delta1_error")

RULE = """\
Verdict rule, per metric (both are errors, so the claim is that they fall):
- a power-law claim fits metric = a * x^b (least squares in log space, 95% Student-t interval on b): it holds if
  the whole interval is below 0, does not hold if the whole interval is above 0, and is inconclusive if the
  interval contains 0 (or the fit cannot be made);
- upcycling also compares each upcycled run with the dense continuation of the same backbone by
  d = log(upcycled / dense): it holds only if the 95% t-interval of the mean d is below 0 (upcycling wins) and the
  fit holds, does not hold if that interval is above 0 (dense wins) whatever b says, else inconclusive;
- cosine vs linear compares the two schedules at each tested step count by d = log(cosine / linear): it holds if
  the 95% t-interval of the mean d is below 0, does not hold if it is above 0, else inconclusive.
A claim holds if it holds on every metric and does not hold if it does not hold on every metric; otherwise it is
inconclusive. With 4-5 tiny CPU runs per sweep, wide intervals (inconclusive) are the expected honest outcome for
small effects."""


@dataclass(frozen=True)
class Verdict:
    """The outcome of one claim on one metric: the verdict, what was measured, and the fit."""

    verdict: str
    measured: str
    fit: str


@dataclass(frozen=True)
class Claim:
    """One of the paper's seven claims and how a tiny sweep tests it."""

    number: int
    sweep: str
    title: str
    paper: str
    predicts: str
    judge: Callable[[Sequence[Mapping], str], Verdict]


def _num(row: Mapping, key: str) -> float | None:
    value = row.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        return None
    return float(value)


def _fit_text(fit) -> str:
    return f"b = {fit.b:.3g} [{fit.b_ci[0]:.3g}, {fit.b_ci[1]:.3g}], R^2 = {fit.r2:.2f}, n = {fit.n}"


def _interval_verdict(low: float, high: float) -> str:
    return HOLDS if high < 0 else FAILS if low > 0 else UNSURE


def judge_decreasing(rows: Sequence[Mapping], metric: str, x: str) -> Verdict:
    """The power-law rule: metric = a * x^b with b's 95% interval below 0."""
    pairs = sorted((_num(r, x), _num(r, metric)) for r in rows if _num(r, x) and _num(r, metric))
    if len(pairs) < 3:
        return Verdict(UNSURE, f"{len(pairs)} usable runs (need 3)", "-")
    fit = fit_power_law([p[0] for p in pairs], [p[1] for p in pairs])
    measured = f"{pairs[0][1]:.4g} at {pairs[0][0]:.3g} -> {pairs[-1][1]:.4g} at {pairs[-1][0]:.3g}"
    return Verdict(_interval_verdict(*fit.b_ci), measured, _fit_text(fit))


def _mean_interval(d: Sequence[float]) -> tuple[float, float, float]:
    """The mean of ``d`` and its 95% Student-t interval (infinite for a single value)."""
    d = np.asarray(d, dtype=float)
    half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d)) if len(d) > 1 else math.inf
    mean = float(d.mean())
    return mean, mean - half, mean + half


def judge_upcycling(rows: Sequence[Mapping], metric: str) -> Verdict:
    """Upcycled runs beat their dense continuation (log-ratio interval below 0) and scale with total compute."""
    dense = {r.get("model.backbone.name"): _num(r, metric) for r in rows if r.get("model.upcycle", 0) is None}
    upcycled = [r for r in rows if r.get("model.upcycle.num_experts") is not None]
    d = [math.log(_num(r, metric) / dense[r.get("model.backbone.name")]) for r in upcycled
         if _num(r, metric) and dense.get(r.get("model.backbone.name"))]
    scaling = judge_decreasing(upcycled, metric, "compute/total_train_macs")
    if not d:
        return Verdict(UNSURE, "no upcycled run with a dense control", scaling.fit)
    mean, low, high = _mean_interval(d)
    versus_dense = _interval_verdict(low, high)
    verdict = versus_dense if versus_dense == FAILS or scaling.verdict == versus_dense else UNSURE
    gain = lambda v: 100 * (1 - math.exp(v))  # log-ratio -> % lower error than dense
    measured = (f"mean gain over dense {gain(mean):+.1f}% [{gain(high):+.1f}%, {gain(low):+.1f}%] ({len(d)} runs); "
                f"{scaling.measured}")
    return Verdict(verdict, measured, scaling.fit)


def judge_cosine(rows: Sequence[Mapping], metric: str) -> Verdict:
    """Cosine (squaredcos_cap_v2) vs linear at matched step counts: the mean log-ratio's 95% interval below 0."""
    by = {}
    for r in rows:
        value = _num(r, metric)
        if value:
            by[(r.get("model.diffusion.beta_schedule"), r.get("model.inference.num_steps"))] = value
    steps = sorted({s for sched, s in by if sched == "squaredcos_cap_v2"} & {s for sched, s in by if sched == "linear"})
    if len(steps) < 2:
        return Verdict(UNSURE, f"{len(steps)} step counts with both schedules (need 2)", "-")
    d = np.log([by[("squaredcos_cap_v2", s)] / by[("linear", s)] for s in steps])
    mean, low, high = _mean_interval(d)
    others = ", ".join(f"{sched} {np.mean([by[(sched, s)] for s in steps if (sched, s) in by]):.4g}"
                       for sched in ("linear", "scaled_linear", "squaredcos_cap_v2")
                       if any((sched, s) in by for s in steps))
    measured = f"mean over steps {steps}: {others}"
    fit = f"mean log(cos/lin) = {mean:.3g} [{low:.3g}, {high:.3g}], n = {len(d)}"
    return Verdict(_interval_verdict(low, high), measured, fit)


def _decreasing(x: str) -> Callable[[Sequence[Mapping], str], Verdict]:
    return lambda rows, metric: judge_decreasing(rows, metric, x)


CLAIMS = (
    Claim(1, "model_size", "Model size (§4.1, Fig. 3)",
          "larger dense DiTs (a1-a6) reach lower AbsRel and delta1 error, a power law in fine-tuning MACs",
          "error falls with training MACs over four sizes, t1 to 160x5 (b < 0)", _decreasing("compute/train_macs")),
    Claim(2, "pretrain_steps", "Pretraining compute (§4.2, Fig. 4)",
          "a4 pretrained 60K-120K steps fine-tunes to lower error, a power law in pretraining compute",
          "error falls with pretraining MACs (b < 0)", _decreasing("from/compute/train_macs")),
    Claim(3, "resolution", "Image resolution (§4.3, Fig. 5)",
          "512 px (4x the tokens) beats 256 px for dense DiT-XL and DiT-MoE",
          "error falls with training MACs as resolution grows 16 -> 40 px (b < 0)", _decreasing("compute/train_macs")),
    Claim(4, "upcycling", "Upcycling (§4.4, Fig. 6)",
          "upcycled a2-a4 improve AbsRel 5.3% and delta1 error 8.6% on average; more experts help",
          "upcycled runs beat dense continuation and fall with total training MACs (b < 0)", judge_upcycling),
    Claim(5, "inference_steps", "Inference steps (§5.1, Fig. 8)",
          "more DDIM steps (1..100) give lower error, a power law in test compute",
          "error falls with test MACs over 1..20 steps (b < 0)", _decreasing("compute/test_macs_per_sample")),
    Claim(6, "ensemble_size", "Test-time ensembling (§5.2, Fig. 9)",
          "more ensemble members (1..20) give lower error, a power law in test compute",
          "error falls with test MACs over N = 1..10 (b < 0)", _decreasing("compute/test_macs_per_sample")),
    Claim(7, "beta_schedule", "Noise schedule (§5.3, Fig. 10)",
          "the cosine schedule beats linear and scaled linear at a fixed test compute",
          "cosine has lower error than linear at matched step counts", judge_cosine),
)


def _combine(verdicts: Sequence[str]) -> str:
    if verdicts and all(v == HOLDS for v in verdicts):
        return HOLDS
    if verdicts and all(v == FAILS for v in verdicts):
        return FAILS
    return UNSURE


def _markdown(results: list, wall_s: float) -> str:
    lines = [
        "# diffperc reproduce-tiny: the paper's seven claims at CPU scale",
        "",
        f"Every sweep under `sweeps/tiny/` on procedural depth, pixel space, tiny DiTs; total wall time "
        f"{wall_s / 60:.1f} min. Metrics: AbsRel and delta1 error (1 - delta1) on 256 test scenes.",
        "",
        "| # | claim | the paper | predicts here | measured (AbsRel) | fit (AbsRel) | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for claim, per_metric, verdict, note, _ in results:
        first = per_metric.get(METRICS[0])
        measured = first.measured if first else note
        fit = first.fit if first else "-"
        lines.append(f"| {claim.number} | {claim.title} | {claim.paper} | {claim.predicts} | {measured} | {fit} | "
                     f"**{verdict}** |")
    lines += ["", RULE, ""]
    for claim, per_metric, verdict, note, wall in results:
        lines += [f"## {claim.number}. {claim.title}: {verdict}", ""]
        lines.append(f"Sweep `sweeps/tiny/{claim.sweep}.yaml` ({wall / 60:.1f} min); fits and plots in "
                     f"[{claim.sweep}/report/report.md]({claim.sweep}/report/report.md).")
        if note:
            lines.append(f"Note: {note}")
        lines.append("")
        for metric, v in per_metric.items():
            lines.append(f"- `{metric}`: **{v.verdict}**. Measured {v.measured}. Fit {v.fit}.")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> Path:
    """Runs the tiny sweeps (finished points are kept) and writes ``<out>/report.md``; returns its path."""
    parser = argparse.ArgumentParser(prog="python -m diffperc.scaling.reproduce", description=__doc__.split("\n")[0],
                                     epilog=RULE, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/reproduce_tiny", help="output folder (one subfolder per sweep)")
    parser.add_argument("--sweeps", default="sweeps/tiny", help="folder with the tiny sweep files")
    parser.add_argument("--only", nargs="*", help="claims to run by sweep name (default: all seven)")
    parser.add_argument("--launcher", choices=("inline", "local"), default="inline",
                        help="inline: every run in this process (no start-up cost per run); local: subprocesses")
    parser.add_argument("--report-only", action="store_true", help="judge what has been run; run nothing new")
    args = parser.parse_args(argv)
    out = Path(args.out)
    upstream_dir = out / "upstream"  # shared: identical stage-1 runs (e.g. the linear t2 model) are trained once
    start = time.perf_counter()
    results = []
    for claim in CLAIMS:
        if args.only and claim.sweep not in args.only:
            continue
        claim_start = time.perf_counter()
        note = ""
        per_metric: dict[str, Verdict] = {}
        try:
            sweep = load_sweep(Path(args.sweeps) / f"{claim.sweep}.yaml")
            if not args.report_only:
                run_local(sweep, out / claim.sweep, inline=args.launcher == "inline", upstream_dir=upstream_dir,
                          write_reports=False)
            report(sweep, out / claim.sweep, upstream_dir)
            rows = collect(sweep, out / claim.sweep, upstream_dir, echo=lambda *_: None)
            per_metric = {m: claim.judge(rows, m) for m in METRICS}
        except (OSError, ValueError, RuntimeError) as err:
            note = f"not run: {' '.join(str(err).split())}"
        verdict = _combine([v.verdict for v in per_metric.values()]) if per_metric else UNSURE
        results.append((claim, per_metric, verdict, note, time.perf_counter() - claim_start))
        print(f"claim {claim.number} ({claim.sweep}): {verdict}")
    path = out / "report.md"
    atomic_write_text(path, _markdown(results, time.perf_counter() - start))
    print(f"report: {path}")
    return path


if __name__ == "__main__":
    main()
