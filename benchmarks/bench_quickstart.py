"""End-to-end wall time of the quickstart: ``diffperc fit`` then ``diffperc test`` on configs/quickstart/depth.yaml.

To run: python benchmarks/bench_quickstart.py [--quick] [--fit-steps N] [--out FILE.md]
Both commands run in subprocesses writing into a temporary log dir. The fit runs ``--fit-steps`` steps (default 200,
so that the whole suite stays under 10 minutes; 0 = the config's full count) and the config's full length is
projected from the steady-state time per step read from the run's TensorBoard events.
"""

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP: see OMP_NOTE in common.py

import yaml  # noqa: E402
from common import Section, bench_main, md_table  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "quickstart" / "depth.yaml"


def _run(args: list[str], log: Path) -> float:
    """Runs ``python -m diffperc <args>`` and returns its wall time; the output goes to ``log``."""
    start = time.perf_counter()
    with open(log, "w") as f:
        done = subprocess.run([sys.executable, "-m", "diffperc", *args], stdout=f, stderr=subprocess.STDOUT)
    elapsed = time.perf_counter() - start
    if done.returncode:
        tail = "\n".join(log.read_text().splitlines()[-15:])
        raise RuntimeError(f"`diffperc {' '.join(args[:1])}` exited with {done.returncode}:\n{tail}")
    return elapsed


def _seconds_per_step(run_dir: Path) -> float | None:
    """Steady-state seconds per training step between the first and last logged ``train/loss`` (None: < 2 logs)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = sorted(run_dir.glob("events.out.tfevents.*"))
    if not events:
        return None
    accumulator = EventAccumulator(str(events[0]), size_guidance={"scalars": 0})
    accumulator.Reload()
    if "train/loss" not in accumulator.Tags()["scalars"]:
        return None
    points = accumulator.Scalars("train/loss")
    if len(points) < 2:
        return None
    return (points[-1].wall_time - points[0].wall_time) / (points[-1].step - points[0].step)


def run(quick: bool = False, fit_steps: int | None = None) -> Section:
    """Times the quickstart fit and test; returns the section with the measured and projected wall times."""
    config = yaml.safe_load(CONFIG.read_text())
    full_steps = int(config["trainer"]["max_steps"])
    steps = fit_steps if fit_steps is not None else (20 if quick else 200)
    steps = steps or full_steps
    with tempfile.TemporaryDirectory(prefix="diffperc_bench_") as tmp:
        root = Path(tmp)
        common = ["--config", str(CONFIG), "--trainer.logger.init_args.save_dir", str(root)]
        common += ["--trainer.enable_progress_bar", "false"]
        fit_s = _run(["fit", *common, "--trainer.max_steps", str(steps)], root / "fit.log")
        test_args = ["test", *common, "--ckpt_path", "last"] + (["--trainer.limit_test_batches", "1"] if quick else [])
        test_s = _run(test_args, root / "test.log")
        name = config["trainer"]["logger"]["init_args"]["name"]
        per_step = _seconds_per_step(root / name)
    rows = [[f"fit, {steps} steps", f"{fit_s:.1f}"], ["test" + (" (1 batch)" if quick else ""), f"{test_s:.1f}"]]
    goals = []
    if per_step is not None:
        overhead = fit_s - steps * per_step  # start-up, data workers, checkpointing
        rows.append(["steady-state s / step (TensorBoard event times)", f"{per_step:.3f}"])
        rows.append(["start-up and other fixed costs of the fit", f"{overhead:.1f}"])
        if steps != full_steps:
            projected = overhead + full_steps * per_step
            rows.append([f"fit, {full_steps} steps (config's full length), projected", f"{projected:.0f}"])
            rows.append([f"fit {full_steps} steps + test, projected", f"{projected + test_s:.0f}"])
        else:
            rows.append([f"fit {full_steps} steps + test", f"{fit_s + test_s:.0f}"])
    body = [
        f"{'QUICK MODE (20 steps, 1 test batch): a smoke test, not results. ' if quick else ''}"
        f"`python -m diffperc fit --config configs/quickstart/depth.yaml --trainer.max_steps {steps}` then "
        f"`python -m diffperc test ... --ckpt_path last`, each a fresh process (Python + torch + Lightning start-up "
        f"included) writing into a temporary log dir, with the environment of this benchmark "
        f"(OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '')}). Projection = fixed costs + full steps x "
        "steady-state s / step (the 2 one-batch validations of the full run are left out).",
        "",
        md_table(["what", "seconds"], rows),
    ]
    return Section("(e) Quickstart end to end", "\n".join(body), goals)


def _args(parser) -> None:
    parser.add_argument("--fit-steps", type=int, default=None, help="Fit steps (default 200; 20 with --quick; 0 = all)")


if __name__ == "__main__":
    bench_main(lambda a: run(a.quick, a.fit_steps), __doc__, _args)
