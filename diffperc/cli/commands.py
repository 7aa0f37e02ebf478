"""The project commands (``models upcycle export download cache-latents sweep laws``): each one's flags, declared here
so that ``--help`` and ``--print_config`` answer without importing the code that runs it, its parser, and the flag
spellings of the previous release it still accepts. Also the names of the Lightning commands."""

import argparse
import ast
import importlib
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from jsonargparse import ActionConfigFile, ArgumentParser, DefaultHelpFormatter, Namespace

from diffperc.cli.errors import check_config_files

LIGHTNING_COMMANDS = {
    "fit": "Trains a model: a run folder with checkpoints, config.yaml, TensorBoard logs and train_macs.json.",
    "validate": "Scores a trained model on the validation set.",
    "test": "Scores a trained model on the test set (test_metrics.json).",
    "predict": "Writes predictions for the test set or your own images (--data.init_args.images FOLDER).",
}

LIGHTNING_EPILOG = (
    "The options of --model and --data depend on their class: `diffperc fit --model.help "
    "diffperc.lit.PerceptionFinetuning` (or diffperc.lit.DiffusionPretraining) and `--data.help "
    "diffperc.data.DepthDataModule` list them. `--print_config` after the other flags prints the resolved config, "
    "with the callbacks the model adds by default listed under trainer.callbacks."
)


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
    for node in ast.parse((Path(__file__).parents[1] / path).read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(target, "id", None) == name for target in node.targets):
            return ast.literal_eval(node.value)
    raise LookupError(f"no {name} in diffperc/{path}")


def _new_parser(prog: str, description: str, epilog: str | None = None) -> ArgumentParser:
    parser = ArgumentParser(
        prog=prog,
        description=description,
        epilog=epilog,
        exit_on_error=False,
        formatter_class=_HelpFormatter,
        allow_abbrev=False,  # a misspelt `--num_expert` must not set `--num_experts`
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
        "diffperc.cli.commands:export_main",
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
    check_config_files(argv, "the command's flags")
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
