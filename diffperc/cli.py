"""The ``diffperc`` command: LightningCLI (``fit validate test predict``) over diffperc's modules and data.

To run: ``diffperc fit --config configs/quickstart/depth.yaml`` (``--print_config`` shows the resolved config).
"""

import importlib
import sys

import torch
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI


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


# Project subcommands that need no Trainer: name -> "module:function" taking the remaining argv.
PROJECT_COMMANDS = {
    "models": "diffperc.models.__main__:main",
    "export": "diffperc.export:main",
    "upcycle": "diffperc.upcycling:main",
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
