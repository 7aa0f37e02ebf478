"""The one place a network is assembled: presets, the widening rule, and the DiT of a run or of a checkpoint.

``build_network`` builds what a LightningModule trains (preset, MoE layout, input widening or task routes, pretrained
weights, upcycling); ``network_from_checkpoint`` rebuilds exactly the network a checkpoint or export holds. Both
LightningModules, ``diffperc export``, ``diffperc upcycle`` and ``PerceptionPipeline`` go through them.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from diffperc.models.dit import DiT, DiT_models
from diffperc.models.moe import SparseMoE, moe_config, parse_moe_suffix, to_moe, upcycle
from diffperc.models.pretrained import (
    architecture_mismatch,
    load_pretrained,
    network_fields,
    read_moe_config,
    read_network_state,
    read_records,
)
from diffperc.models.router import PatchEmbedRouter

#: Presets with an ``-<E>E<k>A`` suffix, listed by ``python -m diffperc.models`` (any dense preset takes a suffix).
MOE_PRESETS = [f"DiT-{s}/2-{e}E2A" for s in ("S", "B", "L", "XL") for e in (8, 16)] + ["a2-8E2A", "t3-4E2A"]


def build_model(
    name: str,
    num_shared_experts: int = 1,
    expert_type: str = "gelu",
    shared_expert_ratio: float | None = None,
    normalize_weights: bool = True,
    **overrides,
) -> DiT:
    """Builds a preset (``"DiT-XL/2"``, ``"t3"``, ``"DiT-S/2-8E2A"``, ...) with DiT constructor keyword overrides.

    A ``-<E>E<k>A`` suffix builds the mixture-of-experts version of the dense preset, as pretrained from scratch in
    the paper (§3.2, after DiT-MoE): every block's MLP becomes E experts of the same width, top-k routed, plus
    ``num_shared_experts`` shared experts that every token uses. The defaults (GELU experts, one shared expert as wide
    as a routed one, normalised top-k weights) are this project's; DiT-MoE's own layout is
    ``expert_type="swiglu", num_shared_experts=2, shared_expert_ratio=1.0, normalize_weights=False``.

    Args:
        name: A key of ``DiT_models`` (see ``python -m diffperc.models``), optionally with an MoE suffix.
        num_shared_experts: Shared experts per MoE layer (MoE presets only).
        expert_type: ``gelu`` (DiT's MLP) or ``swiglu`` (DiT-MoE's) experts (MoE presets only).
        shared_expert_ratio: Hidden width of one shared expert / ``hidden_size``; None = ``mlp_ratio`` (as wide as a
            routed expert). MoE presets only.
        normalize_weights: Renormalise each token's top-k routing weights to sum to 1 (MoE presets only).
        **overrides: Official DiT constructor keywords (``input_size``, ``patch_size``, ``in_channels``, ...).
    """
    moe = parse_moe_suffix(name)
    base = moe[0] if moe else name
    if base not in DiT_models:
        known = ", ".join(DiT_models)
        raise ValueError(
            f"Unknown model preset {name!r} (`--model.backbone.name`). Known presets: {known}, each "
            "optionally with a mixture-of-experts suffix such as -8E2A"
        )
    kwargs = dict(DiT_models[base])
    kwargs.update({k: v for k, v in overrides.items() if v is not None})
    model = DiT(**kwargs)
    if moe:
        _, num_experts, top_k = moe
        for block in model.blocks:
            dim, hidden = block.mlp.fc1.in_features, block.mlp.fc1.out_features
            block.mlp = SparseMoE(
                dim,
                hidden,
                num_experts=num_experts,
                experts_per_token=top_k,
                num_shared_experts=num_shared_experts,
                shared_expert_hidden_size=int(dim * shared_expert_ratio) if shared_expert_ratio else None,
                expert_type=expert_type,
                normalize_weights=normalize_weights,
            ).to(block.mlp.fc1.weight.device)
    return model


@torch.no_grad()
def widen_input_projection(model: DiT, num_inputs: int) -> DiT:
    """Lets ``model`` take ``num_inputs`` latents concatenated on channels (Marigold's rule, paper §4).

    The patch-embedding weights are repeated ``num_inputs`` times along the input channels and divided by
    ``num_inputs``, so feeding ``num_inputs`` copies of one latent gives exactly the original response. The output
    channels stay those of one latent.
    """
    if num_inputs < 1:
        raise ValueError(f"num_inputs must be >= 1, got {num_inputs}")
    old = model.x_embedder.proj
    new = nn.Conv2d(old.in_channels * num_inputs, old.out_channels, old.kernel_size, old.stride, bias=True)
    new = new.to(device=old.weight.device, dtype=old.weight.dtype)
    new.weight.copy_(old.weight.repeat(1, num_inputs, 1, 1) / num_inputs)
    new.bias.copy_(old.bias)
    model.x_embedder.proj = new
    model.in_channels = new.in_channels
    return model


@dataclass
class Backbone:
    """The DiT to build: a preset name plus optional overrides of its shape and, for MoE presets, its expert layout.

    The MoE fields apply to ``-<E>E<k>A`` presets (``t1-4E2A``, ``DiT-S/2-8E2A``). Their defaults are this project's
    layout (GELU experts, one shared expert as wide as a routed one, normalised top-k weights); DiT-MoE's (paper §3.2)
    is ``expert_type: swiglu``, ``num_shared_experts: 2``, ``shared_expert_ratio: 1.0`` (two shared experts of width
    D, one fused SwiGLU of width 2D) and ``normalize_weights: false``. Starting from an MoE checkpoint
    (``--model.init_from``) takes the layout from the checkpoint instead.

    Args:
        name: Preset (``t1``..``t6``, ``a1``..``a6``, ``DiT-S/2`` .. ``DiT-XL/8``, optionally ``-<E>E<k>A``;
            ``python -m diffperc.models`` lists them).
        patch_size: Override of the preset's patch size.
        hidden_size: Override of the preset's width.
        depth: Override of the preset's number of blocks.
        num_heads: Override of the preset's attention heads.
        learn_sigma: Keep DiT's variance outputs (ignored by the loss; only for official-checkpoint layouts).
        num_shared_experts: MoE presets: experts every token uses besides its top-k (0 = none).
        shared_expert_ratio: MoE presets: hidden width of one shared expert / width D; null = the MLP ratio (4), as
            wide as a routed expert.
        expert_type: MoE presets: ``gelu`` (DiT's MLP, so dense weights copy in) or ``swiglu`` (DiT-MoE's experts).
        normalize_weights: MoE presets: renormalise each token's top-k routing weights to sum to 1.
    """

    name: str = "t2"
    patch_size: int | None = None
    hidden_size: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    learn_sigma: bool = False
    num_shared_experts: int = 1
    shared_expert_ratio: float | None = None
    expert_type: Literal["gelu", "swiglu"] = "gelu"
    normalize_weights: bool = True

    def __post_init__(self):
        if self.num_shared_experts < 0:
            raise ValueError(f"`--model.backbone.num_shared_experts` must be >= 0, got {self.num_shared_experts}")
        if self.shared_expert_ratio is not None and self.shared_expert_ratio <= 0:
            raise ValueError(
                f"`--model.backbone.shared_expert_ratio` must be > 0 or null, got {self.shared_expert_ratio}"
            )
        if self.expert_type not in ("gelu", "swiglu"):
            raise ValueError(f"`--model.backbone.expert_type` must be gelu or swiglu, got {self.expert_type!r}")

    def build(self, dense: bool = False, **dit_kwargs) -> DiT:
        """The network: ``build_model`` on this preset (its dense base when ``dense``) with these overrides and
        ``dit_kwargs`` (``input_size``, ``in_channels``, ``num_classes``, ...)."""
        moe = parse_moe_suffix(self.name)
        return build_model(
            moe[0] if moe and dense else self.name,
            num_shared_experts=self.num_shared_experts,
            expert_type=self.expert_type,
            shared_expert_ratio=self.shared_expert_ratio,
            normalize_weights=self.normalize_weights,
            patch_size=self.patch_size,
            hidden_size=self.hidden_size,
            depth=self.depth,
            num_heads=self.num_heads,
            learn_sigma=self.learn_sigma,
            **dit_kwargs,
        )


@dataclass
class Upcycle:
    """Upcycling a dense network into a mixture of experts before fine-tuning (paper §4.4).

    When ``--model.init_from`` is already a mixture of experts, its own layout is loaded: ``num_experts`` and
    ``top_k`` may restate it (and stand in for a file that does not record its top-k) but not change it, and
    ``balance_loss_coef`` and ``capacity_factor`` apply to it.

    Args:
        num_experts: Experts E per block; each starts as a copy of the block's dense MLP.
        top_k: Experts per token k (weights renormalised over the k, so the upcycled model starts equal to the dense).
        balance_loss_coef: Coefficient of the expert balance loss added to the training loss.
        capacity_factor: Optional expert capacity (drops assignments beyond it; None keeps all).
        router_init_std: Standard deviation of the new router's weights.
    """

    num_experts: int = 8
    top_k: int = 2
    balance_loss_coef: float = 0.01
    capacity_factor: float | None = None
    router_init_std: float = 0.02

    def __post_init__(self):
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"`--model.upcycle.top_k` must be in 1..num_experts={self.num_experts}, got {self.top_k}")


def build_network(
    backbone: Backbone,
    *,
    input_size: int,
    in_channels: int,
    num_classes: int,
    class_dropout_prob: float = 0.0,
    task_inputs: list[int] | None = None,
    init_from: str | Path | None = None,
    upcycle_to: Upcycle | None = None,
) -> DiT:
    """The network a run trains, in four steps.

    1. The preset over one latent. A checkpoint that is already a mixture of experts (pretrained as one,
       ``diffperc upcycle``, an upcycled run) brings its own layout: the preset's dense base, then every MLP swapped
       for the checkpoint's ``SparseMoE`` layout (``checkpoint_moe_layout``).
    2. Inputs: ``task_inputs`` holds the latents each task's network input stacks ([k conditions, noisy target]). One
       task widens the input projection (the widening rule keeps the response of an all-RGB input); several get one
       widened projection each (``PatchEmbedRouter``). None keeps one latent (generative pretraining).
    3. ``init_from``'s weights (``load_pretrained`` converts a one-latent or dense-label checkpoint).
    4. ``upcycle_to``: a dense network becomes a mixture of experts (function-preserving).

    Args:
        backbone: The preset and its overrides.
        input_size: Latent side the position embedding is built for.
        in_channels: Channels of one latent.
        num_classes: Label rows (classes for pretraining, task ids for fine-tuning).
        class_dropout_prob: Label dropout (adds the null row when > 0).
        task_inputs: Latents per network input, one entry per task; None = one latent, no task routing.
        init_from: Pretrained weights (DiT ``.pt``, diffperc checkpoint, ``.safetensors``); None = from scratch.
        upcycle_to: Upcycling settings; also restate or complete an MoE checkpoint's layout.
    """
    source = read_network_state(init_from) if init_from else {}
    stored = checkpoint_moe_layout(init_from, source, backbone, upcycle_to) if init_from else None
    net = backbone.build(
        dense=stored is not None,
        input_size=input_size,
        in_channels=in_channels,
        num_classes=num_classes,
        class_dropout_prob=class_dropout_prob,
    )
    if stored is not None:
        to_moe(net, stored)
    routed = task_inputs is not None and len(task_inputs) > 1
    if task_inputs is not None and not routed:
        widen_input_projection(net, task_inputs[0])
    elif routed and (not source or any(k.startswith("x_embedder.routes.") for k in source)):
        net.x_embedder = PatchEmbedRouter.from_patch_embed(net.x_embedder, task_inputs)
    if init_from:
        if stored is None and moe_config(net) is not None:
            raise ValueError(
                f"`--model.init_from` {init_from} is a dense network but `--model.backbone.name` "
                f"{backbone.name} is a mixture of experts: name its dense preset and set "
                "`--model.upcycle.num_experts` / `--model.upcycle.top_k` to upcycle it"
            )
        load_pretrained(net, init_from)
    if routed and not isinstance(net.x_embedder, PatchEmbedRouter):
        # Routes initialised from the loaded one-latent projection.
        net.x_embedder = PatchEmbedRouter.from_patch_embed(net.x_embedder, task_inputs)
    u = upcycle_to
    if u and moe_config(net) is None:
        net = upcycle(net, u.num_experts, u.top_k, u.capacity_factor, u.balance_loss_coef, u.router_init_std)
    return net


def checkpoint_moe_layout(
    init_from: str | Path, source: dict[str, torch.Tensor], backbone: Backbone, upcycle_to: Upcycle | None
) -> dict | None:
    """The SparseMoE layout to load ``init_from`` into, None for a dense file: the checkpoint's own (experts,
    top-k, shared experts, expert type, normalisation), which a preset suffix or ``--model.upcycle`` may restate
    but not contradict, plus the balance-loss and capacity settings of ``--model.upcycle`` when given."""
    stored = read_moe_config(init_from, source)
    if stored is None:
        return None
    b, u = backbone, upcycle_to
    suffix = parse_moe_suffix(b.name)
    asks = []  # (flag, layout it implies): fills in what a file without records can't tell, and must agree
    if suffix:
        implied = dict(num_experts=suffix[1], experts_per_token=suffix[2], normalize_weights=b.normalize_weights)
        asks.append((f"`--model.backbone.name {b.name}`", implied))
    if u:
        implied = dict(num_experts=u.num_experts, experts_per_token=u.top_k, normalize_weights=True)
        asks.append((f"`--model.upcycle.num_experts {u.num_experts} --model.upcycle.top_k {u.top_k}`", implied))
    layout = dict(stored)
    for flag, implied in asks:
        layout.update({k: v for k, v in implied.items() if layout[k] is None})
        wrong = [f"{k}={layout[k]}" for k in ("num_experts", "experts_per_token") if layout[k] != implied[k]]
        if wrong:
            raise ValueError(
                f"`--model.init_from` {init_from} is a mixture of experts with {', '.join(wrong)}, which {flag} "
                "contradicts: match the checkpoint, or leave the layout out (it is read from the checkpoint)"
            )
    if layout["experts_per_token"] is None or layout["normalize_weights"] is None:
        e, base = layout["num_experts"], suffix[0] if suffix else b.name
        raise ValueError(
            f"`--model.init_from` {init_from} holds a mixture of {e} experts with no record of how many are "
            f"active per token: set `--model.upcycle.num_experts {e} --model.upcycle.top_k <k>` (an upcycled "
            f"network), or `--model.backbone.name {base}-{e}E<k>A` with `--model.backbone.normalize_weights` "
            "(one pretrained as a mixture of experts)"
        )
    if u:  # training settings, not layout
        layout.update(balance_loss_coef=u.balance_loss_coef, capacity_factor=u.capacity_factor)
    return layout


# ----------------------------------------------------------------------------- networks read back from files
@dataclass
class CheckpointNetwork:
    """A network rebuilt from a file, with what describes it.

    Attributes:
        net: The DiT (or DiT-MoE, or task-routed DiT), weights loaded strictly (EMA weights when the file has them).
        record: What rebuilds and checks it: ``dit_config``, ``moe``, ``task``/``tasks``, ``task_routes``,
            ``diffusion``, ``codec``.
        hparams: The run's hyper-parameters ({} when the file has none).
    """

    net: DiT
    record: dict
    hparams: dict


def network_from_checkpoint(path: str | Path, flag: str = "--ckpt_path") -> CheckpointNetwork:
    """Rebuilds the network in ``path`` (a diffperc ``.ckpt``, an upcycled file, an export's ``.safetensors``) from
    the file's own record, else from its tensors and hyper-parameters, and loads its weights strictly. A file that
    cannot be rebuilt exactly fails in one line naming ``flag`` and the file."""
    path = Path(path)
    state = read_network_state(path)
    meta, hparams = read_records(path)
    config = meta.get("dit_config") or _config_or_fail(state, hparams, path, flag)
    moe = read_moe_config(path, state)  # the stored record, else what the hyper-parameters and tensors tell
    if moe is not None and (moe["experts_per_token"] is None or moe["normalize_weights"] is None):
        raise ValueError(
            f"`{flag}` {path} holds a mixture of {moe['num_experts']} experts with no record of how many are "
            "active per token (no `diffperc` metadata or MoE hyper-parameters): it cannot be rebuilt exactly"
        )
    routes = meta.get("task_routes") or network_fields(state).get("task_routes")
    net = rebuild_network(state, config, moe, routes, path, flag)  # proves the record rebuilds this network
    record = {
        "dit_config": config,
        "moe": moe_config(net),
        "task": meta.get("task"),
        "tasks": meta.get("tasks"),
        "task_routes": routes,
        "diffusion": meta.get("diffusion") or hparams.get("diffusion"),  # older runs: hyper-parameters only
        "codec": meta.get("codec"),
    }
    return CheckpointNetwork(net, record, hparams)


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


def infer_dit_config(state: dict[str, torch.Tensor], hparams: dict) -> dict:
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
    num_heads = backbone.get("num_heads") or DiT_models.get(str(backbone.get("name")), {}).get("num_heads")
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


def _config_or_fail(state: dict[str, torch.Tensor], hparams: dict, path: Path, flag: str) -> dict:
    try:
        return infer_dit_config(state, hparams)
    except (KeyError, ValueError) as err:  # a file without `diffperc` metadata whose tensors don't tell enough
        raise ValueError(f"`{flag}` {path}: cannot rebuild its network from the tensors alone: {err}") from err
