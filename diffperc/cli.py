"""The ``diffperc`` command: LightningCLI (``fit validate test predict``) over diffperc's modules and data.

To run: ``diffperc fit --config configs/quickstart/depth.yaml`` (``--print_config`` shows the resolved config).
"""

import importlib
import linecache
import os
import re
import sys
from argparse import ArgumentError
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning: with data workers or other jobs on the same cores, spinning threads
# slowed training steps several-fold in our measurements. Set OMP_WAIT_POLICY yourself to override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import yaml  # noqa: E402
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO  # noqa: E402
from lightning.fabric.utilities.exceptions import MisconfigurationException  # noqa: E402
from lightning.pytorch import LightningDataModule, LightningModule  # noqa: E402
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback  # noqa: E402

from diffperc.checkpoint_io import LOAD_ERRORS, AtomicCheckpointIO, check_ckpt_path, load_error
from diffperc.lit.checks import check_before_run
from diffperc.models.pretrained import load_weights_only
from diffperc.utils import DISK_ERRNOS

DEBUG_ENV = "DIFFPERC_DEBUG"  # `DIFFPERC_DEBUG=1 diffperc ...` (or `--debug`): full tracebacks for every error


class SaveRunConfig(SaveConfigCallback):
    """Saves the resolved config in the run folder: ``config.yaml`` for fit, ``config_<stage>.yaml`` for validate,
    test and predict, so scoring a run never rewrites the record of how it was trained."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        name = getattr(stage, "value", stage)  # Lightning passes a TrainerFn: "fit", "validate", "test", "predict"
        self.config_filename = "config.yaml" if name == "fit" else f"config_{name}.yaml"
        super().setup(trainer, pl_module, stage)


class DiffpercCLI(LightningCLI):
    """LightningCLI with diffperc's defaults: any LightningModule / DataModule by ``class_path``, each command's config
    saved in the run directory (`SaveRunConfig`), a fresh ``fit`` refused in a folder that holds a run."""

    def __init__(self, args=None, run: bool = True, **kwargs):
        if args is None or isinstance(args, list):
            _check_config_files([str(a) for a in (sys.argv[1:] if args is None else args)])
        kwargs.setdefault("save_config_callback", SaveRunConfig)
        # A resumed fit rewrites config.yaml, and a rerun of test its config_test.yaml; a fresh fit never gets there.
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(
            LightningModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            args=args,
            run=run,
            auto_configure_optimizers=False,
            **kwargs,
        )

    def _parse_ckpt_path(self) -> None:
        # A missing --ckpt_path file fails here, before anything is written. LightningCLI would also overwrite the
        # model's arguments with the checkpoint's saved hyper-parameters, silently undoing command-line choices such
        # as --model.inference.num_steps at test time; diffperc runs always pass their config, so the command line
        # wins and the checkpoint only provides weights and training state.
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        check_ckpt_path(ckpt_path)
        if ckpt_path and Path(ckpt_path).is_file():
            try:  # refuse a file weights-only loading rejects before the run directory is written
                load_weights_only(ckpt_path)  # maps zip files; reads legacy (non-zip) files plainly
            except LOAD_ERRORS as err:
                raise load_error(ckpt_path, err) from err

    def after_instantiate_classes(self) -> None:
        # Before anything is written: --ckpt_path against the model, --trainer.max_steps 0, predict padding.
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
        trainer = super().instantiate_trainer(**kwargs)
        # Crash-safe (temp file + rename), weights-only checkpoint files unless the config chose another CheckpointIO.
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer


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


# Project subcommands that need no Trainer: name -> "module:function" taking the remaining argv.
PROJECT_COMMANDS = {
    "models": "diffperc.models.__main__:main",
    "export": "diffperc.export:main",
    "upcycle": "diffperc.upcycling:main",
    "sweep": "diffperc.scaling.sweep:main",
    "laws": "diffperc.scaling.laws:main",
    "cache-latents": "diffperc.data.latents:main",
}


def main(args: list[str] | None = None) -> None:
    """``diffperc <command> ...``: a user error (a bad flag value, a missing file or folder, an untrained run, a full
    disk) prints one line naming the flag or file and exits with status 2; ``--debug`` or ``DIFFPERC_DEBUG=1`` keeps
    the full traceback. Any other exception is a bug and keeps its traceback."""
    debug = os.environ.get(DEBUG_ENV, "") not in ("", "0")
    argv = list(sys.argv[1:] if args is None else args)
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


# Parse errors raise an ArgumentError for `main` to report, instead of printing the whole usage.
_RAISE_PARSE_ERRORS = {"exit_on_error": False, **{cmd: {"exit_on_error": False} for cmd in LightningCLI.subcommands()}}


def _dispatch(argv: list[str], args: list[str] | None) -> None:
    if argv and argv[0] in PROJECT_COMMANDS:
        module, function = PROJECT_COMMANDS[argv[0]].split(":")
        getattr(importlib.import_module(module), function)(argv[1:])
        return
    if argv and argv[0] in ("-h", "--help"):
        print("Project subcommands: " + ", ".join(PROJECT_COMMANDS) + " (diffperc <command> --help)\n")
    torch.set_float32_matmul_precision("high")
    DiffpercCLI(args=args, parser_kwargs=_RAISE_PARSE_ERRORS)


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
    if isinstance(err, (MisconfigurationException, *file_errors)) or (
        isinstance(err, OSError) and err.errno in DISK_ERRNOS
    ):
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


def _check_config_files(argv: list[str]) -> None:
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
            raise ValueError(
                f"`--config {value}` holds a YAML {type(content).__name__}, not keys such as `trainer:`, `model:` and "
                "`data:`"
            )


if __name__ == "__main__":
    main()
