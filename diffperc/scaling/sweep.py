"""Scaling sweeps: base configs x a grid of CLI overrides, run point by point, then power-law fits and a report.

To run: ``diffperc sweep run sweeps/tiny/model_size.yaml`` (``--dry_run`` prints the plain ``diffperc fit/test``
command lines), ``diffperc sweep report FILE --out DIR`` (collect after a SLURM run), and
``diffperc sweep tts --base CFG --ckpt_path CKPT --steps 1 2 5 --ensemble 1 2 5`` (test-time grid).
The pieces: ``spec`` (sweep files, points), ``launch`` (command lines, local runs), ``resume``, ``slurm``,
``results`` (rows) and ``report``; their public names are importable from here too.
"""

from dataclasses import replace
from pathlib import Path

import yaml

from diffperc.scaling.launch import command_lines, run_local, shell_line
from diffperc.scaling.report import report
from diffperc.scaling.results import collect, failed_rows, read_results, row_from_run
from diffperc.scaling.resume import trim_event_files
from diffperc.scaling.slurm import write_slurm
from diffperc.scaling.spec import Point, Sweep, expand, load_sweep, normalize_key, parse_sweep

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
  slurm: {time: "24:00:00", gpus-per-node: 8, setup: ["module load cuda"]}   # #SBATCH options; `setup`: shell
                                          # lines run after `source .venv/bin/activate`. With --signal=SIGUSR1@180
                                          # and --requeue a task near its time limit is requeued and resumes

Rows (one JSON line per point in <out>/results.jsonl; the last line of a point wins) hold:
  point, status (ok | failed), run_dir, overrides (as written), and each override under its dotted key with every
  `init_args` segment removed (`model.init_args.backbone.name` -> `model.backbone.name`); tags;
  compute/train_macs and trainer.global_step (the run's train_macs.json, written by MACsCounter);
  from test_metrics.json: task, and its `metrics` block as is: test/<task>/<name> for each metric (e.g.
  test/depth/abs_rel, for one task or several), baseline/<task>/<name>, compute/test_macs_per_sample (several tasks:
  compute/<task>/test_macs_per_sample); model.inference.<field> (the settings used);
  with `from`: from (the upstream point), from/<key> for its overrides and compute/train_macs, and
  compute/total_train_macs = upstream + own training MACs (a tts row's compute/train_macs is its checkpoint's);
  failed rows: step (fit | test | collect | upstream), returncode, log, and error (the log's last meaningful line).
`diffperc sweep run` and `diffperc sweep tts` exit non-zero when a point failed, after running all the others; the
report lists the failed points. A rerun retries them, and a fit that was killed resumes from its last.ckpt.
Keys in x, metrics and group_by may be written with or without `init_args`.
"""


def _tts_sweep(args) -> Sweep:
    grid = {"model.inference.num_steps": args.steps, "model.inference.ensemble_size": args.ensemble}
    overrides = {}
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"`--set {item}`: expected KEY=VALUE")
        overrides[key] = yaml.safe_load(value)
    data = {"base": args.base, "command": "tts", "checkpoint": args.ckpt_path, "grid": grid, "set": overrides,
            "metrics": args.metrics or []}
    sweep = parse_sweep(data)
    return replace(sweep, name="tts", out=args.out or str(Path(args.ckpt_path).resolve().parent.parent / "tts"))


def main(argv: list[str] | None = None) -> None:
    """``diffperc sweep {run,report,tts} ...``; the flags are declared in ``diffperc.cli`` (``diffperc sweep
    --help`` prints them with ``SWEEP_DOC``)."""
    from diffperc.cli import parse_command

    parsed = parse_command("sweep", argv)
    action, args = parsed.action, parsed[parsed.action]
    sweep = _tts_sweep(args) if action == "tts" else load_sweep(args.file)  # errors name the file or flag
    out = Path(args.out) if args.out else sweep.default_out()
    upstream_dir = args.get("upstream_dir")
    if action == "report":
        report(sweep, out, upstream_dir)
        return
    if args.dry_run:
        upstream_points, points = expand(sweep, out, upstream_dir)
        for point in upstream_points + points:
            print(f"# {point.id}")
            for _, argv in command_lines(point):
                print(shell_line(argv))
        return
    launcher = "inline" if action == "tts" else args.launcher
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
