"""Forward+backward timing of SparseMoE's two dispatch paths against other MoE algorithms and an equal-MACs dense MLP.

To run: python benchmarks/bench_moe.py [--out benchmarks/results_moe.md] [--device cuda --dtype bf16]
Defaults: E=8 experts, k=2 active, width 384, expert hidden 1536, 256 tokens, batch 8; about 70 s on 2 idle CPU cores.
Variants: ``ours`` (the dropless default: experts on their sorted slices, one host sync), ``ours, capacity ...``
(capacity-padded batches, one batched matmul over the stacked experts, no host sync), the naive masked loop of
reference code, DiT-MoE's training-mode algorithm (tokens repeated k times, a boolean mask per expert, experts
split into ``pretraining_tp`` = 2 weight slices), and one dense MLP with the k active experts' MACs.
"""

import argparse
import os

# Idle OpenMP workers sleep instead of spinning: on a shared 2-core machine spinning workers starve the main
# thread between the many mid-size ops of a dispatch loop (measured ~3x slower MoE, ~1.3x slower dense). Must be
# set before torch starts its thread pool; an explicit OMP_WAIT_POLICY in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import copy  # noqa: E402
from contextlib import nullcontext  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import sig, time_interleaved, write_markdown  # noqa: E402
from torch import nn  # noqa: E402

from diffperc.models.dit import Mlp  # noqa: E402
from diffperc.models.moe import SparseMoE, SwiGLU  # noqa: E402
from diffperc.profiling import SyncCounter  # noqa: E402

OURS, CAPACITY, NAIVE, DIT_MOE, DENSE = (
    "ours",
    "ours, capacity {cf} (padded bmm)",
    "naive masked loop",
    "DiT-MoE training (repeat + masks, tp 2)",
    "dense, same active MACs",
)


class NaiveMoE(nn.Module):
    """The common reference-code pattern: for every k-slot and every expert, mask the full token set."""

    def __init__(self, moe: SparseMoE):
        super().__init__()
        self.moe = moe

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        moe, D = self.moe, x.shape[-1]
        x_flat = x.reshape(-1, D)  # (M, D)
        probs = moe.router(x_flat).float().softmax(dim=-1)  # (M, E)
        top_p, top_e = probs.topk(moe.experts_per_token, dim=-1)  # (M, k)
        weights = top_p / top_p.sum(dim=-1, keepdim=True) if moe.normalize_weights else top_p
        out = torch.zeros_like(x_flat)
        for slot in range(moe.experts_per_token):
            for e, expert in enumerate(moe.experts):
                mask = top_e[:, slot] == e  # (M,) boolean over every token
                if mask.any():
                    out[mask] += (weights[mask, slot, None] * expert(x_flat[mask])).to(out.dtype)
        if moe.shared_experts is not None:
            out = out + moe.shared_experts(x_flat)
        return out.reshape(x.shape)


def _sliced_expert(expert: nn.Module, x: torch.Tensor, tp: int) -> torch.Tensor:
    """One expert with its weights cut into ``tp`` slices of the hidden width, as DiT-MoE's ``MoeMLP`` does when
    ``pretraining_tp > 1``: the first projections are concatenated, the last one is summed over slices."""
    if hasattr(expert, "gate_proj"):  # SwiGLU: down(silu(gate(x)) * up(x))
        gate = torch.cat([F.linear(x, w) for w in expert.gate_proj.weight.chunk(tp, dim=0)], dim=-1)
        up = torch.cat([F.linear(x, w) for w in expert.up_proj.weight.chunk(tp, dim=0)], dim=-1)
        hidden = (F.silu(gate) * up).chunk(tp, dim=-1)
        return sum(F.linear(h, w) for h, w in zip(hidden, expert.down_proj.weight.chunk(tp, dim=1)))
    first = zip(expert.fc1.weight.chunk(tp, dim=0), expert.fc1.bias.chunk(tp, dim=0))  # GELU: fc2(gelu(fc1(x)))
    hidden = F.gelu(torch.cat([F.linear(x, w, b) for w, b in first], dim=-1), approximate="tanh").chunk(tp, dim=-1)
    return sum(F.linear(h, w) for h, w in zip(hidden, expert.fc2.weight.chunk(tp, dim=1))) + expert.fc2.bias


class DiTMoETraining(nn.Module):
    """DiT-MoE's training-mode dispatch (https://github.com/feizc/DiT-MoE, ``SparseMoeBlock.forward`` when
    ``self.training``), written anew: every token repeated k times, one boolean mask per expert over all M * k
    copies, tensor-parallel-sliced experts, then the k weighted copies summed per token."""

    def __init__(self, moe: SparseMoE, tp: int = 2):
        super().__init__()
        self.moe, self.tp = moe, tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        moe, D, k = self.moe, x.shape[-1], self.moe.experts_per_token
        x_flat = x.reshape(-1, D)  # (M, D)
        probs = moe.router(x_flat).float().softmax(dim=-1)  # (M, E)
        top_p, top_e = probs.topk(k, dim=-1)  # (M, k)
        weights = top_p / top_p.sum(dim=-1, keepdim=True) if moe.normalize_weights else top_p
        x_rep = x_flat.repeat_interleave(k, dim=0)  # (M * k, D): copy j of token m is row m * k + j
        flat_e = top_e.reshape(-1)  # (M * k,)
        y = torch.empty_like(x_rep)
        for e, expert in enumerate(moe.experts):
            mask = flat_e == e
            y[mask] = _sliced_expert(expert, x_rep[mask], self.tp).to(y.dtype)
        out = (y.view(-1, k, D) * weights.unsqueeze(-1).to(y.dtype)).sum(dim=1)  # (M, D)
        if moe.shared_experts is not None:
            out = out + moe.shared_experts(x_flat)
        return out.reshape(x.shape)


def _step(module: nn.Module, x: torch.Tensor, dtype: torch.dtype | None):
    def step() -> None:
        module.zero_grad(set_to_none=True)
        with torch.autocast(x.device.type, dtype=dtype) if dtype is not None else nullcontext():
            out = module(x)
        out.float().square().mean().backward()

    return step


def build_variants(
    width: int, experts: int, top_k: int, expert_type: str, capacity_factor: float, device: torch.device
) -> dict[str, nn.Module]:
    """The modules to compare, sharing one set of expert weights (seeded; a spread-out router)."""
    torch.manual_seed(0)
    hidden = 4 * width  # expert hidden width, DiT's mlp_ratio 4
    ours = SparseMoE(width, hidden, num_experts=experts, experts_per_token=top_k, expert_type=expert_type).to(device)
    nn.init.normal_(ours.router.weight, std=0.5)  # a trained-looking router: tokens spread over the experts
    padded = copy.copy(ours)  # the same submodules and weights, another capacity
    padded.capacity_factor = capacity_factor
    dense = Mlp(width, top_k * hidden) if expert_type == "gelu" else SwiGLU(width, top_k * hidden)
    return {
        OURS: ours,
        CAPACITY.format(cf=capacity_factor): padded,
        NAIVE: NaiveMoE(ours),
        DIT_MOE: DiTMoETraining(ours),
        DENSE: dense.to(device),
    }


def check_same_function(variants: dict[str, nn.Module], x: torch.Tensor) -> None:
    """Every variant but the dense MLP computes the MoE function (the capacity one with a capacity that drops
    nothing, E / k), so their timings compare like for like."""
    ours = variants[OURS]
    no_drop = copy.copy(ours)
    no_drop.capacity_factor = ours.num_experts / ours.experts_per_token
    with torch.no_grad():
        expected = ours(x)
        for name, module in [(NAIVE, variants[NAIVE]), (DIT_MOE, variants[DIT_MOE]), ("capacity E / k", no_drop)]:
            torch.testing.assert_close(module(x), expected, atol=1e-4, rtol=1e-4, msg=name)


def syncs_per_step(module: nn.Module, x: torch.Tensor, dtype: torch.dtype | None) -> int:
    """Host syncs of one forward + backward (``diffperc.profiling.SyncCounter``)."""
    with SyncCounter(device=x.device.type) as syncs:
        _step(module, x, dtype)()
    return syncs.total


def measure(
    width: int = 384,
    experts: int = 8,
    top_k: int = 2,
    tokens: int = 256,
    batch: int = 8,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
    expert_type: str = "gelu",
    capacity_factor: float = 1.25,
    warmup: int = 2,
    repeats: int = 15,
) -> dict[str, dict[str, float]]:
    """Times forward + backward of every variant in interleaved rounds: ``{name: {median_ms, best_ms, syncs}}``."""
    device = torch.device(device)
    variants = build_variants(width, experts, top_k, expert_type, capacity_factor, device)
    x = torch.randn(batch, tokens, width, device=device)
    check_same_function(variants, x)
    syncs = {name: syncs_per_step(module, x, dtype) for name, module in variants.items()}
    times = time_interleaved({name: _step(m, x, dtype) for name, m in variants.items()}, repeats, warmup=warmup)
    return {
        name: {"median_ms": t.median * 1e3, "best_ms": t.best * 1e3, "syncs": syncs[name]} for name, t in times.items()
    }


def ratio_lines(results: dict[str, dict[str, float]]) -> list[str]:
    """The ratios of the medians: the goals (naive / ours, ours / dense) and how the other algorithms compare."""
    median = {name: r["median_ms"] for name, r in results.items()}
    capacity = next(name for name in median if name.startswith("ours, capacity"))
    return [
        f"naive / ours = {median[NAIVE] / median[OURS]:.2f}x (goal >= 2x)",
        f"ours / dense = {median[OURS] / median[DENSE]:.2f}x (goal <= 1.3x)",
        f"naive / dense = {median[NAIVE] / median[DENSE]:.2f}x: the most any dispatch can gain over the naive loop "
        "here, unless its experts run faster than one dense MLP doing the same MACs",
        f"capacity / dense = {median[capacity] / median[DENSE]:.2f}x (the padded path runs E x C rows, "
        "capacity_factor x the dropless path's rows)",
        f"DiT-MoE training / ours = {median[DIT_MOE] / median[OURS]:.2f}x",
        f"DiT-MoE training / capacity = {median[DIT_MOE] / median[capacity]:.2f}x",
    ]


def main(argv: list[str] | None = None) -> str:
    """Parses ``argv`` (default: the command line), measures, prints and returns the markdown."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="Markdown file for the results (e.g. benchmarks/results_moe.md)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16: under bf16 autocast")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--width", type=int, default=384)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--expert-type", choices=["gelu", "swiglu"], default="gelu")
    parser.add_argument("--capacity-factor", type=float, default=1.25)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: every core available)")
    args = parser.parse_args(argv)

    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(args.threads or available)
    dtype = torch.bfloat16 if args.dtype == "bf16" else None
    results = measure(
        args.width,
        args.experts,
        args.top_k,
        args.tokens,
        args.batch,
        args.device,
        dtype,
        args.expert_type,
        args.capacity_factor,
        args.warmup,
        args.repeats,
    )

    device = torch.device(args.device)
    device_name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else (f"CPU, {torch.get_num_threads()} threads, OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}")
    )
    D, E, k = args.width, args.experts, args.top_k
    header = (
        f"SparseMoE forward+backward, E={E}, k={k}, {args.expert_type} experts, width {D}, expert hidden {4 * D}, "
        f"{args.tokens} tokens x batch {args.batch}, {args.dtype}, {device_name}, torch {torch.__version__}; "
        f"{args.repeats} interleaved rounds after {args.warmup} warm-up; ratios use the medians. `ours` is the "
        "dropless default (one host sync per call); host syncs are those of one forward + backward."
    )
    lines = [header, "", "| variant | median ms | best ms | host syncs |", "|---|---|---|---|"]
    lines += [f"| {name} | {sig(r['median_ms'])} | {sig(r['best_ms'])} | {r['syncs']} |" for name, r in results.items()]
    lines += ["", *ratio_lines(results)]
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.out:
        write_markdown(args.out, text)
    return text


if __name__ == "__main__":
    main()
