"""fp32 vs bf16-mixed on the depth quickstart: test AbsRel (mean and spread over seeds) and wall time per arm.

To run: python benchmarks/bench_precision.py [--seeds 3] [--max_steps N] [--tiny] [--out FILE.md]
Each (seed, arm) runs ``diffperc fit`` then ``diffperc test --ckpt_path last`` on configs/quickstart/depth.yaml in
fresh subprocesses, with ``--seed_everything`` and ``--model.init_args.noise_seed`` set to the seed and
``--trainer.precision`` 32-true or bf16-mixed; the arms alternate within each seed so a busy machine slows both alike.
The full run (3 seeds x 2 arms x the config's 800 steps) takes about 30 minutes on 2 CPU cores; ``--max_steps 2
--tiny`` checks the code in about a minute. bf16 autocast runs the DiT's matmuls, convolutions and attention in bf16;
the router softmax, the loss, the DDIM updates, the metrics and any VAE stay in float32.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP: see OMP_NOTE in common.py

from common import machine_info, md_table, sig, write_markdown  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "quickstart" / "depth.yaml"
ARMS = {"fp32": "32-true", "bf16-mixed": "bf16-mixed"}
# --tiny: a width-32 1-block DiT, batches of 2 in this process's loader, one test batch.
_TINY_ARGS = [
    "--model.init_args.backbone.hidden_size",
    "32",
    "--model.init_args.backbone.depth",
    "1",
    "--model.init_args.backbone.num_heads",
    "2",
    "--data.init_args.batch_size",
    "2",
    "--data.init_args.num_workers",
    "0",
    "--trainer.limit_test_batches",
    "1",
]


def _diffperc(args: list[str], log: Path) -> float:
    """Runs ``python -m diffperc <args>`` with its output in ``log``; returns the wall time in seconds."""
    start = time.perf_counter()
    with open(log, "w") as f:
        done = subprocess.run([sys.executable, "-m", "diffperc", *args], stdout=f, stderr=subprocess.STDOUT)
    if done.returncode:
        tail = "\n".join(log.read_text().splitlines()[-15:])
        raise RuntimeError(f"`diffperc {' '.join(args)}` exited with {done.returncode}:\n{tail}")
    return time.perf_counter() - start


def run_arm(root: Path, arm: str, seed: int, max_steps: int | None, tiny: bool) -> dict:
    """Fits and tests one (arm, seed) into ``root/<arm>_seed<seed>``; returns its metrics and wall times."""
    name = f"{arm}_seed{seed}"
    common = [
        "--config",
        str(CONFIG),
        "--trainer.logger.init_args.save_dir",
        str(root),
        "--trainer.logger.init_args.name",
        name,
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.precision",
        ARMS[arm],
        "--seed_everything",
        str(seed),
        "--model.init_args.noise_seed",
        str(seed),
        *(_TINY_ARGS if tiny else []),
    ]
    steps = ["--trainer.max_steps", str(max_steps)] if max_steps else []
    fit_s = _diffperc(["fit", *common, *steps], root / f"{name}_fit.log")
    test_s = _diffperc(["test", *common, "--ckpt_path", "last"], root / f"{name}_test.log")
    record = json.loads((root / name / "test_metrics.json").read_text())
    return {
        "arm": arm,
        "seed": seed,
        "abs_rel": record["abs_rel"],
        "delta1": record["delta1"],
        "baseline_abs_rel": record["baseline/abs_rel"],
        "fit_s": fit_s,
        "test_s": test_s,
    }


def _spread(values: list[float]) -> str:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.4f} ± {std:.4f} ({min(values):.4f} - {max(values):.4f})"


def summarize(runs: list[dict], steps: str, tiny: bool) -> str:
    """The markdown: per arm AbsRel / delta1 mean ± std (min - max) and mean wall times, the per-seed AbsRel and
    the paired bf16 - fp32 difference."""
    by_arm = {arm: [r for r in runs if r["arm"] == arm] for arm in ARMS}
    rows = [
        [
            arm,
            len(rs),
            _spread([r["abs_rel"] for r in rs]),
            _spread([r["delta1"] for r in rs]),
            sig(statistics.fmean(r["fit_s"] for r in rs)),
            sig(statistics.fmean(r["test_s"] for r in rs)),
        ]
        for arm, rs in by_arm.items()
    ]
    seeds = sorted({r["seed"] for r in runs})
    per_seed = {(r["arm"], r["seed"]): r for r in runs}
    seed_rows = []
    for seed in seeds:
        fp32, bf16 = per_seed[("fp32", seed)], per_seed[("bf16-mixed", seed)]
        seed_rows.append(
            [
                seed,
                f"{fp32['abs_rel']:.4f}",
                f"{bf16['abs_rel']:.4f}",
                f"{bf16['abs_rel'] - fp32['abs_rel']:+.4f}",
                f"{fp32['fit_s'] / bf16['fit_s']:.2f}x",
            ]
        )
    diffs = [per_seed[("bf16-mixed", s)]["abs_rel"] - per_seed[("fp32", s)]["abs_rel"] for s in seeds]
    info = machine_info()
    lines = [
        "## fp32 vs bf16-mixed on the depth quickstart",
        "",
        f"{'TINY MODE (width-32 1-block DiT, batch 2, one test batch): a smoke test, not results. ' if tiny else ''}"
        f"`diffperc fit` ({steps} steps) then `diffperc test` on configs/quickstart/depth.yaml per seed and arm, each "
        f"a fresh process; seeds {seeds} set `--seed_everything` and `--model.init_args.noise_seed`. "
        f"{info['CPU']}, {info['cores available']} cores, torch {info['torch']}, GPU: {info['GPU']}, "
        f"load at start {info['load average (1, 5, 15 min) at start']}.",
        "",
        md_table(
            [
                "arm",
                "seeds",
                "AbsRel mean ± std (min - max)",
                "delta1 mean ± std (min - max)",
                "fit s (mean)",
                "test s (mean)",
            ],
            rows,
        ),
        "",
        md_table(["seed", "AbsRel fp32", "AbsRel bf16-mixed", "bf16 - fp32", "fit speed-up of bf16"], seed_rows),
        "",
        f"Paired AbsRel difference bf16 - fp32: {statistics.fmean(diffs):+.4f}"
        + (f" ± {statistics.stdev(diffs):.4f} (std over seeds)" if len(diffs) > 1 else ""),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="Seeds 0..N-1 per arm (default 3)")
    parser.add_argument("--max_steps", type=int, default=None, help="Fit steps (default: the config's 800)")
    parser.add_argument("--tiny", action="store_true", help="Tiny model and one test batch: checks the code")
    parser.add_argument("--out", default=None, help="Also write the markdown (and a .json of every run) here")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error(f"--seeds must be >= 1, got {args.seeds}")
    runs = []
    with tempfile.TemporaryDirectory(prefix="diffperc_precision_") as tmp:
        for seed in range(args.seeds):
            arms = list(ARMS) if seed % 2 == 0 else list(ARMS)[::-1]  # alternate which arm goes first
            for arm in arms:
                print(f"seed {seed}, {arm} ...", flush=True)
                runs.append(run_arm(Path(tmp), arm, seed, args.max_steps, args.tiny))
    text = summarize(runs, str(args.max_steps or "the config's"), args.tiny)
    print(text, end="")
    if args.out:
        out = write_markdown(args.out, text)
        write_markdown(out.with_suffix(".json"), json.dumps(runs, indent=2) + "\n")
    return text


if __name__ == "__main__":
    main()
