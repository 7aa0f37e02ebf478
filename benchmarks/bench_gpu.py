"""GPU numbers in one command: DiT-XL/2 512 px bf16 training throughput and MFU, batched-ensemble speed-up, MoE ratios.

To run: python benchmarks/bench_gpu.py [--quick | --tiny] [--out benchmarks/results_gpu.md] [--batch 16]
[--steps 20] [--no-compile] [--peak-tflops 989] [--device cuda|cpu]
Full mode takes about 4 minutes on an H100 (under 8: sections are skipped, and said so, when the time runs out) and
writes the markdown to ``--out`` and every number to the same path with ``.json``. ``--tiny`` runs every section on
tiny models in seconds, on the CPU when there is no GPU. MFU = 2 x ``count_train_macs`` (forward + backward MACs,
exact) / step time / the GPU's dense bf16 peak (a table of known GPUs, or ``--peak-tflops``).
"""

import json
import os
import shlex
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP: see OMP_NOTE in common.py

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import (  # noqa: E402
    Section,
    add_size_args,
    machine_info,
    md_table,
    mode_note,
    setup_threads,
    sig,
    time_interleaved,
    write_markdown,
)

from diffperc.compute import count_train_macs  # noqa: E402
from diffperc.models import build_model  # noqa: E402

TITLE = "(f) GPU: DiT-XL/2 512 px bf16"
# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s from the vendors' data sheets. Matched in this order on the
# device name, so the PCIe / NVL variants come before the SXM part of the same name.
PEAK_BF16_TFLOPS = {
    "B200": 2250.0,
    "H200 NVL": 836.0,
    "H200": 989.0,
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H100": 989.0,  # SXM (HBM3)
    "H800": 989.0,
    "GH200": 989.0,
    "A100": 312.0,  # SXM and PCIe alike
    "A800": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10G": 70.0,
    "RTX 6000 Ada": 364.0,
    "RTX A6000": 155.0,
    "RTX 4090": 165.0,
}
_BUDGET_S = 480  # the whole command, 8 minutes
# --tiny: a width-32 1-block DiT on 8x8x4 latents instead of DiT-XL/2 on 64x64x4 (batch 2, 1 step, no warm-up).
_TINY_OVERRIDES = dict(hidden_size=32, depth=1, num_heads=2)
_MODE = {"quick": "3 steps, 1 ensemble round, small MoE batches", "tiny": "tiny models, 1 step each"}


def peak_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of a known GPU (first table key contained in ``device_name``), else None."""
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in device_name), None)


def train_throughput(
    model: torch.nn.Module,
    batch: int,
    input_size: int,
    in_channels: int,
    device: torch.device,
    steps: int,
    warmup: int = 3,
    compile_model: bool = False,
) -> dict[str, float]:
    """Times bf16-autocast training steps (forward, MSE backward, fused AdamW) of a DiT on random latents.

    Returns:
        ``step_s`` (median seconds per step), ``images_per_s``, ``train_flops`` (2 x MACs of forward + backward per
        step) and ``achieved_flops`` (FLOP/s).
    """
    model = model.to(device).train()
    x = torch.randn(batch, in_channels, input_size, input_size, device=device)
    t = torch.randint(0, 1000, (batch,), device=device)
    y = torch.zeros(batch, dtype=torch.long, device=device)
    train_flops = 2 * count_train_macs(model, x, t, y, device="meta")
    target = torch.randn(batch, model.out_channels, input_size, input_size, device=device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    net = torch.compile(model) if compile_model else model

    def _step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = F.mse_loss(net(x, t, y).float(), target)
        loss.backward()
        optimizer.step()

    step_s = time_interleaved({"step": _step}, steps, warmup=warmup)["step"].median
    return {
        "step_s": step_s,
        "images_per_s": batch / step_s,
        "train_flops": train_flops,
        "achieved_flops": train_flops / step_s,
    }


def _max_mem_gib(device: torch.device) -> str:
    return f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f}" if device.type == "cuda" else "n/a"


def _reset_mem(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


#################################################################################
#                                   Sections                                    #
#################################################################################


def train_section(device, size, batch, steps, compile_model, peak, deadline) -> tuple[str, list[dict]]:
    """DiT-XL/2 training at 512 px (64x64x4 latents), eager and (optionally) compiled; halves the batch on OOM."""
    tiny = size == "tiny"
    steps = {"full": steps, "quick": 3, "tiny": 1}[size]
    batch, latent, warmup = (2, 8, 0) if tiny else (batch, 64, 3)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    peak = peak or peak_tflops(name)
    records, rows, notes = [], [], []
    for compiled in (False, True) if compile_model else (False,):
        if compiled and time.perf_counter() > deadline - 240:  # compiling DiT-XL/2 takes 1-3 minutes
            notes.append("torch.compile skipped: less than 4 minutes of the time budget left")
            continue
        b = batch
        while True:
            _reset_mem(device)
            torch.manual_seed(0)
            # 512 px through the SD VAE: 64x64x4 latents, 1024 tokens at patch 2; learn_sigma as in the official model.
            model = build_model(
                "DiT-XL/2", input_size=latent, in_channels=4, num_classes=1000, **(_TINY_OVERRIDES if tiny else {})
            )
            try:
                result = train_throughput(model, b, latent, 4, device, steps, warmup, compiled)
                break
            except torch.cuda.OutOfMemoryError:
                del model
                if b == 1:
                    raise
                notes.append(f"batch {b} ran out of memory; halved")
                b //= 2
            except Exception as error:  # an inductor failure is a result to report, not a crash
                if not compiled:
                    raise
                notes.append(f"torch.compile failed: {type(error).__name__}: {str(error)[:200]}")
                result = None
                break
        del model
        if result is None:
            continue
        mfu = result["achieved_flops"] / (peak * 1e12) if peak else None
        record = {
            "gpu": name,
            "compiled": compiled,
            "batch": b,
            **result,
            "peak_tflops": peak,
            "mfu": mfu,
            "max_mem_gib": _max_mem_gib(device),
        }
        records.append(record)
        rows.append(
            [
                name,
                "torch.compile" if compiled else "eager",
                b,
                sig(result["step_s"] * 1e3),
                sig(result["images_per_s"]),
                sig(result["train_flops"] / 1e12),
                sig(result["achieved_flops"] / 1e12),
                f"{peak:.0f}" if peak else "?",
                f"{sig(100 * mfu)}%" if mfu else "unknown peak (pass --peak-tflops)",
                record["max_mem_gib"],
            ]
        )
    text = [
        f"DiT-XL/2 (675M parameters), 512 px = 64x64x4 latents (1024 tokens), bf16 autocast, fused AdamW, median of "
        f"{steps} steps after {warmup} warm-up. Train FLOPs = 2 x `count_train_macs` (forward + backward, exact; "
        "AdamW not counted); MFU against the dense bf16 peak.",
        "",
        md_table(
            [
                "GPU",
                "mode",
                "batch",
                "ms / step",
                "images/s",
                "TFLOP / step",
                "TFLOP/s",
                "peak TFLOP/s",
                "MFU",
                "max mem GiB",
            ],
            rows,
        ),
        *(["", *notes] if notes else []),
    ]
    return "\n".join(text), records


def ensemble_section(device, size) -> tuple[str, list[dict]]:
    """Batched vs one-by-one test-time ensembles (5 members, DDIM) of a DiT-XL/2 depth model at 512 px, bf16."""
    from diffusers import DDIMScheduler

    from diffperc.diffusion import InferenceSettings, sample_ensemble

    tiny = size == "tiny"
    latent, steps, repeats, inputs = (8, 1, 1, (1, 2)) if tiny else (64, 10, 3 if size == "full" else 1, (1, 8))
    members = 5
    torch.manual_seed(0)
    # A fine-tuned depth DiT: [RGB latent, noisy depth latent] in (8 channels), the depth latent out (4).
    net = (
        build_model(
            "DiT-XL/2",
            input_size=latent,
            in_channels=8,
            num_classes=1,
            learn_sigma=False,
            **(_TINY_OVERRIDES if tiny else {}),
        )
        .to(device)
        .eval()
    )
    for p in net.parameters():
        if not p.any():  # adaLN-Zero's zero-initialised layers: non-zero outputs make the comparison mean something
            torch.nn.init.normal_(p, std=0.02)
    sampler = DDIMScheduler(
        num_train_timesteps=1000, timestep_spacing="trailing", prediction_type="v_prediction", clip_sample=False
    )
    records, rows = [], []
    for b in inputs:
        cond = torch.randn(b, 4, latent, latent, device=device, generator=torch.Generator(device).manual_seed(b))
        y = torch.zeros(b, dtype=torch.long, device=device)
        settings = {
            "one-by-one": InferenceSettings(num_steps=steps, ensemble_size=members, max_batch=b),
            "batched": InferenceSettings(num_steps=steps, ensemble_size=members, max_batch=members * b),
        }

        def _sample(s, cond=cond, y=y):
            with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16):
                return sample_ensemble(net, cond, y, sampler, s, 4)

        outs = {k: _sample(s) for k, s in settings.items()}
        diff = (outs["batched"] - outs["one-by-one"]).abs().max().item()
        times = {
            k: t.median
            for k, t in time_interleaved(
                {k: (lambda s=s: _sample(s)) for k, s in settings.items()}, repeats, warmup=1
            ).items()
        }
        speedup = times["one-by-one"] / times["batched"]
        records.append(
            {
                "inputs": b,
                "members": members,
                "steps": steps,
                "one_by_one_s": times["one-by-one"],
                "batched_s": times["batched"],
                "speedup": speedup,
                "max_abs_diff": diff,
            }
        )
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
    text = [
        f"`sample_ensemble` of a DiT-XL/2 depth model (8 latent channels in, 4 out) at 512 px, {members} members, "
        f"{steps} trailing DDIM steps, bf16 autocast, VAE excluded; median of {repeats} interleaved rounds. "
        "One-by-one = one member of the B inputs per network call; batched = all members x B inputs per call. Max "
        "abs diff = largest difference of the sampled latents (bf16 kernels differ with the batch size).",
        "",
        md_table(["inputs B", "one-by-one ms", "batched ms", "speed-up", "inputs/s batched", "max abs diff"], rows),
    ]
    return "\n".join(text), records


def moe_section(device, size) -> tuple[str, list[dict]]:
    """bench_moe.py's variants at DiT-XL/2's width on 512 px token counts, bf16, GELU and SwiGLU experts."""
    import bench_moe

    shape = (
        dict(width=16, experts=4, tokens=8, batch=2, warmup=0, repeats=1)
        if size == "tiny"
        else dict(
            width=1152,
            experts=8,
            tokens=1024,
            batch=8 if size == "full" else 2,
            warmup=3,
            repeats=10 if size == "full" else 2,
        )
    )
    types = ("gelu",) if size == "tiny" else ("gelu", "swiglu")
    dtype = torch.bfloat16 if device.type == "cuda" else None
    parts, records = [], []
    for expert_type in types:
        _reset_mem(device)
        results = bench_moe.measure(top_k=2, device=str(device), dtype=dtype, expert_type=expert_type, **shape)
        median = {name: r["median_ms"] for name, r in results.items()}
        dense = median[bench_moe.DENSE]
        records.append(
            {
                "expert_type": expert_type,
                **shape,
                "results": results,
                "ratios_vs_dense": {name: m / dense for name, m in median.items()},
            }
        )
        rows = [
            [name, sig(r["median_ms"]), f"{r['median_ms'] / dense:.2f}x", r["syncs"]] for name, r in results.items()
        ]
        parts += [f"{expert_type} experts:", "", md_table(["variant", "median ms", "vs dense", "host syncs"], rows), ""]
    text = [
        f"SparseMoE forward + backward (`bench_moe.py`), E={shape['experts']}, k=2, width {shape['width']}, expert "
        f"hidden {4 * shape['width']}, {shape['tokens']} tokens x batch {shape['batch']}, "
        f"{'bf16 autocast' if dtype else 'fp32'}; `ours` = dropless (one host sync per call), `capacity` = padded "
        "batches in one batched matmul (no host sync); dense = one MLP with the k active experts' MACs.",
        "",
        *parts,
    ]
    return "\n".join(text).rstrip(), records


#################################################################################
#                                  Whole run                                    #
#################################################################################


def measure_all(
    size: str,
    device: torch.device,
    batch: int = 16,
    steps: int = 20,
    compile_model: bool = True,
    peak: float | None = None,
    budget_s: float = _BUDGET_S,
) -> tuple[str, dict]:
    """Runs the three sections on ``device`` within ``budget_s`` seconds; returns the markdown body and the record."""
    start = time.perf_counter()
    deadline = start + budget_s
    parts, record = [], {"size": size, "device": str(device), "machine": machine_info()}
    sections = (
        (
            "training",
            "Training throughput and MFU",
            lambda: train_section(device, size, batch, steps, compile_model and size != "tiny", peak, deadline),
        ),
        ("ensemble", "Batched ensembles", lambda: ensemble_section(device, size)),
        ("moe", "MoE dispatch vs dense", lambda: moe_section(device, size)),
    )
    for key, title, fn in sections:
        if time.perf_counter() > deadline - 30:
            parts.append(f"### {title}\n\nskipped: the {budget_s:.0f} s budget is spent")
            continue
        section_start = time.perf_counter()
        text, record[key] = fn()
        parts.append(f"### {title}\n\n{text}\n\n(section wall time: {time.perf_counter() - section_start:.0f} s)")
    record["wall_s"] = time.perf_counter() - start
    parts.append(_readme_rows(record))
    return "\n\n".join(parts), record


def _readme_rows(record: dict) -> str:
    """One row per GPU for the README: the headline numbers of this run."""
    train = {("compile" if r["compiled"] else "eager"): r for r in record.get("training") or []}
    best = max(train.values(), key=lambda r: r["achieved_flops"], default=None)
    ens = {r["inputs"]: r["speedup"] for r in record.get("ensemble") or []}
    moe = {r["expert_type"]: r["ratios_vs_dense"] for r in record.get("moe") or []}
    gelu = moe.get("gelu", {})
    capacity = next((v for k, v in gelu.items() if k.startswith("ours, capacity")), None)
    cells = [
        best["gpu"] if best else "?",
        f"{sig(best['images_per_s'])} ({'compiled' if best['compiled'] else 'eager'}, batch {best['batch']})"
        if best
        else "?",
        f"{sig(100 * best['mfu'])}%" if best and best["mfu"] else "?",
        " / ".join(f"{v:.2f}x" for v in ens.values()) or "?",
        f"{gelu['ours']:.2f}x" if "ours" in gelu else "?",
        f"{capacity:.2f}x" if capacity else "?",
    ]
    header = [
        "GPU",
        "DiT-XL/2 512 px train images/s",
        "MFU",
        "ensemble speed-up B=1 / B=8",
        "MoE dropless / dense",
        "MoE capacity 1.25 / dense",
    ]
    return "### Row for the README's GPU table\n\n" + md_table(header, [cells])


def run(
    size: str = "full",
    batch: int = 16,
    steps: int = 20,
    compile_model: bool = False,
    peak: float | None = None,
    device: str | None = None,
) -> Section:
    """The GPU section of ``run_all.py``: every measurement on ``device`` (default: the first CUDA device; without
    one, a line saying so)."""
    if device is None and not torch.cuda.is_available():
        return Section(TITLE, "no GPU on this machine")
    dev = torch.device(device or "cuda")
    body, _ = measure_all(size, dev, batch, steps, compile_model, peak)
    return Section(TITLE, mode_note(size, _MODE.get(size, "")) + body)


def main(argv: list[str] | None = None) -> Path | None:
    """Command line: measures, prints, and writes ``--out`` (markdown) and its ``.json`` twin."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_size_args(parser)
    parser.add_argument(
        "--out",
        default=str(Path(__file__).resolve().parent / "results_gpu.md"),
        help="Markdown file to write (the numbers go to the same path with .json)",
    )
    parser.add_argument("--device", default=None, help="Default: cuda; cpu only makes sense with --tiny")
    parser.add_argument("--batch", type=int, default=16, help="Images per training step (halved on out-of-memory)")
    parser.add_argument("--steps", type=int, default=20, help="Timed training steps")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="Skip the torch.compile run")
    parser.add_argument("--peak-tflops", type=float, default=None, help="Dense bf16 peak of the GPU, TFLOP/s")
    parser.add_argument("--budget-s", type=float, default=_BUDGET_S, help="Time budget of the whole command")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: every core)")
    args = parser.parse_args(argv)
    setup_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu" if args.size == "tiny" else None)
    if device is None:
        print("no GPU on this machine: run with --tiny to check the code on the CPU", file=sys.stderr)
        return None
    body, record = measure_all(
        args.size, torch.device(device), args.batch, args.steps, args.compile, args.peak_tflops, args.budget_s
    )
    command = " ".join(shlex.quote(a) for a in ["python benchmarks/bench_gpu.py", *(argv or sys.argv[1:])])
    record["command"] = command
    text = f"## {TITLE}\n\n{mode_note(args.size, _MODE.get(args.size, ''))}Command: `{command}`\n\n{body}\n"
    print(text, end="")
    out = write_markdown(args.out, text)
    write_markdown(out.with_suffix(".json"), json.dumps(record, indent=2, default=str) + "\n")
    return out


if __name__ == "__main__":
    main()
