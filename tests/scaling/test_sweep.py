import json
import os
import shlex
import sys
from pathlib import Path

import pytest
import torch

from diffperc.cli import DiffpercCLI
from diffperc.compute import count_train_macs
from diffperc.scaling.sweep import (
    command_lines,
    expand,
    load_sweep,
    main,
    normalize_key,
    parse_sweep,
    read_results,
    run_local,
    write_slurm,
)

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "configs" / "quickstart" / "depth.yaml"
SWEEPS = sorted((ROOT / "sweeps").rglob("*.yaml"))
# The tiny model of tests/lit/test_finetuning.py: width 32, 16 px, patch 4 (the quickstart's), 3 steps, 8 test images.
TINY = {
    "model.init_args.backbone.hidden_size": 32,
    "model.init_args.backbone.num_heads": 2,
    "model.init_args.image_size": 16,
    "model.init_args.num_images_logged": 0,
    "model.init_args.inference.num_steps": 1,
    "model.init_args.inference.ensemble_size": 1,
    "model.init_args.lr_scheduler.init_args.total_steps": 3,
    "model.init_args.lr_scheduler.init_args.warmup_steps": 1,
    "data.init_args.train.init_args.resolution": 16,
    "data.init_args.val.init_args.resolution": 16,
    "data.init_args.test.init_args.resolution": 16,
    "data.init_args.test.init_args.length": 8,
    "data.init_args.batch_size": 4,
    "data.init_args.num_workers": 0,
    "trainer.max_steps": 3,
    "trainer.limit_val_batches": 0,
    "trainer.log_every_n_steps": 1,
    "trainer.enable_progress_bar": False,
    "trainer.enable_model_summary": False,
}


class _ParseOnly(DiffpercCLI):
    """Parses (and type-checks) a command line without building the model, data or trainer."""

    def instantiate_classes(self) -> None:
        pass


_PARSERS = {}


def _parse(args: list[str]):
    # One parser serves every file (model and data are subclass-mode), which keeps the suite fast.
    if "parser" not in _PARSERS:
        _PARSERS["parser"] = _ParseOnly(args=args, run=False).parser
    return _PARSERS["parser"].parse_args(args)


def _config_args(argv: list[str]) -> list[str]:
    """A `diffperc fit/test ...` argv without its subcommand and --ckpt_path: what `run=False` accepts."""
    args = argv[1:]
    i = args.index("--ckpt_path")
    return args[:i] + args[i + 2:]


def _covering(points) -> list:
    """Points that together show every key with every type of value, and every class path, at least once: what
    parsing depends on, so each of them is parsed once and the suite stays fast. A string value parses alike whatever
    it says (every swept string argument is a plain ``str``: preset names and paths are checked when the run builds
    its model); a class path is imported, so each is parsed."""
    seen, keep = set(), []
    for point in points:
        pairs = {(k, v if k.endswith("class_path") else type(v).__name__) for k, v in point.own.items()}
        if not keep or pairs - seen:
            keep.append(point)
            seen |= pairs
    return keep


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: str(p.relative_to(ROOT / "sweeps")))
def test_sweep_file_expands_and_every_point_parses(path, tmp_path):
    sweep = load_sweep(path)
    upstream, points = expand(sweep, tmp_path / "out")
    assert points and (sweep.upstream is None) == (not upstream)
    missing = sweep.missing_bases()
    if missing:
        pytest.skip(f"base config {[str(m.relative_to(ROOT)) for m in missing]} is not written yet")
    for point in _covering(upstream) + _covering(points):
        steps = command_lines(point)
        assert [s for s, _ in steps] == (["tts"] if point.command == "tts" else ["fit", "test"][: 1 + point.test])
        cfg = _parse(_config_args(steps[0][1]))
        for key, value in point.overrides.items():
            assert cfg[key] == value, (point.id, key)
        assert cfg["trainer.logger.init_args.name"] == point.id
        assert cfg["trainer.callbacks"][-1].class_path == "diffperc.callbacks.macs.MACsCounter"


def test_sweep_file_errors_name_the_key():
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['gird'\]"):
        parse_sweep({"base": "a.yaml", "gird": {}}, source="sweeps/x.yaml")
    with pytest.raises(ValueError, match="`grid.trainer.max_steps` must be a non-empty list"):
        parse_sweep({"base": "a.yaml", "grid": {"trainer.max_steps": 3}})
    with pytest.raises(ValueError, match="`command: tts` needs `checkpoint:`"):
        parse_sweep({"base": "a.yaml", "command": "tts"})


def test_expand_crosses_points_grid_seeds_and_upstream(tmp_path):
    sweep = parse_sweep({
        "base": ["a.yaml"],
        "set": {"trainer.max_steps": 7},
        "points": [{"model.init_args.image_size": 16, "tags": {"tokens": 16}}, {"model.init_args.image_size": 32}],
        "grid": {"model.init_args.backbone.name": ["t1", "t2"]},
        "seeds": [0, 1],
        "from": {"base": "b.yaml", "grid": {"model.init_args.backbone.depth": [1, 2]},
                 "inherit": ["model.init_args.backbone.depth"]},
    })
    upstream, points = expand(sweep, tmp_path / "a")
    assert len(upstream) == 2 and len(points) == 2 * 2 * 2 * 2
    first = points[0]
    assert first.overrides == {
        "trainer.max_steps": 7,
        "model.init_args.backbone.depth": 1,  # inherited from its upstream run
        "model.init_args.image_size": 16,
        "model.init_args.backbone.name": "t1",
        "seed_everything": 0,
        "model.init_args.init_from": str(upstream[0].run_dir / "checkpoints" / "last.ckpt"),
    }
    assert first.tags == {"tokens": 16} and first.upstream is upstream[0]
    assert first.run_dir == tmp_path / "a" / first.id and upstream[0].run_dir.parent == tmp_path / "a" / "from"
    assert first.id.startswith("depth-1_image_size-16_name-t1_seed_everything-0-")
    # Ids depend on what the run is, not on where it is written.
    assert [p.id for p in expand(sweep, tmp_path / "b")[1]] == [p.id for p in points]
    assert len({p.id for p in points}) == len(points)
    assert normalize_key("data.init_args.train.init_args.resolution") == "data.train.resolution"


def test_dry_run_prints_pasteable_command_lines(tmp_path, capsys):
    odd = "it's a; $(value)"  # would break, or run, if it went through a shell unquoted
    sweep_file = tmp_path / "s.yaml"
    sweep_file.write_text(json.dumps({"base": [str(QUICKSTART)], "grid": {"model.init_args.init_from": [odd, "x"]}}))
    main(["run", str(sweep_file), "--dry_run", "--out", str(tmp_path / "out")])
    lines = [line for line in capsys.readouterr().out.splitlines() if not line.startswith("#")]
    expected = [argv for p in expand(load_sweep(sweep_file), tmp_path / "out")[1] for _, argv in command_lines(p)]
    assert [shlex.split(line) for line in lines] == [["diffperc", *argv] for argv in expected]
    assert lines[0].startswith("diffperc fit --config ") and "--ckpt_path last" in lines[0]
    assert shlex.split(lines[0])[shlex.split(lines[0]).index("--model.init_args.init_from") + 1] == odd


_FAKE_DIFFPERC = """\
import json, os, pathlib, sys
args = sys.argv[3:]  # after `-m diffperc`
with open({calls!r}, "a") as f:
    f.write(json.dumps(args) + "\\n")
value = lambda key: args[args.index(key) + 1]
run = pathlib.Path(value("--trainer.logger.init_args.save_dir")) / value("--trainer.logger.init_args.name")
print("fake diffperc", args[0])
if "fail" in args:
    print("RuntimeError: the fake run failed", file=sys.stderr)
    print("", file=sys.stderr)
    sys.exit(3)
if "kill" in args:
    os.kill(os.getpid(), 9)
if args[0] == "fit":
    (run / "checkpoints").mkdir(parents=True, exist_ok=True)
    (run / "checkpoints" / "last.ckpt").write_text("")
    (run / "train_macs.json").write_text(json.dumps({{"compute/train_macs": 1000, "global_step": 3}}))
else:
    (run / "test_metrics.json").write_text(json.dumps({{"task": "depth", "abs_rel": 0.25, "baseline/abs_rel": 0.5,
        "compute/test_macs_per_sample": 77, "inference": {{"num_steps": 2, "ensemble_size": 3}},
        "metrics": {{"test/depth/abs_rel": 0.25, "baseline/depth/abs_rel": 0.5, "compute/test_macs_per_sample": 77}}}}))
"""


def test_local_launcher_runs_argv_lists_records_failures_and_skips_finished(tmp_path):
    calls = tmp_path / "calls.jsonl"
    fake = tmp_path / "fake_python"
    fake.write_text(f"#!{sys.executable}\n" + _FAKE_DIFFPERC.format(calls=str(calls)))
    fake.chmod(0o755)
    odd = "a b'; echo hacked"
    sweep = parse_sweep({"base": [str(QUICKSTART)],
                         "grid": {"model.init_args.init_from": ["fail", odd, "ok", "kill"]},
                         "metrics": ["test/depth/abs_rel"]})
    out = tmp_path / "out"
    results = run_local(sweep, out, python=str(fake), echo=lambda *_: None, write_reports=False)
    rows = read_results(results)
    failed, odd_row, _, killed = (rows[p.id] for p in expand(sweep, out)[1])
    assert failed["status"] == "failed" and failed["step"] == "fit" and failed["returncode"] == 3
    assert "fake diffperc fit" in Path(failed["log"]).read_text()
    assert failed["error"] == "RuntimeError: the fake run failed"  # the log's last non-blank line
    assert (killed["status"], killed["returncode"], killed["error"]) == ("failed", -9, "killed by SIGKILL")
    # The odd value reached the program verbatim: no shell in between.
    argv = [json.loads(line) for line in calls.read_text().splitlines()]
    assert [a[0] for a in argv] == ["fit", "fit", "test", "fit", "test", "fit"]
    assert argv[1][argv[1].index("--model.init_args.init_from") + 1] == odd
    assert odd_row["status"] == "ok"
    assert {k: odd_row[k] for k in ("test/depth/abs_rel", "baseline/depth/abs_rel", "compute/train_macs",
                                    "compute/total_train_macs", "compute/test_macs_per_sample",
                                    "model.inference.num_steps", "model.init_from", "trainer.global_step")} == {
        "test/depth/abs_rel": 0.25, "baseline/depth/abs_rel": 0.5, "compute/train_macs": 1000,
        "compute/total_train_macs": 1000, "compute/test_macs_per_sample": 77, "model.inference.num_steps": 2,
        "model.init_from": odd, "trainer.global_step": 3}
    # A rerun retries only the failed points.
    run_local(sweep, out, python=str(fake), echo=lambda *_: None, write_reports=False)
    assert len(calls.read_text().splitlines()) == 8
    assert len(results.read_text().splitlines()) == 6


def _event_file(folder: Path, steps) -> Path:
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(folder)) as writer:
        for step in steps:
            writer.add_scalar("train/loss", 1.0 / (step + 1), step)
    (path,) = folder.glob("events.out.tfevents.*")
    return path


def _event_steps(path: Path) -> list[int]:
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    return [e.step for e in EventFileLoader(str(path)).Load() if e.summary.value]


def test_local_launcher_resumes_a_killed_point_and_cuts_its_stale_events(tmp_path):
    calls = tmp_path / "calls.jsonl"
    fake = tmp_path / "fake_python"
    fake.write_text(f"#!{sys.executable}\n" + _FAKE_DIFFPERC.format(calls=str(calls)))
    fake.chmod(0o755)
    sweep = parse_sweep({"base": [str(QUICKSTART)], "set": {"trainer.max_steps": 8}})
    out = tmp_path / "out"
    (point,) = expand(sweep, out)[1]
    # A killed attempt: no result row, a last.ckpt of step 4, events logged up to step 6, the last record torn.
    (point.run_dir / "checkpoints").mkdir(parents=True)
    torch.save({"global_step": 4}, point.run_dir / "checkpoints" / "last.ckpt")
    events = _event_file(point.run_dir, range(7))
    events.write_bytes(events.read_bytes() + b"\x20\x00\x00\x00\x00\x00\x00\x00torn")
    run_local(sweep, out, python=str(fake), echo=lambda *_: None, write_reports=False)
    argv = json.loads(calls.read_text().splitlines()[0])
    assert argv[0] == "fit" and argv[argv.index("--ckpt_path") + 1] == "last"
    # Lightning logs optimizer step k as step k - 1, so the resumed run logs 4, 5, ... again: 0..3 are kept.
    assert _event_steps(events) == [0, 1, 2, 3]
    assert f"# resuming from {point.run_dir / 'checkpoints' / 'last.ckpt'} (step 4); cut 1 event file(s)" in (
        point.run_dir / "sweep.log").read_text()
    assert read_results(out / "results.jsonl")[point.id]["status"] == "ok"


def test_slurm_launcher_writes_array_scripts_and_submits_in_order(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "sbatch.log"
    sbatch = bin_dir / "sbatch"
    sbatch.write_text(f"#!{sys.executable}\nimport sys\nopen({str(log)!r}, 'a').write(' '.join(sys.argv[1:]) + '\\n')\n"
                      f"print(str(40 + sum(1 for _ in open({str(log)!r}))) + ';cluster')\n")
    sbatch.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    sweep = parse_sweep({"base": [str(QUICKSTART)], "grid": {"trainer.max_steps": [1, 2, 3]},
                         "from": {"base": [str(QUICKSTART)]}, "slurm": {"time": "01:00:00", "setup": ["echo hi"]}})
    up_script, script = write_slurm(sweep, tmp_path / "out", submit=True, echo=lambda *_: None)
    text = script.read_text()
    assert "#SBATCH --array=0-2" in text and "#SBATCH --time=01:00:00" in text
    # Requeued 3 minutes before the time limit, as configs/slurm/example.sbatch; the venv's `diffperc` on PATH.
    lines = text.splitlines()
    assert {"#SBATCH --signal=SIGUSR1@180", "#SBATCH --requeue"} <= set(lines)
    assert lines[lines.index("set -euo pipefail") + 2: lines.index("set -euo pipefail") + 4] == [
        "source .venv/bin/activate", "echo hi"]
    assert text.count("    srun diffperc fit ") == 3 and text.count("    srun diffperc test ") == 3
    # Each srun line parses, its pre-emption checkpoint going to the point's own folder.
    fit_line = next(line for line in lines if line.startswith("    srun diffperc fit "))
    cfg = _parse(_config_args(shlex.split(fit_line)[2:]))
    point = expand(sweep, tmp_path / "out")[1][0]
    assert cfg["trainer.default_root_dir"] == str(point.run_dir) and cfg["trainer.max_steps"] == 1
    assert "#SBATCH --array=0-0" in up_script.read_text()
    assert log.read_text().splitlines() == [f"--parsable {up_script}", f"--parsable --dependency=afterok:41 {script}"]


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*no last checkpoint available")
def test_tiny_sweep_end_to_end_interrupted_rerun_redoes_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    echoed = []
    bad_point = {"model.init_args.backbone.name": "nope", "model.init_args.backbone.depth": 1}  # no such preset

    def _sweep(depths: list) -> dict:
        points = [bad_point] + [{"model.init_args.backbone.depth": d} for d in depths]
        return {"base": [str(QUICKSTART)], "set": TINY, "points": points, "metrics": ["test/depth/abs_rel"]}

    def _fits() -> list[str]:
        found = [line.split("]")[0][1:] for line in echoed if "] fit: " in line]
        echoed.clear()
        return found

    # 1. `diffperc sweep run`, "interrupted" after the first good point: it runs every point, then exits non-zero
    # naming the failed one, and the report lists it with the error line of its log.
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(json.dumps(_sweep([1])))
    bad, one = expand(load_sweep(sweep_file), out)[1]
    with pytest.raises(SystemExit) as failure:
        main(["run", str(sweep_file), "--launcher", "inline", "--out", str(out)])
    echoed += capsys.readouterr().out.splitlines()
    assert _fits() == [bad.id, one.id]
    error = "Unknown model preset 'nope' (`--model.backbone.name`). Known presets: DiT-S/2"
    assert str(failure.value.code).startswith("1 of 2 sweep points failed")
    assert f"\n  {bad.id} (fit): diffperc fit: error: {error}" in str(failure.value.code)
    rows = read_results(out / "results.jsonl")
    code = rows[bad.id]["returncode"]
    assert rows[bad.id]["status"] == "failed" and code > 0
    assert rows[bad.id]["error"].startswith(f"diffperc fit: error: {error}")  # the log's last meaningful line
    assert f"| `{bad.id}` | fit | {code} | diffperc fit: error: {error}" in (out / "report" / "report.md").read_text()
    row = rows[one.id]
    net = _tiny_net()
    x, t = torch.zeros(4, 6, 16, 16), torch.zeros(4, dtype=torch.long)
    assert row["compute/train_macs"] == 3 * count_train_macs(net, x, t, t)  # 3 steps, batch 4
    assert row["trainer.global_step"] == 3 and row["model.backbone.depth"] == 1
    assert 0 < row["test/depth/abs_rel"] < 10 and row["compute/test_macs_per_sample"] > 0
    stamps = {f: f.stat().st_mtime_ns for f in one.run_dir.rglob("*") if f.is_file()}

    # 2. The full sweep: only the failed point and the new one run; depth 1 is untouched.
    full = parse_sweep(_sweep([1, 2]))
    run_local(full, out, inline=True, echo=echoed.append)
    assert _fits() == [bad.id, expand(full, out)[1][2].id]
    assert {f: f.stat().st_mtime_ns for f in one.run_dir.rglob("*") if f.is_file()} == stamps
    # 3. Once more: nothing but the bad point is attempted, and the report covers the two ok rows.
    lines = len((out / "results.jsonl").read_text().splitlines())
    run_local(full, out, inline=True, echo=echoed.append)
    assert _fits() == [bad.id] and len((out / "results.jsonl").read_text().splitlines()) == lines + 1
    assert (out / "report" / "report.md").is_file()
    assert len((out / "report" / "rows.csv").read_text().splitlines()) == 1 + 2


def _tiny_net():
    from diffperc.codecs import PixelCodec
    from diffperc.lit import Backbone, PerceptionFinetuning
    from diffperc.tasks import DepthTask

    module = PerceptionFinetuning(task=DepthTask(min_depth=0.1, max_depth=30.0), codec=PixelCodec(),
                                  backbone=Backbone(name="t2", patch_size=4, hidden_size=32, depth=1, num_heads=2),
                                  image_size=16)
    return module.net


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*no last checkpoint available", "ignore:The dirpath has changed")
def test_sweep_tts_grid_on_one_checkpoint(tmp_path):
    sets = [f"{k}={json.dumps(v)}" for k, v in TINY.items()]
    fit = parse_sweep({"base": [str(QUICKSTART)], "set": {**TINY, "model.init_args.backbone.depth": 1}})
    run_local(fit, tmp_path / "fit", inline=True, echo=lambda *_: None, write_reports=False)
    (point,) = expand(fit, tmp_path / "fit")[1]
    ckpt = point.run_dir / "checkpoints" / "last.ckpt"
    # 0 steps is a bad value: those two points fail, the four others run, and then the command exits non-zero.
    with pytest.raises(SystemExit) as failure:
        main(["tts", "--base", str(QUICKSTART), *[a for s in sets for a in ("--set", s)],
              "--set", "model.init_args.backbone.depth=1", "--ckpt_path", str(ckpt),
              "--steps", "0", "1", "2", "--ensemble", "1", "3", "--out", str(tmp_path / "tts")])
    rows = {(r["model.inference.num_steps"], r["model.inference.ensemble_size"]): r
            for r in read_results(tmp_path / "tts" / "results.jsonl").values() if r["status"] == "ok"}
    assert sorted(rows) == [(1, 1), (1, 3), (2, 1), (2, 3)]
    error = "`--model.inference.num_steps` must be >= 1, got 0"
    failed = [r for r in read_results(tmp_path / "tts" / "results.jsonl").values() if r["status"] == "failed"]
    assert [(r["step"], r["overrides"]["model.inference.num_steps"]) for r in failed] == [("tts", 0), ("tts", 0)]
    assert all(error in r["error"] for r in failed), [r["error"] for r in failed]
    assert str(failure.value.code).startswith("2 of 6 sweep points failed")
    report_md = (tmp_path / "tts" / "report" / "report.md").read_text()
    assert all(f"| `{r['point']}` | tts |" in report_md for r in failed) and report_md.count(error) == 2
    # Pixel codec: test MACs are N x steps x one forward; the training MACs are the checkpoint's run's.
    one = rows[(1, 1)]["compute/test_macs_per_sample"]
    assert [rows[k]["compute/test_macs_per_sample"] for k in sorted(rows)] == [one, 3 * one, 2 * one, 6 * one]
    train = read_results(tmp_path / "fit" / "results.jsonl")[point.id]["compute/train_macs"]
    assert all(r["compute/train_macs"] == train for r in rows.values())
