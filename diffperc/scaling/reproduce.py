"""``make reproduce-tiny``: every claim of ``diffperc.scaling.claims`` under two recipe arms and three training seeds,
and one report that gives both verdicts side by side, why they differ, and one figure per claim.

To run: ``python -m diffperc.scaling.reproduce [--out runs/reproduce_tiny] [--only model_size ...]``.
The arms: *paper* (what the paper states: epsilon prediction, DDIM with diffusers' default ``leading`` spacing,
median compilation) and *tuned* (the quickstart recipe). Seeds are training seeds; sampling seeds stay fixed.
"""

import argparse
import dataclasses
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from diffperc.scaling.claims import (
    CLAIMS,
    FAILS,
    HOLDS,
    METRICS,
    UNSURE,
    Claim,
    Verdict,
    combine,
    judge_cosine,
    judge_decreasing,
    judge_upcycling,
)
from diffperc.scaling.launch import run_local
from diffperc.scaling.reproduce_report import markdown, write_figures
from diffperc.scaling.results import collect
from diffperc.scaling.spec import Sweep, load_sweep
from diffperc.utils import atomic_write_text

# The rules live in diffperc.scaling.claims; importable from here too.
__all__ = [
    "ARMS",
    "CLAIMS",
    "FAILS",
    "HOLDS",
    "UNSURE",
    "Arm",
    "Claim",
    "Verdict",
    "arm_sweep",
    "judge_cosine",
    "judge_decreasing",
    "judge_upcycling",
    "main",
]

SEEDS = (0, 1, 2)


@dataclass(frozen=True)
class Arm:
    """A recipe: overrides of the stage that trains the fine-tuned model and of the stage that tests it."""

    name: str
    train: dict
    test: dict
    about: str


ARMS = (
    Arm(
        "paper",
        train={"model.init_args.diffusion.prediction_type": "epsilon"},
        test={
            "model.init_args.inference.timestep_spacing": "leading",
            "model.init_args.inference.reducer": "median_compilation",
            "model.init_args.inference.num_steps": 10,
            "model.init_args.inference.ensemble_size": 1,
        },
        about="epsilon prediction (Eq. 2), DiT's linear betas, DDIM with diffusers' default `leading` spacing (as the "
        "release samples), members merged by median compilation (Marigold's, §5.2); where a claim does not "
        "set them, 10 steps x 1 member (the paper gives no test setting for its training ablations; 10 is "
        "in its Fig. 8 grid)",
    ),
    Arm(
        "tuned",
        train={},
        test={},
        about="the quickstart recipe: v-prediction, DiT's linear betas, `trailing` DDIM, 2 steps x 3 members "
        "merged by the pixel median",
    ),
)

_SHARED = Arm("shared", train={}, test={}, about="")


def arm_sweep(sweep: Sweep, arm: Arm, seeds: Sequence[int], claim: Claim, extra: Mapping | None = None) -> Sweep:
    """The claim's sweep under ``arm`` with one run per training seed; ``extra`` overrides every stage (tiny runs).

    The training stage gets the seeds: the sweep itself, or its ``from:`` stage, whose seed the fine-tunes inherit.
    The arm's training overrides go to the stage that trains the fine-tuned model (not to pretraining, which both
    arms share), its test overrides to the stage that tests (a claim's own grid values win over them).
    """
    extra = dict(extra or {})
    if sweep.upstream is None:
        return dataclasses.replace(sweep, set={**sweep.set, **arm.train, **arm.test, **extra}, seeds=list(seeds))
    up = sweep.upstream
    up = dataclasses.replace(
        up, set={**up.set, **(arm.train if claim.upstream_arm else {}), **extra}, seeds=list(seeds)
    )
    inherit = sweep.inherit + (["seed_everything"] if sweep.command == "fit" else [])
    return dataclasses.replace(sweep, set={**sweep.set, **arm.train, **arm.test, **extra}, upstream=up, inherit=inherit)


def _parse_set(items: Sequence[str]) -> dict:
    import yaml

    out = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"`--set {item}`: use KEY=VALUE, e.g. --set trainer.max_steps=2")
        out[key] = yaml.safe_load(value)
    return out


def _tag(rows: list[dict], **tags) -> list[dict]:
    return [{**r, **tags} for r in rows]


def main(argv: list[str] | None = None) -> Path:
    """Runs the claims' sweeps for both arms (finished points are kept) and writes ``<out>/report.md``."""
    from diffperc.scaling.claims import RULE

    parser = argparse.ArgumentParser(
        prog="python -m diffperc.scaling.reproduce",
        description=__doc__.split("\n")[0],
        epilog=RULE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", default="runs/reproduce_tiny", help="output folder (<arm>/<sweep>/ per claim)")
    parser.add_argument("--sweeps", default="sweeps/tiny", help="folder with the tiny sweep files")
    parser.add_argument("--only", nargs="*", help="claims to run by sweep name (default: all)")
    parser.add_argument("--arms", nargs="*", default=[a.name for a in ARMS], choices=[a.name for a in ARMS])
    parser.add_argument("--seeds", nargs="*", type=int, default=list(SEEDS), help="training seeds (default 0 1 2)")
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="override every run (e.g. trainer.max_steps=2 for a smoke run; point ids change)",
    )
    parser.add_argument(
        "--launcher",
        choices=("inline", "local"),
        default="inline",
        help="inline: every run in this process (no start-up cost per run); local: subprocesses",
    )
    parser.add_argument("--report-only", action="store_true", help="judge what has been run; run nothing new")
    args = parser.parse_args(argv)
    out, extra = Path(args.out), _parse_set(args.set)
    arms = [a for a in ARMS if a.name in args.arms]
    upstream_dir = out / "upstream"  # shared: identical upstream runs (e.g. the linear t2 model) are trained once
    start = time.perf_counter()
    rows_of: dict[tuple[str, str], list[dict]] = {}  # (arm, sweep) -> rows
    results = []
    claims = [c for c in CLAIMS if not args.only or c.sweep in args.only]
    for claim in claims:
        claim_start = time.perf_counter()
        per_arm = {}
        for arm in arms:
            note, per_metric = "", {}
            try:
                recipe = arm if claim.arms else _SHARED  # a sweep both arms share runs with its own settings
                sweep = arm_sweep(
                    load_sweep(Path(args.sweeps) / f"{claim.sweep}.yaml"), recipe, args.seeds, claim, extra
                )
                folder = out / ("shared" if not claim.arms else arm.name) / claim.sweep
                if not args.report_only and (claim.arms or arm is arms[0]):
                    run_local(
                        sweep, folder, inline=args.launcher == "inline", upstream_dir=upstream_dir, write_reports=False
                    )
                rows = collect(sweep, folder, upstream_dir, echo=lambda *_: None)
                rows_of[(arm.name, claim.sweep)] = rows
                judged = _tag(rows, kind="e2e") if claim.with_rows else rows
                for other in claim.with_rows:
                    judged += rows_of.get((arm.name, other), [])
                per_metric = {m: claim.judge(judged, m) for m in METRICS}
            except (OSError, ValueError, RuntimeError) as err:
                note = f"not run: {' '.join(str(err).split())}"
            verdict = combine([v.verdict for v in per_metric.values()]) if per_metric else UNSURE
            per_arm[arm.name] = (per_metric, verdict, note)
            print(f"claim {claim.number} ({claim.sweep}, {arm.name} arm): {verdict}")
        results.append((claim, per_arm, time.perf_counter() - claim_start))
    figures = write_figures(out, claims, arms, rows_of)
    path = out / "report.md"
    atomic_write_text(path, markdown(results, arms, rows_of, figures, time.perf_counter() - start, args.seeds))
    print(f"report: {path}")
    return path


if __name__ == "__main__":
    main()
