"""Checks run before a fine-tuning run starts: does a checkpoint fit the configured model, and can the run do anything?

A checkpoint records what it was trained as (``PerceptionFinetuning.on_save_checkpoint``: tasks, prediction type and
noise schedule, codec, network). Loading one into a model built differently fails on the first field that differs,
in one line naming the file, the field and the flag to change, instead of a size-mismatch dump or, where the shapes
happen to agree (a flow checkpoint scored as amodal, v-prediction sampled as epsilon), a wrong score.
The CLI calls ``check_before_run`` before anything is written; ``PerceptionFinetuning`` repeats the checks in its hooks
(``on_load_checkpoint``, ``setup``) for runs started from Python.
"""

import inspect
import math
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path

from diffperc.data.datamodule import predict_folder
from diffperc.data.real.images import DEFAULT_MAX_IMAGE_SIDE
from diffperc.models import moe_config
from diffperc.models.pretrained import architecture_mismatch, load_weights_only, read_records

# Fields compared, in order, with the flag that sets each. The VAE's folder is recorded but not compared: its weights
# travel in the checkpoint, and the folder may move between machines.
_DIFFUSION_FIELDS = ("prediction_type", "num_train_timesteps", "beta_schedule", "beta_start", "beta_end")
_DIT_FIELDS = {
    "patch_size": ("backbone patch_size", "--model.init_args.backbone.patch_size"),
    "hidden_size": ("backbone hidden_size", "--model.init_args.backbone.hidden_size"),
    "depth": ("backbone depth", "--model.init_args.backbone.depth"),
    "num_heads": ("backbone num_heads", "--model.init_args.backbone.num_heads"),
    "mlp_ratio": ("backbone mlp_ratio", "--model.init_args.backbone.name"),
    "learn_sigma": ("backbone learn_sigma", "--model.init_args.backbone.learn_sigma"),
    "in_channels": ("network in_channels", "--model.init_args.codec"),
    "out_channels": ("network out_channels", "--model.init_args.codec"),
    "num_classes": ("label rows (tasks)", "--model.init_args.task"),
    "input_size": ("latent grid input_size", "--model.init_args.image_size"),
}
_MOE_FIELDS = {
    "num_experts": "--model.init_args.backbone.name` (`-<E>E<k>A`) or `--model.init_args.upcycle.num_experts",
    "experts_per_token": "--model.init_args.backbone.name` (`-<E>E<k>A`) or `--model.init_args.upcycle.top_k",
    "num_shared_experts": "--model.init_args.backbone.num_shared_experts",
    "shared_expert_hidden_size": "--model.init_args.backbone.shared_expert_ratio",
    "expert_type": "--model.init_args.backbone.expert_type",
    "normalize_weights": "--model.init_args.backbone.normalize_weights",
}


_MISSING = object()  # an attribute that is absent, or not a plain value


def constructor_record(obj) -> dict:
    """``{"class_path", "init_args"}`` that rebuild ``obj`` (a task, a codec): each argument of its class's
    ``__init__`` that ``obj`` keeps as an attribute of the same name, as a plain value (numbers, strings, lists). An
    argument it keeps under another name, or as an object, is left out: ``diffperc export`` takes those from the run's
    ``config.yaml`` (see ``diffperc.export``)."""
    cls = type(obj)
    init_args = {}
    for name, param in inspect.signature(cls.__init__).parameters.items():
        if name == "self" or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        value = _plain_value(getattr(obj, name, _MISSING))
        if value is not _MISSING:
            init_args[name] = value
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": init_args}


def _plain_value(value):
    """``value`` as JSON-like containers (tuples become lists), or ``_MISSING`` if it holds anything else."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        items = [_plain_value(v) for v in value]
        return _MISSING if any(v is _MISSING for v in items) else items
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        items = {k: _plain_value(v) for k, v in value.items()}
        return _MISSING if any(v is _MISSING for v in items.values()) else items
    return _MISSING


def codec_record(codec) -> dict:
    """What identifies a codec's latent space: class, latent channels, downsample factor, and for a VAE its latent
    scale and folder; plus the constructor arguments the codec keeps (``init_args``, see `constructor_record`)."""
    record = {
        "class": f"{type(codec).__module__}.{type(codec).__qualname__}",
        "init_args": constructor_record(codec)["init_args"],
        "latent_channels": int(codec.latent_channels),
        "downsample": int(codec.downsample),
    }
    if hasattr(codec, "scaling_factor"):
        record["scaling_factor"] = float(codec.scaling_factor)
    vae = getattr(codec, "vae", None)
    if vae is not None:
        record["path"] = vae.config.get("_name_or_path")
    return record


def module_record(module) -> dict:
    """The ``diffperc`` record a fine-tuning checkpoint carries: what rebuilds its network and its tasks without the
    config (used by ``diffperc export`` and ``load_pretrained``) and what a model loading it must match."""
    return {
        "dit_config": module.net.config,
        "moe": moe_config(module.net),
        "task": module.task.name,
        "tasks": [t.name for t in module.tasks],
        "task_args": [constructor_record(t) for t in module.tasks],
        "task_routes": getattr(module.net.x_embedder, "in_channels", None),
        "diffusion": asdict(module.diffusion),
        "codec": codec_record(module.codec),
    }


def _differs(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return not (isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isclose(a, b, rel_tol=1e-9))
    return a != b


def _trained(what: str, stored, configured, flag: str) -> str:
    return f"checkpoint was trained with {what} {stored!r}, the config builds {configured!r} (`{flag}`)"


def _task_mismatch(record: Mapping, module) -> str | None:
    names = [t.name for t in module.tasks]
    stored = record.get("tasks") or ([record["task"]] if record.get("task") else None)
    if stored is None or list(stored) == names:
        return None
    what = "task" if len(stored) == 1 and len(names) == 1 else "tasks"
    if what == "task":
        stored, names = stored[0], names[0]
    return f"checkpoint was trained for {what} {stored!r}, the config builds {names!r} (`--model.init_args.task`)"


def _diffusion_mismatch(stored: Mapping, module) -> str | None:
    configured = asdict(module.diffusion)
    for field in _DIFFUSION_FIELDS:
        if field not in stored:
            continue
        if field in ("beta_start", "beta_end") and configured["beta_schedule"] == "squaredcos_cap_v2":
            continue  # the cosine schedule does not use them
        if _differs(stored[field], configured[field]):
            return _trained(field, stored[field], configured[field], f"--model.init_args.diffusion.{field}")
    return None


def _codec_mismatch(stored: Mapping, module) -> str | None:
    configured = codec_record(module.codec)
    if stored.get("class") and stored["class"] != configured["class"]:
        return _trained("codec", stored["class"], configured["class"], "--model.init_args.codec")
    for field, flag in (
        ("latent_channels", "--model.init_args.codec"),
        ("downsample", "--model.init_args.codec"),
        ("scaling_factor", "--model.init_args.codec.init_args.scaling_factor"),
    ):
        if field in stored and field in configured and _differs(stored[field], configured[field]):
            return _trained(f"codec {field}", stored[field], configured[field], flag)
    return None


def _network_mismatch(record: Mapping, module) -> str | None:
    stored, configured = record.get("dit_config") or {}, module.net.config
    for field, (what, flag) in _DIT_FIELDS.items():
        if field in stored and _differs(stored[field], configured[field]):
            if field == "input_size":  # said in pixels, as the flag takes it
                f = module.codec.downsample
                return _trained("image_size", stored[field] * f, configured[field] * f, flag)
            return _trained(what, stored[field], configured[field], flag)
    if "moe" in record:
        stored_moe, configured_moe = record["moe"], moe_config(module.net)
        if (stored_moe is None) != (configured_moe is None):
            kinds = [f"a mixture of {m['num_experts']} experts" if m else "a dense network"
                     for m in (stored_moe, configured_moe)]
            flag = "--model.init_args.backbone.name` (`-<E>E<k>A`) or `--model.init_args.upcycle"
            return f"checkpoint was trained as {kinds[0]}, the config builds {kinds[1]} (`{flag}`)"
        for field, flag in _MOE_FIELDS.items():
            if stored_moe and field in stored_moe and _differs(stored_moe[field], configured_moe[field]):
                return _trained(f"MoE {field}", stored_moe[field], configured_moe[field], flag)
    routes = getattr(module.net.x_embedder, "in_channels", None)
    if "task_routes" in record and record["task_routes"] != routes:
        return _trained("task input routes", record["task_routes"], routes, "--model.init_args.task")
    return None


def _weights_mismatch(state: Mapping, module) -> str | None:
    """The first tensor of ``state`` (a Lightning ``state_dict``) that the module lacks or holds in another shape,
    with the architecture field behind it when the network's tensors show one."""
    target = module.state_dict()
    wrong = [k for k, v in state.items() if k in target and hasattr(v, "shape") and v.shape != target[k].shape]
    missing = [k for k in target if k not in state]
    unexpected = [k for k in state if k not in target]
    if not (wrong or missing or unexpected):
        return None
    net = {k[4:]: v for k, v in state.items() if k.startswith("net.") and hasattr(v, "shape")}
    field = architecture_mismatch(net, {k[4:]: v for k, v in target.items() if k.startswith("net.")})
    if wrong:
        k = wrong[0]
        detail = f"`{k}` file {tuple(state[k].shape)} vs model {tuple(target[k].shape)}"
    elif missing:
        detail = f"the model's `{missing[0]}` is not in the file ({len(missing)} such tensors)"
    else:
        detail = f"the file's `{unexpected[0]}` is not in the model ({len(unexpected)} such tensors)"
    what = field or "the weights do not fit the model"
    return f"checkpoint was trained with another network: {what}; first tensor: {detail}"


def record_mismatch(checkpoint: Mapping, module, *, weights: bool = True) -> str | None:
    """Why a Lightning checkpoint (the dict ``torch.load`` returns) does not fit a ``PerceptionFinetuning``, in one
    line without the file name (see the module docstring); None if it fits.

    Checked in order: tasks, prediction type and noise schedule, codec, network config and MoE layout, input routes,
    then (``weights``) the tensors of ``state_dict`` against the module's. Older checkpoints without the ``diffusion``
    record are checked against their hyper-parameters; without a ``codec`` record, through the network's channels.
    """
    record = checkpoint.get("diffperc") or {}
    hparams = checkpoint.get("hyper_parameters") or {}
    diffusion = record.get("diffusion") or hparams.get("diffusion")
    objective, expected = record.get("objective"), getattr(module, "objective", None)
    if objective != expected:  # a one-step (e2e) model's weights fit a denoiser's network but are no denoiser
        return (f"checkpoint was trained as {objective or 'a diffusion model'}, this module is "
                f"{expected or 'a diffusion model'}: test it with the config it was trained with")
    found = (
        _task_mismatch(record, module)
        or (_diffusion_mismatch(diffusion, module) if isinstance(diffusion, Mapping) else None)
        or _codec_mismatch(record.get("codec") or {}, module)
        or _network_mismatch(record, module)
    )
    if found is None and weights and isinstance(checkpoint.get("state_dict"), Mapping):
        found = _weights_mismatch(checkpoint["state_dict"], module)
    return found


def check_record(path, checkpoint: Mapping, module, weights: bool = True) -> None:
    """Raises ``ValueError("<path>: <record_mismatch>")`` when ``checkpoint`` does not fit ``module``."""
    found = record_mismatch(checkpoint, module, weights=weights)
    if found:
        raise ValueError(f"{path}: {found}")


def check_checkpoint(path, module) -> None:
    """Checks the checkpoint file ``path`` (``--ckpt_path``) against a ``PerceptionFinetuning`` ``module`` before it is
    restored; raises ``ValueError`` naming the file, the first mismatching field and its flag.

    Nothing happens for other modules, for ``None``, ``last``/``best``/``hpc`` (Lightning resolves them later;
    ``on_load_checkpoint`` checks them) and for URLs or folders (sharded checkpoints).
    """
    if path is None or not hasattr(module, "tasks") or not hasattr(module, "codec") or not Path(path).is_file():
        return
    check_record(path, load_weights_only(path), module)


def check_init_from(path, module) -> None:
    """Checks ``--model.init_args.init_from`` when it is a fine-tuning checkpoint (it records its tasks): tasks,
    prediction type, noise schedule and codec must be the model's. A pretrained or official DiT records no task and is
    not checked here: fine-tuning it with another schedule is the recipe. Its network is checked by ``load_pretrained``.
    """
    record, hparams = read_records(path)
    if not (record.get("tasks") or record.get("task")):
        return
    diffusion = record.get("diffusion") or hparams.get("diffusion")
    found = (
        _task_mismatch(record, module)
        or (_diffusion_mismatch(diffusion, module) if isinstance(diffusion, Mapping) else None)
        or _codec_mismatch(record.get("codec") or {}, module)
    )
    if found:
        raise ValueError(f"{path} (`--model.init_args.init_from`): {found}")


def check_max_steps(trainer) -> None:
    """``fit`` with ``--trainer.max_steps 0`` would train nothing and exit as if it had succeeded."""
    if trainer is not None and trainer.max_steps == 0:
        raise ValueError(
            "`--trainer.max_steps 0` trains nothing: set a positive number of steps, or -1 to train for "
            "`--trainer.max_epochs`"
        )


def check_before_run(subcommand: str | None, model, datamodule, trainer, ckpt_path=None) -> None:
    """Everything that can be checked once the CLI has built its objects and before the run writes a file:
    ``--ckpt_path`` against the model, ``--trainer.max_steps`` for ``fit``, the predict folder (its inputs in the
    model's task layout, the padding) against the model."""
    if subcommand is None:
        return
    check_checkpoint(ckpt_path, model)
    if subcommand == "fit":
        check_max_steps(trainer)
    multiple = getattr(datamodule, "predict_multiple", None)
    if subcommand == "predict" and getattr(datamodule, "images", None) and multiple is not None:
        side = getattr(datamodule, "max_image_side", DEFAULT_MAX_IMAGE_SIDE)
        predict_folder(model, datamodule.images, getattr(datamodule, "predict_resolution", 32), multiple, side)
