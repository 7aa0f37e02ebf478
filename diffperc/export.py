"""Exports a fine-tuned model as a Hugging Face model folder that ``PerceptionPipeline.from_pretrained`` loads.

To run: ``diffperc export --ckpt_path runs/quickstart_depth/checkpoints/last.ckpt --out exports/depth``

``export_model`` writes ``config.json`` (network, tasks, codec, diffusion, inference and processing settings),
``model.safetensors`` (the network; EMA weights when the checkpoint has them) and a ``README.md`` model card (task,
training data, steps, test metrics, MACs, how to load it), optionally pushing them to the Hub. ``export_checkpoint``
and ``load_exported`` keep the older single-file format: the network's safetensors plus a JSON record beside it.
"""

import errno
import importlib
import inspect
import json
import os
import secrets
import shutil
import sys
from dataclasses import asdict, fields
from pathlib import Path

import yaml
from safetensors.torch import save_file

from diffperc.data.datamodule import check_predict_multiple
from diffperc.diffusion import InferenceSettings
from diffperc.lit.base import settings
from diffperc.models import DiT, load_pretrained
from diffperc.models.build import CheckpointNetwork, network_from_checkpoint
from diffperc.models.pretrained import load_weights_only, read_records
from diffperc.pipeline import CALLS, RETURNS, PerceptionPipeline
from diffperc.utils import atomic_write_bytes, atomic_write_json, fsync_path

FORMAT_VERSION = 1


def export_checkpoint(ckpt: str | Path, out: str | Path) -> tuple[Path, Path]:
    """Writes ``out`` (safetensors, the network's tensors; EMA weights when the checkpoint has them) and
    ``out`` with suffix ``.json`` (DiT config, MoE settings, task and run metadata). Both atomically."""
    ckpt, out = Path(ckpt), Path(out)
    if out.suffix != ".safetensors":
        raise ValueError(f"`--out` must end in .safetensors, got {out}")
    found = network_from_checkpoint(ckpt, "--ckpt_path")  # proves the record rebuilds this network
    raw = load_weights_only(ckpt) if ckpt.suffix != ".safetensors" else {}
    model = found.net
    record = {
        "format_version": FORMAT_VERSION,
        **found.record,
        "hyper_parameters": found.hparams,
        "source": str(ckpt),
        "global_step": raw.get("global_step") if isinstance(raw, dict) else None,
    }
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    tmp = out.with_name(f".{out.name}.tmp")
    save_file(tensors, str(tmp), metadata={"format": "diffperc", "format_version": str(FORMAT_VERSION)})
    atomic_write_bytes(out, tmp.read_bytes())
    tmp.unlink()
    meta_path = atomic_write_json(out.with_suffix(".json"), record)
    return out, meta_path


def load_exported(path: str | Path) -> DiT:
    """Rebuilds the network of an export (``.safetensors`` + its ``.json``) and loads its weights strictly."""
    path = Path(path)
    meta_path = path.with_suffix(".json")
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path} not found: an export is a .safetensors file plus its .json")
    return network_from_checkpoint(path, "load_exported").net


# ------------------------------------------------------------------------------------ Hugging Face model folders
def export_model(ckpt_path: str, out: str, push_to_hub: str | None = None) -> Path:
    """Writes the model folder ``out`` (``config.json``, ``model.safetensors``, ``README.md``) of a fine-tuning
    checkpoint, and uploads it to the Hub repository ``push_to_hub`` (``org/name``) when given.

    The folder is written beside ``out`` and renamed into place once complete; an ``out`` that exists and is not
    empty is never overwritten. Before anything is written, the export is rebuilt as a ``PerceptionPipeline`` (its
    tasks and codec built from the record) and the codec's weights are compared with those the checkpoint holds.

    Args:
        ckpt_path: A checkpoint of a ``PerceptionFinetuning`` run (``<run>/checkpoints/last.ckpt``). The run folder's
            ``config.yaml``, ``test_metrics.json`` and ``train_macs.json`` fill the model card when present.
        out: The folder to write.
        push_to_hub: Hub repository id to upload the folder to (needs a token, ``hf auth login``); None = local only.

    Returns:
        ``out``.
    """
    ckpt, out = Path(ckpt_path), Path(out)
    _refuse_existing(out)
    if not ckpt.is_file():
        raise FileNotFoundError(f"`--ckpt_path` {ckpt}: no such file")
    found = network_from_checkpoint(ckpt, "--ckpt_path")
    record, _ = read_records(ckpt)
    raw = load_weights_only(ckpt)
    run = run_folder(ckpt)
    config = export_config(ckpt, found, record, run, global_step=raw.get("global_step"))
    try:
        pipe = PerceptionPipeline(config)  # proves the tasks and the codec rebuild from what config.json says
    except (OSError, ValueError) as err:
        raise type(err)(f"`--ckpt_path` {ckpt}: the export would not load: {err}") from err
    recorded = record.get("tasks") or [record.get("task")]
    if pipe.tasks != list(recorded):
        raise ValueError(
            f"`--ckpt_path` {ckpt} was trained for tasks {recorded}, its run's config.yaml builds "
            f"{pipe.tasks}: export the config.yaml of the run that wrote the checkpoint"
        )
    _check_codec_weights(ckpt, raw.get("state_dict") or {}, pipe.module.codec)
    pipe.set_network(found.net)
    check_predict_multiple(config["processing"]["multiple"], pipe.module, "data.init_args.predict_multiple")
    card = model_card_kwargs(pipe, run, repo_id=push_to_hub or str(out), ckpt=ckpt)
    _write_folder(out, lambda folder: pipe.save_pretrained(folder, model_card_kwargs=card))
    if push_to_hub:
        pipe.push_to_hub(push_to_hub, model_card_kwargs=card)
    return out


def run_folder(ckpt: Path) -> Path:
    """The run folder of a checkpoint: ``<run>`` for ``<run>/checkpoints/<file>``, else the checkpoint's folder."""
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent


def run_config(run: Path) -> tuple[dict | None, Path | None]:
    """The fit's resolved config saved in ``run`` (``config.yaml``, or ``config_fit.yaml``) and its path."""
    for name in ("config.yaml", "config_fit.yaml"):
        path = run / name
        if path.is_file():
            try:
                loaded = yaml.safe_load(path.read_text())
            except yaml.YAMLError as err:
                raise ValueError(f"{path} (the run's config, read by `diffperc export`) is not YAML: {err}") from err
            return (loaded if isinstance(loaded, dict) else {}), path
    return None, None


def export_config(
    ckpt: Path, found: CheckpointNetwork, record: dict, run: Path, global_step: int | None = None
) -> dict:
    """The ``config.json`` of a checkpoint's export: what ``PerceptionPipeline`` rebuilds the model from.

    The network comes from the checkpoint's record (``network_from_checkpoint``); the tasks and codec from their
    recorded constructor arguments (``lit/checks.py``: ``task_args``, the codec's ``init_args``), completed by the
    run's ``config.yaml`` for arguments an object does not keep (a VAE's ``subfolder``) and for checkpoints written
    before those records existed; the processing resolution and multiple from ``config.yaml``'s ``data`` (else the
    training image size, and the codec downsample x the patch size).
    """
    hparams = found.hparams
    if record.get("objective"):
        raise ValueError(
            f"`--ckpt_path` {ckpt} is a one-step model ({record['objective']}): export writes diffusion models, "
            "which the pipeline samples; test the one-step model with `diffperc test` and its config"
        )
    names = list(record.get("tasks") or ([record["task"]] if record.get("task") else []))
    if not names:
        raise ValueError(
            f"`--ckpt_path` {ckpt} records no task: export takes a checkpoint of a fine-tuning run "
            "(`diffperc.lit.PerceptionFinetuning`), not a pretraining one"
        )
    cfg, cfg_path = run_config(run)
    model_args = ((cfg or {}).get("model") or {}).get("init_args") or {}
    data_args = ((cfg or {}).get("data") or {}).get("init_args") or {}
    # The end of an error for an argument the checkpoint does not record.
    where = f"{cfg_path} does not say it either" if cfg_path else f"no config.yaml lies in its run folder {run}"

    # Tasks: the recorded arguments, completed from config.yaml.
    configured = model_args.get("task")
    configured = configured if isinstance(configured, list) else [configured] if configured else []
    specs = record.get("task_args")
    if specs is None:
        if not configured:
            raise ValueError(
                f"`--ckpt_path` {ckpt} records no task constructor arguments (written before diffperc recorded them) "
                f"and {where} (`model.init_args.task`): put the run's config.yaml beside its checkpoints/ folder"
            )
        specs = [{"class_path": c.get("class_path"), "init_args": c.get("init_args") or {}} for c in configured]
    tasks = [
        _complete(
            spec,
            configured[i] if i < len(configured) else None,
            {},
            f"task {names[i] if i < len(names) else i}",
            ckpt,
            where,
        )
        for i, spec in enumerate(specs)
    ]
    # Codec: the recorded arguments, then config.yaml, then the record's same-named fields (a VAE's `path`).
    codec_rec = dict(record.get("codec") or found.record.get("codec") or {})
    codec_cfg = model_args.get("codec") if isinstance(model_args.get("codec"), dict) else None
    if not codec_rec.get("class"):
        if codec_cfg is None and "codec" in model_args:  # `codec: null` in config.yaml: the pixel codec
            codec_cfg = {"class_path": "diffperc.codecs.PixelCodec", "init_args": {}}
        if codec_cfg is None:
            raise ValueError(
                f"`--ckpt_path` {ckpt} records no codec and {where} (`model.init_args.codec`): put the run's "
                "config.yaml beside its checkpoints/ folder"
            )
        codec_rec = {"class": codec_cfg.get("class_path"), "init_args": codec_cfg.get("init_args") or {}}
    codec_spec = {"class_path": codec_rec["class"], "init_args": codec_rec.get("init_args") or {}}
    extra = {k: v for k, v in codec_rec.items() if k not in ("class", "init_args")}
    codec = _complete(codec_spec, codec_cfg, extra, "codec", ckpt, where)

    diffusion = found.record.get("diffusion") or model_args.get("diffusion")
    if not isinstance(diffusion, dict):
        raise ValueError(
            f"`--ckpt_path` {ckpt} records no diffusion settings and {where} (`model.init_args.diffusion`)"
        )
    inference = hparams.get("inference") or model_args.get("inference") or {}
    known = {f.name for f in fields(InferenceSettings)}  # settings an older or newer diffperc added are dropped
    inference = asdict(settings(InferenceSettings, {k: v for k, v in inference.items() if k in known}))
    predict_task = hparams.get("predict_task") or model_args.get("predict_task") or record.get("task") or names[0]
    dit = found.record["dit_config"]
    downsample = int(codec_rec.get("downsample") or 1)
    image_size = hparams.get("image_size") or model_args.get("image_size") or dit["input_size"] * downsample
    processing = {
        "resolution": int(data_args.get("predict_resolution") or image_size),
        "multiple": int(data_args.get("predict_multiple") or downsample * dit["patch_size"]),
    }
    return {
        "format": "diffperc",
        "format_version": 2,
        "network": {k: found.record[k] for k in ("dit_config", "moe", "task_routes")},
        "tasks": tasks,
        "predict_task": predict_task,
        "codec": codec,
        "diffusion": diffusion,
        "inference": inference,
        "processing": processing,
        "training": {
            "checkpoint": ckpt.name,
            "global_step": global_step,
            "backbone": hparams.get("backbone") or model_args.get("backbone"),
            "image_size": image_size,
            "upcycle": hparams.get("upcycle") or model_args.get("upcycle"),
        },
    }


def _complete(spec: dict, configured: dict | None, extra: dict, what: str, ckpt: Path, where: str) -> dict:
    """``spec`` (``class_path`` + ``init_args``) with the constructor arguments it lacks taken from ``configured``
    (the same class's entry in config.yaml), then from ``extra``; an argument without a default that neither holds
    fails in one line."""
    class_path = str(spec.get("class_path"))
    module_name, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(f"`--ckpt_path` {ckpt}: its {what} class {class_path} cannot be imported: {err}") from err
    if configured and configured.get("class_path"):
        c_module, _, c_name = str(configured["class_path"]).rpartition(".")
        try:
            same = getattr(importlib.import_module(c_module), c_name, None) is cls
        except ImportError:
            same = False
        configured = configured if same else None
    from_config = (configured or {}).get("init_args") or {}
    init_args = dict(spec.get("init_args") or {})
    unknown = []
    for param_name, param in inspect.signature(cls.__init__).parameters.items():
        if param_name == "self" or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD) or param_name in init_args:
            continue
        if param_name in from_config:
            init_args[param_name] = from_config[param_name]
        elif param_name in extra:
            init_args[param_name] = extra[param_name]
        elif param.default is inspect.Parameter.empty:
            unknown.append(param_name)
    if unknown:
        raise ValueError(
            f"`--ckpt_path` {ckpt} does not record its {what}'s {', '.join(f'`{u}`' for u in unknown)} "
            f"({class_path} keeps no attribute of that name) and {where}: put the run's config.yaml beside its "
            "checkpoints/ folder"
        )
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": init_args}


def _check_codec_weights(ckpt: Path, state: dict, codec) -> None:
    """The codec the export references must hold the weights the checkpoint was trained with (a VAE's ``codec.*``
    tensors travel in the checkpoint); the pixel codec has none."""
    for key, tensor in codec.state_dict().items():
        stored = state.get(f"codec.{key}")
        if stored is None:
            continue  # a checkpoint that does not keep the frozen codec: nothing to compare
        same = stored.shape == tensor.shape and bool((tensor.to(stored.dtype) == stored).all())
        if not same:
            raise ValueError(
                f"`--ckpt_path` {ckpt}: the codec the checkpoint records ({type(codec).__name__} from "
                f"{getattr(getattr(codec, 'vae', None), 'name_or_path', None) or 'its recorded arguments'}) holds "
                f"other weights than the run trained with (first: `codec.{key}`): export where the run's codec is"
            )


def _refuse_existing(out: Path) -> None:
    if out.is_file() or out.is_symlink() and not out.is_dir():
        raise FileExistsError(f"`--out` {out} is a file: export writes a folder; choose another `--out`")
    if out.is_dir() and any(out.iterdir()):
        raise FileExistsError(
            f"`--out` {out} exists and is not empty: export never overwrites a folder; remove it or choose another "
            "`--out`"
        )


def _write_folder(out: Path, write) -> None:
    """Calls ``write(folder)`` on a new folder beside ``out``, syncs its files and renames it to ``out``, so ``out``
    is complete or absent (folder and files get the usual permissions: the umask applies)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    tmp.mkdir()
    try:
        write(tmp)
        for path in [*tmp.iterdir(), tmp]:
            fsync_path(path)
        try:
            os.rename(tmp, out)  # replaces an empty `out`; fails on a non-empty one
        except OSError as err:
            if err.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                _refuse_existing(out)  # something appeared at `out` meanwhile
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_path(out.parent)


def model_card_kwargs(pipe, run: Path, repo_id: str, ckpt: Path | None = None) -> dict:
    """What fills the model card template (``diffperc.pipeline.MODEL_CARD``): tasks, network, codec and settings
    from the export, training data from the run's ``config.yaml``, steps, test metrics (``test_metrics.json``, when
    they scored the exported checkpoint ``ckpt``, with the settings they were tested with), training MACs
    (``train_macs.json``) and test MACs per sample (``test_metrics.json``, else counted here)."""
    config = pipe.config
    tasks, codec, dit = pipe.tasks, config["codec"], config["network"]["dit_config"]
    moe = config["network"]["moe"]
    backbone = (config["training"].get("backbone") or {}).get("name")
    params = sum(p.numel() for p in pipe.net.parameters())
    network = (
        f"{backbone + ' ' if backbone else ''}DiT (width {dit['hidden_size']}, depth {dit['depth']}, "
        f"patch {dit['patch_size']}"
        + (f", {moe['num_experts']} experts, top-{moe['experts_per_token']}" if moe else "")
        + ")"
    )
    usage = []
    for task in pipe.module.tasks:
        call = CALLS[task.predict_layout] + (f", task='{task.name}'" if len(tasks) > 1 else "")
        usage.append(f"out = pipe({call})\nout.prediction  # {RETURNS.get(task.name, 'the prediction')}")
    inference = config["inference"]
    rows = {
        "Tasks": ", ".join(tasks) + (f" (default `{config['predict_task']}`)" if len(tasks) > 1 else ""),
        "Network": f"{network}, {params:,} parameters",
        "Codec": f"`{codec['class_path']}` {json.dumps(codec['init_args'], sort_keys=True)}",
        "Diffusion": ", ".join(f"{k} {v}" for k, v in sorted(config["diffusion"].items())),
        "Inference": f"{inference['num_steps']} DDIM steps, ensemble of {inference['ensemble_size']}"
        + (f" ({inference['reducer']})" if inference["reducer"] else "")
        + f", seed {inference['seed']}",
        "Processing": f"long side resized to {config['processing']['resolution']} px, padded to a multiple of "
        f"{config['processing']['multiple']}",
    }
    cfg, cfg_path = run_config(run)
    metrics_path, macs_path = run / "test_metrics.json", run / "train_macs.json"
    test = _read_json(metrics_path)
    train = _read_json(macs_path)
    steps = config["training"].get("global_step")
    other = _tested_another_checkpoint(test, ckpt, run, steps)
    if not test:
        metrics = "Not evaluated: no test_metrics.json in the run folder."
    elif other:
        test = {}
        exported = f"{ckpt.name}, step {steps}" if ckpt is not None else f"step {steps}"
        metrics = (
            f"Not evaluated: the run folder's test_metrics.json scored {other}, not the exported weights "
            f"({exported}); `diffperc test --config {cfg_path or '<the run config>'} --ckpt_path "
            f"{ckpt or '<the checkpoint>'}` scores them."
        )
        print(f"note: {metrics_path} scored {other}: the model card lists no test metrics", file=sys.stderr)
    else:
        metrics = _metrics_table(test) + _tested_with(test)
    return {
        "title": f"diffperc {' + '.join(tasks)}",
        "summary": f"A diffusion transformer fine-tuned for {', '.join(tasks)} with diffperc: image-to-image "
        "diffusion over the codec's latents, conditioned on the input image(s).",
        "repo_id": repo_id,
        "usage": "\n".join(usage),
        "model_table": "\n".join(f"| {k} | {v} |" for k, v in rows.items()),
        "training_data": _training_data(cfg) if cfg is not None else "not recorded (no config.yaml in the run folder)",
        "training_steps": f"{steps:,}" if isinstance(steps, int) else "not recorded",
        "train_macs": _macs(train.get("compute/train_macs")) + f" (`{macs_path.name}`)"
        if train.get("compute/train_macs") is not None
        else "not recorded (no train_macs.json in the run folder)",
        "metrics": metrics,
        "test_macs": _test_macs(pipe, test),
    }


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        loaded = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} (read by `diffperc export` for the model card) is not valid JSON: {err}") from err
    return loaded if isinstance(loaded, dict) else {}


def _training_data(cfg: dict) -> str:
    data = cfg.get("data") or {}
    args = dict(data.get("init_args") or {})
    train = args.get("train")
    if train is None:  # a data module that builds its own sets (`DepthDataModule`, ...): its arguments
        loader = ("batch_size", "eval_batch_size", "num_workers", "pin_memory", "images", "max_image_side")
        args = {k: v for k, v in args.items() if k not in loader and not k.startswith("predict_")}
        return _call(data.get("class_path", "?"), args)
    train = train if isinstance(train, list) else [train]
    return "; ".join(_call(t.get("class_path", "?"), t.get("init_args") or {}) for t in train if isinstance(t, dict))


def _call(class_path: str, args: dict) -> str:
    return f"`{class_path.rsplit('.', 1)[-1]}({', '.join(f'{k}={v!r}' for k, v in args.items())})`"


def _tested_another_checkpoint(test: dict, ckpt: Path | None, run: Path, step: int | None) -> str | None:
    """The checkpoint a run's test record scored (``<path> (step N)``) when it is not ``ckpt``: another file, or the
    same file since trained further; None when it scored ``ckpt`` or the record cannot tell."""
    tested, tested_step = test.get("ckpt_path"), test.get("global_step")
    where = f"{tested or 'weights in memory'} (step {tested_step})"
    if tested and ckpt is not None:
        path = Path(tested) if Path(tested).is_absolute() else run / tested
        if path.resolve() != ckpt.resolve():
            return where
    if isinstance(tested_step, int) and isinstance(step, int) and tested_step != step:
        return where
    return None


def _tested_with(test: dict) -> str:
    """The settings a test record was measured with, as a sentence after the metrics table."""
    inference = test.get("inference") or {}
    if not inference:
        return ""
    reducer = f" ({inference['reducer']})" if inference.get("reducer") else ""
    return (
        f"\n\nTested with {inference.get('num_steps')} DDIM steps, an ensemble of {inference.get('ensemble_size')}"
        f"{reducer} and seed {inference.get('seed')}, on the weights of step {test.get('global_step')}."
    )


def _metrics_table(test: dict) -> str:
    metrics = test.get("metrics") or {}
    rows = [(k.removeprefix("test/"), v) for k, v in sorted(metrics.items()) if k.startswith("test/")]
    if not rows:
        return "No test metrics in test_metrics.json."
    lines = ["| metric | value | baseline |", "|---|---|---|"]
    for name, value in rows:
        baseline = metrics.get(f"baseline/{name}")
        lines.append(f"| {name} | {value:.4g} | {'' if baseline is None else f'{baseline:.4g}'} |")
    return "\n".join(lines)


def _test_macs(pipe, test: dict) -> str:
    metrics = test.get("metrics") or {}
    recorded = {k: v for k, v in metrics.items() if k.startswith("compute/") and k.endswith("test_macs_per_sample")}
    if recorded:
        return "; ".join(f"{_macs(v)} per sample (`{k}`, test_metrics.json)" for k, v in sorted(recorded.items()))
    side = pipe.config["processing"]["resolution"]
    counted = []
    with_names = len(pipe.tasks) > 1
    for task in pipe.module.tasks:
        macs = pipe.module.test_macs_per_sample((3, side, side), task)
        counted.append(f"{_macs(macs)} per {side}x{side} input" + (f" ({task.name})" if with_names else ""))
    return "; ".join(counted) + " with the default inference settings, counted at export (not tested)"


def _macs(value) -> str:
    value = float(value)
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.3g} {unit}MACs"
    return f"{value:.3g} MACs"

__all__ = ["export_checkpoint", "export_model", "load_exported", "load_pretrained"]
