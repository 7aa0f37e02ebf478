"""Tests for the sparse mixture-of-experts layer, upcycling and the MoE preset suffix (tiny models, CPU)."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from diffperc.models import build_model
from diffperc.models.dit import Mlp
from diffperc.models.moe import (
    SparseMoE,
    SwiGLU,
    expert_loads,
    infer_moe_config,
    moe_aux_loss,
    parameter_counts,
    parse_moe_suffix,
    upcycle,
)


def _constant_experts(moe: SparseMoE) -> None:
    """Makes GELU expert e output the unit vector e for every token (zero weights, act(0) = 0, bias = e_e)."""
    with torch.no_grad():
        for e, expert in enumerate(moe.experts):
            for p in expert.parameters():
                p.zero_()
            expert.fc2.bias[e] = 1.0


# The two dispatch paths: dropless (default) and capacity-padded with a capacity no routing can exceed (E / k = 2
# for the 4-expert top-2 layers below), so both must compute the same function.
PATHS = pytest.mark.parametrize("capacity_factor", [None, 2.0], ids=["dropless", "capacity"])


def _reference_moe(moe: SparseMoE, x: torch.Tensor) -> torch.Tensor:
    """Every expert on every token, combined with a dense (M, E) weight matrix: slow but obviously right. With a
    capacity C, a Python loop drops each expert's assignments after its first C in (slot, token) order."""
    x_flat = x.reshape(-1, x.shape[-1])
    probs = F.softmax(x_flat @ moe.router.weight.t(), dim=-1)
    top_p, top_e = probs.topk(moe.experts_per_token, dim=-1)
    if moe.normalize_weights:
        top_p = top_p / top_p.sum(-1, keepdim=True)
    capacity = moe.expert_capacity(x_flat.shape[0])
    if capacity is not None:
        taken = [0] * moe.num_experts
        for slot in range(moe.experts_per_token):
            for token in range(x_flat.shape[0]):
                e = int(top_e[token, slot])
                if taken[e] >= capacity:
                    top_p[token, slot] = 0.0
                taken[e] += 1
    dense_w = torch.zeros_like(probs).scatter(1, top_e, top_p)  # (M, E)
    all_out = torch.stack([expert(x_flat) for expert in moe.experts], dim=1)  # (M, E, D)
    out = (dense_w.unsqueeze(-1) * all_out).sum(1)
    if moe.shared_experts is not None:
        out = out + moe.shared_experts(x_flat)
    return out.reshape(x.shape)


@PATHS
def test_sparse_moe_topk_picks_hand_set_experts(capacity_factor):
    moe = SparseMoE(4, 8, num_experts=4, experts_per_token=2, capacity_factor=capacity_factor)
    _constant_experts(moe)
    with torch.no_grad():
        moe.router.weight.copy_(torch.eye(4))  # logits = x
    x = torch.tensor([[[3.0, 1.0, 2.0, 0.0], [0.0, 5.0, 1.0, 4.0]]])  # (1, 2, 4)
    # Token 0: top-2 experts 0 and 2 (logits 3, 2); token 1: experts 1 and 3 (logits 5, 4).
    s = 1.0 / (1.0 + math.exp(-1.0))  # renormalised weight of the better expert when logits differ by 1
    expected = torch.tensor([[[s, 0.0, 1 - s, 0.0], [0.0, s, 0.0, 1 - s]]])
    torch.testing.assert_close(moe(x), expected)
    torch.testing.assert_close(moe.last_load, torch.full((4,), 0.25))

    moe.normalize_weights = False  # raw softmax probabilities as weights
    p0 = torch.softmax(x[0, 0], 0)
    p1 = torch.softmax(x[0, 1], 0)
    expected = torch.stack([p0 * torch.tensor([1.0, 0, 1, 0]), p1 * torch.tensor([0.0, 1, 0, 1])])[None]
    torch.testing.assert_close(moe(x), expected)


@PATHS
@pytest.mark.parametrize("expert_type", ["gelu", "swiglu"])
def test_sparse_moe_matches_dense_reference(expert_type, capacity_factor):
    torch.manual_seed(0)
    moe = SparseMoE(
        16,
        24,
        num_experts=4,
        experts_per_token=2,
        num_shared_experts=1,
        expert_type=expert_type,
        capacity_factor=capacity_factor,
    )
    nn.init.normal_(moe.router.weight, std=0.5)  # spread tokens over all experts
    x = torch.randn(3, 10, 16)
    torch.testing.assert_close(moe(x), _reference_moe(moe, x), atol=1e-6, rtol=1e-5)
    assert (moe.last_load > 0).all()


@pytest.mark.parametrize("expert_type", ["gelu", "swiglu"])
def test_sparse_moe_capacity_path_matches_reference_loop_when_dropping(expert_type):
    # 30 tokens, 4 experts, top-2, capacity ceil(0.5 * 30 * 2 / 4) = 8 < what the skewed router sends expert 0.
    torch.manual_seed(0)
    moe = SparseMoE(16, 24, num_experts=4, experts_per_token=2, expert_type=expert_type, capacity_factor=0.5)
    nn.init.normal_(moe.router.weight, std=0.5)
    with torch.no_grad():
        moe.router.weight[0] += 0.3  # most tokens rank expert 0 first
    x = torch.randn(3, 10, 16)
    assert moe.expert_capacity(30) == 8
    out = moe(x)
    assert moe.last_load[0] * 60 > 8  # expert 0 got more than its capacity: some assignments were dropped
    torch.testing.assert_close(out, _reference_moe(moe, x), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("expert_type", ["gelu", "swiglu"])
def test_sparse_moe_paths_agree_on_outputs_and_gradients(expert_type):
    torch.manual_seed(0)
    dropless = SparseMoE(16, 24, num_experts=4, experts_per_token=2, num_shared_experts=1, expert_type=expert_type)
    nn.init.normal_(dropless.router.weight, std=0.5)
    padded = copy.deepcopy(dropless)
    padded.capacity_factor = 2.0  # = E / k: no assignment can be dropped
    x = torch.randn(3, 10, 16)
    outs = []
    for moe in (dropless, padded):
        out = moe(x)
        (out.square().sum() + moe_aux_loss(moe)).backward()
        outs.append(out)
    torch.testing.assert_close(outs[1], outs[0], atol=1e-6, rtol=1e-5)
    for (name, a), b in zip(dropless.named_parameters(), padded.parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-5, rtol=1e-5, msg=name)


def test_sparse_moe_paths_agree_under_bf16_autocast():
    # bf16-mixed: the experts' matmuls run in bf16 on both paths, the routing in float32 (same experts picked).
    torch.manual_seed(0)
    dropless = SparseMoE(16, 32, num_experts=4, experts_per_token=2, num_shared_experts=1)
    nn.init.normal_(dropless.router.weight, std=0.5)
    padded = copy.deepcopy(dropless)
    padded.capacity_factor = 2.0
    x = torch.randn(2, 8, 16)
    with torch.no_grad():
        full = dropless(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            a, b = dropless(x), padded(x)
    assert a.dtype == b.dtype == torch.bfloat16
    torch.testing.assert_close(b, a, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(a.float(), full, atol=5e-2, rtol=5e-2)
    torch.testing.assert_close(padded.last_load, dropless.last_load, rtol=0, atol=0)


def test_sparse_moe_capacity_path_makes_no_host_sync_and_runs_on_meta():
    from diffperc.compute import count_macs
    from diffperc.profiling import SyncCounter

    torch.manual_seed(0)
    x = torch.randn(2, 8, 16)
    dropless = SparseMoE(16, 32, num_experts=4, experts_per_token=2)
    padded = SparseMoE(16, 32, num_experts=4, experts_per_token=2, capacity_factor=1.0)
    with SyncCounter(device="cpu") as syncs:
        dropless(x)
    assert dict(syncs.by_op) == {"tolist": 1}  # the split sizes
    with SyncCounter(device="cpu") as syncs:
        padded(x)
    assert syncs.total == 0
    # Static shapes: counted on the meta device. Router 16 x 4 per token, then E * C = 4 * 8 rows through the
    # experts (16 x 32 and 32 x 16 matmuls), padding rows included.
    assert not padded.routing_dependent and dropless.routing_dependent
    assert count_macs(padded, x, device="meta") == 16 * 16 * 4 + 4 * 8 * 2 * 16 * 32


@PATHS
def test_sparse_moe_single_expert_equals_dense_mlp(capacity_factor):
    torch.manual_seed(0)
    mlp = Mlp(16, 32)
    nn.init.normal_(mlp.fc1.bias)
    nn.init.normal_(mlp.fc2.bias)
    moe = SparseMoE(16, 32, num_experts=1, experts_per_token=1, capacity_factor=capacity_factor)
    moe.experts[0].load_state_dict(mlp.state_dict())
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(moe(x), mlp(x), atol=1e-6, rtol=0)


@PATHS
def test_sparse_moe_swiglu_expert_formula(capacity_factor):
    torch.manual_seed(0)
    moe = SparseMoE(8, 12, num_experts=1, experts_per_token=1, expert_type="swiglu", capacity_factor=capacity_factor)
    e = moe.experts[0]
    x = torch.randn(1, 3, 8)
    expected = (F.silu(x @ e.gate_proj.weight.t()) * (x @ e.up_proj.weight.t())) @ e.down_proj.weight.t()
    torch.testing.assert_close(moe(x), expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("capacity_factor", [None, 1.5], ids=["dropless", "capacity"])  # E / k = 1.5: no drop
def test_sparse_moe_balance_loss_hand_computed(capacity_factor):
    moe = SparseMoE(3, 4, num_experts=3, experts_per_token=2, balance_loss_coef=0.1, capacity_factor=capacity_factor)
    with torch.no_grad():
        moe.router.weight.copy_(torch.eye(3))  # logits = x
    logits = [[2.0, 1.0, 0.0], [0.0, 1.0, 3.0]]  # top-2: {0, 1} and {2, 1}
    moe(torch.tensor([logits]))

    def softmax(v):
        z = sum(math.exp(a) for a in v)
        return [math.exp(a) / z for a in v]

    probs = [softmax(v) for v in logits]
    f = [1 / 4, 2 / 4, 1 / 4]  # 4 assignments: expert 0 once, expert 1 twice, expert 2 once
    mean_p = [(probs[0][e] + probs[1][e]) / 2 for e in range(3)]
    expected = 0.1 * 3 * sum(fe * pe for fe, pe in zip(f, mean_p))
    assert moe.aux_loss.item() == pytest.approx(expected, rel=1e-6)
    torch.testing.assert_close(moe.last_load, torch.tensor(f))


def test_sparse_moe_capacity_drops_second_choices_then_later_tokens():
    # Top-1, every token prefers expert 0; capacity ceil(1.0 * 4 * 1 / 2) = 2 keeps tokens 0 and 1.
    moe = SparseMoE(2, 4, num_experts=2, experts_per_token=1, capacity_factor=1.0)
    _constant_experts(moe)
    with torch.no_grad():
        moe.router.weight.copy_(torch.eye(2))
    x = torch.tensor([[[2.0, 0.0], [3.0, 1.0], [1.0, 0.0], [4.0, 0.0]]])
    assert moe.expert_capacity(4) == 2
    expected = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 0.0], [0.0, 0.0]]])
    torch.testing.assert_close(moe(x), expected)
    torch.testing.assert_close(moe.last_load, torch.tensor([1.0, 0.0]))  # load is counted before dropping

    # Top-2 over 3 experts, capacity ceil(0.5 * 2 * 2 / 3) = 1: token 0 ranks (0, 1), token 1 ranks (1, 0).
    # Expert 1 keeps token 1's first choice over token 0's earlier-positioned second choice.
    moe = SparseMoE(3, 4, num_experts=3, experts_per_token=2, capacity_factor=0.5)
    _constant_experts(moe)
    with torch.no_grad():
        moe.router.weight.copy_(torch.eye(3))
    x = torch.tensor([[[2.0, 1.0, 0.0], [1.0, 2.0, 0.0]]])
    s = 1.0 / (1.0 + math.exp(-1.0))
    expected = torch.tensor([[[s, 0.0, 0.0], [0.0, s, 0.0]]])
    torch.testing.assert_close(moe(x), expected)


@PATHS
def test_sparse_moe_gradients_reach_router_and_used_experts(capacity_factor):
    torch.manual_seed(0)
    moe = SparseMoE(8, 16, num_experts=4, experts_per_token=2, num_shared_experts=1, capacity_factor=capacity_factor)
    nn.init.normal_(moe.router.weight, std=0.5)
    x = torch.randn(2, 6, 8)
    (moe(x).square().sum() + moe_aux_loss(moe)).backward()
    assert moe.router.weight.grad.abs().sum() > 0
    assert (moe.last_load > 0).all()
    for e, expert in enumerate(moe.experts):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in expert.parameters()), e
    assert all(p.grad.abs().sum() > 0 for p in moe.shared_experts.parameters())


@PATHS
@pytest.mark.parametrize("expert_type", ["gelu", "swiglu"])
def test_sparse_moe_expert_without_tokens_gets_a_zero_gradient(expert_type, capacity_factor):
    # Plain DDP (find_unused_parameters=False) needs a gradient for every parameter in every step, also for an expert
    # the router sent no token to: it runs on an empty slice (or on padding rows that are never read back), so its
    # gradient is exactly zero, not missing.
    torch.manual_seed(0)
    moe = SparseMoE(
        8,
        16,
        num_experts=4,
        experts_per_token=2,
        num_shared_experts=1,
        expert_type=expert_type,
        capacity_factor=capacity_factor,
    )
    nn.init.normal_(moe.router.weight, std=2.0)  # spread tokens over experts 0-2
    with torch.no_grad():
        moe.router.weight[3] = -100.0  # inputs are positive below: expert 3's logit is far below the others'
    x = torch.rand(2, 6, 8) + 0.1
    out = moe(x)
    (out.square().sum() + moe_aux_loss(moe)).backward()
    assert moe.last_load[3] == 0 and (moe.last_load[:3] > 0).all()
    for name, param in moe.named_parameters():
        assert param.grad is not None, name
        if name.startswith("experts.3."):
            assert torch.equal(param.grad, torch.zeros_like(param)), name
        else:
            assert param.grad.abs().sum() > 0, name
    torch.testing.assert_close(out, _reference_moe(moe, x), atol=1e-6, rtol=1e-5)


def _random_tiny_dit():
    torch.manual_seed(0)
    model = build_model("t1", input_size=8, in_channels=3, num_classes=2, learn_sigma=False)
    with torch.no_grad():
        # adaLN-Zero makes a fresh DiT output zeros; random weights make the comparison mean something.
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.normal_(std=0.1)
    return model.eval()


@PATHS
def test_upcycle_preserves_outputs(capacity_factor):
    dense = _random_tiny_dit()
    moe_model = upcycle(dense, num_experts=4, top_k=2, capacity_factor=capacity_factor, router_init_std=1.0).eval()
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([10, 500]), torch.tensor([0, 1])
    with torch.no_grad():
        out_dense, out_moe = dense(x, t, y), moe_model(x, t, y)
    assert out_dense.abs().mean() > 1e-2
    torch.testing.assert_close(out_moe, out_dense, atol=1e-5, rtol=1e-5)
    assert isinstance(dense.blocks[0].mlp, Mlp)  # the dense model is untouched
    loads = expert_loads(moe_model)
    assert list(loads) == [f"blocks.{i}.mlp" for i in range(len(dense.blocks))]
    assert all((load > 0).sum() >= 2 for load in loads.values())  # the random router spreads tokens
    # Everything but the MLPs is unchanged; each expert is a copy of its block's MLP.
    dense_sd, moe_sd = dense.state_dict(), moe_model.state_dict()
    for key, value in dense_sd.items():
        if key.startswith("blocks.") and ".mlp." in key:
            block, rest = key.split(".mlp.")
            for e in range(4):
                torch.testing.assert_close(moe_sd[f"{block}.mlp.experts.{e}.{rest}"], value, atol=0, rtol=0)
        else:
            torch.testing.assert_close(moe_sd[key], value, atol=0, rtol=0)


@pytest.mark.parametrize("capacity_factor", [None, 2.0], ids=["dropless", "capacity"])  # E / k = 2: no drop
def test_upcycle_zero_router_still_matches(capacity_factor):
    dense = _random_tiny_dit()
    moe_model = upcycle(dense, num_experts=2, top_k=1, capacity_factor=capacity_factor, router_init_std=0.0).eval()
    assert moe_model.blocks[1].mlp.router.weight.abs().sum() == 0
    x, t, y = torch.randn(1, 3, 8, 8), torch.tensor([3]), torch.tensor([1])
    with torch.no_grad():
        torch.testing.assert_close(moe_model(x, t, y), dense(x, t, y), atol=1e-5, rtol=1e-5)


def test_moe_aux_loss_sums_modules_and_is_zero_without_moe():
    dense = _random_tiny_dit()
    assert moe_aux_loss(dense).item() == 0.0
    assert expert_loads(dense) == {}
    moe_model = upcycle(dense, num_experts=4, top_k=2, balance_loss_coef=0.5)
    moe_model(torch.randn(2, 3, 8, 8), torch.tensor([1, 2]), torch.tensor([0, 1]))
    blocks = moe_model.blocks
    torch.testing.assert_close(moe_aux_loss(moe_model), blocks[0].mlp.aux_loss + blocks[1].mlp.aux_loss)
    assert moe_aux_loss(moe_model).requires_grad


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("DiT-S/2-8E2A", ("DiT-S/2", 8, 2)),
        ("a4-16E2A", ("a4", 16, 2)),
        ("t3-4E2A", ("t3", 4, 2)),
        ("DiT-XL/2-8E2A", ("DiT-XL/2", 8, 2)),
        ("t3", None),
        ("DiT-S/2", None),
        ("t3-8e2a", None),
        ("t3-8E", None),
        ("-8E2A", None),
        ("t3-E2A", None),
        ("t3-8E2A-x", None),
    ],
)
def test_parse_moe_suffix_examples(name, expected):
    assert parse_moe_suffix(name) == expected


@pytest.mark.parametrize("name", ["t3-2E4A", "t3-0E0A", "t3-8E0A"])
def test_parse_moe_suffix_rejects_unbuildable(name):
    with pytest.raises(ValueError, match="MoE suffix"):
        parse_moe_suffix(name)


@pytest.mark.parametrize(
    ("expert_type", "num_shared", "shared_hidden"),
    [("gelu", 1, None), ("swiglu", 2, None), ("gelu", 0, None), ("swiglu", 2, 8), ("gelu", 3, 4)],
)
def test_parameter_counts_formula(expert_type, num_shared, shared_hidden):
    D, H, E, k = 8, 16, 4, 2
    moe = SparseMoE(
        D,
        H,
        num_experts=E,
        experts_per_token=k,
        num_shared_experts=num_shared,
        shared_expert_hidden_size=shared_hidden,
        expert_type=expert_type,
    )

    def expert(hidden):
        return 2 * D * hidden + hidden + D if expert_type == "gelu" else 3 * D * hidden

    H_shared = num_shared * (shared_hidden or H)  # the shared experts fused into one MLP
    shared = expert(H_shared) if num_shared else 0
    total, active = parameter_counts(moe)
    assert total == D * E + E * expert(H) + shared
    assert active == D * E + k * expert(H) + shared == moe.num_active_parameters()
    assert moe.macs_per_token() == D * E + (k * H + H_shared) * (2 if expert_type == "gelu" else 3) * D


def test_build_model_dit_moe_layout_exact_parameter_counts():
    # DiT-MoE's layout (https://github.com/feizc/DiT-MoE models.py, SparseMoeBlock): SwiGLU experts of width 4D,
    # 2 shared experts fused into one SwiGLU of width 2D, unnormalised top-k weights.
    D, H, E, k, depth = 32, 128, 4, 2, 2
    kwargs = dict(input_size=8, in_channels=3, num_classes=2, hidden_size=D, depth=depth, num_heads=2)
    model = build_model(
        "t1-4E2A",
        expert_type="swiglu",
        num_shared_experts=2,
        shared_expert_ratio=1.0,
        normalize_weights=False,
        **kwargs,
    )
    dense = build_model("t1", **kwargs)
    moe = model.blocks[0].mlp
    assert isinstance(moe.experts[0], SwiGLU) and moe.normalize_weights is False
    assert moe.shared_experts.gate_proj.weight.shape == (2 * D, D)
    per_layer = D * E + E * 3 * D * H + 3 * D * 2 * D  # router, 4 routed experts, the fused shared expert
    assert sum(p.numel() for p in moe.parameters()) == per_layer == 55424
    dense_mlp = 2 * D * H + H + D
    total, active = parameter_counts(model)
    assert total == sum(p.numel() for p in dense.parameters()) + depth * (per_layer - dense_mlp)
    assert total - active == depth * (E - k) * 3 * D * H
    assert moe.macs_per_token() == D * E + 3 * D * (k * H + 2 * D)

    # The project's defaults: GELU experts, one shared expert as wide as a routed one, normalised weights.
    moe = build_model("t1-4E2A", **kwargs).blocks[0].mlp
    assert moe.expert_type == "gelu" and moe.normalize_weights and moe.shared_experts.fc1.weight.shape == (H, D)
    assert sum(p.numel() for p in moe.parameters()) == D * E + 5 * dense_mlp


@pytest.mark.parametrize(
    ("kwargs", "hint", "expected"),
    [
        (
            dict(num_shared_experts=1),
            None,
            dict(num_experts=4, num_shared_experts=1, shared_expert_hidden_size=16, expert_type="gelu"),
        ),
        (
            dict(num_shared_experts=0),
            None,
            dict(num_experts=4, num_shared_experts=0, shared_expert_hidden_size=16, expert_type="gelu"),
        ),
        (
            dict(expert_type="swiglu", num_shared_experts=2, shared_expert_hidden_size=4),
            None,
            dict(num_experts=4, num_shared_experts=1, shared_expert_hidden_size=8, expert_type="swiglu"),
        ),
        (
            dict(expert_type="swiglu", num_shared_experts=2, shared_expert_hidden_size=4),
            2,
            dict(num_experts=4, num_shared_experts=2, shared_expert_hidden_size=4, expert_type="swiglu"),
        ),
        (
            dict(num_shared_experts=3),
            None,
            dict(num_experts=4, num_shared_experts=3, shared_expert_hidden_size=16, expert_type="gelu"),
        ),
    ],
)
def test_infer_moe_config_reads_the_layout_from_tensors(kwargs, hint, expected):
    # Routed experts 16 wide: a fused shared width that 16 divides tells the count, another is one expert.
    moe = SparseMoE(4, 16, num_experts=4, experts_per_token=2, **kwargs)
    state = {f"blocks.0.mlp.{k}": v for k, v in moe.state_dict().items()}
    assert infer_moe_config(state, hint) == expected
    rebuilt = SparseMoE(4, 16, experts_per_token=2, **infer_moe_config(state, hint))  # the same tensors
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in moe.state_dict().items()}
    assert infer_moe_config(_random_tiny_dit().state_dict()) is None


def test_parameter_counts_upcycled_dit():
    dense = _random_tiny_dit()
    moe_model = upcycle(dense, num_experts=4, top_k=2)
    D, H, depth = 64, 256, 2  # t1: width 64, depth 2, mlp_ratio 4
    mlp = 2 * D * H + H + D
    dense_total, dense_active = parameter_counts(dense)
    assert dense_total == dense_active == sum(p.numel() for p in dense.parameters())
    total, active = parameter_counts(moe_model)
    assert total == dense_total + depth * (3 * mlp + D * 4)
    assert active == dense_total + depth * (mlp + D * 4)


def test_sparse_moe_rejects_bad_arguments():
    with pytest.raises(ValueError, match="experts_per_token"):
        SparseMoE(8, 16, num_experts=2, experts_per_token=3)
    with pytest.raises(ValueError, match="expert_type"):
        SparseMoE(8, 16, expert_type="relu")
    with pytest.raises(ValueError, match="capacity_factor"):
        SparseMoE(8, 16, capacity_factor=0.0)
