"""Model construction by preset name, and the input-widening rule for conditioning latents."""

import torch
from torch import nn

from diffperc.models.dit import DiT, DiT_models
from diffperc.models.moe import SparseMoE, parse_moe_suffix

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
