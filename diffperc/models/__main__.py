"""Prints every model preset with its parameter count and forward MACs per image.

To run: ``python -m diffperc.models`` (or ``diffperc models``). GPU presets are counted as in the paper, on Stable
Diffusion VAE latents (4 channels, 1/8 resolution) at 256 and 512 px with DiT's default outputs (learn_sigma,
1000 classes); the tiny presets in pixel space (3 channels) at 32 and 64 px. MACs are counted on the meta device.
"""

import argparse
import time

import torch

from diffperc.compute import count_macs
from diffperc.models import MOE_PRESETS, DiT_models, SparseMoE, build_model, parameter_counts, parse_moe_suffix


def _row(name: str, pixel_space: bool) -> dict:
    sizes = (32, 64) if pixel_space else (256, 512)
    channels, factor = (3, 1) if pixel_space else (4, 8)
    moe = parse_moe_suffix(name)
    base = moe[0] if moe else name
    with torch.device("meta"):
        model = build_model(name, input_size=sizes[0] // factor, in_channels=channels)
        dense = build_model(base, input_size=sizes[0] // factor, in_channels=channels)
    cfg = DiT_models[base]
    total, active = parameter_counts(model)
    macs = []
    for size in sizes:
        side = size // factor
        x = torch.empty(1, channels, side, side, device="meta")
        t = torch.zeros(1, dtype=torch.long, device="meta")
        count = count_macs(dense, x, t, t.clone(), device="meta")
        # Without a capacity factor every token uses exactly k routed (+ shared) experts, so an MoE model's MACs are
        # the dense count with each dense MLP's per-token MACs replaced by the MoE layer's.
        tokens = (side // cfg["patch_size"]) ** 2
        for block in model.blocks:
            if isinstance(block.mlp, SparseMoE):
                dense_mlp = 2 * block.mlp.hidden_size * block.mlp.mlp_hidden_size
                count += tokens * (block.mlp.macs_per_token() - dense_mlp)
        macs.append(count)
    return dict(
        name=name,
        width=cfg["hidden_size"],
        depth=cfg["depth"],
        heads=cfg["num_heads"],
        patch=cfg["patch_size"],
        params=total,
        active=active,
        sizes=sizes,
        macs=macs,
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
    parser = argparse.ArgumentParser(prog="diffperc models", description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="presets to show (default: all)")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if (parse_moe_suffix(n) or (n,))[0] not in DiT_models]
    if unknown:
        parser.error(f"unknown preset(s) {unknown}; known: {', '.join(DiT_models)}")
    start = time.perf_counter()
    print(table(args.names or None))
    print(f"\n({time.perf_counter() - start:.1f} s; MACs counted on the meta device by diffperc.compute.count_macs)")


if __name__ == "__main__":
    main()
