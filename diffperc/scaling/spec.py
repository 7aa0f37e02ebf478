"""Sweep files: the ``Sweep`` a YAML file describes (see ``diffperc sweep --help``) and its expansion into ``Point``s,
one run each, with ids that are stable across reruns.

upstream_points, points = expand(load_sweep("sweeps/tiny/model_size.yaml"), "runs/sweeps/tiny/model_size")
"""

import hashlib
import itertools
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

_COMMANDS = ("fit", "tts")
_TOP_KEYS = {"base", "command", "set", "grid", "points", "seeds", "x", "metrics", "offset", "group_by",
             "checkpoint", "from", "out", "slurm"}
_FROM_KEYS = {"base", "set", "grid", "points", "seeds", "test", "key", "inherit"}


# ---------------------------------------------------------------------------------------------------------------
#                                              Sweep files
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Sweep:
    """A parsed sweep file (its keys: ``diffperc sweep --help``, ``SWEEP_DOC`` in ``diffperc.scaling.sweep``)."""

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
    if not path.is_file():
        raise FileNotFoundError(f"Sweep file not found: {path}")
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


def slug(value: Any) -> str:
    """A value as a short label (letters, digits and dots, at most 24) in point ids and report group folders."""
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return re.sub(r"[^A-Za-z0-9.]+", "", text.replace("/", "."))[:24]


def _point_id(labelled: dict, identity: dict) -> str:
    digest = hashlib.sha1(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:8]
    parts = dict.fromkeys(f"{k.split('.')[-1]}-{slug(v)}" for k, v in labelled.items())  # once per name and value
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

