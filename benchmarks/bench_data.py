"""Samples/s of every procedural generator (depth, flow, amodal, classes) at 32 and 64 px on one CPU core.

To run: python benchmarks/bench_data.py [--quick | --tiny] [--out FILE.md]
The process is pinned to one core and torch uses one thread while generating, as one DataLoader worker would.
"""

import contextlib
import importlib
import os
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP: see OMP_NOTE in common.py

import torch  # noqa: E402
from common import Goal, Section, bench_main, md_table, mode_note, sig  # noqa: E402

# (module, class): generators that do not import (not written yet, or broken) are listed as such, not fatal.
GENERATORS = [
    ("diffperc.data.procedural", "ProceduralDepth"),
    ("diffperc.data.procedural_flow", "ProceduralFlow"),
    ("diffperc.data.procedural_amodal", "ProceduralAmodal"),
    ("diffperc.data.procedural_classes", "ProceduralClasses"),
]
RESOLUTIONS = (32, 64)
_GOAL = 1000.0
# New samples per pass and passes, per size (``common.SIZES``).
_SIZES = {"full": (200, 3), "quick": (30, 1), "tiny": (2, 1)}


@contextlib.contextmanager
def one_core():
    """Pins this process to one core and torch to one thread; restores both afterwards."""
    threads = torch.get_num_threads()
    cores = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    torch.set_num_threads(1)
    if cores:
        os.sched_setaffinity(0, {min(cores)})
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        if cores:
            os.sched_setaffinity(0, cores)


def _rate(dataset, samples: int, repeats: int) -> float:
    """Median samples/s over ``repeats`` passes of ``samples`` distinct indices (every pass new scenes)."""
    dataset[0]  # warm-up: caches of rays / pixel grids for this resolution
    rates = []
    for r in range(repeats):
        start = time.perf_counter()
        for i in range(r * samples, (r + 1) * samples):
            dataset[i]
        rates.append(samples / (time.perf_counter() - start))
    return sorted(rates)[len(rates) // 2]


def run(size: str = "full") -> Section:
    """Times ``dataset[i]`` for every generator and resolution (``size``: full, quick or tiny)."""
    samples, repeats = _SIZES[size]
    rows, goals, missing = [], [], []
    with one_core():
        for module_name, class_name in GENERATORS:
            try:
                cls = getattr(importlib.import_module(module_name), class_name)
            except (ImportError, AttributeError) as error:
                missing.append(f"{module_name}.{class_name} ({type(error).__name__}: {error})")
                continue
            rates = {res: _rate(cls("train", samples * repeats, res), samples, repeats) for res in RESOLUTIONS}
            rows.append([class_name, *(sig(rates[res]) for res in RESOLUTIONS)])
            r64 = rates[64]
            goals.append(Goal(f"(d) {class_name} at 64 px, one core", f"{sig(r64)}/s", ">= 1000/s", r64 >= _GOAL))
    body = [
        f"{mode_note(size, f'{samples} samples, {repeats} pass')}"
        f"`dataset[i]` (render + tensors) for {samples} new indices per pass, median of {repeats} passes, process "
        f"pinned to one core with torch at 1 thread.",
        "",
        md_table(["generator", *(f"samples/s at {r} px" for r in RESOLUTIONS)], rows),
    ]
    if missing:
        body += ["", "Not measured (did not import): " + "; ".join(missing)]
    return Section("(d) Procedural data generators", "\n".join(body), goals)


if __name__ == "__main__":
    bench_main(lambda a: run(a.size), __doc__)
