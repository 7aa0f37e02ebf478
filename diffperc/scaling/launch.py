"""The local launchers of a sweep: each point's plain ``diffperc fit/test`` command lines, run one after another in
subprocesses (``--launcher local``) or in this process (``inline``), each point's row appended to ``results.jsonl``.

run_local(load_sweep("sweeps/tiny/model_size.yaml"), "runs/sweeps/tiny/model_size", inline=True)
"""

import contextlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from diffperc.scaling.report import report
from diffperc.scaling.results import RESULTS, failed_row, read_results, row_from_run
from diffperc.scaling.resume import prepare_resume
from diffperc.scaling.spec import Point, Sweep, expand
from diffperc.utils import append_jsonl

_MACS_CALLBACK = "diffperc.callbacks.macs.MACsCounter"


# ---------------------------------------------------------------------------------------------------------------
#                                             Command lines
# ---------------------------------------------------------------------------------------------------------------
def _cli_value(value: Any) -> str:
    """A YAML value as jsonargparse reads it from the command line."""
    if isinstance(value, str):
        return value
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(value)


def _display_path(path: Path) -> str:
    with contextlib.suppress(ValueError):
        return str(path.resolve().relative_to(Path.cwd()))
    return str(path)


def _args(point: Point, subcommand: str) -> list[str]:
    args = [subcommand]
    for path in point.base_paths:
        args += ["--config", _display_path(path)]
    for key, value in point.overrides.items():
        args += [f"--{key}", _cli_value(value)]
    # One run directory per point: <save_dir>/<name>/ (TensorBoardLogger and CSVLogger both take these three).
    args += ["--trainer.logger.init_args.save_dir", _display_path(point.run_dir.parent),
             "--trainer.logger.init_args.name", point.run_dir.name, "--trainer.logger.init_args.version", ""]
    if point.add_macs_counter:
        args.append(f"--trainer.callbacks+={_MACS_CALLBACK}")
    return args


def command_lines(point: Point) -> list[tuple[str, list[str]]]:
    """The ``(step, argv)`` pairs of a point, argv without the leading ``diffperc``: fit resumes its own last
    checkpoint if there is one (``--ckpt_path last``), then test (of that run's ``last.ckpt``); tts tests its
    checkpoint."""
    if point.command == "tts":
        return [("tts", [*_args(point, "test"), "--ckpt_path", _display_path(Path(point.checkpoint))])]
    steps = [("fit", [*_args(point, "fit"), "--ckpt_path", "last"])]
    if point.test:
        last = _display_path(point.run_dir / "checkpoints" / "last.ckpt")
        steps.append(("test", [*_args(point, "test"), "--ckpt_path", last]))
    return steps


def shell_line(argv: list[str], program: str = "diffperc") -> str:
    """``argv`` as one pasteable shell line, every value quoted."""
    return shlex.join([program, *argv])


# ---------------------------------------------------------------------------------------------------------------
#                                             Local launcher
# ---------------------------------------------------------------------------------------------------------------
def _run_step(argv: list[str], log: Path, inline: bool, python: str) -> int:
    """Runs one ``diffperc`` command; returns its exit code. Values are passed as an argv list, never via a shell."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        f.write(f"$ {shell_line(argv)}\n")
        f.flush()
        if not inline:
            return subprocess.run([python, "-m", "diffperc", *argv], stdout=f, stderr=subprocess.STDOUT).returncode
        try:
            with contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
                _run_inline(argv)
            return 0
        except SystemExit as err:  # argument errors exit through jsonargparse
            code = err.code if isinstance(err.code, int) else 1
            return code
        except Exception:
            f.write(traceback.format_exc())
            return 1


def _run_inline(argv: list[str]) -> None:
    """``diffperc <argv>`` in this process. A test is run as ``trainer.test(model, ckpt_path=...)`` on a CLI built
    with ``run=False``: LightningCLI's ``test --ckpt_path`` would replace the model arguments by the checkpoint's
    saved hyper-parameters, undoing overrides such as ``--model.init_args.inference.num_steps``."""
    import torch

    from diffperc.cli import DiffpercCLI
    from diffperc.cli import main as cli_main

    if argv[0] != "test":
        cli_main(argv)
        return
    i = argv.index("--ckpt_path")
    torch.set_float32_matmul_precision("high")
    cli = DiffpercCLI(args=argv[1:i] + argv[i + 2:], run=False)
    cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path=argv[i + 1])


# Lines of a failed command's output that do not say what went wrong: jsonargparse's restatement of the input and
# of the union it tried (`Given value: Namespace(...)`, `- Expected a <class 'NoneType'>`), Python warnings (they
# name a source line: `/path/x.py:21: ...`) and hints in parentheses (`(... --debug shows the traceback)`).
_NOISE = re.compile(r"^(Given value|Subtypes:|Errors:|Does not validate against any of the Union subtypes|"
                    r"- Expected a <class 'NoneType'>|tip: |/\S+\.py:\d+: |\(.*\)$)")


def _error_line(log: Path, returncode: int | None) -> str:
    """What a failed step's log says went wrong: its last meaningful line (after the step's `$ diffperc` line), e.g.
    the exception message a traceback ends with; or the signal that killed it."""
    if returncode is not None and returncode < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-returncode).name}"
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return f"no log ({log})"
    starts = [i for i, line in enumerate(lines) if line.startswith("$ ")]
    output = [line.strip() for line in lines[starts[-1] + 1 if starts else 0:]]
    meaningful = [line for line in output if line and not _NOISE.match(line)]
    return meaningful[-1].removeprefix("- ")[:300] if meaningful else f"no output (return code {returncode})"



def _run_point(point: Point, results: Path, done: dict, inline: bool, python: str, echo) -> dict:
    upstream_row = done.get(point.upstream.id) if point.upstream else None
    log = point.run_dir / "sweep.log"
    start = time.perf_counter()
    if point.upstream is not None and (upstream_row is None or upstream_row.get("status") != "ok"):
        error = f"upstream point {point.upstream.id} failed" + (
            f": {upstream_row['error']}" if upstream_row and upstream_row.get("error") else "")
        row = failed_row(point, "upstream", None, point.upstream.run_dir / "sweep.log", error)
        append_jsonl(results, row)
        return row
    for step, argv in command_lines(point):
        if step == "test" and not (point.run_dir / "checkpoints" / "last.ckpt").is_file():
            code = None
            error = "fit wrote no checkpoints/last.ckpt: the base config needs ModelCheckpoint(save_last=True)"
        else:
            if step == "fit":
                log.parent.mkdir(parents=True, exist_ok=True)
                prepare_resume(point, log, echo)
            echo(f"[{point.id}] {step}: {shell_line(argv)}")
            code = _run_step(argv, log, inline, python)
            error = _error_line(log, code) if code != 0 else None
        if code != 0:
            row = failed_row(point, step, code, log, error, start)
            echo(f"[{point.id}] FAILED at {step} (return code {code}): {error}; log: {log}")
            append_jsonl(results, row)
            return row
    row = row_from_run(point, upstream_row)
    if row is None:
        row = failed_row(point, "collect", 0, log, f"no train_macs.json / test_metrics.json in {point.run_dir}", start)
        echo(f"[{point.id}] FAILED: {row['error']}")
    else:
        row["wall_s"] = round(time.perf_counter() - start, 2)
    append_jsonl(results, row)
    return row


def run_local(
    sweep: Sweep,
    out: str | os.PathLike,
    inline: bool = False,
    upstream_dir: str | os.PathLike | None = None,
    python: str = sys.executable,
    echo=print,
    write_reports: bool = True,
) -> Path:
    """Runs every unfinished point one after another, appends each result row to ``<out>/results.jsonl``, and
    writes the report. A point is finished when its row in ``results.jsonl`` has status ``ok``; failed points are
    retried on a rerun, and a failing point never stops the sweep.

    Args:
        sweep: The sweep.
        out: Output folder (run directories, ``results.jsonl``, ``report/``).
        inline: Run each ``diffperc`` command in this process (no interpreter start-up per command, which matters
            for tiny CPU sweeps; a hard crash stops the sweep) instead of a subprocess.
        upstream_dir: Where the ``from:`` stage runs (default ``<out>/from``); sweeps sharing it share runs.
        python: Interpreter for the subprocesses.
        echo: Progress printer.
        write_reports: Fit and write ``<out>/report`` at the end.

    Returns:
        The path of ``results.jsonl``.
    """
    missing = sweep.missing_bases()
    if missing:
        raise FileNotFoundError(f"sweep file {sweep.source}: base config(s) not found: {[str(m) for m in missing]}")
    out = Path(out)
    upstream_points, points = expand(sweep, out, upstream_dir)
    stages = [(upstream_points, upstream_points[0].run_dir.parent / RESULTS)] if upstream_points else []
    stages.append((points, out / RESULTS))
    done: dict[str, dict] = {}
    for stage_points, results in stages:
        previous = read_results(results)
        for i, point in enumerate(stage_points):
            if previous.get(point.id, {}).get("status") == "ok":
                done[point.id] = previous[point.id]
                continue
            echo(f"[{i + 1}/{len(stage_points)}] {point.id}")
            done[point.id] = _run_point(point, results, done, inline, python, echo)
    if write_reports:
        report(sweep, out, upstream_dir)
    return out / RESULTS

