"""DiT training step (forward + backward + AdamW) for t3, t6 and DiT-S/2 shapes: eager vs torch.compile, FLOP/s.

To run: python benchmarks/bench_train_step.py [--quick | --tiny] [--compile t3|all|none] [--out FILE.md]
Achieved FLOP/s = 2 x ``diffperc.compute.count_train_macs`` / median step time, against an fp32 ``torch.mm`` timed
in the same interleaved rounds (so a noisy neighbour slows both alike). Also times AdamW's CPU implementations.
"""

import contextlib
import os
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP: see OMP_NOTE in common.py

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import Goal, Section, bench_main, md_table, mode_note, sig, time_interleaved  # noqa: E402

from diffperc.compute import count_train_macs  # noqa: E402
from diffperc.models import build_model, widen_input_projection  # noqa: E402

# name, preset, overrides, (N, C, H, W) of one latent, conditions. t3/t6 run the quickstart's setting (32 px pixel
# space, patch 4, batch 64: 64 tokens); DiT-S/2 runs 256 px images as SD-VAE latents (32x32x4, 256 tokens).
_SHAPES = {
    "t3": ("t3", dict(patch_size=4), (64, 3, 32, 32)),
    "t6": ("t6", dict(patch_size=4), (64, 3, 32, 32)),
    "DiT-S/2": ("DiT-S/2", dict(), (8, 4, 32, 32)),
}
# --quick keeps the widths and depths but shrinks the batch: it checks the code path, its numbers are not results.
_QUICK_BATCH = {"t3": 8, "t6": 4, "DiT-S/2": 1}
# --tiny replaces them with one DiT of width 32 and 1 block on 8x8 inputs, batch 2 (GEMM 64x64): seconds, not results.
_TINY_SHAPES = {"tiny": ("t1", dict(patch_size=2, hidden_size=32, depth=1, num_heads=2), (2, 3, 8, 8))}
_GEMM_SIZE = {"full": 2048, "quick": 1024, "tiny": 64}
_MODE = {"quick": "tiny batches, 1 repeat", "tiny": "a width-32 1-block DiT, batch 2, 1 repeat"}
_GOAL_WIDTH = 384
_GOAL_FRACTION = 0.5


def _build(shape: tuple, batch: int) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...], torch.Tensor]:
    """The fine-tuning network of ``shape`` (a ``_SHAPES`` value; one condition latent + the noisy target, as
    PerceptionFinetuning builds it) and a seeded batch: inputs (x, t, y) and a regression target."""
    preset, overrides, (_, c, h, w) = shape
    torch.manual_seed(0)
    net = build_model(
        preset, input_size=h, in_channels=c, learn_sigma=False, num_classes=1, class_dropout_prob=0.0, **overrides
    )
    widen_input_projection(net, 2)
    x = torch.randn(batch, 2 * c, h, w)
    t = torch.randint(0, 1000, (batch,))
    y = torch.zeros(batch, dtype=torch.long)
    return net, (x, t, y), torch.randn(batch, c, h, w)


def _make_step(model, optimizer, inputs, target):
    def _step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.mse_loss(model(*inputs), target).backward()
        optimizer.step()

    return _step


def _gemm(n: int):
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=generator), torch.randn(n, n, generator=generator)
    return lambda: torch.mm(a, b)


@contextlib.contextmanager
def _onednn_matmul():
    """Routes fp32 matmuls to oneDNN instead of MKL. torch does that only when oneDNN may use bf16 internally
    (``fp32_precision="bf16"``); whether it does is the CPU's choice, so the benchmark checks the gradients."""
    before = torch.backends.mkldnn.matmul.fp32_precision
    torch.backends.mkldnn.matmul.fp32_precision = "bf16"
    try:
        yield
    finally:
        torch.backends.mkldnn.matmul.fp32_precision = before


def _on_onednn(fn):
    def _run():
        with _onednn_matmul():
            return fn()

    return _run


def _grad_difference(net: torch.nn.Module, inputs, target) -> float:
    """max |grad difference| / max |grad| between the MKL and the oneDNN matmul paths on one batch (fp32
    summation-order noise is ~1e-6; bf16 inputs would give ~1e-2)."""
    grads = []
    for path in (contextlib.nullcontext, _onednn_matmul):
        net.zero_grad(set_to_none=True)
        with path():
            F.mse_loss(net(*inputs), target).backward()
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None]))
    net.zero_grad(set_to_none=True)
    return ((grads[0] - grads[1]).abs().max() / grads[0].abs().max()).item()


def _bf16_gemm_rate(n: int, repeats: int) -> float:
    a, b = torch.randn(n, n).bfloat16(), torch.randn(n, n).bfloat16()
    t = time_interleaved({"mm": lambda: torch.mm(a, b)}, repeats, warmup=1)["mm"]
    return 2 * n**3 / t.median


def _adamw_variants(net: torch.nn.Module, repeats: int) -> tuple[dict[str, float], float]:
    """Median ``optimizer.step()`` seconds of AdamW's default (for-loop on CPU), foreach and fused implementations on
    copies of ``net``'s parameters with fixed gradients, and the largest parameter difference fused vs default after
    three steps from the same start (the math is the same; only the rounding may differ)."""
    params = [p.detach() for p in net.parameters()]
    grads = [torch.randn_like(p) for p in params]
    options = {"default (for-loop)": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}
    copies, steps = {}, {}
    for name, kwargs in options.items():
        copy = [torch.nn.Parameter(p.clone()) for p in params]
        for p, g in zip(copy, grads):
            p.grad = g
        # weight_decay > 0 so the decoupled decay is part of what is compared.
        steps[name] = torch.optim.AdamW(copy, lr=1e-3, weight_decay=0.01, **kwargs).step
        copies[name] = copy
    for step in steps.values():
        for _ in range(3):
            step()
    diff = max((a - b).abs().max().item() for a, b in zip(copies["default (for-loop)"], copies["fused"]))
    times = time_interleaved(steps, repeats, warmup=0)
    return {name: t.median for name, t in times.items()}, diff


def run(size: str = "full", compile_models: str = "t3", repeats: int | None = None) -> Section:
    """Times the training step of every shape; ``size`` is full, quick or tiny (``common.SIZES``) and
    ``compile_models`` is ``none``, ``all`` or one shape name."""
    note = mode_note(size, _MODE.get(size, ""))
    shapes = _TINY_SHAPES if size == "tiny" else _SHAPES
    repeats = repeats or (3 if size == "full" else 1)
    n_gemm = _GEMM_SIZE[size]
    if compile_models not in ("none", "all", *shapes):
        raise ValueError(f"`--compile` must be none, all or one of {list(shapes)}, got {compile_models!r}")
    shape_rows, rows, opt_rows, goals, notes = [], [], [], [], []
    for name, shape in shapes.items():
        batch = _QUICK_BATCH[name] if size == "quick" else shape[2][0]
        net, inputs, target = _build(shape, batch)
        flops = 2 * count_train_macs(net, *inputs)  # forward + backward; AdamW's O(params) update is not counted
        optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)  # what the configs use: the default implementation
        gemm, step = _gemm(n_gemm), _make_step(net, optimizer, inputs, target)
        fns = {"gemm": gemm, "gemm_onednn": _on_onednn(gemm), "eager": step, "eager_onednn": _on_onednn(step)}
        compile_s = None
        if compile_models in ("all", name):
            compiled = _make_step(torch.compile(net), optimizer, inputs, target)
            start = time.perf_counter()
            try:
                compiled()  # the first call compiles forward and backward
                compile_s = time.perf_counter() - start
                fns["compiled"] = compiled
            except Exception as error:  # an inductor failure on this machine is a result to report, not a crash
                notes.append(f"torch.compile failed for {name}: {type(error).__name__}: {str(error)[:200]}")
        times = {k: t.median for k, t in time_interleaved(fns, repeats, warmup=1).items()}
        rate = {"mkl": 2 * n_gemm**3 / times["gemm"], "onednn": 2 * n_gemm**3 / times["gemm_onednn"]}
        x = inputs[0]
        tokens = (x.shape[-1] // net.patch_size) ** 2
        shape_rows.append(
            [
                name,
                f"{net.hidden_size} x {len(net.blocks)}",
                f"{tuple(x.shape)}, p{net.patch_size}, {tokens} tok",
                f"{sig(sum(p.numel() for p in net.parameters()) / 1e6)}M",
                sig(flops / 1e9),
                sig(rate["mkl"] / 1e9),
                sig(rate["onednn"] / 1e9),
            ]
        )
        variants = [("eager", "eager", "mkl"), ("compiled", "torch.compile", "mkl")]
        variants.append(("eager_onednn", "eager, oneDNN matmul", "onednn"))
        best = 0.0
        for key, label, gemm_kind in variants:
            if key not in times:
                continue
            achieved = flops / times[key]
            if gemm_kind == "mkl":  # the goal is about the default fp32 path
                best = max(best, achieved / rate["mkl"])
            extra = f" (compile {compile_s:.0f} s)" if key == "compiled" else ""
            rows.append(
                [
                    name,
                    label + extra,
                    sig(times[key] * 1e3),
                    sig(achieved / 1e9),
                    f"{sig(100 * achieved / rate[gemm_kind])}% of {'MKL' if gemm_kind == 'mkl' else 'oneDNN'}",
                    f"{times['eager'] / times[key]:.2f}x",
                ]
            )
        if net.hidden_size >= _GOAL_WIDTH:
            value = f"{100 * best:.0f}%"
            goals.append(Goal(f"(a) {name} train step FLOP/s vs fp32 GEMM", value, ">= 50%", best >= _GOAL_FRACTION))
        adam, diff = _adamw_variants(net, repeats=10 if size == "full" else 1)
        default, fused = adam["default (for-loop)"], adam["fused"]
        opt_rows.append(
            [
                name,
                *(sig(adam[k] * 1e3) for k in adam),
                f"{default / fused:.1f}x",
                f"{100 * (default - fused) / times['eager']:.1f}%",
                f"{diff:.1e}",
                f"{_grad_difference(net, [v[:8] for v in inputs], target[:8]):.1e}",  # 8 samples tell as much
            ]
        )
        del net, optimizer, fns

    body = [
        f"{note}Forward + backward + `AdamW.step()` of the fine-tuning DiT (condition + noisy target on channels, "
        f"MSE), median of {repeats} interleaved rounds after 1 warm-up. Train FLOPs = 2 x `count_train_macs` (matmuls, "
        f"convolutions and attention; elementwise ops, norms and the optimizer update count zero). GEMM = fp32 "
        f"`torch.mm` {n_gemm}x{n_gemm} timed in the same rounds, through MKL (torch's default fp32 path) and "
        f'through oneDNN (`torch.backends.mkldnn.matmul.fp32_precision = "bf16"`, the only switch that routes fp32 '
        f"matmuls to oneDNN; see the gradient check below). bf16 GEMM for reference (not used): "
        f"{sig(_bf16_gemm_rate(n_gemm, repeats + 2) / 1e9)} GFLOP/s.",
        "",
        md_table(
            [
                "model",
                "width x depth",
                "input, patch, tokens",
                "params",
                "train GFLOP/step",
                "GEMM GFLOP/s (MKL)",
                "GEMM GFLOP/s (oneDNN)",
            ],
            shape_rows,
        ),
        "",
        md_table(["model", "variant", "ms / step", "GFLOP/s", "vs GEMM", "speed-up vs eager"], rows),
        "",
        "AdamW `step()` alone (ms, median) on the same parameters with fixed gradients: the configs use the default, "
        "which on CPU is the per-parameter for-loop; `fused=True` is the candidate change (saving = share of the "
        "eager step; max abs param diff of fused vs default after 3 identical steps). The last column is max abs "
        "grad diff / max abs grad of one backward through oneDNN vs MKL matmuls.",
        "",
        md_table(
            [
                "model",
                "default ms",
                "foreach ms",
                "fused ms",
                "fused speed-up",
                "step time saved",
                "max abs param diff",
                "oneDNN grad rel. diff",
            ],
            opt_rows,
        ),
    ]
    if notes:
        body += ["", *notes]
    return Section("(a) DiT training step", "\n".join(body), goals)


def _args(parser) -> None:
    parser.add_argument("--compile", default="t3", help="Shapes to torch.compile: none, all, or one of t3, t6, DiT-S/2")
    parser.add_argument("--repeats", type=int, default=None, help="Timed rounds (default 3; 1 with --quick or --tiny)")


if __name__ == "__main__":
    bench_main(lambda a: run(a.size, a.compile, a.repeats), __doc__, _args)
