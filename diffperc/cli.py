"""The ``diffperc`` command: LightningCLI (``fit validate test predict``) over diffperc's modules and data.

To run: ``diffperc fit --config configs/quickstart/depth.yaml`` (``--print_config`` shows the resolved config).
"""

import importlib
import os
import sys
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning: with data workers or other jobs on the same cores, spinning threads
# slowed training steps several-fold in our measurements. Set OMP_WAIT_POLICY yourself to override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO  # noqa: E402
from lightning.pytorch import LightningDataModule, LightningModule  # noqa: E402
from lightning.pytorch.cli import LightningCLI  # noqa: E402

from diffperc.checkpoint_io import LOAD_ERRORS, AtomicCheckpointIO, check_ckpt_path, load_error


class DiffpercCLI(LightningCLI):
    """LightningCLI with diffperc's defaults: any LightningModule / DataModule by ``class_path``, config saved in
    the run directory (overwritten on a rerun of the same run)."""

    def __init__(self, args=None, run: bool = True, **kwargs):
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
                torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
            except LOAD_ERRORS as err:
                raise load_error(ckpt_path, err) from err

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

    def before_validate(self) -> None:
        self._require_trained_weights()

    def before_test(self) -> None:
        self._require_trained_weights()

    def before_predict(self) -> None:
        self._require_trained_weights()

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
    argv = sys.argv[1:] if args is None else args
    if argv and argv[0] in PROJECT_COMMANDS:
        module, function = PROJECT_COMMANDS[argv[0]].split(":")
        getattr(importlib.import_module(module), function)(argv[1:])
        return
    if argv and argv[0] in ("-h", "--help"):
        print("Project subcommands: " + ", ".join(PROJECT_COMMANDS) + " (diffperc <command> --help)\n")
    torch.set_float32_matmul_precision("high")
    DiffpercCLI(args=args)


if __name__ == "__main__":
    main()
