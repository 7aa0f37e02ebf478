"""Prints every model preset with its parameter count and forward MACs per image.

To run: ``diffperc models`` (or ``python -m diffperc.models``; ``diffperc models DiT-XL/2 t1`` for some). GPU presets
are counted as in the paper, on Stable Diffusion VAE latents (4 channels, 1/8 resolution) at 256 and 512 px with
DiT's default outputs (learn_sigma, 1000 classes); the tiny presets in pixel space (3 channels) at 32 and 64 px.
Networks are built on the meta device; MACs come from their layers' shapes (``forward_macs``).
"""

import sys
import time

import torch
from torch import nn

from diffperc.models import MOE_PRESETS, DiT, DiT_models, SparseMoE, build_model, parameter_counts, parse_moe_suffix


def forward_macs(model: DiT, side: int) -> int:
    """Forward MACs of ``model`` on one ``side`` x ``side`` latent, from its layers' shapes.

    What ``diffperc.compute.count_macs`` measures (weight matmuls, the patch convolution, attention's two products;
    elementwise ops, norms and embedding lookups are free), without running the network: the full table takes
    seconds instead of minutes. Without a capacity factor every token uses exactly k routed (+ shared) experts, so
    an MoE layer costs ``SparseMoE.macs_per_token`` per token.
    """
    tokens = (side // model.patch_size) ** 2  # T
    linear = lambda layer: layer.in_features * layer.out_features  # noqa: E731  (per row; biases are free)
    conv = model.x_embedder.proj
    macs = tokens * conv.out_channels * conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
    macs += sum(linear(m) for m in model.t_embedder.mlp if isinstance(m, nn.Linear))  # once per image
    for block in model.blocks:
        macs += linear(block.adaLN_modulation[-1])  # once per image, on the conditioning vector
        macs += tokens * (linear(block.attn.qkv) + linear(block.attn.proj))
        macs += 2 * tokens * tokens * model.hidden_size  # Q K^T and (softmax) V, over all heads
        mlp = block.mlp
        macs += tokens * (mlp.macs_per_token() if isinstance(mlp, SparseMoE) else linear(mlp.fc1) + linear(mlp.fc2))
    final = model.final_layer
    return macs + linear(final.adaLN_modulation[-1]) + tokens * linear(final.linear)


def _row(name: str, pixel_space: bool) -> dict:
    sizes = (32, 64) if pixel_space else (256, 512)
    channels, factor = (3, 1) if pixel_space else (4, 8)
    moe = parse_moe_suffix(name)
    cfg = DiT_models[moe[0] if moe else name]
    with torch.device("meta"):
        model = build_model(name, input_size=sizes[0] // factor, in_channels=channels)
    total, active = parameter_counts(model)
    return dict(
        name=name,
        width=cfg["hidden_size"],
        depth=cfg["depth"],
        heads=cfg["num_heads"],
        patch=cfg["patch_size"],
        params=total,
        active=active,
        sizes=sizes,
        macs=[forward_macs(model, size // factor) for size in sizes],
    )


def table(names: list[str] | None = None) -> str:
    """The presets table as markdown."""
    names = names or [*DiT_models, *MOE_PRESETS]
    lines = [
        "| preset | width | depth | heads | patch | params (M) | active (M) | image px | GMACs / image |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in names:
        r = _row(name, pixel_space=name.startswith("t"))
        for size, macs in zip(r["sizes"], r["macs"]):
            lines.append(
                f"| {r['name']} | {r['width']} | {r['depth']} | {r['heads']} | {r['patch']} | "
                f"{r['params'] / 1e6:.1f} | {r['active'] / 1e6:.1f} | {size} | {macs / 1e9:.3f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """``diffperc models [NAME ...]``; its flags are declared in ``diffperc.cli``."""
    from diffperc.cli import parse_command

    names = parse_command("models", argv).get("names") or []
    unknown = [n for n in names if (parse_moe_suffix(n) or (n,))[0] not in DiT_models]
    if unknown:
        raise ValueError(
            f"Unknown preset(s) {unknown}: the presets are {', '.join(DiT_models)}, each also with an MoE suffix "
            "such as -8E2A (8 experts, 2 active)"
        )
    start = time.perf_counter()
    print(table(names or None))
    print(f"\n({time.perf_counter() - start:.1f} s; networks on the meta device, MACs from their layers' shapes)")


if __name__ == "__main__":
    from diffperc.cli import main as diffperc

    diffperc(["models", *sys.argv[1:]])
