"""diffperc's LightningCLI: ``DiffpercCLI``, the parser that prints and saves each command's config with the model's
default callbacks (``DiffpercArgumentParser``), and ``SaveRunConfig``. Each subclasses its Lightning class and is put
together from the methods below and that base on first use (``from diffperc.cli import DiffpercCLI``, or ``diffperc
fit``), so that ``diffperc --help`` and the project commands never import Lightning."""

import importlib
import sys
from pathlib import Path

import yaml
from jsonargparse import ArgumentParser, Namespace

from diffperc.cli.commands import LIGHTNING_COMMANDS, LIGHTNING_EPILOG
from diffperc.cli.errors import check_config_files

#: Trainer arguments that count batches (an int) or a fraction of them (a float).
_FLOAT_OR_INT_TRAINER_ARGS = ("limit_train_batches", "limit_val_batches", "limit_test_batches", "limit_predict_batches")


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

    A command serialises its config twice (the model's hyper-parameters, then ``config.yaml``), each dump ~0.2 s of
    re-serialising every class-typed value: the second dump of the same, unchanged config returns the first's text.
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
        check_config_files(argv)
        self._chosen_subcommand = argv[0] if argv and argv[0] in LIGHTNING_COMMANDS and run else None
        kwargs.setdefault("parser_class", lightning_class("DiffpercArgumentParser"))
        kwargs.setdefault("save_config_callback", lightning_class("SaveRunConfig"))
        # A resumed fit rewrites config.yaml, and a rerun of test its config_test.yaml; a fresh fit never gets there.
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        parser_kwargs = dict(kwargs.pop("parser_kwargs", None) or {})
        # No abbreviations: argparse would take `--trainer.max_step 3` for `--trainer.max_steps 3`, so a misspelt
        # flag could silently set another one.
        parser_kwargs.setdefault("allow_abbrev", False)
        for subcommand in LIGHTNING_COMMANDS:
            parser_kwargs[subcommand] = {
                "epilog": LIGHTNING_EPILOG,
                "allow_abbrev": False,
                **parser_kwargs.get(subcommand, {}),
            }
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

    def add_arguments_to_parser(self, parser) -> None:
        # The Trainer types `limit_{train,val,test,predict}_batches` as `float | int | None` and jsonargparse tries
        # the union's types in order, so `limit_val_batches: 1` (one batch) became 1.0 (every batch). Tried int
        # first, 1 stays one batch and 1.0 or 0.25 stay fractions, as in Lightning's own signature docs.
        for name in _FLOAT_OR_INT_TRAINER_ARGS:
            action = parser._option_string_actions.get(f"--trainer.{name}")
            if action is not None:
                action._typehint = int | float | None

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


LIGHTNING_CLASSES = {
    "DiffpercCLI": (_DiffpercCLI, "LightningCLI"),
    "SaveRunConfig": (_SaveRunConfig, "SaveConfigCallback"),
    "DiffpercArgumentParser": (_DiffpercArgumentParser, "LightningArgumentParser"),
}


def lightning_class(name: str) -> type:
    """``name`` (a key of ``LIGHTNING_CLASSES``): its methods over its base in ``lightning.pytorch.cli``, made once
    and kept as ``diffperc.cli.<name>``."""
    package = sys.modules["diffperc.cli"]
    if name not in vars(package):
        from lightning.pytorch import cli

        methods, base = LIGHTNING_CLASSES[name]
        namespace = {"__module__": "diffperc.cli", "__qualname__": name, "__doc__": methods.__doc__}
        setattr(package, name, type(name, (methods, getattr(cli, base)), namespace))
    return getattr(package, name)


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
