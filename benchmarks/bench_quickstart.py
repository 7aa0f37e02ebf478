"""End-to-end wall time of the quickstart: ``diffperc fit`` then ``diffperc test`` on configs/quickstart/depth.yaml.

To run: python benchmarks/bench_quickstart.py [--quick | --tiny] [--fit-steps N] [--out FILE.md]
Both commands run in subprocesses writing into a temporary log dir. The fit runs ``--fit-steps`` steps (default 200,
so that the whole suite stays under 10 minutes; 0 = the config's full count) and the config's full length is
projected from the steady-state time per step read from the run's TensorBoard events. ``--tiny`` runs both commands
in this process on a width-32 1-block DiT (a fresh Python + Lightning start-up alone takes ~15 s on 2 cores).
"""

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP: see OMP_NOTE in common.py

import yaml  # noqa: E402
from common import Section, bench_main, md_table, mode_note, sig  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "quickstart" / "depth.yaml"
_FIT_STEPS = {"full": 200, "quick": 20, "tiny": 2}
# --tiny: a width-32 1-block DiT on batches of 2 without loader workers, and a loss log every step so that even 2 steps
# give the two TensorBoard points the steady-state time per step needs.
_TINY_ARGS = {
    "--model.init_args.backbone.hidden_size": "32",
    "--model.init_args.backbone.depth": "1",
    "--model.init_args.backbone.num_heads": "2",
    "--data.init_args.batch_size": "2",
    "--data.init_args.num_workers": "0",
    "--trainer.log_every_n_steps": "1",
}
_MODE = {"quick": "20 steps, 1 test batch", "tiny": "a width-32 1-block DiT, 2 steps, 1 test batch, in-process"}


def _run(args: list[str], log: Path, in_process: bool = False) -> float:
    """Runs ``python -m diffperc <args>`` with its output in ``log`` and returns its wall time; ``in_process`` calls
    ``diffperc.cli.main(args)`` in this process instead (output not redirected)."""
    start = time.perf_counter()
    if in_process:
        from diffperc.cli import main

        main(args)
        return time.perf_counter() - start
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


def run(size: str = "full", fit_steps: int | None = None) -> Section:
    """Times the quickstart fit and test (``size``: full, quick or tiny); returns the section with the measured and
    projected wall times."""
    note = mode_note(size, _MODE.get(size, ""))
    config = yaml.safe_load(CONFIG.read_text())
    full_steps = int(config["trainer"]["max_steps"])
    steps = fit_steps if fit_steps is not None else _FIT_STEPS[size]
    steps = steps or full_steps
    one_batch = size != "full"
    with tempfile.TemporaryDirectory(prefix="diffperc_bench_") as tmp:
        root = Path(tmp)
        common = ["--config", str(CONFIG), "--trainer.logger.init_args.save_dir", str(root)]
        common += ["--trainer.enable_progress_bar", "false"]
        in_process = size == "tiny"
        if in_process:
            common += [arg for pair in _TINY_ARGS.items() for arg in pair]
        fit_s = _run(["fit", *common, "--trainer.max_steps", str(steps)], root / "fit.log", in_process)
        test_args = ["test", *common, "--ckpt_path", "last"]
        test_args += ["--trainer.limit_test_batches", "1"] if one_batch else []
        test_s = _run(test_args, root / "test.log", in_process)
        name = config["trainer"]["logger"]["init_args"]["name"]
        per_step = _seconds_per_step(root / name)
    rows = [[f"fit, {steps} steps", sig(fit_s)], ["test" + (" (1 batch)" if one_batch else ""), sig(test_s)]]
    goals = []
    if per_step is not None:
        overhead = fit_s - steps * per_step  # start-up, data workers, checkpointing
        rows.append(["steady-state s / step (TensorBoard event times)", sig(per_step)])
        rows.append(["start-up and other fixed costs of the fit", sig(overhead)])
        if steps != full_steps:
            projected = overhead + full_steps * per_step
            rows.append([f"fit, {full_steps} steps (config's full length), projected", sig(projected)])
            rows.append([f"fit {full_steps} steps + test, projected", sig(projected + test_s)])
        else:
            rows.append([f"fit {full_steps} steps + test", sig(fit_s + test_s)])
    body = [
        f"{note}`python -m diffperc fit --config configs/quickstart/depth.yaml --trainer.max_steps {steps}` then "
        f"`python -m diffperc test ... --ckpt_path last`, each a fresh process (Python + torch + Lightning start-up "
        f"included) writing into a temporary log dir, with the environment of this benchmark "
        f"(OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '')}). Projection = fixed costs + full steps x "
        "steady-state s / step (the 2 one-batch validations of the full run are left out).",
        "",
        md_table(["what", "seconds"], rows),
    ]
    return Section("(e) Quickstart end to end", "\n".join(body), goals)


def _args(parser) -> None:
    parser.add_argument(
        "--fit-steps", type=int, default=None, help="Fit steps (default 200; 20 with --quick, 2 with --tiny; 0 = all)"
    )


if __name__ == "__main__":
    bench_main(lambda a: run(a.size, a.fit_steps), __doc__, _args)
