"""The ``diffperc`` command: LightningCLI (``fit validate test predict``) over diffperc's modules and data, and the
project commands (``models upcycle export download cache-latents sweep laws``), all jsonargparse. Every command takes
``--config FILE`` (repeatable; later files win) and ``--print_config``, and spells its flags ``--flag_name``.

To run: ``diffperc fit --config configs/quickstart/depth.yaml`` (``--print_config`` shows the resolved config);
``diffperc --help`` lists the commands. ``--help`` of the project commands never imports torch or Lightning.
"""

import argparse
import ast
import importlib
import linecache
import os
import re
import sys
from argparse import ArgumentError
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from jsonargparse import ActionConfigFile, ArgumentParser, DefaultHelpFormatter, Namespace

from diffperc.utils import DISK_ERRNOS

# Idle OpenMP threads sleep instead of spinning: with data workers or other jobs on the same cores, spinning threads
# slowed training steps several-fold in our measurements. Set OMP_WAIT_POLICY yourself to override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

DEBUG_ENV = "DIFFPERC_DEBUG"  # `DIFFPERC_DEBUG=1 diffperc ...` (or `--debug`): full tracebacks for every error

LIGHTNING_COMMANDS = {
    "fit": "Trains a model: a run folder with checkpoints, config.yaml, TensorBoard logs and train_macs.json.",
    "validate": "Scores a trained model on the validation set.",
    "test": "Scores a trained model on the test set (test_metrics.json).",
    "predict": "Writes predictions for the test set or your own images (--data.init_args.images FOLDER).",
}

_LIGHTNING_EPILOG = (
    "The options of --model and --data depend on their class: `diffperc fit --model.help "
    "diffperc.lit.PerceptionFinetuning` (or diffperc.lit.DiffusionPretraining) and `--data.help "
    "diffperc.data.DepthDataModule` list them. `--print_config` after the other flags prints the resolved config, "
    "with the callbacks the model adds by default listed under trainer.callbacks."
)


# ------------------------------------------------------------------------------------------------- project commands
@dataclass(frozen=True)
class ProjectCommand:
    """A command that needs no Trainer: its flags (declared here, so ``--help`` and ``--print_config`` answer without
    importing the code that runs it), the ``module:function`` that runs it, and the spellings it still accepts."""

    help: str
    main: str  # called with the arguments after the command name; parses them with `parse_command`
    add_arguments: Callable[[ArgumentParser], None]
    renamed: dict[str, str] = field(default_factory=dict)  # a flag of the previous release -> today's
    takes_base: bool = False  # `--config TRAINING.yaml` of the previous release means `--base TRAINING.yaml`


class _HelpFormatter(DefaultHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """jsonargparse's help, with the epilog's lines (tables, examples) kept as written."""


def _module_text(path: str, name: str) -> str:
    """The string constant ``name`` of the diffperc module at ``path``, read from its source: the documents that
    ``diffperc sweep --help`` and ``diffperc laws plan --help`` print live beside their code, whose imports (scipy)
    would take seconds."""
    for node in ast.parse((Path(__file__).parent / path).read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(target, "id", None) == name for target in node.targets):
            return ast.literal_eval(node.value)
    raise LookupError(f"no {name} in diffperc/{path}")


def _new_parser(prog: str, description: str, epilog: str | None = None) -> ArgumentParser:
    parser = ArgumentParser(
        prog=prog, description=description, epilog=epilog, exit_on_error=False, formatter_class=_HelpFormatter
    )
    parser.add_argument(
        "-c",
        "--config",
        action=ActionConfigFile,
        help="A YAML file of this command's flags (repeatable; later files win). --print_config writes one.",
    )
    return parser


def _models_arguments(parser: ArgumentParser) -> None:
    # No default: an empty command line must not replace the names a --config file gives.
    parser.add_argument(
        "names", type=str, nargs="*", default=argparse.SUPPRESS, help="presets to show (default: all), e.g. t1 a1"
    )


def _upcycle_arguments(parser: ArgumentParser) -> None:
    parser.add_argument(
        "--ckpt_path", type=str, required=True, help="the dense checkpoint: a diffperc .ckpt, DiT .pt or .safetensors"
    )
    parser.add_argument("--out", type=str, required=True, help="the mixture-of-experts checkpoint to write")
    parser.add_argument("--num_experts", type=int, default=8, help="experts E per block")
    parser.add_argument("--top_k", type=int, default=2, help="experts per token k, in 1..num_experts")
    parser.add_argument("--balance_loss_coef", type=float, default=0.01, help="weight of the MoE balance loss")
    parser.add_argument("--router_init_std", type=float, default=0.02, help="std of the router's initial weights")
    parser.add_argument("--seed", type=int, default=0, help="seed of the router initialisation")


def _export_arguments(parser: ArgumentParser) -> None:
    parser.add_argument(
        "--ckpt_path", type=str, required=True, help="a fine-tuning run's checkpoint, e.g. <run>/checkpoints/last.ckpt"
    )
    parser.add_argument(
        "--out", type=str, required=True, help="the model folder to write (config.json, model.safetensors, README.md)"
    )
    parser.add_argument(
        "--push_to_hub", type=str | None, default=None, help="also upload the folder to this Hub repository (org/name)"
    )


def _download_arguments(parser: ArgumentParser) -> None:
    from diffperc.hub import OFFICIAL, default_dir

    parser.add_argument(
        "name",
        type=str,
        help=f"an official checkpoint ({', '.join(OFFICIAL)}) or a Hugging Face Hub id (facebook/DiT-XL-2-256, "
        "stabilityai/sd-vae-ft-mse)",
    )
    parser.add_argument(
        "--out",
        type=str | None,
        default=None,
        help=f"folder for an official checkpoint (default {default_dir()}: $HF_HOME/diffperc, else "
        "~/.cache/diffperc), or the Hugging Face cache folder for a Hub id (default: HF_HUB_CACHE, HF_HOME/hub)",
    )
    parser.add_argument("--subfolder", type=str | None, default=None, help="Hub id only: fetch just this folder")
    parser.add_argument("--revision", type=str | None, default=None, help="Hub id only: branch, tag or commit")


def _base_argument(parser: ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--base",
        type=str,
        nargs="+",
        action="extend",
        required=True,
        help=f"training configs (YAML) {what}, composed as repeated `diffperc fit --config` composes them (later "
        "files win); `--base a.yaml b.yaml` or `--base a.yaml --base b.yaml`",
    )


def _cache_latents_arguments(parser: ArgumentParser) -> None:
    _base_argument(parser, "whose data set (data.init_args.<split>) and codec (model.init_args.codec) are cached")
    parser.add_argument("--out", type=str, required=True, help="folder for the shards and manifest.json")
    parser.add_argument(
        "--split", default="train", choices=["train", "val", "test"], help="which data set of the config to encode"
    )
    parser.add_argument("--shard_size", type=int, default=1024, help="samples per shard")
    parser.add_argument("--batch_size", type=int, default=64, help="images per codec call")
    parser.add_argument("--num_workers", type=int, default=4, help="data loader processes")
    parser.add_argument("--device", type=str | None, default=None, help="where the codec runs (default: cuda if any)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"], help="latent dtype")
    parser.add_argument("--no_flip", action="store_true", help="do not store the flipped images' latents")
    parser.add_argument("--limit", type=int | None, default=None, help="cache only the first LIMIT samples")


def _sweep_arguments(parser: ArgumentParser) -> None:
    commands = parser.add_subcommands(dest="action")
    run = _new_parser("diffperc sweep run", "Runs (or prints, or submits) every point, then fits and reports.")
    run.add_argument("file", type=str, help="the sweep YAML, e.g. sweeps/tiny/model_size.yaml")
    run.add_argument("--out", type=str | None, default=None, help="output folder (default: the file's out:)")
    run.add_argument("--dry_run", action="store_true", help="print the `diffperc fit/test` command lines only")
    run.add_argument(
        "--launcher",
        default="local",
        choices=["local", "inline", "slurm"],
        help="local: a subprocess per command; inline: in this process; slurm: an sbatch array",
    )
    run.add_argument("--submit", action="store_true", help="with --launcher slurm: also run sbatch")
    run.add_argument(
        "--upstream_dir",
        type=str | None,
        default=None,
        help="where the from: stage runs (default <out>/from); sweeps may share it",
    )
    commands.add_subcommand("run", run, help="run every point, then fit and report")

    report = _new_parser("diffperc sweep report", "Collects finished runs into results.jsonl, fits and reports.")
    report.add_argument("file", type=str, help="the sweep YAML")
    report.add_argument("--out", type=str | None, default=None, help="output folder (default: the file's out:)")
    report.add_argument("--upstream_dir", type=str | None, default=None, help="where the from: stage ran")
    commands.add_subcommand("report", report, help="collect finished runs (e.g. after SLURM), fit and report")

    tts = _new_parser("diffperc sweep tts", "Tests one checkpoint over a (num_steps x ensemble_size) grid, in process.")
    _base_argument(tts, "that build the checkpoint's model and test data")
    tts.add_argument("--ckpt_path", type=str, required=True, help="the trained checkpoint (.ckpt) to test")
    tts.add_argument("--steps", type=int, nargs="+", default=[1, 2, 5, 10, 20], help="DDIM steps")
    tts.add_argument("--ensemble", type=int, nargs="+", default=[1, 2, 5], help="ensemble sizes N")
    tts.add_argument(
        "--set", type=str, nargs="+", action="extend", metavar="KEY=VALUE", help="overrides of every point"
    )
    tts.add_argument("--metrics", type=str, nargs="*", help="row keys to fit (default: every test/... metric)")
    tts.add_argument("--out", type=str | None, default=None, help="output folder (default: <checkpoint's run>/tts)")
    tts.add_argument("--dry_run", action="store_true", help="print the `diffperc test` command lines only")
    commands.add_subcommand("tts", tts, help="test one checkpoint over a (num_steps x ensemble_size) grid")


def _laws_arguments(parser: ArgumentParser) -> None:
    commands = parser.add_subcommands(dest="action")
    plan = _new_parser(
        "diffperc laws plan",
        "Prints the configuration that a training law and a test-time law predict is best under the budgets,\n"
        "with the predicted metric and its 95% band. This is an extrapolation beyond the measured runs.",
        epilog=_module_text("scaling/laws.py", "PLAN_DOC"),
    )
    plan.add_argument(
        "--train_report", type=str, required=True, help="a training sweep's --out folder (or its report folder)"
    )
    plan.add_argument(
        "--tts_report", type=str, required=True, help="a test-time sweep's --out folder (or its report folder)"
    )
    plan.add_argument("--train_budget", type=float, required=True, help="training MACs to spend")
    plan.add_argument("--inference_budget", type=float, required=True, help="test MACs per image to spend at most")
    plan.add_argument(
        "--metric",
        type=str | None,
        default=None,
        help="row key to minimise (default: test/<task>/abs_rel if present, else the first test/... key both "
        "sweeps have)",
    )
    commands.add_subcommand(
        "plan", plan, help="the configuration the laws predict is best under a training and an inference budget"
    )


PROJECT_COMMANDS = {
    "models": ProjectCommand(
        "Prints every model preset with its parameter count and forward MACs per image.",
        "diffperc.models.__main__:main",
        _models_arguments,
    ),
    "upcycle": ProjectCommand(
        "Upcycles a dense checkpoint into a mixture of experts, to fine-tune with --model.init_args.init_from.",
        "diffperc.upcycling:main",
        _upcycle_arguments,
        renamed={"--src": "--ckpt_path"},
    ),
    "export": ProjectCommand(
        "Exports a fine-tuned model as a folder that PerceptionPipeline.from_pretrained loads.",
        "diffperc.cli:export_main",
        _export_arguments,
        renamed={"--ckpt": "--ckpt_path"},
    ),
    "download": ProjectCommand(
        "Fetches pretrained weights and prints the flag that uses them (on stdout; messages on stderr).",
        "diffperc.hub:main",
        _download_arguments,
    ),
    "cache-latents": ProjectCommand(
        "Encodes a training config's data set once through its frozen codec into latent shards.",
        "diffperc.data.latents:main",
        _cache_latents_arguments,
        takes_base=True,
    ),
    "sweep": ProjectCommand(
        "Scaling sweeps: a grid of overrides run as `diffperc fit/test` runs, then power-law fits.",
        "diffperc.scaling.sweep:main",
        _sweep_arguments,
        renamed={"--checkpoint": "--ckpt_path", "--dry-run": "--dry_run", "--upstream-dir": "--upstream_dir"},
        takes_base=True,
    ),
    "laws": ProjectCommand(
        "Plans training and test-time compute with fitted scaling laws.",
        "diffperc.scaling.laws:main",
        _laws_arguments,
        renamed={
            "--train-report": "--train_report",
            "--tts-report": "--tts_report",
            "--train-budget": "--train_budget",
            "--inference-budget": "--inference_budget",
        },
    ),
}


def command_parser(name: str) -> ArgumentParser:
    """The jsonargparse parser of project command ``name`` (built without importing the code that runs it)."""
    command = PROJECT_COMMANDS[name]
    epilog = _module_text("scaling/sweep.py", "SWEEP_DOC") if name == "sweep" else None
    parser = _new_parser(f"diffperc {name}", command.help, epilog)
    command.add_arguments(parser)
    return parser


def parse_command(name: str, argv: list[str] | None = None) -> Namespace:
    """The flags of project command ``name`` parsed from ``argv`` (the arguments after the command name; default
    ``sys.argv[1:]``). ``--help`` and ``--print_config`` print and exit; a bad flag raises ``ArgumentError``, which
    ``main`` prints in one line."""
    argv = _current_spelling(name, [str(a) for a in (sys.argv[1:] if argv is None else argv)])
    _check_config_files(argv, "the command's flags")
    return command_parser(name).parse_args(argv)


def export_main(argv: list[str] | None = None) -> None:
    """``diffperc export``: writes the model folder of a fine-tuning checkpoint (``diffperc.export.export_model``)."""
    args = parse_command("export", argv)
    from diffperc.export import export_model

    out = export_model(args.ckpt_path, args.out, args.push_to_hub)
    pushed = f" and pushed it to https://huggingface.co/{args.push_to_hub}" if args.push_to_hub else ""
    print(f"Wrote {out}{pushed}; load it with `diffperc.PerceptionPipeline.from_pretrained({str(out)!r})`")


def _current_spelling(name: str, argv: list[str]) -> list[str]:
    """``argv`` with the flags of the previous release spelled as today, each replacement noted in one line.

    Also a training config given as ``--config`` to a command that takes it as ``--base`` (``cache-latents``,
    ``sweep tts``): ``--config`` is now the command's own config, and a training config holds ``trainer:``,
    ``model:`` or ``data:`` instead of the command's flags.
    """
    command, out = PROJECT_COMMANDS[name], []
    for i, arg in enumerate(argv):
        flag, sep, value = arg.partition("=")
        new = command.renamed.get(flag)
        note = f"`{flag}` is now `{new}`"
        if new is None and command.takes_base and flag in ("--config", "-c"):
            given = value if sep else (argv[i + 1] if i + 1 < len(argv) else "")
            new = "--base" if _is_training_config(given) else None
            note = f"a training config is now given as `--base`, not `{flag}` ({given})"
        if new is None:
            out.append(arg)
            continue
        print(f"diffperc {name}: {note}; the old spelling goes in the next release", file=sys.stderr)
        out.append(f"{new}{sep}{value}")
    return out


def _is_training_config(path: str) -> bool:
    try:
        content = yaml.safe_load(Path(path).read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    return isinstance(content, dict) and bool({"trainer", "model", "data"} & set(content))


def _asks_to_print(argv: list[str]) -> bool:
    """Whether ``argv`` asks for ``--help`` or ``--print_config`` (answered by the parser alone)."""
    return any(a in ("-h", "--help") or a.split("=", 1)[0] == "--print_config" for a in argv)


def run_project_command(name: str, argv: list[str]) -> None:
    """Runs project command ``name``; ``--help`` and ``--print_config`` are answered before its code is imported."""
    if _asks_to_print(argv):
        parse_command(name, argv)
    module, function = PROJECT_COMMANDS[name].main.split(":")
    getattr(importlib.import_module(module), function)(argv)


# ------------------------------------------------------------------------------------------------------ the command
def main(args: list[str] | None = None) -> None:
    """``diffperc <command> ...``: a user error (a bad flag value, a missing file or folder, an untrained run, a full
    disk) prints one line naming the flag or file and exits with status 2; ``--debug`` or ``DIFFPERC_DEBUG=1`` keeps
    the full traceback. Any other exception is a bug and keeps its traceback."""
    debug = os.environ.get(DEBUG_ENV, "") not in ("", "0")
    argv = [str(a) for a in (sys.argv[1:] if args is None else args)]
    if "--debug" in argv:
        debug, argv = True, [a for a in argv if a != "--debug"]
        if args is None:  # Lightning's DDP launcher starts the other processes with sys.argv and this environment
            sys.argv, os.environ[DEBUG_ENV] = [sys.argv[0], *argv], "1"
    try:
        _dispatch(argv, None if args is None else argv)
    except Exception as err:
        message = None if debug else user_error(err)
        if message is None:
            raise
        command = f"diffperc {argv[0]}" if argv and not argv[0].startswith("-") else "diffperc"
        print(f"{command}: error: {message}\n(`{DEBUG_ENV}=1` or `--debug` shows the traceback)", file=sys.stderr)
        sys.exit(2)


def _dispatch(argv: list[str], args: list[str] | None) -> None:
    commands = [*LIGHTNING_COMMANDS, *PROJECT_COMMANDS]
    if not argv or argv[0] in ("-h", "--help"):
        if not argv:
            raise ArgumentError(None, f"expected a command: {', '.join(commands)} (`diffperc --help`)")
        print(_overview())
        return
    if argv[0] in PROJECT_COMMANDS:
        run_project_command(argv[0], argv[1:])
        return
    if not argv[0].startswith("-") and argv[0] not in LIGHTNING_COMMANDS:
        raise ArgumentError(None, f"unknown command {argv[0]!r}: the commands are {', '.join(commands)}")
    _run_lightning(args)


def _overview() -> str:
    """``diffperc --help``: the commands (Lightning's and the project's) and what every command shares."""
    width = max(map(len, [*LIGHTNING_COMMANDS, *PROJECT_COMMANDS])) + 2
    lines = [
        "usage: diffperc [--debug] <command> [--config FILE] [--print_config] [--flag_name VALUE ...]",
        "",
        (__doc__ or "").split("\n\n")[0].replace("``", "`"),
        "",
        "Lightning commands (a Trainer, a model and a data module, e.g. --config configs/quickstart/depth.yaml):",
    ]
    lines += [f"  {name:<{width}}{text}" for name, text in LIGHTNING_COMMANDS.items()]
    lines += ["", "Project commands:"]
    lines += [f"  {name:<{width}}{command.help}" for name, command in PROJECT_COMMANDS.items()]
    lines += [
        "",
        "`diffperc <command> --help` lists a command's flags; `--print_config` prints the command's resolved config,",
        "which `--config FILE` takes back. `--debug` (or DIFFPERC_DEBUG=1) shows full tracebacks.",
    ]
    return "\n".join(lines)


def _run_lightning(args: list[str] | None) -> None:
    import torch

    torch.set_float32_matmul_precision("high")
    # Parse errors raise an ArgumentError for `main` to report, instead of printing the whole usage.
    raising = {"exit_on_error": False, **{command: {"exit_on_error": False} for command in LIGHTNING_COMMANDS}}
    _lightning_class("DiffpercCLI")(args=args, parser_kwargs=raising)


# ----------------------------------------------------------------------------------------------------- user errors
def user_error(err: BaseException) -> str | None:
    """The message of an error the user can fix, or None for a bug.

    User errors: a command-line or config parse error, Lightning's ``MisconfigurationException``, a missing,
    existing or inaccessible file, a full disk, and a ``ValueError`` raised by a ``raise`` statement in diffperc
    (its messages name the flag). A ``ValueError`` from torch or NumPy, an ``AssertionError`` or a ``RuntimeError``
    is a bug. jsonargparse wraps an error raised while it builds a class (twice for a class inside a class): the
    innermost one is reported.
    """
    while not isinstance(err, ArgumentError) and err.__cause__ is not None and _raised_in(err, "jsonargparse"):
        err = err.__cause__
    if isinstance(err, ArgumentError):
        return _short_parse_error(str(err))
    file_errors = (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError)
    lightning = sys.modules.get("lightning.fabric.utilities.exceptions")  # never imported: never raised
    misconfiguration = (lightning.MisconfigurationException,) if lightning is not None else ()
    if isinstance(err, (*misconfiguration, *file_errors)) or (isinstance(err, OSError) and err.errno in DISK_ERRNOS):
        return str(err)
    if isinstance(err, ValueError) and _raised_in(err, str(Path(__file__).parent), statement="raise "):
        return str(err)
    return None


def _raised_in(err: BaseException, where: str, statement: str = "") -> bool:
    """Whether ``err`` was raised in a file whose path contains ``where``, by a line starting with ``statement``."""
    tb = err.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    filename = tb.tb_frame.f_code.co_filename
    return where in filename and linecache.getline(filename, tb.tb_lineno).lstrip().startswith(statement)


# jsonargparse's report of a failed parse lists every type a value could have had; these lines are that noise.
_PARSE_NOISE = re.compile(
    r"(Does not validate against any of the Union subtypes|Subtypes: |Errors:$|Given value( type)?: "
    r"|Expected a (<class '[^']*'>|\S+)$|Expected a path but .* either not accessible or invalid$)"
)


def _short_parse_error(text: str) -> str:
    """jsonargparse's parse error as one line: ``--<key>`` (class path): what is wrong."""
    keys, lines, class_path = [], [], None
    for line in text.splitlines():
        line = line.strip().removeprefix("- ").strip()
        key = re.match(r'Parser key "([^"]+)":\s*(.*)$', line)
        if key:
            keys.append(key[1])
            line = key[2]
        problem = re.match(r"Problem with given class_path '([^']+)':$", line)
        if problem:
            class_path = problem[1]
        elif line and not _PARSE_NOISE.match(line):
            lines.append(line)
    if not keys:
        return "; ".join(lines) or text.strip()
    where = f"`--{'.'.join(keys)}`" + (f" ({class_path})" if class_path else "")
    return f"{where}: {'; '.join(lines) or text.strip()}"


def _check_config_files(argv: list[str], keys: str = "keys such as `trainer:`, `model:` and `data:`") -> None:
    """Each ``--config FILE`` must be a YAML mapping; jsonargparse's errors for a binary or non-YAML file don't name
    it. Values that are not files are left to jsonargparse (a missing file, a YAML string)."""
    values = [b for a, b in zip(argv, argv[1:]) if a in ("--config", "-c")]
    values += [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    for value in values:
        if not Path(value).is_file():
            continue
        try:
            text = Path(value).read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"`--config {value}` is not a YAML file: it holds binary data, not UTF-8 text") from None
        try:
            content = yaml.safe_load(text)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ValueError(f"`--config {value}` is not valid YAML{at}: {problem}") from None
        if content is not None and not isinstance(content, dict):
            raise ValueError(f"`--config {value}` holds a YAML {type(content).__name__}, not {keys}")
    _check_bases(values)


def _check_bases(values: list[str]) -> None:
    """A recipe that holds only what differs from its base names the files that go before it on its first line
    (``# base: configs/depth_xl.yaml``); given without them it would run a half-configured model."""
    for i, value in enumerate(values):
        path = Path(value)
        first = path.read_text(errors="replace").split("\n", 1)[0] if path.is_file() else ""
        if not first.startswith("# base:"):
            continue
        bases = [b.strip() for b in first.removeprefix("# base:").split(",") if b.strip()]
        given = {Path(v).resolve() for v in values[:i]}
        # A base is named from the repository folder: relative to the working folder or to a folder above the recipe.
        places = [Path.cwd(), *path.resolve().parents]
        missing = [b for b in bases if not any((place / b).resolve() in given for place in places)]
        if missing:
            chain = " ".join(f"--config {b}" for b in [*bases, value])
            raise ValueError(
                f"`--config {value}` holds what differs from {', '.join(bases)}: give its bases first, e.g. `{chain}`"
            )


# -------------------------------------------------------------------------------------------------- LightningCLI
# `DiffpercCLI`, `SaveRunConfig` and `DiffpercArgumentParser` subclass Lightning's classes. Each is put together from
# the methods below and its Lightning base on first use (`from diffperc.cli import DiffpercCLI`, or `diffperc fit`),
# so that `diffperc --help` and the project commands never import Lightning.
class _SaveRunConfig:
    """Saves the resolved config in the run folder: ``config.yaml`` for fit, ``config_<stage>.yaml`` for validate,
    test and predict, so scoring a run never rewrites the record of how it was trained."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        name = getattr(stage, "value", stage)  # Lightning passes a TrainerFn: "fit", "validate", "test", "predict"
        self.config_filename = "config.yaml" if name == "fit" else f"config_{name}.yaml"
        super().setup(trainer, pl_module, stage)


class _DiffpercArgumentParser:
    """LightningCLI's parser; the config it prints (``--print_config``) and saves (``config.yaml``) lists the
    callbacks the model adds by default in ``trainer.callbacks`` (see ``with_default_callbacks``).

    A command serialises its config twice (the model's hyper-parameters, then ``config.yaml``): the second dump of
    an unchanged config returns the first one's text. Both are ~0.2 s each of re-serialising every class-typed value.
    """

    _last_dump: tuple | None = None  # (the namespace, a copy of it, the dump's options, the text)
    validated: Namespace | None = None  # the command's config, once parsed (so validated) and completed

    def dump(self, namespace: Namespace, *args, **kwargs) -> str:
        # The config was validated when it was parsed; validating it again for every dump (config.yaml, the model's
        # hyper-parameters) cost about half a second per command. `--print_config` dumps before that validation.
        if namespace is self.validated:
            kwargs.pop("skip_check", None)
            kwargs["skip_validation"] = True
        elif "skip_check" not in kwargs:
            kwargs.setdefault("skip_validation", True)
        options = (args, sorted(kwargs.items()))
        last = self._last_dump
        if last is not None and last[0] is namespace and last[2] == options and last[1] == namespace:
            return last[3]
        text = super().dump(with_default_callbacks(namespace), *args, **kwargs)
        self._last_dump = (namespace, namespace.clone(), options, text)
        return text


class _DiffpercCLI:
    """LightningCLI with diffperc's defaults: any LightningModule / DataModule by ``class_path``, each command's config
    saved in the run directory (`SaveRunConfig`), the model's default callbacks in ``trainer.callbacks`` (shown by
    ``--print_config``), a fresh ``fit`` refused in a folder that holds a run."""

    def __init__(self, args=None, run: bool = True, **kwargs):
        from lightning.pytorch import LightningDataModule, LightningModule

        given = args is None or isinstance(args, list)
        argv = [str(a) for a in (sys.argv[1:] if args is None else args)] if given else []
        _check_config_files(argv)
        self._chosen_subcommand = argv[0] if argv and argv[0] in LIGHTNING_COMMANDS and run else None
        kwargs.setdefault("parser_class", _lightning_class("DiffpercArgumentParser"))
        kwargs.setdefault("save_config_callback", _lightning_class("SaveRunConfig"))
        # A resumed fit rewrites config.yaml, and a rerun of test its config_test.yaml; a fresh fit never gets there.
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        parser_kwargs = dict(kwargs.pop("parser_kwargs", None) or {})
        for subcommand in LIGHTNING_COMMANDS:
            parser_kwargs[subcommand] = {"epilog": _LIGHTNING_EPILOG, **parser_kwargs.get(subcommand, {})}
        super().__init__(
            LightningModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            args=args,
            run=run,
            auto_configure_optimizers=False,
            parser_kwargs=parser_kwargs,
            **kwargs,
        )

    def _add_subcommands(self, parser, **kwargs) -> None:
        # `diffperc fit ...` builds the parser of `fit` alone: Lightning builds all four (each from the Trainer's,
        # the model's and the data's signatures), which cost ~0.2 s of every command. `--help` and a misspelt
        # command still get all four.
        chosen = self._chosen_subcommand
        if chosen is None:
            return super()._add_subcommands(parser, **kwargs)
        every = type(self).subcommands()
        self.subcommands = lambda: {chosen: every[chosen]}
        try:
            super()._add_subcommands(parser, **kwargs)
        finally:
            del self.subcommands

    def _dump_config(self) -> None:
        # The model's hyper-parameters come from the same dump as config.yaml (the parser's dump returns it again).
        subcommand = self.config.get("subcommand")
        if hasattr(self, "config_dump") or not subcommand:
            return super()._dump_config()
        parser = self._parser(subcommand)
        self.config_dump = yaml.safe_load(parser.dump(self.config[subcommand], format="parser_mode", skip_unset=False))

    def _parse_ckpt_path(self) -> None:
        # A missing --ckpt_path file fails here, before anything is written. LightningCLI would also overwrite the
        # model's arguments with the checkpoint's saved hyper-parameters, silently undoing command-line choices such
        # as --model.inference.num_steps at test time; diffperc runs always pass their config, so the command line
        # wins and the checkpoint only provides weights and training state.
        from diffperc.checkpoint_io import LOAD_ERRORS, check_ckpt_path, load_error
        from diffperc.models.pretrained import load_weights_only

        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        check_ckpt_path(ckpt_path)
        if ckpt_path and Path(ckpt_path).is_file():
            try:  # refuse a file weights-only loading rejects before the run directory is written
                load_weights_only(ckpt_path)  # maps zip files; reads legacy (non-zip) files plainly
            except LOAD_ERRORS as err:
                raise load_error(ckpt_path, err) from err

    def before_instantiate_classes(self) -> None:
        # The model's default callbacks become trainer callbacks, as `--print_config` and config.yaml list them.
        subcommand = self.config.get("subcommand")
        if subcommand:
            self.config[subcommand] = with_default_callbacks(self.config[subcommand])
            self._parser(subcommand).validated = self.config[subcommand]
        else:  # run=False: the config of one command, without the subcommand level
            self.config = with_default_callbacks(self.config)
            self.parser.validated = self.config

    def after_instantiate_classes(self) -> None:
        # Before anything is written: --ckpt_path against the model, --trainer.max_steps 0, predict padding.
        from diffperc.lit.checks import check_before_run

        subcommand = self.config.get("subcommand")
        if subcommand:
            ckpt_path = self.config[subcommand].get("ckpt_path")
            check_before_run(subcommand, self.model, self.datamodule, self.trainer, ckpt_path)

    def _require_trained_weights(self) -> None:
        """validate / test / predict score a model: refuse to run on untrained weights.

        Lightning turns ``--ckpt_path last`` without a checkpoint into "no checkpoint" with a warning, and runs on the
        freshly initialised network; a metrics file from it would be a number nobody measured.
        """
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path")
        if ckpt_path == "last":
            if _last_checkpoints(self.trainer):
                return
            folders = sorted({str(d) for d in _checkpoint_dirs(self.trainer)}) or [str(self.trainer.default_root_dir)]
            raise FileNotFoundError(
                f"`--ckpt_path last`: no checkpoint in {', '.join(folders)}. Train first (`diffperc fit` with the "
                "same --config files and overrides), or pass a checkpoint file as `--ckpt_path PATH`."
            )
        if ckpt_path is None and not getattr(self.model, "hparams", {}).get("init_from"):
            raise ValueError(
                f"`diffperc {subcommand}` needs trained weights: pass `--ckpt_path last` (this run's checkpoint), "
                "`--ckpt_path PATH`, or `--model.init_args.init_from PATH`; an untrained model is never scored."
            )

    def _refuse_existing_run(self) -> None:
        """A fit without ``--ckpt_path`` starts over: refuse it in a folder that already holds a run (a checkpoint, or
        ``config.yaml`` beside TensorBoard event files: a fit that logged steps; ``config.yaml`` alone is a fit that
        failed while setting up, and may be rerun).

        Lightning would write ``last-v1.ckpt`` beside ``last.ckpt`` (``--ckpt_path last`` then picks whichever is
        newer), add a second set of TensorBoard curves over the first and replace ``config.yaml``.
        """
        found = {ckpt for folder in _checkpoint_dirs(self.trainer) if folder.is_dir() for ckpt in folder.glob("*.ckpt")}
        run = Path(self.trainer.log_dir) if self.trainer.logger is not None and self.trainer.log_dir else None
        if run is not None and (run / "config.yaml").is_file() and any(run.glob("events.out.tfevents.*")):
            found.add(run / "config.yaml")
        if found:
            folder = run if run is not None else next(iter(found)).parent
            raise FileExistsError(
                f"{folder} already holds a run ({', '.join(sorted(p.name for p in found)[:3])}). Resume it with "
                "`--ckpt_path last`, or start a new run with another `--trainer.logger.init_args.name` or "
                "`--trainer.logger.init_args.version`."
            )

    def before_fit(self) -> None:
        if self.config["fit"].get("ckpt_path") is None:
            self._refuse_existing_run()

    def _before_scoring(self) -> None:
        self._require_trained_weights()
        # Scoring logs its metrics, not the model's hyper-parameters: those are the fit's record (hparams.yaml and
        # the TensorBoard hparams tab), and a logger such as CSVLogger would rewrite hparams.yaml with this run's.
        self.trainer.enable_autolog_hparams = False

    def before_validate(self) -> None:
        self._before_scoring()

    def before_test(self) -> None:
        self._before_scoring()

    def before_predict(self) -> None:
        self._before_scoring()

    def instantiate_trainer(self, **kwargs):
        from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

        from diffperc.checkpoint_io import AtomicCheckpointIO

        trainer = super().instantiate_trainer(**kwargs)
        # Crash-safe (temp file + rename), weights-only checkpoint files unless the config chose another CheckpointIO.
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer


_LIGHTNING_CLASSES = {
    "DiffpercCLI": (_DiffpercCLI, "LightningCLI"),
    "SaveRunConfig": (_SaveRunConfig, "SaveConfigCallback"),
    "DiffpercArgumentParser": (_DiffpercArgumentParser, "LightningArgumentParser"),
}


def _lightning_class(name: str) -> type:
    """``name`` (a key of ``_LIGHTNING_CLASSES``): its methods over its base in ``lightning.pytorch.cli``, made once."""
    if name not in globals():
        from lightning.pytorch import cli

        methods, base = _LIGHTNING_CLASSES[name]
        namespace = {"__module__": __name__, "__qualname__": name, "__doc__": methods.__doc__}
        globals()[name] = type(name, (methods, getattr(cli, base)), namespace)
    return globals()[name]


def __getattr__(name: str) -> type:
    # `from diffperc.cli import DiffpercCLI` (PEP 562): the Lightning classes are made on first use.
    if name in _LIGHTNING_CLASSES:
        return _lightning_class(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def with_default_callbacks(cfg: Namespace) -> Namespace:
    """One command's config with the model's default callbacks added to ``trainer.callbacks``: those its class's
    ``default_callbacks`` lists (from its init arguments), less the classes the list already holds, so a callback of
    the user's wins over the default of its class and none is added twice. Other configs are returned as they are."""
    from lightning.pytorch.callbacks import ProgressBar

    from diffperc.lit.base import DiffusionModule

    model = cfg.get("model") if isinstance(cfg, Namespace) else None
    class_path = model.get("class_path") if isinstance(model, Namespace) else None
    module_class = _import_class(class_path) if class_path else None
    if not (isinstance(module_class, type) and issubclass(module_class, DiffusionModule)):
        return cfg  # no model yet (a template), or one that is not diffperc's
    if not isinstance(cfg.get("trainer"), Namespace):
        return cfg

    given = cfg.get("trainer.callbacks") or []
    given = given if isinstance(given, list) else [given]
    present = {_import_class(c.class_path) if isinstance(c, Namespace) else type(c) for c in given}
    init_args = model.get("init_args")
    progress_bar = cfg.get("trainer.enable_progress_bar") is not False and not any(
        issubclass(c, ProgressBar) for c in present
    )
    hparams = init_args.as_dict() if isinstance(init_args, Namespace) else {}
    specs = module_class.default_callbacks(hparams, progress_bar=progress_bar)
    missing = [spec for spec in specs if _import_class(spec["class_path"]) not in present]
    if not missing:
        return cfg
    cfg = cfg.clone()
    cfg["trainer.callbacks"] = given + _callbacks_parser().parse_object({"callbacks": missing}).callbacks
    return cfg


def _import_class(class_path: str) -> type:
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _callbacks_parser() -> ArgumentParser:
    """Parses callback entries as ``trainer.callbacks`` holds them: ``class_path`` and every ``init_args`` value."""
    from lightning.pytorch.callbacks import Callback

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--callbacks", type=list[Callback])
    return parser


def _checkpoint_dirs(trainer) -> list[Path]:
    """Where the trainer's ModelCheckpoint callbacks write (the run's ``checkpoints/`` folder by default)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    dirs = []
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint):
            dirs.append(Path(callback._ModelCheckpoint__resolve_ckpt_dir(trainer)))
    return dirs


def _last_checkpoints(trainer) -> list[str]:
    """The files Lightning chooses from for ``ckpt_path="last"``: ``last*.ckpt`` in the checkpoint folders."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    found = []
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint):
            found += callback._find_last_checkpoints(trainer)
    return [path for path in found if Path(path).is_file()]


if __name__ == "__main__":
    main()
