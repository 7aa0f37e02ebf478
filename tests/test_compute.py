"""Tests for diffperc.compute: MAC counts of tiny DiTs against formulas derived by hand, on CPU and on meta."""

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from diffperc.compute import SDPA_FLOP_FORMULAS, count_macs, count_train_macs, macs_per_sample
from diffperc.models.dit import DiT, DiT_models

_FREQ = 256  # TimestepEmbedder.frequency_embedding_size


def _tiny_dit(input_size: int = 8, patch_size: int = 2, hidden_size: int = 16, depth: int = 2) -> DiT:
    return DiT(input_size=input_size, patch_size=patch_size, in_channels=3, hidden_size=hidden_size, depth=depth,
               num_heads=2, num_classes=5, learn_sigma=False, class_dropout_prob=0.0)


def _inputs(batch: int, channels: int, side: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, channels, side, side, generator=g)
    return x, torch.randint(0, 1000, (batch,), generator=g), torch.randint(0, 5, (batch,), generator=g)


def _attention_macs(n: int, side: int, p: int, d: int, depth: int) -> int:
    t = (side // p) ** 2
    return n * depth * (t * t * d + t * t * d)  # QK^T, then AV, summed over heads


def _dit_forward_macs(n: int, side: int, p: int, c_in: int, c_out: int, d: int, depth: int) -> int:
    """Forward MACs of a DiT, layer by layer, as derived from diffperc/models/dit.py."""
    t = (side // p) ** 2
    patch_embed = t * d * c_in * p * p  # strided conv = one (C p^2 -> D) linear map per token
    t_embed = _FREQ * d + d * d  # two-layer MLP on the sinusoidal features; the label lookup is free
    block = (
        d * 6 * d  # adaLN modulation, once per sample
        + t * d * 3 * d  # qkv
        + t * t * d + t * t * d  # QK^T and AV
        + t * d * d  # out proj
        + 2 * t * d * 4 * d  # fc1 and fc2 (mlp_ratio 4)
    )
    final = d * 2 * d + t * d * p * p * c_out
    return n * (patch_embed + t_embed + depth * block + final)


@pytest.mark.parametrize("side", [8, 16])
@pytest.mark.parametrize("patch_size", [2, 4])
def test_count_macs_matches_analytic_dit_formula(side, patch_size):
    model = _tiny_dit(input_size=side, patch_size=patch_size)
    x, t, y = _inputs(2, 3, side)
    expected = _dit_forward_macs(2, side, patch_size, 3, 3, 16, 2)
    assert count_macs(model, x, t, y, device="same") == expected
    assert count_macs(model, x, t, y, device="meta") == expected


def test_count_macs_meta_equals_cpu_and_leaves_model_in_place():
    side = 8
    model = _tiny_dit(side)
    x, t, y = _inputs(3, 3, side)
    assert count_macs(model, x, t, y, device="meta") == count_macs(model, x, t, y, device="same")
    assert count_train_macs(model, x, t, y, device="meta") == count_train_macs(model, x, t, y, device="same")
    assert {p.device.type for p in model.parameters()} == {"cpu"}


def test_count_macs_counts_cpu_attention_through_custom_mapping():
    side = 16
    model = _tiny_dit(side, patch_size=2, hidden_size=32)
    x, t, y = _inputs(2, 3, side)
    assert torch.ops.aten._scaled_dot_product_flash_attention_for_cpu in SDPA_FLOP_FORMULAS
    # Plain FlopCounterMode on CPU does not know the CPU flash kernel and drops attention entirely.
    with torch.no_grad(), FlopCounterMode(display=False) as plain:
        model(x, t, y)
    with_mapping = count_macs(model, x, t, y, device="same")
    assert with_mapping - plain.get_total_flops() // 2 == _attention_macs(2, side, 2, 32, 2)


def test_count_train_macs_is_three_forwards_less_unneeded_input_grads():
    n, side, p, d = 2, 8, 2, 16
    model = _tiny_dit(side, p, d)
    x, t, y = _inputs(n, 3, side)
    forward = count_macs(model, x, t, y)
    train = count_train_macs(model, x, t, y)
    # Backward = 2x forward (dX and dW per matmul; dP, dV, dQ, dK for attention), but autograd skips dX where X needs
    # no grad: the image into the patch-embed conv and the sinusoidal features into the first t-MLP layer.
    t_tokens = (side // p) ** 2
    skipped = n * (t_tokens * d * 3 * p * p + _FREQ * d)
    assert train == 3 * forward - skipped
    assert 2.85 < train / forward < 3.0


def test_count_train_macs_counts_input_grad_when_requested_and_leaves_grads_alone():
    side = 8
    model = _tiny_dit(side)
    x, t, y = _inputs(2, 3, side)
    weight = model.final_layer.linear.weight
    weight.grad = torch.full_like(weight, 7.0)  # as if mid gradient accumulation
    plain = count_train_macs(model, x, t, y, device="same")
    assert torch.equal(weight.grad, torch.full_like(weight, 7.0))
    assert all(param.grad is None for param in model.parameters() if param is not weight)
    # dX of the patch-embed conv (same MACs as its forward) is only computed when x requires grad.
    with_input_grad = count_train_macs(model, x.requires_grad_(), t, y, device="meta")
    assert with_input_grad - plain == 2 * (side // 2) ** 2 * 16 * 3 * 2 * 2


def test_macs_per_sample_dit_xl2_matches_analytic_and_paper():
    with torch.device("meta"):  # 675M parameters without allocating them
        model = DiT(input_size=32, **DiT_models["DiT-XL/2"])
    macs_256 = macs_per_sample(model, 32, 4)
    macs_512 = macs_per_sample(model, 64, 4, batch=2)
    assert macs_256 == _dit_forward_macs(1, 32, 2, 4, 8, 1152, 28)  # learn_sigma doubles the 4 output channels
    assert macs_512 == _dit_forward_macs(1, 64, 2, 4, 8, 1152, 28)
    # DiT paper (Peebles & Xie), Table 4 "Gflops", which count a multiply-add once: 118.6 at 256 px, 524.6 at 512 px.
    assert abs(macs_256 / 1e9 - 118.6) < 0.1
    assert abs(macs_512 / 1e9 - 524.6) < 0.1


class _RoutedLinear(nn.Module):
    """Applies its linear map only to rows with a positive first feature, so its MACs depend on the data."""

    routing_dependent = True

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x[x[:, 0] > 0])


def test_count_macs_routing_dependent_refuses_meta_and_counts_real_batch():
    model = nn.Sequential(_RoutedLinear())
    x = torch.tensor([[1.0, 0, 0, 0], [-1.0, 0, 0, 0], [2.0, 0, 0, 0]])
    with pytest.raises(ValueError, match="routing_dependent"):
        count_macs(model, x, device="meta")
    assert count_macs(model, x) == 2 * 4 * 3  # auto -> real batch: 2 routed rows x (4 -> 3)
    assert count_train_macs(model, x) == 2 * 4 * 3 * 2  # forward + dW (x needs no grad)
    with pytest.raises(ValueError, match="routing_dependent"):
        macs_per_sample(model, 8, 3, device="meta")


def test_count_macs_rejects_unknown_device():
    with pytest.raises(ValueError, match="`device`"):
        count_macs(_tiny_dit(), *_inputs(1, 3, 8), device="cuda")
