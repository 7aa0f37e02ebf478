"""Runs every benchmark and writes benchmarks/results.md: machine, medians, ratios and a goals table.

To run: python benchmarks/run_all.py [--quick | --tiny] [--out benchmarks/results.md] [--only a,c] (``make bench``)
Sections: (a) DiT training step, (b) MoE dispatch (bench_moe.py in a subprocess), (c) batched ensembles,
(d) procedural data, (e) quickstart end to end, (f) GPU DiT-XL/2 (only with CUDA). Full mode: < 10 min on 2 cores;
--quick (real widths, small batches): a few minutes; --tiny (tiny models, every code path once): seconds.
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP: see OMP_NOTE in common.py

import bench_data  # noqa: E402
import bench_ensemble  # noqa: E402
import bench_gpu  # noqa: E402
import bench_moe  # noqa: E402
import bench_quickstart  # noqa: E402
import bench_syncs  # noqa: E402
import bench_train_step  # noqa: E402
from common import (  # noqa: E402
    OMP_NOTE,
    Goal,
    Section,
    add_size_args,
    goals_table,
    machine_info,
    md_table,
    setup_threads,
    write_markdown,
)

HERE = Path(__file__).resolve().parent
TITLES = {
    "a": "(a) DiT training step",
    "b": "(b) MoE dispatch",
    "c": "(c) Batched ensembles",
    "d": "(d) Procedural data generators",
    "e": "(e) Quickstart end to end",
    "f": "(f) GPU: DiT-XL/2 512 px bf16",
    "g": "(g) Real-data readers, latent cache and loader workers",
    "h": "(h) Host syncs per step",
}
_BUDGET_S = 600
_MOE_ARGS = {
    "full": [],
    "quick": ["--repeats", "2", "--warmup", "1", "--batch", "2"],
    "tiny": ["--repeats", "1", "--warmup", "0", "--batch", "2", "--tokens", "8", "--width", "16", "--experts", "4"],
}
_MOE_MODE = {"quick": "QUICK MODE (batch 2, 2 rounds)", "tiny": "TINY MODE (width 16, 4 experts, 16 tokens, 1 round)"}


def run_moe(size: str) -> Section:
    """bench_moe.py in a subprocess (it sets its own threads); its ratio lines become goals. ``size`` tiny runs it in
    this process: a fresh Python + torch start-up would take longer than the tiny benchmark."""
    args = _MOE_ARGS[size]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "moe.md"
        if size == "tiny":
            bench_moe.main(["--out", str(out), *args])
        else:
            done = subprocess.run(
                [sys.executable, str(HERE / "bench_moe.py"), "--out", str(out), *args], capture_output=True, text=True
            )
            if done.returncode:
                raise RuntimeError(f"bench_moe.py exited with {done.returncode}: {done.stderr[-2000:]}")
        text = out.read_text()
    goals = []
    for label, pattern, target, ok in (
        ("(b) MoE dispatch: naive masked loop / ours", r"naive / ours = ([\d.]+)x", ">= 2x", lambda v: v >= 2.0),
        ("(b) MoE: ours / dense with the same active MACs", r"ours / dense = ([\d.]+)x", "<= 1.3x", lambda v: v <= 1.3),
    ):
        match = re.search(pattern, text)
        value = float(match.group(1)) if match else None
        goals.append(Goal(label, f"{value:.2f}x" if match else "not found", target, ok(value) if match else None))
    prefix = f"{_MOE_MODE[size]}: a smoke test, not results. " if size in _MOE_MODE else ""
    return Section(TITLES["b"], f"{prefix}`python benchmarks/bench_moe.py {' '.join(args)}`:\n\n{text}", goals)


def _runners(args: argparse.Namespace) -> dict:
    size = args.size
    return {
        "a": lambda: bench_train_step.run(size, args.compile if size == "full" else "none"),
        "b": lambda: run_moe(size),
        "c": lambda: bench_ensemble.run(size),
        "d": lambda: bench_data.run(size),
        "e": lambda: bench_quickstart.run(size, args.fit_steps),
        "f": lambda: bench_gpu.run(size),
        "g": lambda: bench_data.run_readers(size),
        "h": lambda: bench_syncs.run(size),
    }


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_size_args(parser)  # --quick: real widths, small batches (minutes); --tiny: tiny models (seconds)
    parser.add_argument("--out", default=str(HERE / "results.md"), help="Markdown file to write")
    parser.add_argument("--only", default="abcdefgh", help="Sections to run, e.g. 'a,c' (default: all)")
    parser.add_argument("--compile", default="t3", help="(a): shapes to torch.compile: none, all, t3, t6 or DiT-S/2")
    parser.add_argument(
        "--fit-steps", type=int, default=None, help="(e): fit steps (default 200; 20 with --quick, 2 with --tiny)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: every core)")
    args = parser.parse_args(argv)
    unknown = set(args.only.replace(",", "")) - set(TITLES)
    if unknown:
        raise SystemExit(f"`--only` has unknown sections {sorted(unknown)}; choose from {''.join(TITLES)}")
    setup_threads(args.threads)
    info = machine_info()  # before the benchmarks, so the load average is that of the machine, not ours
    start = time.perf_counter()
    sections = []
    for key, runner in _runners(args).items():
        if key not in args.only:
            sections.append(Section(TITLES[key], "skipped (`--only`)"))
            continue
        print(f"running {TITLES[key]} ...", flush=True)
        section_start = time.perf_counter()
        try:
            section = runner()
        except Exception as error:  # keep the other sections' numbers; the failure is reported in its place
            traceback.print_exc()
            section = Section(TITLES[key], f"FAILED: {type(error).__name__}: {error}")
        section.body += f"\n\n(section wall time: {time.perf_counter() - section_start:.0f} s)"
        sections.append(section)
    total = time.perf_counter() - start
    goals = [goal for section in sections for goal in section.goals]
    full_suite = args.size == "full" and set(args.only.replace(",", "")) == set(TITLES)
    goals.append(
        Goal(
            "make bench wall time (full mode, this machine)",
            f"{total:.0f} s",
            f"< {_BUDGET_S} s",
            total < _BUDGET_S if full_suite else None,
        )
    )
    mode = (
        f"**{args.size.upper()} MODE**: smaller shapes and repeats to check the suite; the numbers are not results. "
        if args.size != "full"
        else ""
    )
    text = "\n".join(
        [
            "# diffperc benchmarks",
            "",
            f"{mode}Written by `python benchmarks/run_all.py{'' if args.size == 'full' else ' --' + args.size}` "
            f"(`make bench`) in "
            f"{total:.0f} s. Times are medians over repeats; variants that are compared run in interleaved rounds "
            "(a, b, a, b, ...) so a busy neighbour slows them alike, and the load average below says how busy the "
            "machine was.",
            "",
            "## Machine",
            "",
            md_table(["", ""], [[k, v] for k, v in info.items()]),
            "",
            OMP_NOTE,
            "",
            "## Goals",
            "",
            goals_table(goals),
            "",
            *(section.markdown() for section in sections),
        ]
    )
    path = write_markdown(args.out, text)
    print(text)
    return path


if __name__ == "__main__":
    main()
