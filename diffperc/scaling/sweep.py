"""Scaling sweeps: base configs x a grid of CLI overrides, run point by point, then power-law fits and a report.

To run: ``diffperc sweep run sweeps/tiny/model_size.yaml`` (``--dry-run`` prints the plain ``diffperc fit/test``
command lines), ``diffperc sweep report FILE --out DIR`` (collect after a SLURM run), and
``diffperc sweep tts --config CFG --checkpoint CKPT --steps 1 2 5 --ensemble 1 2 5`` (test-time grid).
"""

import argparse
import contextlib
import hashlib
import itertools
import json
import os
import re
import shlex
import signal
import struct
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from diffperc.scaling.report import write_report
from diffperc.utils import atomic_write_bytes

__all__ = [
    "Point",
    "Sweep",
    "collect",
    "command_lines",
    "expand",
    "failed_rows",
    "load_sweep",
    "main",
    "normalize_key",
    "parse_sweep",
    "read_results",
    "report",
    "row_from_run",
    "run_local",
    "trim_event_files",
    "write_slurm",
]

SWEEP_DOC = """\
A sweep file (YAML) has these keys; only `base` is required:

  base: [configs/quickstart/depth.yaml]   # one path or a list, composed like repeated --config (last wins).
                                          # A relative path is looked up in the working directory, then in
                                          # each folder above the sweep file (so `configs/...` works anywhere).
  command: fit                            # fit: train, then test the same run; tts: test a checkpoint only
  set: {trainer.max_steps: 200}           # overrides of every point (dotted CLI keys -> values)
  grid:                                   # cartesian product of dotted CLI keys -> value lists
    model.init_args.backbone.name: [t1, t2, t3]
  points:                                 # and/or explicit points (crossed with `grid` when both are given);
    - {model.init_args.image_size: 16, data.init_args.train.init_args.resolution: 16}
    - {model.init_args.image_size: 32, tags: {tokens: 256}}   # `tags`: row values, not passed to the CLI
  seeds: [0, 1]                           # crossed in as --seed_everything
  x: compute/train_macs                   # the fits' x-axis: a row key (below)
  metrics: [test/depth/abs_rel]           # the fitted row keys (default: every test/... key)
  offset: false                           # also fit an irreducible term: y = e + a * x^b
  group_by: [model.diffusion.beta_schedule]   # also fit each group separately (report/<group>/)
  checkpoint: path/to/last.ckpt           # tts only: the checkpoint every point tests
  from:                                   # an upstream stage run first: every point continues one of its runs
    base: [...]                           #   base / set / grid / points / seeds as above (always `fit`)
    test: false                           #   also test the upstream runs
    key: model.init_args.init_from        #   fit: the override that gets the upstream last.ckpt
    inherit: [model.init_args.backbone.name]  # upstream overrides copied into the point (same network)
  out: runs/sweeps/tiny/model_size        # default output folder (else runs/sweeps/<folder>/<file stem>)
  slurm: {time: "24:00:00", gpus-per-node: 8, setup: ["source .venv/bin/activate"]}   # #SBATCH options

Rows (one JSON line per point in <out>/results.jsonl; the last line of a point wins) hold:
  point, status (ok | failed), run_dir, overrides (as written), and each override under its dotted key with every
  `init_args` segment removed (`model.init_args.backbone.name` -> `model.backbone.name`); tags;
  compute/train_macs and trainer.global_step (the run's train_macs.json, written by MACsCounter);
  from test_metrics.json: task, test/<task>/<name> for each metric (e.g. abs_rel -> test/depth/abs_rel),
  baseline/<task>/<name>, compute/test_macs_per_sample, model.inference.<field> (the settings used);
  with `from`: from (the upstream point), from/<key> for its overrides and compute/train_macs, and
  compute/total_train_macs = upstream + own training MACs (a tts row's compute/train_macs is its checkpoint's);
  failed rows: step (fit | test | collect | upstream), returncode, log, and error (the log's last meaningful line).
`diffperc sweep run` and `diffperc sweep tts` exit non-zero when a point failed, after running all the others; the
report lists the failed points. A rerun retries them, and a fit that was killed resumes from its last.ckpt.
Keys in x, metrics and group_by may be written with or without `init_args`.
"""

_COMMANDS = ("fit", "tts")
_TOP_KEYS = {"base", "command", "set", "grid", "points", "seeds", "x", "metrics", "offset", "group_by",
             "checkpoint", "from", "out", "slurm"}
_FROM_KEYS = {"base", "set", "grid", "points", "seeds", "test", "key", "inherit"}
_MACS_CALLBACK = "diffperc.callbacks.macs.MACsCounter"
_RESULTS = "results.jsonl"


# ---------------------------------------------------------------------------------------------------------------
#                                              Sweep files
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Sweep:
    """A parsed sweep file (see ``SWEEP_DOC``)."""

    name: str
    base: list[str]
    base_paths: list[Path]
    command: str = "fit"
    set: dict = field(default_factory=dict)
    grid: dict = field(default_factory=dict)
    points: list = field(default_factory=list)
    seeds: list = field(default_factory=list)
    x: str = "compute/train_macs"
    metrics: list = field(default_factory=list)
    offset: bool = False
    group_by: list = field(default_factory=list)
    checkpoint: str | None = None
    upstream: "Sweep | None" = None
    test: bool = True
    key: str = "model.init_args.init_from"
    inherit: list = field(default_factory=list)
    out: str | None = None
    slurm: dict = field(default_factory=dict)
    source: str = "<sweep>"

    def missing_bases(self) -> list[Path]:
        """Base config files (of this sweep and its upstream stage) that do not exist."""
        missing = [p for p in self.base_paths if not p.is_file()]
        return missing + (self.upstream.missing_bases() if self.upstream else [])

    def default_out(self) -> Path:
        if self.out:
            return Path(self.out)
        src = Path(self.source)
        return Path("runs") / "sweeps" / src.parent.name / src.stem if src.suffix else Path("runs/sweeps") / self.name


@dataclass
class Point:
    """One run of a sweep: its full overrides, its run directory and what it continues."""

    id: str
    command: str
    overrides: dict
    own: dict
    tags: dict
    run_dir: Path
    base_paths: list[Path]
    test: bool = True
    checkpoint: str | None = None
    upstream: "Point | None" = None
    add_macs_counter: bool = True


def load_sweep(path: str | os.PathLike) -> Sweep:
    """Reads and validates a sweep file; errors name the file and the key."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(f"Cannot read sweep file {path}: {err}") from err
    return parse_sweep(data, source=str(path))


def parse_sweep(data: Any, source: str = "<sweep>", _stage: bool = False) -> Sweep:
    """Builds a ``Sweep`` from the mapping a sweep file holds (``source`` names the file in errors)."""
    where = f"sweep file {source}" + (" (`from:`)" if _stage else "")
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be a mapping with at least `base:`")
    unknown = set(data) - (_FROM_KEYS if _stage else _TOP_KEYS)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {sorted(unknown)}; see `diffperc sweep --help`")
    base = data.get("base")
    base = [base] if isinstance(base, str) else base
    if not base or not all(isinstance(b, str) for b in base):
        raise ValueError(f"{where}: `base` must be a config path or a list of them")
    command = data.get("command", "fit")
    if command not in _COMMANDS:
        raise ValueError(f"{where}: `command` must be one of {_COMMANDS}, got {command!r}")
    for key in ("set", "grid"):
        if not isinstance(data.get(key, {}), dict):
            raise ValueError(f"{where}: `{key}` must map dotted CLI keys to values")
    grid = data.get("grid", {})
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ValueError(f"{where}: `grid.{key}` must be a non-empty list of values")
    points = data.get("points", [])
    if not isinstance(points, list) or not all(isinstance(p, dict) for p in points):
        raise ValueError(f"{where}: `points` must be a list of mappings (dotted CLI key -> value)")
    for list_key in ("seeds", "metrics", "group_by", "inherit"):
        if not isinstance(data.get(list_key, []), list):
            raise ValueError(f"{where}: `{list_key}` must be a list")
    upstream = None
    if "from" in data:
        upstream = parse_sweep(data["from"], source, _stage=True)
    if command == "tts" and not (upstream or data.get("checkpoint")):
        raise ValueError(f"{where}: `command: tts` needs `checkpoint:` or a `from:` stage that trains it")
    sweep = Sweep(
        name=Path(source).stem if source != "<sweep>" else "sweep",
        base=list(base),
        base_paths=[_resolve_base(b, source) for b in base],
        command=command,
        set=dict(data.get("set", {})),
        grid=dict(grid),
        points=[dict(p) for p in points],
        seeds=list(data.get("seeds", [])),
        x=str(data.get("x", "compute/test_macs_per_sample" if command == "tts" else "compute/train_macs")),
        metrics=[str(m) for m in data.get("metrics", [])],
        offset=bool(data.get("offset", False)),
        group_by=[str(g) for g in data.get("group_by", [])],
        checkpoint=data.get("checkpoint"),
        upstream=upstream,
        out=data.get("out"),
        slurm=dict(data.get("slurm", {})),
        source=source,
    )
    if _stage:
        sweep.test = bool(data.get("test", False))
        sweep.key = str(data.get("key", "model.init_args.init_from"))
        sweep.inherit = [str(k) for k in data.get("inherit", [])]
    elif upstream is not None:
        sweep.key, sweep.inherit = upstream.key, upstream.inherit
    return sweep


def _resolve_base(entry: str, source: str) -> Path:
    path = Path(entry)
    if path.is_absolute():
        return path
    candidates = [Path.cwd() / path]
    if source != "<sweep>":
        candidates += [folder / path for folder in Path(source).resolve().parents]
    return next((c for c in candidates if c.is_file()), candidates[0])


def normalize_key(key: str) -> str:
    """``model.init_args.backbone.name`` -> ``model.backbone.name``: the row key of an override (and of x/metrics)."""
    return ".".join(part for part in key.split(".") if part != "init_args")


# ---------------------------------------------------------------------------------------------------------------
#                                               Expansion
# ---------------------------------------------------------------------------------------------------------------
def _combinations(sweep: Sweep) -> list[tuple[dict, dict]]:
    """The sweep's own points as (overrides, tags): points x grid x seeds, in file order."""
    keys = list(sweep.grid)
    grid = [dict(zip(keys, values, strict=True)) for values in itertools.product(*(sweep.grid[k] for k in keys))]
    explicit = sweep.points or [{}]
    out = []
    for point, cell in itertools.product(explicit, grid or [{}]):
        point = dict(point)
        tags = point.pop("tags", {}) or {}
        for seed in sweep.seeds or [None]:
            own = {**point, **cell, **({} if seed is None else {"seed_everything": seed})}
            out.append((own, dict(tags)))
    return out


def _slug(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return re.sub(r"[^A-Za-z0-9.]+", "", text.replace("/", "."))[:24]


def _point_id(labelled: dict, identity: dict) -> str:
    digest = hashlib.sha1(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:8]
    parts = dict.fromkeys(f"{k.split('.')[-1]}-{_slug(v)}" for k, v in labelled.items())  # once per name and value
    label = "_".join(parts)[:60]
    return f"{label}-{digest}" if label else digest


def _has_macs_callback(base_paths: list[Path]) -> bool:
    for path in base_paths:
        if not path.is_file():
            continue
        callbacks = ((yaml.safe_load(path.read_text()) or {}).get("trainer") or {}).get("callbacks") or []
        for cb in callbacks if isinstance(callbacks, list) else [callbacks]:
            name = cb.get("class_path", "") if isinstance(cb, dict) else str(cb)
            if name.endswith("MACsCounter"):
                return True
    return False


def expand(sweep: Sweep, out: str | os.PathLike, upstream_dir: str | os.PathLike | None = None) -> tuple[list, list]:
    """Expands a sweep into ``(upstream points, points)``; run directories are ``<out>/<point id>`` and
    ``<upstream_dir or out/from>/<point id>``. A point id is a readable label of the point's own values plus a hash
    of everything that defines the run (base, overrides, upstream), so it is stable across reruns and grid edits."""
    out = Path(out)
    upstream_points: list[Point] = []
    if sweep.upstream is not None:
        up_dir = Path(upstream_dir) if upstream_dir is not None else out / "from"
        upstream_points = _expand_stage(sweep.upstream, "fit", up_dir, [None])
    points = _expand_stage(sweep, sweep.command, out, upstream_points or [None])
    return upstream_points, points


def _expand_stage(sweep: Sweep, command: str, out: Path, upstreams: list) -> list[Point]:
    add_macs = not _has_macs_callback(sweep.base_paths)
    points = []
    for upstream in upstreams:
        for own, tags in _combinations(sweep):
            inherited = {}
            if upstream is not None:
                for key in sweep.inherit:
                    match = [k for k in upstream.overrides if normalize_key(k) == normalize_key(key)]
                    if not match:
                        raise ValueError(f"sweep file {sweep.source}: `from.inherit` key {key!r} is not an override "
                                         f"of upstream point {upstream.id}")
                    inherited[key] = upstream.overrides[match[-1]]
            overrides = {**sweep.set, **inherited, **own}
            checkpoint = sweep.checkpoint
            if upstream is not None:
                checkpoint = str(upstream.run_dir / "checkpoints" / "last.ckpt")
                if command == "fit":
                    overrides[sweep.key] = checkpoint
            # The upstream id stands for its checkpoint path, so the id does not depend on where --out points.
            identity = {"command": command, "base": sweep.base, "test": sweep.test,
                        "overrides": {k: v for k, v in overrides.items() if upstream is None or k != sweep.key},
                        "checkpoint": None if upstream else checkpoint, "upstream": upstream.id if upstream else None}
            point_id = _point_id({**inherited, **own}, identity)
            points.append(Point(point_id, command, overrides, own, tags, out / point_id, sweep.base_paths,
                                sweep.test, checkpoint, upstream, add_macs))
    ids = [p.id for p in points]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise ValueError(f"sweep file {sweep.source}: points {duplicates} are identical; remove the repeats")
    return points


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


def _shell_line(argv: list[str], program: str = "diffperc") -> str:
    return shlex.join([program, *argv])


# ---------------------------------------------------------------------------------------------------------------
#                                                Results
# ---------------------------------------------------------------------------------------------------------------
def _append_row(path: Path, row: dict) -> None:
    """Appends one JSON line in a single O_APPEND write + fsync, so concurrent writers never interleave a line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = (json.dumps(row, sort_keys=True, default=str) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        if os.write(fd, data) != len(data):
            raise OSError(f"short write to {path}")
        os.fsync(fd)
    finally:
        os.close(fd)


def read_results(path: str | os.PathLike) -> dict[str, dict]:
    """Rows of a ``results.jsonl`` by point id (the last line of a point wins; a torn last line is ignored)."""
    rows: dict[str, dict] = {}
    path = Path(path)
    if not path.is_file():
        return rows
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            row = json.loads(line)
            if isinstance(row, dict) and "point" in row:
                rows[row["point"]] = row
    return rows


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def row_from_run(point: Point, upstream_row: dict | None = None) -> dict | None:
    """The result row of a finished point from its run directory, or None when its files are missing."""
    row: dict[str, Any] = {"point": point.id, "status": "ok", "command": point.command,
                           "run_dir": str(point.run_dir), "overrides": point.overrides}
    row.update({normalize_key(k): v for k, v in point.overrides.items()})
    row.update(point.tags)
    train_dir = point.run_dir if point.command == "fit" else Path(point.checkpoint).parent.parent
    train = _read_json(train_dir / "train_macs.json")
    if point.command == "fit" and train is None:
        return None
    if train is not None:
        row["compute/train_macs"] = train.get("compute/train_macs")
        row["trainer.global_step"] = train.get("global_step")
    if point.command == "tts" or point.test:
        metrics = _read_json(point.run_dir / "test_metrics.json")
        if metrics is None:
            return None
        row.update(_metric_keys(metrics))
    if upstream_row is not None:
        row["from"] = upstream_row["point"]
        for key, value in upstream_row.items():
            if key not in ("point", "status", "overrides", "from") and not key.startswith("from/"):
                row[f"from/{key}"] = value
        up_macs = upstream_row.get("compute/train_macs")
        if point.command == "fit" and _is_number(up_macs) and _is_number(row.get("compute/train_macs")):
            row["compute/total_train_macs"] = up_macs + row["compute/train_macs"]
        elif point.command == "tts" and _is_number(up_macs):
            row["compute/total_train_macs"] = up_macs
    elif _is_number(row.get("compute/train_macs")):
        row["compute/total_train_macs"] = row["compute/train_macs"]
    return row


def _metric_keys(metrics: dict) -> dict:
    """test_metrics.json -> row keys: abs_rel -> test/<task>/abs_rel, baseline/x -> baseline/<task>/x, ..."""
    task = metrics.get("task", "task")
    row: dict[str, Any] = {"task": task}
    for key, value in metrics.items():
        if key == "inference" and isinstance(value, dict):
            row.update({f"model.inference.{k}": v for k, v in value.items()})
        elif key.startswith("compute/"):
            row[key] = value
        elif key.startswith("baseline/") and _is_number(value):
            row[f"baseline/{task}/{key.removeprefix('baseline/')}"] = value
        elif _is_number(value):
            row[f"test/{task}/{key}"] = value
    return row


# ---------------------------------------------------------------------------------------------------------------
#                                             Local launcher
# ---------------------------------------------------------------------------------------------------------------
def _run_step(argv: list[str], log: Path, inline: bool, python: str) -> int:
    """Runs one ``diffperc`` command; returns its exit code. Values are passed as an argv list, never via a shell."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        f.write(f"$ {_shell_line(argv)}\n")
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


def _failed(point: Point, step: str, returncode: int | None, log: Path, error: str, start: float | None = None) -> dict:
    row = {"point": point.id, "status": "failed", "step": step, "returncode": returncode, "log": str(log),
           "error": error, "overrides": point.overrides}
    if start is not None:
        row["wall_s"] = round(time.perf_counter() - start, 2)
    return row


def trim_event_files(run_dir: str | os.PathLike, step: int) -> list[Path]:
    """Cuts the TensorBoard event files in ``run_dir`` back to what was logged before ``step``; returns the files cut.

    A fit resumed from a checkpoint of global step ``step`` logs steps ``step, step + 1, ...`` again (Lightning logs
    optimizer step ``k`` as ``k - 1``), so what a killed attempt logged from there on would show twice. Kept records
    are copied byte for byte; a record torn by the kill is dropped. TFRecord framing: length (u64), its CRC (u32),
    the ``Event`` protobuf, its CRC (u32).
    """
    try:
        from tensorboard.compat.proto.event_pb2 import Event
    except ImportError:  # no TensorBoard, so no event files to cut
        return []
    cut = []
    for path in sorted(Path(run_dir).glob("events.out.tfevents.*")):
        data, kept, pos = path.read_bytes(), [], 0
        while pos + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            end = pos + 12 + length + 4
            if end > len(data):
                break
            try:
                event = Event.FromString(data[pos + 12:end - 4])
            except Exception:  # protobuf's DecodeError: garbage from a torn write
                break
            if event.step < step:
                kept.append(data[pos:end])
            pos = end
        trimmed = b"".join(kept)
        if trimmed != data:
            atomic_write_bytes(path, trimmed)
            cut.append(path)
    return cut


def _prepare_resume(point: Point, log: Path, echo) -> None:
    """A point whose run directory holds a last.ckpt (an attempt was killed, or failed after saving) resumes from it
    (``--ckpt_path last``): cut that attempt's TensorBoard events back to the checkpoint's step first."""
    last = point.run_dir / "checkpoints" / "last.ckpt"
    if not last.is_file():
        return
    import torch

    try:
        step = int(torch.load(last, map_location="cpu", weights_only=True, mmap=True)["global_step"])
    except Exception:  # unreadable: the fit itself reports it, naming the file
        return
    cut = trim_event_files(point.run_dir, step)
    message = f"resuming from {last} (step {step})" + (f"; cut {len(cut)} event file(s) back to it" if cut else "")
    echo(f"[{point.id}] {message}")
    with open(log, "a") as f:
        f.write(f"# {message}\n")


def _run_point(point: Point, results: Path, done: dict, inline: bool, python: str, echo) -> dict:
    upstream_row = done.get(point.upstream.id) if point.upstream else None
    log = point.run_dir / "sweep.log"
    start = time.perf_counter()
    if point.upstream is not None and (upstream_row is None or upstream_row.get("status") != "ok"):
        error = f"upstream point {point.upstream.id} failed" + (
            f": {upstream_row['error']}" if upstream_row and upstream_row.get("error") else "")
        row = _failed(point, "upstream", None, point.upstream.run_dir / "sweep.log", error)
        _append_row(results, row)
        return row
    for step, argv in command_lines(point):
        if step == "test" and not (point.run_dir / "checkpoints" / "last.ckpt").is_file():
            code = None
            error = "fit wrote no checkpoints/last.ckpt: the base config needs ModelCheckpoint(save_last=True)"
        else:
            if step == "fit":
                log.parent.mkdir(parents=True, exist_ok=True)
                _prepare_resume(point, log, echo)
            echo(f"[{point.id}] {step}: {_shell_line(argv)}")
            code = _run_step(argv, log, inline, python)
            error = _error_line(log, code) if code != 0 else None
        if code != 0:
            row = _failed(point, step, code, log, error, start)
            echo(f"[{point.id}] FAILED at {step} (return code {code}): {error}; log: {log}")
            _append_row(results, row)
            return row
    row = row_from_run(point, upstream_row)
    if row is None:
        row = _failed(point, "collect", 0, log, f"no train_macs.json / test_metrics.json in {point.run_dir}", start)
        echo(f"[{point.id}] FAILED: {row['error']}")
    else:
        row["wall_s"] = round(time.perf_counter() - start, 2)
    _append_row(results, row)
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
    stages = [(upstream_points, upstream_points[0].run_dir.parent / _RESULTS)] if upstream_points else []
    stages.append((points, out / _RESULTS))
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
    return out / _RESULTS


# ---------------------------------------------------------------------------------------------------------------
#                                             SLURM launcher
# ---------------------------------------------------------------------------------------------------------------
def _sbatch_script(points: list[Point], name: str, log_dir: Path, options: dict) -> str:
    options = dict(options)
    setup = options.pop("setup", [])
    lines = [
        "#!/bin/bash",
        f"# Generated by `diffperc sweep run --launcher slurm`: one array task per point ({len(points)} points).",
        "# srun starts one process per task, and Lightning's SLURMEnvironment reads the ranks from SLURM, so a point",
        "# with --trainer.num_nodes / --trainer.devices runs multi-GPU if --nodes / --ntasks-per-node match them.",
        f"#SBATCH --job-name={name}",
        f"#SBATCH --array=0-{len(points) - 1}",
        f"#SBATCH --output={log_dir}/slurm-%A_%a.log",
    ]
    lines += [f"#SBATCH --{key}={value}" for key, value in options.items()]
    lines += ["set -euo pipefail", f"cd {shlex.quote(str(Path.cwd()))}", *setup, 'case "$SLURM_ARRAY_TASK_ID" in']
    for i, point in enumerate(points):
        lines.append(f"  {i})  # {point.id}")
        lines += [f"    srun {_shell_line(argv)}" for _, argv in command_lines(point)]
        lines.append("    ;;")
    lines += ["esac", ""]
    return "\n".join(lines)


def write_slurm(
    sweep: Sweep,
    out: str | os.PathLike,
    submit: bool = False,
    upstream_dir: str | os.PathLike | None = None,
    echo=print,
) -> list[Path]:
    """Writes ``<out>/sweep.sbatch`` (and ``<out>/from.sbatch`` for a ``from:`` stage), and with ``submit`` runs
    ``sbatch`` on them, the main array depending on the upstream one (``--dependency=afterok``). Collect the
    results afterwards with ``diffperc sweep report FILE --out DIR``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    upstream_points, points = expand(sweep, out, upstream_dir)
    scripts = []
    if upstream_points:
        scripts.append((out / "from.sbatch", _sbatch_script(upstream_points, f"{sweep.name}-from", out, sweep.slurm)))
    scripts.append((out / "sweep.sbatch", _sbatch_script(points, sweep.name, out, sweep.slurm)))
    job_id = None
    for path, text in scripts:
        path.write_text(text)
        echo(f"wrote {path}")
        if submit:
            cmd = ["sbatch", "--parsable", *([f"--dependency=afterok:{job_id}"] if job_id else []), str(path)]
            result = subprocess.run(cmd, capture_output=True, text=True, check=True)
            job_id = result.stdout.strip().split(";")[0]
            echo(f"submitted {path.name}: job {job_id}")
    return [p for p, _ in scripts]


# ---------------------------------------------------------------------------------------------------------------
#                                              Reporting
# ---------------------------------------------------------------------------------------------------------------
def collect(sweep: Sweep, out: str | os.PathLike, upstream_dir: str | os.PathLike | None = None, echo=print) -> list:
    """Adds a row to ``results.jsonl`` for every point whose run finished (e.g. under SLURM) but has no ``ok`` row
    yet, and returns the ok rows of the sweep's points in expansion order."""
    out = Path(out)
    upstream_points, points = expand(sweep, out, upstream_dir)
    done: dict[str, dict] = {}
    for stage_points in (upstream_points, points):
        if not stage_points:
            continue
        results = stage_points[0].run_dir.parent / _RESULTS
        previous = read_results(results)
        for point in stage_points:
            row = previous.get(point.id)
            if row is None or row.get("status") != "ok":
                upstream_row = done.get(point.upstream.id) if point.upstream else None
                row = row_from_run(point, upstream_row) if point.upstream is None or upstream_row else None
                if row is None:
                    echo(f"not finished: {point.id} ({point.run_dir})")
                    continue
                _append_row(results, row)
            done[point.id] = row
    return [done[p.id] for p in points if p.id in done]


def failed_rows(sweep: Sweep, out: str | os.PathLike, upstream_dir: str | os.PathLike | None = None) -> list[dict]:
    """The failed rows (the last row of a point in ``results.jsonl`` has status ``failed``) of the sweep's points,
    upstream stage first, in expansion order."""
    upstream_points, points = expand(sweep, Path(out), upstream_dir)
    failed = []
    for stage_points in (upstream_points, points):
        if stage_points:
            previous = read_results(stage_points[0].run_dir.parent / _RESULTS)
            failed += [previous[p.id] for p in stage_points if previous.get(p.id, {}).get("status") == "failed"]
    return failed


def report(sweep: Sweep, out: str | os.PathLike, upstream_dir: str | os.PathLike | None = None, echo=print) -> Path:
    """Fits ``sweep.metrics`` against ``sweep.x`` over the ok rows and writes ``<out>/report/report.md`` (and one
    report per group under ``<out>/report/<group>/`` with ``group_by``), listing the failed points first."""
    out = Path(out)
    rows = [{k: v for k, v in r.items() if k != "overrides"} for r in collect(sweep, out, upstream_dir, echo)]
    failed = failed_rows(sweep, out, upstream_dir)
    x = normalize_key(sweep.x)
    metrics = [normalize_key(m) for m in sweep.metrics] or sorted(
        {k for r in rows for k in r if k.startswith("test/") and _is_number(r[k])}
    )
    specs = [(x, m, sweep.offset) for m in metrics]
    path = write_report(rows, specs, out / "report", failed=failed)
    groups = [normalize_key(g) for g in sweep.group_by]
    if groups:
        by_group: dict[tuple, list] = {}
        for r in rows:
            by_group.setdefault(tuple(r.get(g) for g in groups), []).append(r)
        for values, group_rows in by_group.items():
            label = "_".join(f"{g.split('.')[-1]}-{_slug(v)}" for g, v in zip(groups, values, strict=True))
            write_report(group_rows, specs, out / "report" / label)
    echo(f"report: {path}")
    return path


# ---------------------------------------------------------------------------------------------------------------
#                                                  CLI
# ---------------------------------------------------------------------------------------------------------------
def _tts_sweep(args: argparse.Namespace) -> Sweep:
    grid = {"model.inference.num_steps": args.steps, "model.inference.ensemble_size": args.ensemble}
    overrides = {}
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"`--set {item}`: expected KEY=VALUE")
        overrides[key] = yaml.safe_load(value)
    data = {"base": args.config, "command": "tts", "checkpoint": args.checkpoint, "grid": grid, "set": overrides,
            "metrics": args.metrics or []}
    sweep = parse_sweep(data)
    return replace(sweep, name="tts", out=args.out or str(Path(args.checkpoint).resolve().parent.parent / "tts"))


def main(argv: list[str] | None = None) -> None:
    """``diffperc sweep {run,report,tts} ...``."""
    parser = argparse.ArgumentParser(
        prog="diffperc sweep",
        description="Scaling sweeps: expand a grid of overrides into `diffperc fit/test` runs, run them, fit laws.",
        epilog=SWEEP_DOC,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="action", required=True)
    run = sub.add_parser("run", help="run (or print, or submit) every point, then fit and report")
    run.add_argument("file", help="sweep YAML, e.g. sweeps/tiny/model_size.yaml")
    run.add_argument("--out", help="output folder (default: the file's `out:` or runs/sweeps/<folder>/<stem>)")
    run.add_argument("--dry-run", action="store_true", help="print the `diffperc fit/test` command lines only")
    run.add_argument("--launcher", choices=("local", "inline", "slurm"), default="local",
                     help="local: one subprocess per command; inline: in this process; slurm: an sbatch array")
    run.add_argument("--submit", action="store_true", help="with --launcher slurm: also run sbatch")
    run.add_argument("--upstream-dir", help="where the `from:` stage runs (default <out>/from); sweeps may share it")
    rep = sub.add_parser("report", help="collect finished runs into results.jsonl, fit and write the report")
    rep.add_argument("file")
    rep.add_argument("--out")
    rep.add_argument("--upstream-dir")
    tts = sub.add_parser("tts", help="test one checkpoint over a (num_steps x ensemble_size) grid, in process")
    tts.add_argument("--config", action="append", required=True, help="config YAML (repeatable, last wins)")
    tts.add_argument("--checkpoint", required=True, help="the trained checkpoint (.ckpt) to evaluate")
    tts.add_argument("--steps", type=int, nargs="+", default=[1, 2, 5, 10, 20], help="DDIM steps")
    tts.add_argument("--ensemble", type=int, nargs="+", default=[1, 2, 5], help="ensemble sizes N")
    tts.add_argument("--set", action="append", metavar="KEY=VALUE", help="an override of every point (repeatable)")
    tts.add_argument("--metrics", nargs="*", help="row keys to fit (default: every test/... metric)")
    tts.add_argument("--out", help="output folder (default: <checkpoint's run>/tts)")
    tts.add_argument("--dry-run", action="store_true", help="print the `diffperc test` command lines only")
    args = parser.parse_args(argv)

    try:
        sweep = _tts_sweep(args) if args.action == "tts" else load_sweep(args.file)
    except ValueError as err:
        raise SystemExit(str(err)) from err
    out = Path(args.out) if args.out else sweep.default_out()
    upstream_dir = getattr(args, "upstream_dir", None)
    if args.action == "report":
        report(sweep, out, upstream_dir)
        return
    if args.dry_run:
        upstream_points, points = expand(sweep, out, upstream_dir)
        for point in upstream_points + points:
            print(f"# {point.id}")
            for _, argv in command_lines(point):
                print(_shell_line(argv))
        return
    launcher = "inline" if args.action == "tts" else args.launcher
    if launcher == "slurm":
        write_slurm(sweep, out, args.submit, upstream_dir)
        return
    run_local(sweep, out, inline=launcher == "inline", upstream_dir=upstream_dir)
    failed = failed_rows(sweep, out, upstream_dir)
    if failed:
        total = sum(len(stage) for stage in expand(sweep, out, upstream_dir))
        lines = [f"  {row['point']} ({row.get('step')}): {row.get('error', '')}" for row in failed]
        raise SystemExit("\n".join([f"{len(failed)} of {total} sweep points failed (logs and errors in "
                                     f"{out / 'report' / 'report.md'}; a rerun retries them):", *lines]))
