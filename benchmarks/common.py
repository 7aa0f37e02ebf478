"""Shared benchmark helpers: machine description, median-over-repeats timers, markdown tables and sections.

Imported first by every ``bench_*.py`` so that OMP_WAIT_POLICY is set before torch starts its thread pool.
"""

import argparse
import datetime
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

# Idle OpenMP workers sleep instead of spinning (as in bench_moe.py): on a small shared machine, spinning workers
# steal the cores that the main thread and the other variants need between ops. An explicit value in the
# environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from diffperc.utils import atomic_write_bytes  # noqa: E402

# How big a run is: "full" measures (``make bench``); "quick" keeps the real widths with smaller batches and fewer
# repeats; "tiny" runs every code path once on tiny models in seconds (tests/test_benchmarks.py). Only "full" numbers
# are results.
SIZES = ("full", "quick", "tiny")

OMP_NOTE = (
    "`OMP_WAIT_POLICY=PASSIVE` (set before torch starts, unless the environment sets it): idle OpenMP worker "
    "threads sleep instead of spin-waiting. On a 2-core machine a spinning worker steals the core that the main "
    "thread needs between the many mid-size ops of a training step; bench_moe.py measured ~3x slower MoE and "
    "~1.3x slower dense steps with the default (active) policy."
)


def available_cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def setup_threads(threads: int | None = None) -> int:
    """Uses ``threads`` torch threads (default: every available core) and returns the number set."""
    torch.set_num_threads(threads or available_cores())
    return torch.get_num_threads()


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (falls back to ``platform.processor()``)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine_info() -> dict[str, str]:
    """What the numbers were measured on: CPU, cores, load, torch version and threads, GPU, date."""
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return {
        "CPU": cpu_model(),
        "cores available": str(available_cores()),
        "load average (1, 5, 15 min) at start": load,
        "torch": torch.__version__,
        "torch threads": str(torch.get_num_threads()),
        "python": platform.python_version(),
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", ""),
        "GPU": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
        "date (UTC)": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
    }


@dataclass
class Timing:
    """Wall-clock times of one benchmarked call, in seconds."""

    times: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def best(self) -> float:
        return min(self.times)


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def time_interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, Timing]:
    """Times every function ``repeats`` times after ``warmup`` untimed calls each.

    Rounds interleave the functions (a, b, c, a, b, c, ...) so that a noisy neighbour on a shared machine slows all
    of them alike and their ratios stay meaningful; report medians.
    """
    if repeats < 1:
        raise ValueError(f"`repeats` must be >= 1, got {repeats}")
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            _sync()
            start = time.perf_counter()
            fn()
            _sync()
            times[name].append(time.perf_counter() - start)
    return {name: Timing(t) for name, t in times.items()}


def time_median(fn: Callable[[], object], repeats: int, warmup: int = 1) -> Timing:
    """Times ``fn`` ``repeats`` times after ``warmup`` untimed calls; ``.median`` is the number to report."""
    return time_interleaved({"fn": fn}, repeats, warmup)["fn"]


def mode_note(size: str, what: str) -> str:
    """The sentence that opens a --quick or --tiny section (``what`` says how it is smaller); "" for a full run."""
    if size not in SIZES:
        raise ValueError(f"`size` must be one of {SIZES}, got {size!r}")
    return "" if size == "full" else f"{size.upper()} MODE ({what}): a smoke test, not results. "


def sig(x: float, digits: int = 3) -> str:
    """``x`` with ``digits`` significant digits in fixed point, so tiny and large times both keep their precision:
    1234.5 -> "1234", 12.345 -> "12.3", 0.012345 -> "0.0123"."""
    if x == 0 or not math.isfinite(x):
        return f"{x:g}"
    return f"{x:.{max(0, digits - 1 - math.floor(math.log10(abs(x))))}f}"


def md_table(header: list[str], rows: list[list[object]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


@dataclass
class Goal:
    """One target of the performance issue and whether this run met it (None: not measured here)."""

    name: str
    value: str
    target: str
    met: bool | None


@dataclass
class Section:
    """One benchmark's part of results.md: a heading, markdown body and the goals it checks."""

    title: str
    body: str
    goals: list[Goal] = field(default_factory=list)

    def markdown(self) -> str:
        return f"## {self.title}\n\n{self.body.strip()}\n"


def goals_table(goals: list[Goal]) -> str:
    """The "goals" table: measured value, target and met / not met."""
    verdict = {True: "met", False: "not met", None: "n/a"}
    rows = [[g.name, g.value, g.target, verdict[g.met]] for g in goals]
    return md_table(["goal", "measured", "target", "status"], rows)


def write_markdown(path: str | Path, text: str) -> Path:
    """Writes ``text`` to ``path`` atomically (a crash never leaves half a results table)."""
    return atomic_write_bytes(path, text.encode())


def add_size_args(parser: argparse.ArgumentParser) -> None:
    """``--quick`` and ``--tiny``, stored as ``args.size`` (default "full"; see ``SIZES``)."""
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", dest="size", action="store_const", const="quick", help="Small batches, few repeats")
    size.add_argument("--tiny", dest="size", action="store_const", const="tiny", help="Tiny models: checks the code")
    parser.set_defaults(size="full")


def bench_main(run: Callable[[argparse.Namespace], Section], doc: str, add_args=None) -> None:
    """Command line of a single benchmark: ``--quick`` / ``--tiny``, ``--out FILE.md``, ``--threads``, plus
    ``add_args``."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    add_size_args(parser)
    parser.add_argument("--out", default=None, help="Also write this section to a markdown file")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: every core)")
    if add_args is not None:
        add_args(parser)
    args = parser.parse_args()
    setup_threads(args.threads)
    section = run(args)
    text = section.markdown()
    if section.goals:
        text += "\n" + goals_table(section.goals) + "\n"
    print(text, end="")
    if args.out:
        write_markdown(args.out, text)
