"""Training-step speed with on-the-fly VAE encoding vs cached latents (``diffperc.data.latents``), on CPU by default.

To run: python benchmarks/bench_latents.py [--resolution 64] [--vae_channels 32,64,64] [--steps 20]
A randomly initialised AutoencoderKL (saved to a temporary folder and loaded through VAECodec) stands in for the
Stable Diffusion VAE; the DiT is a tiny preset. About a minute on 2 CPU cores.
"""

import argparse
import os
import statistics
import tempfile
import time

# Idle OpenMP workers sleep instead of spinning (see bench_moe.py); set before torch starts its thread pool.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from diffusers import AutoencoderKL  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from diffperc.codecs import VAECodec  # noqa: E402
from diffperc.data import ProceduralClasses  # noqa: E402
from diffperc.data.latents import LatentCache, cache_latents  # noqa: E402
from diffperc.lit.finetuning import Backbone  # noqa: E402
from diffperc.lit.pretraining import DiffusionPretraining, EMASettings, SamplingSettings  # noqa: E402


def _steps_per_second(module: DiffusionPretraining, loader: DataLoader, steps: int) -> tuple[float, float]:
    """Median and total seconds per optimisation step, data loading included (first step is warm-up)."""
    optimizer = torch.optim.AdamW(module.net.parameters(), lr=1e-4)
    module.train()
    times, it = [], iter(loader)
    for _ in range(steps + 1):
        start = time.perf_counter()
        batch = next(it)
        loss = module.diffusion_loss(module._latents(batch), module._labels(batch))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:]), sum(times[1:])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--vae_channels", default="32,64,64", help="AutoencoderKL block_out_channels")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--backbone", default="t1")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    channels = tuple(int(c) for c in args.vae_channels.split(","))

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * len(channels),
            up_block_types=("UpDecoderBlock2D",) * len(channels),
            block_out_channels=channels,
            latent_channels=4,
            layers_per_block=1,
            norm_num_groups=min(32, channels[0]),
            sample_size=args.resolution,
        ).save_pretrained(f"{tmp}/vae")
        codec = VAECodec(f"{tmp}/vae").to(args.device)
        num_images = args.batch_size * (args.steps + 1)
        data = ProceduralClasses("train", length=num_images, resolution=args.resolution)

        start = time.perf_counter()
        cache_latents(data, codec, f"{tmp}/cache", shard_size=256, batch_size=args.batch_size, device=args.device)
        cache_seconds = time.perf_counter() - start

        module = DiffusionPretraining(
            codec=codec,
            backbone=Backbone(args.backbone, patch_size=2),
            image_size=args.resolution,
            ema=EMASettings(decay=None),
            sampling=SamplingSettings(num_samples=0),
        ).to(args.device)
        images = DataLoader(data, batch_size=args.batch_size, shuffle=True)
        latents = DataLoader(LatentCache(f"{tmp}/cache"), batch_size=args.batch_size, shuffle=True)
        raw_step, raw_total = _steps_per_second(module, images, args.steps)
        cached_step, cached_total = _steps_per_second(module, latents, args.steps)

    per_image_raw = raw_total / (args.steps * args.batch_size)
    per_image_cached = cached_total / (args.steps * args.batch_size)
    per_image_cache = cache_seconds / num_images  # both orientations encoded
    print(
        f"device {args.device}, {torch.get_num_threads()} threads, {args.resolution} px, VAE {channels}, "
        f"latents {codec.latent_channels}x{args.resolution // codec.downsample}^2, DiT {args.backbone}/2, "
        f"batch {args.batch_size}, {args.steps} timed steps"
    )
    print(f"images -> encode -> step : {raw_step * 1e3:8.1f} ms/step (median), {1 / per_image_raw:8.1f} images/s")
    print(f"cached latents -> step   : {cached_step * 1e3:8.1f} ms/step (median), {1 / per_image_cached:8.1f} images/s")
    print(f"speed-up per step        : {raw_step / cached_step:8.2f}x")
    print(
        f"one-off cache (+ flipped): {per_image_cache * 1e3:8.2f} ms/image; pays for itself after "
        f"{per_image_cache / max(per_image_raw - per_image_cached, 1e-12):.2f} epochs"
    )


if __name__ == "__main__":
    main()
