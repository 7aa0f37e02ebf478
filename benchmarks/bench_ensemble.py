"""Batched vs one-by-one test-time ensembles (N = 5 members, 10 DDIM steps) on the quickstart depth model's shape.

To run: python benchmarks/bench_ensemble.py [--quick | --tiny] [--out FILE.md]
One-by-one is ``sample_ensemble`` with ``max_batch`` = B inputs (one member per network call, the authors' loop);
batched puts all N x B rows through each call. Both draw the same per-member noise, so their outputs are compared.
"""

import os
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP: see OMP_NOTE in common.py

import torch  # noqa: E402
import yaml  # noqa: E402
from common import Goal, Section, bench_main, md_table, mode_note, sig, time_interleaved  # noqa: E402
from torch.utils.data import default_collate  # noqa: E402

from diffperc.data import ProceduralDepth  # noqa: E402
from diffperc.diffusion import DiffusionSettings, InferenceSettings, sample_ensemble  # noqa: E402
from diffperc.lit.finetuning import Backbone, PerceptionFinetuning  # noqa: E402
from diffperc.tasks import DepthTask  # noqa: E402

QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart" / "depth.yaml"
_MEMBERS, _GOAL = 5, 1.5
# DDIM steps, timed rounds and input batch sizes B per size; --tiny also swaps in a width-32 1-block DiT at 16 px.
_SIZES = {"full": (10, 10, (1, 8)), "quick": (2, 2, (1, 8)), "tiny": (1, 1, (1, 2))}
_TINY_BACKBONE, _TINY_IMAGE_SIZE = dict(hidden_size=32, depth=1, num_heads=2), 16
_MODE = {"quick": "2 DDIM steps, 2 repeats", "tiny": "a width-32 1-block DiT at 16 px, 1 DDIM step, 1 repeat"}


def quickstart_module(backbone: dict | None = None, image_size: int | None = None) -> PerceptionFinetuning:
    """The quickstart depth model (backbone, image size, diffusion settings read from its YAML; ``backbone``
    overrides fields of its backbone, ``image_size`` its image size), untrained but with non-zero output layers, so
    the outputs compared below are not trivially zero."""
    cfg = yaml.safe_load(QUICKSTART.read_text())["model"]["init_args"]
    torch.manual_seed(0)
    module = PerceptionFinetuning(
        task=DepthTask(**cfg["task"].get("init_args", {})),
        backbone=Backbone(**{**cfg["backbone"], **(backbone or {})}),
        image_size=image_size or cfg["image_size"],
        diffusion=DiffusionSettings(**cfg["diffusion"]),
    )
    for p in module.net.parameters():
        if not p.any():  # adaLN-Zero's zero-initialised layers
            torch.nn.init.normal_(p, std=0.02)
    return module.eval()


def run(size: str = "full", repeats: int | None = None) -> Section:
    """Times ``predict_batch`` (sampling, decoding, median merge) batched vs one by one for B = 1 and 8 inputs
    (``size``: full, quick or tiny, see ``common.SIZES``; tiny: B = 1 and 2)."""
    note = mode_note(size, _MODE.get(size, ""))
    steps, default_repeats, batch_sizes = _SIZES[size]
    repeats = repeats or default_repeats
    module = quickstart_module(_TINY_BACKBONE, _TINY_IMAGE_SIZE) if size == "tiny" else quickstart_module()
    rows, goals = [], []
    for b in batch_sizes:
        data = ProceduralDepth("test", length=b, resolution=module.hparams.image_size)
        batch = default_collate([data[i] for i in range(b)])
        settings = {
            "one-by-one": InferenceSettings(num_steps=steps, ensemble_size=_MEMBERS, max_batch=b),
            "batched": InferenceSettings(num_steps=steps, ensemble_size=_MEMBERS, max_batch=_MEMBERS * b),
        }
        # Same members either way: the noise of member m comes from its own generator, whatever the chunking.
        cond, y, channels = module.encode_conditions(batch), module._task_ids(batch), module.latent_channels
        members = {k: sample_ensemble(module.net, cond, y, module.sampler, s, channels) for k, s in settings.items()}
        diff = (members["batched"] - members["one-by-one"]).abs().max().item()
        fns = {k: (lambda s=s, batch=batch: module.predict_batch(batch, s)) for k, s in settings.items()}
        times = {k: t.median for k, t in time_interleaved(fns, repeats, warmup=1).items()}
        speedup = times["one-by-one"] / times["batched"]
        rows.append(
            [
                b,
                sig(times["one-by-one"] * 1e3),
                sig(times["batched"] * 1e3),
                f"{speedup:.2f}x",
                sig(b / times["batched"]),
                f"{diff:.1e}",
            ]
        )
        goals.append(Goal(f"(c) batched vs one-by-one ensemble, B={b}", f"{speedup:.2f}x", ">= 1.5x", speedup >= _GOAL))
    net = module.net
    body = [
        f"{note}`PerceptionFinetuning.predict_batch` (DDIM sampling, decoding, median merge) with N = {_MEMBERS} "
        f"members, {steps} trailing DDIM steps, the quickstart depth model's shape (DiT {module.backbone.name}: width "
        f"{net.hidden_size}, depth {len(net.blocks)}, patch {net.patch_size}, {module.hparams.image_size} px pixel "
        f"space), median of {repeats} interleaved rounds after 1 warm-up. One-by-one = `max_batch` B (each network "
        f"call holds one member of the B inputs); batched = `max_batch` N x B. Max abs diff = largest difference of "
        f"the sampled member latents between the two.",
        "",
        md_table(["inputs B", "one-by-one ms", "batched ms", "speed-up", "inputs/s batched", "max abs diff"], rows),
    ]
    return Section("(c) Batched ensembles", "\n".join(body), goals)


def _args(parser) -> None:
    parser.add_argument(
        "--repeats", type=int, default=None, help="Timed rounds (default 10; 2 with --quick, 1 with --tiny)"
    )


if __name__ == "__main__":
    bench_main(lambda a: run(a.size, a.repeats), __doc__, _args)
