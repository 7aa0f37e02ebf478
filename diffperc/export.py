"""Exports a trained network to safetensors plus a JSON of what rebuilds it, and loads such an export back.

To run: ``diffperc export --ckpt runs/quickstart_depth/checkpoints/last.ckpt --out depth_t2.safetensors``
"""

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from diffperc.models import DiT, load_pretrained, moe_config
from diffperc.models.moe import to_moe
from diffperc.models.pretrained import architecture_mismatch, network_fields, read_moe_config, read_network_state
from diffperc.models.router import PatchEmbedRouter
from diffperc.utils import atomic_write_bytes, atomic_write_json

FORMAT_VERSION = 1


def _infer_config(state: dict[str, torch.Tensor], hparams: dict) -> dict:
    """DiT constructor keywords from a network's tensors (shapes) and the run's hyper-parameters."""
    routes = network_fields(state).get("task_routes")  # a multi-task network: one input projection per task
    proj = state["x_embedder.proj.weight"] if routes is None else state["x_embedder.routes.0.proj.weight"]
    hidden, in_channels, patch = proj.shape[0], max(routes or [proj.shape[1]]), proj.shape[2]  # (D, C_in, p, p)
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    tokens = state["pos_embed"].shape[1]
    rows = state["y_embedder.embedding_table.weight"].shape[0]
    out_per_patch = state["final_layer.linear.weight"].shape[0] // (patch * patch)
    # The MLP width: a dense MLP, or a routed expert (GELU experts have fc1, SwiGLU experts gate_proj).
    keys = ("blocks.0.mlp.fc1.weight", "blocks.0.mlp.experts.0.fc1.weight", "blocks.0.mlp.experts.0.gate_proj.weight")
    fc1 = next((state[k] for k in keys if k in state), None)
    backbone = hparams.get("backbone") or {}
    num_heads = backbone.get("num_heads")
    if num_heads is None:
        from diffperc.models.dit import DiT_models

        num_heads = DiT_models.get(str(backbone.get("name")), {}).get("num_heads")
    if num_heads is None:
        raise ValueError("Cannot tell the number of attention heads: the checkpoint has no `backbone` hyper-parameters")
    learn_sigma = bool(backbone.get("learn_sigma", False))
    return dict(
        input_size=int(round(tokens**0.5)) * patch,
        patch_size=patch,
        in_channels=in_channels,
        hidden_size=hidden,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=(fc1.shape[0] / hidden) if fc1 is not None else 4.0,
        class_dropout_prob=0.0,
        num_classes=rows,
        learn_sigma=learn_sigma,
        out_channels=out_per_patch // 2 if learn_sigma else out_per_patch,
    )


def rebuild_network(
    state: dict[str, torch.Tensor], config: dict, moe: dict | None, routes: list[int] | None, path: Path, flag: str
) -> DiT:
    """The network ``state`` (a checkpoint's tensors) belongs to: a DiT of ``config`` with ``routes`` (one input
    projection per task) and the ``moe`` layout, its weights loaded strictly. A record that does not describe the
    weights fails in one line naming ``flag``, the file and the first field (or tensor) that differs."""
    model = DiT(**config)
    if routes:
        model.x_embedder = PatchEmbedRouter(list(routes), config["patch_size"], config["hidden_size"])
    if moe is not None:
        to_moe(model, moe)
    target = model.state_dict()
    detail = architecture_mismatch(state, target, names=("the weights", "the recorded network"), flags=False)
    wrong = [k for k in state if k in target and state[k].shape != target[k].shape]
    only = [(k, "recorded network") for k in target if k not in state]
    only += [(k, "weights") for k in state if k not in target]
    if detail is None and wrong:
        k = wrong[0]
        detail = f"`{k}` is {tuple(state[k].shape)} in the weights, {tuple(target[k].shape)} in the recorded network"
    elif detail is None and only:
        detail = f"`{only[0][0]}` is only in the {only[0][1]} ({len(only)} tensors differ)"
    if detail:
        raise ValueError(f"`{flag}` {path}: the weights do not match the network the checkpoint records: {detail}")
    model.load_state_dict(state, strict=True)
    return model


def _carried(meta: dict, hparams: dict) -> dict:
    """What a model loading the file checks it against (``diffperc.lit.checks``): tasks, input routes, noise schedule
    and prediction type, codec; older checkpoints keep their schedule in the hyper-parameters only."""
    return {
        "task": meta.get("task"),
        "tasks": meta.get("tasks"),
        "task_routes": meta.get("task_routes"),
        "diffusion": meta.get("diffusion") or hparams.get("diffusion"),
        "codec": meta.get("codec"),
    }


def export_checkpoint(ckpt: str | Path, out: str | Path) -> tuple[Path, Path]:
    """Writes ``out`` (safetensors, the network's tensors; EMA weights when the checkpoint has them) and
    ``out`` with suffix ``.json`` (DiT config, MoE settings, task and run metadata). Both atomically."""
    ckpt, out = Path(ckpt), Path(out)
    if out.suffix != ".safetensors":
        raise ValueError(f"`--out` must end in .safetensors, got {out}")
    state = read_network_state(ckpt)
    raw = torch.load(ckpt, map_location="cpu", weights_only=True) if ckpt.suffix != ".safetensors" else {}
    hparams = dict(raw.get("hyper_parameters") or {}) if isinstance(raw, dict) else {}
    meta = dict(raw.get("diffperc") or {}) if isinstance(raw, dict) else {}
    config = meta.get("dit_config") or _config_or_fail(state, hparams, ckpt, "--ckpt")
    moe = read_moe_config(ckpt, state)  # the stored record, else what the hyper-parameters and tensors tell
    if moe is not None and (moe["experts_per_token"] is None or moe["normalize_weights"] is None):
        raise ValueError(
            f"`--ckpt` {ckpt} holds a mixture of {moe['num_experts']} experts with no record of how many are "
            "active per token (no `diffperc` metadata or MoE hyper-parameters): it cannot be rebuilt exactly"
        )
    routes = meta.get("task_routes") or network_fields(state).get("task_routes")
    model = rebuild_network(state, config, moe, routes, ckpt, "--ckpt")  # proves the record rebuilds this network
    record = {
        "format_version": FORMAT_VERSION,
        "dit_config": config,
        "moe": moe_config(model),
        **_carried({**meta, "task_routes": routes}, hparams),
        "hyper_parameters": hparams,
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
    record = json.loads(meta_path.read_text())
    return rebuild_network(
        load_file(str(path)), record["dit_config"], record.get("moe"), record.get("task_routes"), path, "load_exported"
    )


def _config_or_fail(state: dict[str, torch.Tensor], hparams: dict, path: Path, flag: str) -> dict:
    try:
        return _infer_config(state, hparams)
    except (KeyError, ValueError) as err:  # a file without `diffperc` metadata whose tensors don't tell enough
        raise ValueError(f"`{flag}` {path}: cannot rebuild its network from the tensors alone: {err}") from err


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="diffperc export", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--ckpt", required=True, help="a diffperc Lightning checkpoint (e.g. run/checkpoints/last.ckpt)"
    )
    parser.add_argument("--out", required=True, help="output .safetensors path (a .json is written beside it)")
    args = parser.parse_args(argv)
    weights, meta = export_checkpoint(args.ckpt, args.out)
    print(f"Wrote {weights} and {meta}")


__all__ = ["export_checkpoint", "load_exported", "load_pretrained"]
