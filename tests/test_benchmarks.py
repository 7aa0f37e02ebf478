"""Benchmark suite: helpers on toy inputs, and ``run_all.py --quick`` writing every section of results.md."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
SECTIONS = [
    "## Machine",
    "## Goals",
    "## (a) DiT training step",
    "## (b) MoE dispatch",
    "## (c) Batched ensembles",
    "## (d) Procedural data generators",
    "## (e) Quickstart end to end",
    "## (f) GPU: DiT-XL/2 512 px bf16",
]


@pytest.fixture
def bench(monkeypatch):
    """The benchmarks folder on sys.path (its scripts import each other as top-level modules)."""
    monkeypatch.syspath_prepend(str(BENCH))
    import common

    return common


def test_md_table_layout(bench):
    assert bench.md_table(["a", "b"], [[1, "x"], [2.5, "y"]]) == "| a | b |\n|---|---|\n| 1 | x |\n| 2.5 | y |"


def test_time_interleaved_calls_warmup_then_rounds_in_order(bench):
    calls = []
    times = bench.time_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 3, warmup=2)
    assert calls == ["a", "a", "b", "b"] + ["a", "b"] * 3
    assert [len(t.times) for t in times.values()] == [3, 3]
    assert times["a"].best <= times["a"].median


def test_goals_table_marks_met_not_met_and_na(bench):
    goals = [bench.Goal("x", "2x", ">= 1x", True), bench.Goal("y", "0", "> 1", False), bench.Goal("z", "-", "-", None)]
    rows = bench.goals_table(goals).splitlines()[2:]
    assert [row.rsplit("|", 2)[1].strip() for row in rows] == ["met", "not met", "n/a"]


def test_write_markdown_replaces_the_file(bench, tmp_path):
    path = tmp_path / "sub" / "results.md"
    bench.write_markdown(path, "old")
    bench.write_markdown(path, "# new\n")
    assert path.read_text() == "# new\n" and [p.name for p in path.parent.iterdir()] == ["results.md"]


def test_peak_tflops_matches_pcie_before_sxm(bench):
    import bench_gpu

    assert bench_gpu.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert bench_gpu.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert bench_gpu.peak_tflops("Some Future GPU") is None


def test_train_throughput_counts_forward_and_backward_flops(bench):
    import bench_gpu

    from diffperc.compute import count_train_macs
    from diffperc.models.dit import DiT

    def tiny():
        torch.manual_seed(0)
        return DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2, num_classes=2)

    x, t, y = torch.randn(2, 4, 8, 8), torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long)
    out = bench_gpu.train_throughput(tiny(), 2, 8, 4, torch.device("cpu"), steps=1, warmup=0)
    assert out["train_flops"] == 2 * count_train_macs(tiny(), x, t, y) > 0
    assert out["images_per_s"] == pytest.approx(2 / out["step_s"])


def test_one_core_pins_and_restores(bench):
    import bench_data

    threads, cores = torch.get_num_threads(), os.sched_getaffinity(0)
    with bench_data.one_core():
        assert torch.get_num_threads() == 1 and len(os.sched_getaffinity(0)) == 1
    assert torch.get_num_threads() == threads and os.sched_getaffinity(0) == cores


@pytest.mark.slow
def test_run_all_quick_writes_every_section(tmp_path):
    out = tmp_path / "results.md"
    done = subprocess.run(
        [sys.executable, str(BENCH / "run_all.py"), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    text = out.read_text()
    headings = [line for line in text.splitlines() if line.startswith("## ")]
    assert headings == SECTIONS
    assert "FAILED" not in text, text
    # One goal row per measured target: 2 widths >= 384, 2 MoE ratios, 2 ensemble sizes, 4 generators, wall time.
    goal_rows = text.split("## Goals")[1].split("## (a)")[0].strip().splitlines()[2:]
    assert len(goal_rows) == 2 + 2 + 2 + 4 + 1, goal_rows
