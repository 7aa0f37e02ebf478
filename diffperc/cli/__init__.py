"""The ``diffperc`` command: LightningCLI (``fit validate test predict``) over diffperc's modules and data, and the
project commands (``models upcycle export download cache-latents sweep laws``), all jsonargparse. Every command takes
``--config FILE`` (repeatable; later files win) and ``--print_config``, and spells its flags ``--flag_name``.

To run: ``diffperc fit --config configs/quickstart/depth.yaml`` (``--print_config`` shows the resolved config);
``diffperc --help`` lists the commands. ``--help`` of the project commands never imports torch or Lightning.

Here: ``main`` and the dispatch to a command; ``commands.py`` (the project commands' flags and parsers),
``lightning.py`` (``DiffpercCLI`` and its parser and config saving), ``errors.py`` (one-line user errors).
"""

import os
import sys
from argparse import ArgumentError

# Idle OpenMP threads sleep instead of spinning: with data workers or other jobs on the same cores, spinning threads
# slowed training steps several-fold in our measurements. Set OMP_WAIT_POLICY yourself to override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from diffperc.cli.commands import (  # noqa: E402
    LIGHTNING_COMMANDS,
    PROJECT_COMMANDS,
    ProjectCommand,
    command_parser,
    export_main,
    parse_command,
    run_project_command,
)
from diffperc.cli.errors import user_error  # noqa: E402
from diffperc.cli.lightning import LIGHTNING_CLASSES, lightning_class, with_default_callbacks  # noqa: E402

__all__ = [
    "LIGHTNING_COMMANDS",
    "PROJECT_COMMANDS",
    "ProjectCommand",
    "command_parser",
    "export_main",
    "main",
    "parse_command",
    "run_project_command",
    "user_error",
    "with_default_callbacks",
]

DEBUG_ENV = "DIFFPERC_DEBUG"  # `DIFFPERC_DEBUG=1 diffperc ...` (or `--debug`): full tracebacks for every error


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
    lightning_class("DiffpercCLI")(args=args, parser_kwargs=raising)


def __getattr__(name: str) -> type:
    # `from diffperc.cli import DiffpercCLI` (PEP 562): the Lightning classes are made on first use.
    if name in LIGHTNING_CLASSES:
        return lightning_class(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
