"""Loading DiT weights (official ``.pt``, this project's Lightning ``.ckpt``, ``.safetensors``) into our networks.

``load_pretrained(model, path)`` finds the network's weights in the file (EMA first), converts them to the target's
shape (drop the sigma outputs, widen the input projection, task rows of the label table, position embedding for
the grid) and loads them. Files are always read with ``weights_only=True``: a checkpoint can't run code.
"""

import json
import math
import re
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from diffperc.models.dit import sincos_pos_embed
from diffperc.models.moe import infer_moe_config, parse_moe_suffix

# Every DiT variant (dense, MoE, task-routed input) has this key; it marks where a network's weights start.
_ANCHOR = "t_embedder.mlp.0.weight"
_EMA_PREFIX = re.compile(r"(^|[._])ema([._]|$)", re.IGNORECASE)
_MAX_LISTED = 5


def drop_sigma(state_dict: Mapping[str, torch.Tensor], patch_size: int, out_channels: int) -> dict[str, torch.Tensor]:
    """Keeps only the mean prediction of a ``learn_sigma`` final layer.

    Each token's ``p * p * 2C`` outputs are laid out ``(p, p, 2C)`` (see ``DiT.unpatchify``), so the mean is the
    first ``C`` channels *of every pixel*: rows ``(i * p + j) * 2C + c`` with ``c < C``, not the first half of rows.

    Args:
        state_dict: DiT weights whose ``final_layer.linear`` predicts ``2 * out_channels`` channels per pixel.
        patch_size: Patch side ``p``.
        out_channels: Channels ``C`` to keep per pixel.

    Returns:
        A new dict with ``final_layer.linear.{weight,bias}`` reduced to ``p * p * C`` rows; other tensors shared.
    """
    p, c = patch_size, out_channels
    out = dict(state_dict)
    for key in ("final_layer.linear.weight", "final_layer.linear.bias"):
        if key not in out:
            raise KeyError(f"drop_sigma: `{key}` is not in the state dict")
        value = out[key]
        if value.shape[0] != p * p * 2 * c:
            raise ValueError(
                f"drop_sigma: `{key}` has {value.shape[0]} rows, expected patch_size**2 * 2 * "
                f"out_channels = {p * p * 2 * c}"
            )
        rest = value.shape[1:]
        out[key] = value.reshape(p, p, 2 * c, *rest)[:, :, :c].reshape(p * p * c, *rest).clone()
    return out


def widen_patch_embedding(state_dict: Mapping[str, torch.Tensor], num_inputs: int) -> dict[str, torch.Tensor]:
    """Lets the patch embedding take ``num_inputs`` latents stacked on channels (rule of ``widen_input_projection``).

    The weight is repeated ``num_inputs`` times along its input channels and divided by ``num_inputs``, so
    ``num_inputs`` copies of one latent give the original response; the bias is unchanged.

    Args:
        state_dict: DiT weights with ``x_embedder.proj.weight`` of shape (D, C, p, p).
        num_inputs: k + 1 for k conditioning latents.

    Returns:
        A new dict with ``x_embedder.proj.weight`` of shape (D, num_inputs * C, p, p); other tensors shared.
    """
    if num_inputs < 1:
        raise ValueError(f"widen_patch_embedding: num_inputs must be >= 1, got {num_inputs}")
    key = "x_embedder.proj.weight"
    if key not in state_dict:
        raise KeyError(f"widen_patch_embedding: `{key}` is not in the state dict")
    out = dict(state_dict)
    out[key] = state_dict[key].repeat(1, num_inputs, 1, 1) / num_inputs
    return out


def task_embedding_rows(table: torch.Tensor, num_tasks: int, has_null_row: bool) -> torch.Tensor:
    """Label-table rows for ``num_tasks`` new labels (tasks): each is the mean of the source's class embeddings.

    The class mean is the source's "average class" condition, a neutral start for every task. The null (CFG) row,
    the last one when the source was trained with label dropout, is no class and is left out of the mean.

    Args:
        table: Source ``y_embedder.embedding_table.weight`` (rows, D).
        num_tasks: Rows to produce.
        has_null_row: Whether the last row of ``table`` is the null label.

    Returns:
        (num_tasks, D) rows, all equal to the class mean.
    """
    classes = table[:-1] if has_null_row else table
    if classes.shape[0] < 1:
        raise ValueError(f"task_embedding_rows: the table has no class rows (shape {tuple(table.shape)})")
    return classes.mean(dim=0, keepdim=True).expand(num_tasks, -1).clone()


def load_pretrained(
    model: nn.Module, path: str | Path, strict: bool = True, *, source_has_null_row: bool = True
) -> dict:
    """Loads DiT weights from ``path`` into ``model``, converting them where the two architectures differ.

    Formats: an official DiT state dict (``DiT-XL-2-512x512.pt``; a ``{"model", "ema"}`` training checkpoint uses
    ``ema``), a Lightning checkpoint of this project (the network under a prefix such as ``net.``; EMA weights win:
    a prefix with ``ema`` in it such as ``net_ema.``, or ``state_dict`` itself when Lightning's ``WeightAveraging``
    callback stored the averaged model there and the live one in ``current_model_state``), ``.safetensors``, or
    diffusers' ``DiTTransformer2DModel`` layout (``convert_diffusers_dit``): its ``diffusion_pytorch_model`` file
    (``.safetensors`` or ``.bin``), a folder holding it (or a pipeline folder with ``transformer/``) or a Hub id such
    as ``facebook/DiT-XL-2-256`` (``resolve_weights``).

    Conversions, applied when the file's tensor and the model's differ in shape:

    1. ``final_layer.linear``: 2C -> C channels per pixel (``drop_sigma``) for a model without ``learn_sigma``.
    2. ``x_embedder.proj.weight``: C -> (k + 1) C input channels (``widen_patch_embedding``).
    3. ``y_embedder.embedding_table.weight``: another row count -> every label row is the mean of the source's class
       rows (``task_embedding_rows``); if the model has a null row (label dropout > 0) it gets the source's null row
       (or the class mean when the source has none).
    4. ``pos_embed``: another grid -> the fixed sin-cos embedding for the model's grid. A stored embedding that is
       not the sin-cos one for its own grid (to 1e-5) triggers a warning.

    Args:
        model: A network in the DiT parameter layout (``diffperc.models.DiT``).
        path: Checkpoint file, diffusers folder or Hub id.
        strict: Fail on keys that only the file or only the model has. Shape mismatches always fail.
        source_has_null_row: Whether the file's label table ends with a null (CFG) row; true for official DiT
            checkpoints and for pretraining with label dropout.

    Returns:
        A report: ``path``, ``format`` (``"dit"``, ``"lightning"``, ``"safetensors"`` or ``"diffusers"``),
        ``prefix`` (where the network was found in the file), ``ema`` (whether EMA weights were used), ``conversions``
        (one line each), ``missing_keys`` and ``unexpected_keys``.

    Raises:
        FileNotFoundError: ``path`` does not exist (naming the command that fetches an official checkpoint).
        TypeError: The file holds something other than a dict.
        ValueError: The file can't be read with ``weights_only=True``, holds no DiT weights or several candidate
            networks, has tensors whose shapes don't fit the model, or (``strict``) different keys.
    """
    path = Path(path)
    raw, fmt = _read(path)
    flat, ema_by_callback = _network_tensors(raw, path)
    prefix = _pick_prefix(flat, path)
    source = {k[len(prefix) :]: v for k, v in flat.items() if k.startswith(prefix)}
    target = model.state_dict()
    source, conversions = _convert(source, target, model, path, source_has_null_row)

    mismatched = [k for k in source if k in target and source[k].shape != target[k].shape]
    if mismatched:
        # One line: the first architecture field that differs (what to change), then the first tensor it breaks.
        k = mismatched[0]
        field = architecture_mismatch(source, target)
        more = f" (+{len(mismatched) - 1} more)" if len(mismatched) > 1 else ""
        raise ValueError(
            f"{path}: the weights do not fit the model (wrong architecture or size?): "
            f"{field + '; first tensor ' if field else ''}`{k}` file {tuple(source[k].shape)} vs model "
            f"{tuple(target[k].shape)}{more}"
        )
    missing = [k for k in target if k not in source]
    unexpected = [k for k in source if k not in target]
    if strict and (missing or unexpected):
        field = architecture_mismatch(source, target)
        if field:
            raise ValueError(f"{path}: the weights do not fit the model (wrong architecture or size?): {field}")
        raise ValueError(
            f"{path}: keys differ from the model (pass strict=False to load the rest): "
            f"missing {missing[:_MAX_LISTED]} ({len(missing)} in all), "
            f"unexpected {unexpected[:_MAX_LISTED]} ({len(unexpected)} in all)"
        )
    model.load_state_dict({k: v for k, v in source.items() if k in target}, strict=False)
    ema = ema_by_callback or bool(_EMA_PREFIX.search(prefix))
    return {
        "path": str(path),
        "format": fmt,
        "prefix": prefix,
        "ema": ema,
        "conversions": conversions,
        "missing_keys": missing,
        "unexpected_keys": unexpected,
    }


# Architecture fields a DiT's tensors show, in the order a mismatch is reported, with the flag that sets each.
_FIELD_FLAGS = {
    "hidden_size": "--model.init_args.backbone.hidden_size",
    "depth": "--model.init_args.backbone.depth",
    "patch_size": "--model.init_args.backbone.patch_size",
    "num_experts": "--model.init_args.backbone.name` (an `-<E>E<k>A` preset) or `--model.init_args.upcycle",
    "expert_type": "--model.init_args.backbone.expert_type",
    "shared_expert_hidden_size": "--model.init_args.backbone.num_shared_experts` / `shared_expert_ratio",
    "mlp_hidden_size": "--model.init_args.backbone.name",
    "task_routes": "--model.init_args.task",
    "in_channels": "--model.init_args.codec",
    "out_channels": "--model.init_args.codec` / `--model.init_args.backbone.learn_sigma",
    "label_rows": "--model.init_args.task",
    "num_patches": "--model.init_args.image_size",
}
_ROUTE_KEY = re.compile(r"^x_embedder\.routes\.(\d+)\.proj\.weight$")


def network_fields(state: Mapping[str, torch.Tensor]) -> dict:
    """The architecture a DiT state dict (keys without prefix) shows in its tensor shapes: width, depth, patch,
    experts, MLP width, input routes and channels, output channels per pixel, label rows and position-grid tokens."""
    fields: dict = {}
    if _ANCHOR in state:
        fields["hidden_size"] = state[_ANCHOR].shape[0]
    blocks = {int(k.split(".")[1]) for k in state if k.startswith("blocks.") and k.split(".")[1].isdigit()}
    if blocks:
        fields["depth"] = max(blocks) + 1
    routes = sorted((int(m[1]), state[k]) for k in state if (m := _ROUTE_KEY.match(k)))
    proj = state.get("x_embedder.proj.weight", routes[0][1] if routes else None)  # (D, C_in, p, p)
    if proj is not None and proj.dim() == 4:
        fields["patch_size"] = proj.shape[-1]
    moe = infer_moe_config(state)
    fields["num_experts"] = moe["num_experts"] if moe else 0
    if moe:
        fields["expert_type"] = moe["expert_type"]
        fields["shared_expert_hidden_size"] = moe["num_shared_experts"] * (moe["shared_expert_hidden_size"] or 0)
    keys = ("blocks.0.mlp.fc1.weight", "blocks.0.mlp.experts.0.fc1.weight", "blocks.0.mlp.experts.0.gate_proj.weight")
    fc1 = next((state[k] for k in keys if k in state), None)
    if fc1 is not None:
        fields["mlp_hidden_size"] = fc1.shape[0]
    if routes:
        fields["task_routes"] = [w.shape[1] for _, w in routes]
    elif proj is not None and proj.dim() == 4:
        fields["in_channels"] = proj.shape[1]
    final = state.get("final_layer.linear.weight")
    if final is not None and "patch_size" in fields:
        fields["out_channels"] = final.shape[0] // fields["patch_size"] ** 2
    if "y_embedder.embedding_table.weight" in state:
        fields["label_rows"] = state["y_embedder.embedding_table.weight"].shape[0]
    if "pos_embed" in state and state["pos_embed"].dim() == 3:
        fields["num_patches"] = state["pos_embed"].shape[1]
    return fields


def architecture_mismatch(
    source: Mapping[str, torch.Tensor],
    target: Mapping[str, torch.Tensor],
    names: tuple[str, str] = ("the file", "the model"),
    flags: bool = True,
) -> str | None:
    """The first architecture field (``network_fields``) in which a file's DiT tensors and a model's differ, as
    ``"`hidden_size` is 48 in the file, 32 in the model (`--model.init_args.backbone.hidden_size`)"`` (``names``
    say where each state dict comes from; ``flags`` adds the flag that sets the field); None if they agree."""
    src, tgt = network_fields(source), network_fields(target)
    for field, flag in _FIELD_FLAGS.items():
        if field in src and field in tgt and src[field] != tgt[field]:
            hint = f" (`{flag}`)" if flags else ""
            return f"`{field}` is {src[field]} in {names[0]}, {tgt[field]} in {names[1]}{hint}"
    return None


def read_network_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The network tensors of a checkpoint file without a model (EMA weights when present), keys without prefix."""
    path = Path(path)
    raw, _ = _read(path)
    flat, _ = _network_tensors(raw, path)
    prefix = _pick_prefix(flat, path)
    return {k[len(prefix) :]: v for k, v in flat.items() if k.startswith(prefix)}


def read_moe_config(path: str | Path, state: Mapping[str, torch.Tensor] | None = None) -> dict | None:
    """The mixture-of-experts layout of the network in a checkpoint file (``moe_config`` keys), None if it is dense.

    Sources, first wins: the ``moe`` record this project writes (``checkpoint["diffperc"]["moe"]`` in Lightning and
    ``diffperc upcycle`` files; the ``.json`` beside a ``diffperc export`` ``.safetensors``), then the run's
    hyper-parameters (a ``backbone.name`` with an ``-<E>E<k>A`` suffix, an ``upcycle`` group). The tensors themselves
    give the experts, expert type and shared-expert widths (``infer_moe_config``) and override the records there.
    ``experts_per_token`` and ``normalize_weights`` are None when no record tells them.

    Args:
        path: Checkpoint file (``.ckpt``, ``.pt`` or ``.safetensors``).
        state: The file's network tensors if already read (``read_network_state``), to skip reading them again.
    """
    path = Path(path)
    state = read_network_state(path) if state is None else state
    if infer_moe_config(state) is None:
        return None
    record, hparams = read_records(path)
    known = {"experts_per_token": None, "normalize_weights": None, **_moe_from_hparams(hparams)}
    known.update(record.get("moe") or {})
    return {**known, **infer_moe_config(state, known.get("num_shared_experts"))}


def read_records(path: str | Path) -> tuple[dict, dict]:
    """The ``diffperc`` record (what rebuilds and checks the network: ``dit_config``, ``moe``, ``tasks``,
    ``diffusion``, ``codec``, ...) and the hyper-parameters stored with a checkpoint ({} for each when there are none).
    A ``diffperc export`` ``.safetensors`` file keeps both in the ``.json`` beside it."""
    path = resolve_weights(path)
    if path.suffix == ".safetensors":
        sidecar = path.with_suffix(".json")
        raw = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
        raw = raw if isinstance(raw, dict) else {}
        return raw, dict(raw.get("hyper_parameters") or {})
    raw = _load_or_refuse(path)  # memory-mapped: the tensors, already read once, are not loaded again
    meta = raw.get("diffperc") if isinstance(raw, Mapping) else None
    hparams = raw.get("hyper_parameters") if isinstance(raw, Mapping) else None
    return dict(meta or {}), dict(hparams or {})


def _moe_from_hparams(hparams: Mapping) -> dict:
    """Top-k, weight normalisation and shared-expert count a run's hyper-parameters imply for its network."""
    out = {}
    backbone = hparams.get("backbone") if isinstance(hparams.get("backbone"), Mapping) else {}
    try:
        suffix = parse_moe_suffix(str(backbone.get("name") or ""))
    except ValueError:
        suffix = None
    if suffix:  # an MoE preset; the defaults are those of `build_model`, which older runs did not record
        out.update(
            experts_per_token=suffix[2],
            normalize_weights=bool(backbone.get("normalize_weights", True)),
            num_shared_experts=int(backbone.get("num_shared_experts", 1)),
        )
    upcycle = hparams.get("upcycle")
    if isinstance(upcycle, Mapping) and "top_k" in upcycle:  # `upcycle()`: normalised weights, no shared expert
        out.update(experts_per_token=int(upcycle["top_k"]), normalize_weights=True, num_shared_experts=0)
    return out


def load_weights_only(path: str | Path, mmap: bool = True):
    """``torch.load(path, weights_only=True)`` on the CPU, memory-mapped when the file allows it.

    Only zip-format files (``torch.save``'s default since 1.6) can be mapped; a legacy file
    (``_use_new_zipfile_serialization=False``) is read plainly instead of failing as if it were truncated.
    """
    with open(path, "rb") as f:
        zipped = f.read(4) == b"PK\x03\x04"
    return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and zipped)


def _load_or_refuse(path: Path, mmap: bool = True):
    """``load_weights_only``, with one line for a file it cannot or must not read."""
    try:
        return load_weights_only(path, mmap=mmap)
    except Exception as err:
        # weights_only refuses any pickled object that is not a tensor or a plain container: never run it.
        raise ValueError(
            f"{path}: torch.load(weights_only=True) could not read it: a corrupt file, or one holding "
            f"Python objects other than tensors and plain containers (refused: unpickling them could "
            f"run code): {err}"
        ) from err


def _read(path: Path) -> tuple[object, str]:
    path = resolve_weights(path)  # a diffusers folder or Hub id -> its weights file
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return _from_diffusers(load_file(str(path), device="cpu"), path, "safetensors")
    raw = _load_or_refuse(path, mmap=False)
    if not isinstance(raw, Mapping):
        raise TypeError(f"{path}: not a state dict (the file holds a {type(raw).__name__}, expected a dict)")
    return _from_diffusers(raw, path, "lightning" if isinstance(raw.get("state_dict"), Mapping) else "dit")


def _network_tensors(raw: Mapping, path: Path) -> tuple[dict[str, torch.Tensor], bool]:
    """Flat ``{dotted key: tensor}`` of the part of the file that holds networks, and whether it is averaged."""
    if isinstance(raw.get("state_dict"), Mapping):
        # WeightAveraging moves the live weights to `current_model_state` and puts the average in `state_dict`.
        averaged = "current_model_state" in raw or "averaging_state" in raw
        return _flatten(raw["state_dict"]), averaged
    flat = _flatten(raw)
    if not flat:
        raise ValueError(f"{path}: not a state dict (no tensors in it)")
    return flat, False


def _flatten(tree: Mapping, prefix: str = "") -> dict[str, torch.Tensor]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, torch.Tensor):
            flat[prefix + str(key)] = value
        elif isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
    return flat


def _pick_prefix(flat: Mapping[str, torch.Tensor], path: Path) -> str:
    prefixes = sorted(k[: -len(_ANCHOR)] for k in flat if k == _ANCHOR or k.endswith("." + _ANCHOR))
    if not prefixes:
        raise ValueError(
            f"{path}: no DiT weights in it (no key ending in `{_ANCHOR}`); first keys: {list(flat)[:_MAX_LISTED]}"
        )
    ema = [p for p in prefixes if _EMA_PREFIX.search(p)]
    candidates = ema or prefixes
    if len(candidates) > 1:
        raise ValueError(f"{path}: several networks in it, under prefixes {candidates}; save the one to load alone")
    return candidates[0]


def _convert(
    source: dict[str, torch.Tensor],
    target: Mapping[str, torch.Tensor],
    model: nn.Module,
    path: Path,
    source_has_null_row: bool,
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Applies the conversions of ``load_pretrained`` where shapes differ; returns the new dict and one line each."""
    done = []

    def _differs(key: str) -> bool:
        return key in source and key in target and source[key].shape != target[key].shape

    # 1. learn_sigma source, mean-only target: keep the first C channels of every pixel.
    key = "final_layer.linear.weight"
    if _differs(key) and "x_embedder.proj.weight" in source:
        p = source["x_embedder.proj.weight"].shape[-1]
        rows_src, rows_tgt = source[key].shape[0], target[key].shape[0]
        if rows_src == 2 * rows_tgt and rows_tgt % (p * p) == 0:
            source = drop_sigma(source, p, rows_tgt // (p * p))
            done.append(
                f"final_layer.linear: dropped sigma, {rows_src // (p * p)} -> {rows_tgt // (p * p)} channels per pixel"
            )

    # 2. k conditioning latents stacked before the noisy one: widen the patch embedding.
    key = "x_embedder.proj.weight"
    if _differs(key) and source[key].dim() == target[key].dim() == 4:
        c_src, c_tgt = source[key].shape[1], target[key].shape[1]
        if c_tgt > c_src and c_tgt % c_src == 0:
            source = widen_patch_embedding(source, c_tgt // c_src)
            done.append(f"x_embedder.proj: widened {c_src} -> {c_tgt} input channels ({c_tgt // c_src} latents)")

    # 3. Another label set (e.g. tasks instead of ImageNet classes): class-mean rows, null row kept apart.
    key = "y_embedder.embedding_table.weight"
    if _differs(key) and source[key].shape[1:] == target[key].shape[1:]:
        table = source[key]
        target_has_null = getattr(getattr(model, "y_embedder", None), "dropout_prob", 0) > 0
        rows = target[key].shape[0]
        new = task_embedding_rows(table, rows - target_has_null, source_has_null_row)
        if target_has_null:
            null = table[-1:] if source_has_null_row else new[:1]
            new = torch.cat([new, null.to(new.dtype)])
        source = {**source, key: new}
        done.append(
            f"y_embedder.embedding_table: {table.shape[0]} -> {rows} rows (class mean"
            f"{', null row kept' if target_has_null and source_has_null_row else ''})"
        )

    # 4. Position embedding: fixed sin-cos, so it can be rebuilt for any grid (or built when, as in a diffusers file
    #    without its config.json, the source does not store it).
    key = "pos_embed"
    if key not in source and key in target and target[key].dim() == 3:
        side = math.isqrt(target[key].shape[1])
        if side * side == target[key].shape[1]:
            source = {**source, key: sincos_pos_embed(target[key].shape[2], side).unsqueeze(0)}
            done.append(f"pos_embed: built for a {side}x{side} grid (not stored in the file)")
    if key in source and key in target and source[key].dim() == 3:
        stored = source[key]
        side = math.isqrt(stored.shape[1])
        if side * side == stored.shape[1] and stored.shape[2] % 4 == 0:
            expected = sincos_pos_embed(stored.shape[2], side).unsqueeze(0)
            if not torch.allclose(stored.float(), expected, atol=1e-5, rtol=0):
                diff = (stored.float() - expected).abs().max().item()
                warnings.warn(
                    f"{path}: `pos_embed` is not the sin-cos embedding for its {side}x{side} grid "
                    f"(max difference {diff:.2e}); it is {'replaced' if _differs(key) else 'kept'}",
                    stacklevel=3,
                )
        if _differs(key) and stored.shape[2] == target[key].shape[2]:
            side_tgt = math.isqrt(target[key].shape[1])
            if side_tgt * side_tgt == target[key].shape[1]:
                source = {**source, key: sincos_pos_embed(stored.shape[2], side_tgt).unsqueeze(0).to(stored.dtype)}
                done.append(f"pos_embed: recomputed for a {side_tgt}x{side_tgt} grid (was {side}x{side})")
    return source, done


#################################################################################
#                   diffusers' DiT layout (DiTTransformer2DModel)               #
#################################################################################
# facebook/DiT-XL-2-256 and -512 hold the official weights renamed for diffusers (its `transformer/` folder). The
# renaming is undone here; diffusers keeps one copy of the timestep and label embedders in every block (all equal).

_DIFFUSERS_ANCHOR = "transformer_blocks.0.norm1.emb.timestep_embedder.linear_1.weight"
_DIFFUSERS_FILES = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.fp16.safetensors",
    "diffusion_pytorch_model.fp16.bin",
)
_WEIGHT_SUFFIXES = {".pt", ".pth", ".ckpt", ".bin", ".safetensors"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Per-block renames: diffusers name (after `transformer_blocks.<i>.`) -> official name (after `blocks.<i>.`).
_BLOCK_RENAMES = {
    "norm1.linear": "adaLN_modulation.1",
    "attn1.to_out.0": "attn.proj",
    "ff.net.0.proj": "mlp.fc1",
    "ff.net.2": "mlp.fc2",
}
_TOP_RENAMES = {
    "pos_embed.proj": "x_embedder.proj",
    "proj_out_1": "final_layer.adaLN_modulation.1",
    "proj_out_2": "final_layer.linear",
}
_EMBEDDERS = {  # block 0's conditioning embedders -> the official model's single copy
    "norm1.emb.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "norm1.emb.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "norm1.emb.class_embedder.embedding_table": "y_embedder.embedding_table",
}


def is_diffusers_dit(state: Mapping) -> bool:
    """Whether a state dict is in diffusers' ``DiTTransformer2DModel`` layout."""
    return _DIFFUSERS_ANCHOR in state


def convert_diffusers_dit(
    state: Mapping[str, torch.Tensor], sample_size: int | None = None, path: str | Path = "the state dict"
) -> dict[str, torch.Tensor]:
    """Renames a diffusers ``DiTTransformer2DModel`` state dict to the official DiT layout (``models/dit.py``).

    Every key is mapped and none is left over: separate ``to_q``/``to_k``/``to_v`` become the fused ``attn.qkv``;
    block 0's timestep and label embedders become ``t_embedder`` / ``y_embedder`` (the copies in the other blocks
    must equal them, as in diffusers' conversion of the official checkpoints); ``pos_embed``, which diffusers
    recomputes instead of storing, is the fixed sin-cos embedding for ``sample_size // patch_size`` (left out when
    ``sample_size`` is None; ``load_pretrained`` then builds it for the model's grid).

    The converted network computes what the official DiT computes, which differs slightly from what diffusers'
    ``DiTTransformer2DModel`` computes with the same weights: diffusers' timestep features use frequencies
    ``exp(-ln(1e4) i / (half - 1))`` (``downscale_freq_shift=1``) where DiT uses ``/ half`` (both put cosines first,
    ``flip_sin_to_cos=True``), and its MLP LayerNorm has the config's ``norm_eps`` (default 1e-5) where DiT has
    1e-6. With DiT's sinusoid and eps, diffusers' model and the converted one give bitwise equal outputs; stock
    diffusers' timestep features are 0.13% (relative L2) off DiT's at t = 1, 1.3% at 10, 13% at 100, 61% at 500 and
    101% at 999, so its outputs drift from the official network's as t grows (``tests/models/test_diffusers_dit.py``).

    Args:
        state: diffusers weights (keys ``pos_embed.proj.*``, ``transformer_blocks.<i>.*``, ``proj_out_{1,2}.*``).
        sample_size: Latent side the model was built for (``sample_size`` in its ``config.json``).
        path: Where the weights come from, for error messages.

    Raises:
        ValueError: a key with no counterpart in the official layout, or per-block embedders that differ.
    """
    out: dict[str, torch.Tensor] = {}
    left = dict(state)

    def take(key: str) -> torch.Tensor:
        return left.pop(key)

    for old, new in _TOP_RENAMES.items():
        for kind in ("weight", "bias"):
            if f"{old}.{kind}" in left:
                out[f"{new}.{kind}"] = take(f"{old}.{kind}")
    blocks = sorted({int(k.split(".")[1]) for k in state if k.startswith("transformer_blocks.")})
    for i in blocks:
        src, dst = f"transformer_blocks.{i}.", f"blocks.{i}."
        for old, new in _BLOCK_RENAMES.items():
            for kind in ("weight", "bias"):
                if f"{src}{old}.{kind}" in left:
                    out[f"{dst}{new}.{kind}"] = take(f"{src}{old}.{kind}")
        # 1. Separate q, k, v projections -> one fused qkv (rows q, then k, then v, as DiT's Attention splits them).
        for kind in ("weight", "bias"):
            parts = [f"{src}attn1.to_{n}.{kind}" for n in "qkv"]
            if all(p in left for p in parts):
                out[f"{dst}attn.qkv.{kind}"] = torch.cat([take(p) for p in parts])
        # 2. The conditioning embedders: block 0's are the model's; the other blocks' copies must be equal.
        for old, new in _EMBEDDERS.items():
            for kind in ("weight", "bias"):
                key = f"{src}{old}.{kind}"
                if key not in left:
                    continue
                value = take(key)
                if i == blocks[0]:
                    out[f"{new}.{kind}"] = value
                elif not torch.equal(value, out.get(f"{new}.{kind}", value)):
                    diff = (value.float() - out[f"{new}.{kind}"].float()).abs().max().item()
                    raise ValueError(
                        f"{path}: `{key}` differs from block {blocks[0]}'s copy (max difference {diff:.3g}); the "
                        "official DiT layout has one timestep and label embedder for all blocks"
                    )
    if left:
        raise ValueError(
            f"{path}: diffusers DiT keys with no counterpart in the official DiT layout: {sorted(left)[:_MAX_LISTED]} "
            f"({len(left)} in all)"
        )
    proj = out.get("x_embedder.proj.weight")
    if sample_size and proj is not None and sample_size % proj.shape[-1] == 0:
        grid = sample_size // proj.shape[-1]
        out["pos_embed"] = sincos_pos_embed(proj.shape[0], grid).unsqueeze(0).to(proj.dtype)
    return out


def resolve_weights(path: str | Path) -> Path:
    """The weights file ``path`` stands for: a file as is; in a folder, diffusers' ``diffusion_pytorch_model``
    (``.safetensors`` first, then ``.bin``), in it or in its ``transformer/`` subfolder (a DiT pipeline such as
    ``facebook/DiT-XL-2-256``); a Hub id through the Hugging Face cache (downloaded unless ``HF_HUB_OFFLINE``).

    Raises:
        FileNotFoundError: no such file, folder or Hub repository; for an official checkpoint's file name the message
            names the ``diffperc download`` command that fetches it, for a Hub id not cached offline the ``hf
            download`` command.
    """
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        return _diffusers_weights(path)
    if _HUB_ID.match(str(path)) and path.suffix not in _WEIGHT_SUFFIXES:
        from diffperc import hub

        return _diffusers_weights(hub.dit_folder(str(path)))
    from diffperc.hub import fetch_command

    command = fetch_command(path)
    raise FileNotFoundError(f"Checkpoint file not found: {path}" + (f"; fetch it with `{command}`" if command else ""))


def _diffusers_weights(folder: Path) -> Path:
    for base in (folder, folder / "transformer"):
        for name in _DIFFUSERS_FILES:
            if (base / name).is_file():
                return base / name
    raise FileNotFoundError(
        f"{folder}: no weights in it (a diffusers model folder holds {_DIFFUSERS_FILES[0]} or "
        f"{_DIFFUSERS_FILES[1]}, a DiT pipeline folder holds them in transformer/)"
    )


def _from_diffusers(raw, path: Path, fmt: str) -> tuple[object, str]:
    """``(raw, fmt)`` unchanged, or converted to the official layout when it is a diffusers DiT state dict."""
    if not isinstance(raw, Mapping) or not is_diffusers_dit(raw):
        return raw, fmt
    sample_size = None
    config = path.parent / "config.json"
    if config.is_file():
        try:
            sample_size = json.loads(config.read_text()).get("sample_size")
        except (json.JSONDecodeError, AttributeError):
            sample_size = None
    sample_size = sample_size if isinstance(sample_size, int) else None
    return convert_diffusers_dit(raw, sample_size, path), "diffusers"
