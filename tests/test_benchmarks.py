"""Benchmark suite: helpers on toy inputs, and ``run_all.py --tiny`` running every section once on tiny models."""

import json
import math
import operator
import os
import re
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
SECTIONS = [
    "## Machine",
    "## Goals",
    "## (a) DiT training step",
    "## (b) MoE dispatch",
    "## (c) Batched ensembles",
    "## (d) Procedural data generators",
    "## (e) Quickstart end to end",
    "## (f) GPU: DiT-XL/2 512 px bf16",
    "## (g) Real-data readers, latent cache and loader workers",
    "## (h) Host syncs per step",
]
# Table columns that hold times, rates or FLOPs: > 0 and finite (differences may be 0 or negative).
POSITIVE = {
    "train GFLOP/step",
    "GEMM GFLOP/s (MKL)",
    "GEMM GFLOP/s (oneDNN)",
    "ms / step",
    "GFLOP/s",
    "default ms",
    "foreach ms",
    "fused ms",
    "median ms",
    "best ms",
    "one-by-one ms",
    "batched ms",
    "inputs/s batched",
    "samples/s at 32 px",
    "samples/s at 64 px",
    "seconds",
}


@pytest.fixture
def bench(monkeypatch):
    """The benchmarks folder on sys.path (its scripts import each other as top-level modules)."""
    monkeypatch.syspath_prepend(str(BENCH))
    import common

    return common


def _section(text: str, heading: str) -> str:
    """The body under ``heading`` (a line of ``SECTIONS``), up to the next section."""
    return text.split(heading + "\n", 1)[1].split("\n## ", 1)[0]


def _tables(body: str) -> list[list[dict[str, str]]]:
    """Every markdown table in ``body``, each as a list of {column: cell} rows."""
    lines, tables = body.splitlines(), []
    for i, line in enumerate(lines):
        if line.startswith("|---"):
            header = [cell.strip() for cell in lines[i - 1].strip("|").split("|")]
            rows = []
            for row in lines[i + 1 :]:
                if not row.startswith("|"):
                    break
                rows.append(dict(zip(header, (cell.strip() for cell in row.strip("|").split("|")))))
            tables.append(rows)
    return tables


def _num(cell: str) -> float:
    """The number a cell starts with: "2.92x", "5.61% of MKL", "253/s", "6.0e-08", "nan" -> float."""
    return float(re.match(r"[-+]?(nan|inf|[\d.]+(e[-+]?\d+)?)", cell).group())


def test_md_table_layout(bench):
    assert bench.md_table(["a", "b"], [[1, "x"], [2.5, "y"]]) == "| a | b |\n|---|---|\n| 1 | x |\n| 2.5 | y |"


def test_sig_keeps_three_significant_digits_without_exponent(bench):
    assert [bench.sig(x) for x in (1234.5, 12.345, 0.012345, 0.0, float("nan"))] == [
        "1234",
        "12.3",
        "0.0123",
        "0",
        "nan",
    ]


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


def test_latents_benchmark_speed_up_is_the_two_step_times_divided(bench, capsys):
    import bench_latents

    bench_latents.main(["--resolution", "16", "--vae_channels", "8,8", "--batch_size", "2", "--steps", "2"])
    out = capsys.readouterr().out
    raw = float(re.search(r"images -> encode -> step : +([\d.]+) ms/step", out).group(1))
    cached = float(re.search(r"cached latents -> step +: +([\d.]+) ms/step", out).group(1))
    speed_up = float(re.search(r"speed-up per step +: +([\d.]+)x", out).group(1))
    assert raw > 0 and cached > 0, out
    assert speed_up == pytest.approx(raw / cached, rel=0.02, abs=0.01), out


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, int]:
    """``run_all.py --tiny`` run once, in this process (a fresh Lightning start-up alone costs ~15 s), over a stale
    results.md: the file and the stale file's inode."""
    out = tmp_path_factory.mktemp("bench") / "results.md"
    out.write_text("stale\n")
    stale_inode = out.stat().st_ino
    threads, precision = torch.get_num_threads(), torch.get_float32_matmul_precision()
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.syspath_prepend(str(BENCH))
        import run_all

        try:
            run_all.main(["--tiny", "--out", str(out)])
        finally:  # run_all takes every core; the quickstart's CLI sets the matmul precision
            torch.set_num_threads(threads)
            torch.set_float32_matmul_precision(precision)
    return out, stale_inode


@pytest.fixture
def results(tiny_run) -> str:
    return tiny_run[0].read_text()


def test_run_all_tiny_writes_every_section_atomically(tiny_run, results):
    out, stale_inode = tiny_run
    # A new file renamed over the old one, no temporary file left behind.
    assert out.stat().st_ino != stale_inode and [p.name for p in out.parent.iterdir()] == ["results.md"]
    assert [line for line in results.splitlines() if line.startswith("## ")] == SECTIONS
    assert "FAILED" not in results and "**TINY MODE**" in results, results
    assert not re.search(r"\| [-+]?(nan|inf)", results), results
    for heading in SECTIONS[2:7]:
        for row in (row for table in _tables(_section(results, heading)) for row in table):
            assert all(0 < _num(row[c]) < math.inf for c in POSITIVE & row.keys()), (heading, row)
    gpu = _section(results, "## (f) GPU: DiT-XL/2 512 px bf16")
    assert ("no GPU on this machine" in gpu) != torch.cuda.is_available()


def test_run_all_tiny_train_step_rates_are_flops_over_measured_times(results):
    shapes, steps, _ = _tables(_section(results, "## (a) DiT training step"))
    gflop, gemm = _num(shapes[0]["train GFLOP/step"]), _num(shapes[0]["GEMM GFLOP/s (MKL)"])
    assert [row["variant"] for row in steps] == ["eager", "eager, oneDNN matmul"]  # --tiny compiles nothing
    eager_ms = _num(steps[0]["ms / step"])
    # Within the rounding of 3 significant digits.
    for row in steps:
        ms = _num(row["ms / step"])
        assert _num(row["GFLOP/s"]) == pytest.approx(gflop / ms * 1e3, rel=0.02)
        assert _num(row["speed-up vs eager"]) == pytest.approx(eager_ms / ms, rel=0.02, abs=0.01)
    assert _num(steps[0]["vs GEMM"]) == pytest.approx(100 * gflop / eager_ms * 1e3 / gemm, rel=0.03)


def test_run_all_tiny_moe_ratios_are_the_medians_divided(results):
    moe = _section(results, "## (b) MoE dispatch")
    ms = {row["variant"]: _num(row["median ms"]) for row in _tables(moe)[0]}
    naive = float(re.search(r"naive / ours = ([\d.]+)x", moe).group(1))
    dense = float(re.search(r"ours / dense = ([\d.]+)x", moe).group(1))
    assert naive == pytest.approx(ms["naive masked loop"] / ms["ours"], rel=0.02, abs=0.01)
    assert dense == pytest.approx(ms["ours"] / ms["dense, same active MACs"], rel=0.02, abs=0.01)


def test_run_all_tiny_ensembles_speed_up_from_times_and_same_members(results):
    rows = _tables(_section(results, "## (c) Batched ensembles"))[0]
    assert [row["inputs B"] for row in rows] == ["1", "2"]
    for row in rows:
        one_by_one, batched = _num(row["one-by-one ms"]), _num(row["batched ms"])
        assert _num(row["speed-up"]) == pytest.approx(one_by_one / batched, rel=0.02, abs=0.01)
        assert _num(row["inputs/s batched"]) == pytest.approx(int(row["inputs B"]) / batched * 1e3, rel=0.02)
        assert _num(row["max abs diff"]) < 1e-5  # the batched call draws the one-by-one loop's members


def test_run_all_tiny_quickstart_projection_adds_up(results):
    rows = _tables(_section(results, "## (e) Quickstart end to end"))[0]
    seconds = {row["what"]: _num(row["seconds"]) for row in rows}
    full_steps = yaml.safe_load((ROOT / "configs" / "quickstart" / "depth.yaml").read_text())["trainer"]["max_steps"]
    per_step = seconds["steady-state s / step (TensorBoard event times)"]
    fixed = seconds["start-up and other fixed costs of the fit"]
    assert fixed == pytest.approx(seconds["fit, 2 steps"] - 2 * per_step, rel=0.02)
    projected = seconds[f"fit, {full_steps} steps (config's full length), projected"]
    assert projected == pytest.approx(fixed + full_steps * per_step, rel=0.02)
    total = seconds[f"fit {full_steps} steps + test, projected"]
    assert total == pytest.approx(projected + seconds["test (1 batch)"], rel=0.02)


def test_run_all_tiny_goals_show_section_numbers_and_follow_targets(results):
    goals = {row["goal"]: row for row in _tables(_section(results, "## Goals"))[0]}
    # (a)'s goals are for widths >= 384 only; then 2 MoE ratios, 2 ensemble sizes, 4 generators and the wall time.
    assert len(goals) == 2 + 2 + 4 + 1, goals
    moe = _section(results, "## (b) MoE dispatch")
    assert goals["(b) MoE dispatch: naive masked loop / ours"]["measured"] in moe.split("naive / ours = ")[1]
    assert goals["(b) MoE: ours / dense with the same active MACs"]["measured"] in moe.split("ours / dense = ")[1]
    for row in _tables(_section(results, "## (c) Batched ensembles"))[0]:
        assert goals[f"(c) batched vs one-by-one ensemble, B={row['inputs B']}"]["measured"] == row["speed-up"]
    data = _tables(_section(results, "## (d) Procedural data generators"))[0]
    generators = ["ProceduralDepth", "ProceduralFlow", "ProceduralAmodal", "ProceduralClasses"]
    assert [row["generator"] for row in data] == generators  # every generator imported
    for row in data:
        assert goals[f"(d) {row['generator']} at 64 px, one core"]["measured"] == row["samples/s at 64 px"] + "/s"
    assert goals["make bench wall time (full mode, this machine)"]["status"] == "n/a"  # only a full run counts
    compare = {">=": operator.ge, "<=": operator.le}
    for goal in list(goals.values())[:-1]:  # all but the wall time
        op, bound = re.fullmatch(r"(>=|<=) ([\d.]+)\S*", goal["target"]).groups()
        value, bound = _num(goal["measured"]), float(bound)
        if value != pytest.approx(bound, rel=0.01):  # a value rounded onto the bound may go either way
            assert goal["status"] == ("met" if compare[op](value, bound) else "not met"), goal


def test_bench_gpu_tiny_runs_every_section_and_its_rates_follow_from_its_times(tmp_path, bench):
    # The one-command device check, on the CPU at tiny sizes: training MFU inputs, ensembles and both MoE paths.
    import bench_gpu

    out = tmp_path / "gpu.md"
    bench_gpu.main(["--tiny", "--device", "cpu", "--out", str(out), "--no-compile"])
    record = json.loads(out.with_suffix(".json").read_text())
    train = record["training"][0]
    assert train["achieved_flops"] == pytest.approx(train["train_flops"] / train["step_s"], rel=1e-9)
    assert train["images_per_s"] == pytest.approx(train["batch"] / train["step_s"], rel=1e-9)
    for row in record["ensemble"]:
        assert row["speedup"] == pytest.approx(row["one_by_one_s"] / row["batched_s"], rel=1e-9)
        assert row["max_abs_diff"] == 0  # batching never changes a member
    moe = record["moe"][0]["results"]
    assert moe["ours, capacity 1.25 (padded bmm)"]["syncs"] == 0 and moe["dense, same active MACs"]["syncs"] == 0
    assert "Row for the README's GPU table" in out.read_text()
