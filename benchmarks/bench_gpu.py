"""DiT-XL/2 training throughput and MFU at 512 px (64x64x4 SD-VAE latents) in bf16 autocast on one CUDA GPU.

To run: python benchmarks/bench_gpu.py [--quick | --tiny] [--batch 16] [--steps 20] [--compile] [--peak-tflops 989]
[--out FILE.md]
Without CUDA it writes "no GPU on this machine". MFU = 2 x ``count_train_macs`` / step time / the GPU's dense bf16
peak (a table of known GPUs, or ``--peak-tflops``).
"""

import os
import shlex
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP: see OMP_NOTE in common.py

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import Section, bench_main, md_table, mode_note, sig, time_interleaved  # noqa: E402

from diffperc.compute import count_train_macs  # noqa: E402
from diffperc.models import build_model  # noqa: E402

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s from the vendors' data sheets; matched on the device name.
PEAK_BF16_TFLOPS = {
    "H200": 989.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,  # SXM; checked after "H100 PCIe"
    "A100": 312.0,
    "L40S": 362.0,
    "A10G": 70.0,
    "RTX 4090": 165.0,
}
# --tiny: a width-32 1-block DiT on 8x8x4 latents instead of DiT-XL/2 on 64x64x4 (batch 2, 1 step, no warm-up).
_TINY_OVERRIDES = dict(hidden_size=32, depth=1, num_heads=2)
_MODE = {"quick": "3 steps", "tiny": "a width-32 1-block DiT, 8x8 latents, batch 2, 1 step"}


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


def run(
    size: str = "full", batch: int = 16, steps: int = 20, compile_model: bool = False, peak: float | None = None
) -> Section:
    """Measures DiT-XL/2 at 512 px on the first CUDA device (``size``: full, quick or tiny); without one, says so."""
    note = mode_note(size, _MODE.get(size, ""))
    if not torch.cuda.is_available():
        return Section("(f) GPU: DiT-XL/2 512 px bf16", "no GPU on this machine")
    device = torch.device("cuda")
    name = torch.cuda.get_device_name(device)
    tiny = size == "tiny"
    steps = {"full": steps, "quick": 3, "tiny": 1}[size]
    batch, latent, warmup = (2, 8, 0) if tiny else (batch, 64, 3)
    overrides = _TINY_OVERRIDES if tiny else {}
    torch.manual_seed(0)
    # 512 px through the SD VAE: 64x64x4 latents, 1024 tokens at patch 2; learn_sigma as in the official model.
    model = build_model("DiT-XL/2", input_size=latent, in_channels=4, num_classes=1000, **overrides)
    result = train_throughput(model, batch, latent, 4, device, steps, warmup, compile_model)
    peak = peak or peak_tflops(name)
    mfu = f"{sig(100 * result['achieved_flops'] / (peak * 1e12))}%" if peak else "unknown peak (pass --peak-tflops)"
    command = " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0]), *sys.argv[1:]])
    rows = [
        [
            name,
            batch,
            sig(result["step_s"] * 1e3),
            sig(result["images_per_s"]),
            sig(result["train_flops"] / 1e12),
            sig(result["achieved_flops"] / 1e12),
            f"{peak:.0f}" if peak else "?",
            mfu,
            f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f}",
        ]
    ]
    body = [
        f"{note}DiT-XL/2 (675M parameters), 512 px = 64x64x4 latents (1024 tokens), bf16 autocast, fused AdamW, "
        f"{'torch.compile, ' if compile_model else 'eager, '}median of {steps} steps after {warmup} warm-up. Train "
        f"FLOPs = 2 x `count_train_macs`; MFU against the dense bf16 peak. Command: `{command}`",
        "",
        md_table(
            ["GPU", "batch", "ms / step", "images/s", "TFLOP / step", "TFLOP/s", "peak TFLOP/s", "MFU", "max mem GiB"],
            rows,
        ),
    ]
    return Section("(f) GPU: DiT-XL/2 512 px bf16", "\n".join(body))


def _args(parser) -> None:
    parser.add_argument("--batch", type=int, default=16, help="Images per step")
    parser.add_argument("--steps", type=int, default=20, help="Timed steps")
    parser.add_argument("--compile", action="store_true", help="torch.compile the DiT")
    parser.add_argument("--peak-tflops", type=float, default=None, help="Dense bf16 peak of the GPU, TFLOP/s")


if __name__ == "__main__":
    bench_main(lambda a: run(a.size, a.batch, a.steps, a.compile, a.peak_tflops), __doc__, _args)
