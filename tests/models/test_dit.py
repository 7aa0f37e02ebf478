import pytest
import torch

from diffperc.compute import macs_per_sample
from diffperc.models import DiT, DiT_models, build_model, sincos_pos_embed, widen_input_projection

from helpers import tiny_dit


def _tiny(**kw) -> DiT:
    return tiny_dit(**{"depth": 2, **kw})


def _randomize(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)


def _param_formula(D, L, p, c_in, c_out, rows, tokens, mlp_ratio=4):
    h = int(D * mlp_ratio)
    patch = c_in * p * p * D + D
    t_emb = 256 * D + D + D * D + D
    block = (3 * D * D + 3 * D) + (D * D + D) + (D * h + h) + (h * D + D) + (6 * D * D + 6 * D)
    final = (2 * D * D + 2 * D) + (D * p * p * c_out + p * p * c_out)
    return patch + t_emb + rows * D + L * block + final + tokens * D


def test_dit_output_shape_and_sigma_channels():
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([1, 500]), torch.tensor([0, 2])
    assert _tiny()(x, t, y).shape == (2, 3, 8, 8)
    assert _tiny(learn_sigma=True)(x, t, y).shape == (2, 6, 8, 8)
    assert _tiny(in_channels=6, out_channels=3)(torch.randn(2, 6, 8, 8), t, y).shape == (2, 3, 8, 8)


def test_dit_zero_init_gives_zero_output_and_identity_blocks():
    model = _tiny()
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([3, 900]), torch.tensor([1, 0])
    assert torch.count_nonzero(model(x, t, y)) == 0  # adaLN-Zero: the final layer starts at zero
    tokens = torch.randn(2, 16, 32)
    c = torch.randn(2, 32)
    torch.testing.assert_close(model.blocks[0](tokens, c), tokens, rtol=0, atol=0)  # gates start at zero


def test_dit_parameter_counts_match_formula_and_official_sizes():
    model = _tiny(learn_sigma=True, class_dropout_prob=0.1)
    expected = _param_formula(32, 2, 2, 3, 6, rows=4, tokens=16)
    assert sum(p.numel() for p in model.parameters()) == expected
    # Official DiT presets (ImageNet 256 px: 32x32 latents, 4 channels, 1000 classes + null row, learn_sigma).
    with torch.device("meta"):
        xl = build_model("DiT-XL/2")
        s = build_model("DiT-S/2")
    assert sum(p.numel() for p in xl.parameters()) == _param_formula(1152, 28, 2, 4, 8, 1001, 256) == 675_129_632
    assert sum(p.numel() for p in s.parameters()) == _param_formula(384, 12, 2, 4, 8, 1001, 256) == 32_963_360


def test_tiny_ladder_is_width_64i_depth_2i_4_heads():
    for i in range(1, 7):
        cfg = DiT_models[f"t{i}"]
        assert (cfg["hidden_size"], cfg["depth"], cfg["num_heads"]) == (64 * i, 2 * i, 4)
    with torch.device("meta"):
        t2 = build_model("t2", input_size=32, in_channels=3, learn_sigma=False, num_classes=1, class_dropout_prob=0)
    assert sum(p.numel() for p in t2.parameters()) == _param_formula(128, 4, 4, 3, 3, rows=1, tokens=64)


def _forward_macs(D, L, p, c_in, c_out, tokens, mlp_ratio=4):
    """Forward MACs of one sample: matmuls, convolution and attention (as diffperc.compute counts them)."""
    h = int(D * mlp_ratio)
    # adaLN once per sample; per token qkv, out proj and the MLP; attention QK^T and AV.
    block = 6 * D * D + tokens * (3 * D * D + D * D + 2 * D * h) + 2 * tokens * tokens * D
    return tokens * c_in * p * p * D + 256 * D + D * D + L * block + 2 * D * D + tokens * D * p * p * c_out


# The paper authors' released a2..a5 and the extrapolated a1, a6 (diffperc/models/dit.py): (width, depth), exact
# parameters and forward MACs per image at 256 px (32x32x4 VAE latents, 1000 classes + null row, learn_sigma).
_A_LADDER = {
    "a1": (256, 12, 14_799_392, 2_826_698_752),
    "a2": (512, 16, 77_208_608, 13_991_018_496),
    "a3": (768, 20, 215_539_232, 38_334_234_624),
    "a4": (1024, 24, 458_102_816, 80_697_622_528),
    "a5": (1536, 28, 1_199_213_600, 208_997_056_512),
    "a6": (2048, 32, 2_432_692_256, 421_750_374_400),
}


@pytest.mark.parametrize("name", list(_A_LADDER))
def test_a_ladder_matches_released_sizes_and_exact_params(name):
    width, depth, params, macs = _A_LADDER[name]
    cfg = DiT_models[name]
    assert (cfg["hidden_size"], cfg["depth"], cfg["num_heads"], cfg["patch_size"]) == (width, depth, 16, 2)
    assert _param_formula(width, depth, 2, 4, 8, rows=1001, tokens=256) == params
    assert _forward_macs(width, depth, 2, 4, 8, tokens=256) == macs
    with torch.device("meta"):
        model = build_model(name)  # defaults: 32x32x4 latents, 1000 classes, learn_sigma
    assert sum(p.numel() for p in model.parameters()) == params


def test_a_ladder_steps_depth_by_4_and_counted_macs_match():
    assert [DiT_models[f"a{i}"]["depth"] for i in range(1, 7)] == list(range(12, 33, 4))
    assert DiT_models["a4"] == DiT_models["DiT-L/2"]  # the released a4 has DiT-L/2's shape
    # Counting every preset takes seconds; the smallest and a4 check the formula (tests/test_compute.py checks it on
    # tiny DiTs and DiT-XL/2). a4: the DiT paper's 80.7 Gflops (multiply-adds) for DiT-L/2 at 256 px.
    for name in ("a1", "a4"):
        with torch.device("meta"):
            model = build_model(name)
        assert macs_per_sample(model, 32, 4) == _A_LADDER[name][3]
    assert round(_A_LADDER["a4"][3] / 1e9, 1) == 80.7


def test_build_model_rejects_unknown_preset_naming_the_flag():
    with pytest.raises(ValueError, match=r"Unknown model preset 'DiT-Q/2'.*--model.backbone.name"):
        build_model("DiT-Q/2")


def test_widen_input_projection_keeps_pretrained_response_for_copies():
    model = _tiny()
    _randomize(model)
    model.eval()
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([10, 700]), torch.tensor([0, 1])
    reference = model(x, t, y)
    widen_input_projection(model, 3)
    assert model.x_embedder.proj.weight.shape == (32, 9, 2, 2)
    torch.testing.assert_close(model(torch.cat([x, x, x], 1), t, y), reference, rtol=1e-5, atol=1e-6)
    # A different condition changes the response: the widened layer really uses every input.
    assert not torch.allclose(model(torch.cat([torch.zeros_like(x), x, x], 1), t, y), reference)


def test_sincos_pos_embed_layout_matches_dit():
    emb = sincos_pos_embed(8, 3)  # (9, 8): half for the column index, half for the row index
    assert emb.shape == (9, 8)
    # Token 5 is row 1, column 2. First quarter: sin(col * omega), omega = 1 / 10000^(k / 2) for k = 0, 1.
    omega = torch.tensor([1.0, 0.01])
    torch.testing.assert_close(emb[5, :2], torch.sin(2 * omega))
    torch.testing.assert_close(emb[5, 2:4], torch.cos(2 * omega))
    torch.testing.assert_close(emb[5, 4:6], torch.sin(1 * omega))
    torch.testing.assert_close(emb[5, 6:8], torch.cos(1 * omega))


def test_dit_non_square_grid_uses_that_grids_embedding():
    # A 4x6 token grid gets the sin-cos embedding of that grid (rows first), not the stored 4x4 one: the forward
    # written out with it gives the same output.
    model = _tiny().eval()
    _randomize(model)
    x, t, y = torch.randn(1, 3, 8, 12), torch.tensor([5]), torch.tensor([0])
    tokens = model.x_embedder(x) + sincos_pos_embed(model.hidden_size, (4, 6))[None]
    c = model.t_embedder(t) + model.y_embedder(y, False)
    for block in model.blocks:
        tokens = block(tokens, c)
    expected = model.unpatchify(model.final_layer(tokens, c), 4, 6)
    torch.testing.assert_close(model(x, t, y), expected, rtol=0, atol=0)
    assert not torch.equal(sincos_pos_embed(model.hidden_size, (4, 6))[:16], model.pos_embed[0])


def test_forward_with_cfg_scale_one_equals_conditional():
    model = _tiny(class_dropout_prob=0.1)
    _randomize(model)
    model.eval()
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([5, 50]), torch.tensor([2, 1])
    torch.testing.assert_close(model.forward_with_cfg(x, t, y, 1.0), model(x, t, y), rtol=1e-5, atol=1e-6)


def test_dit_rejects_bad_shapes_with_clear_errors():
    with pytest.raises(ValueError, match="multiple of `patch_size`"):
        _tiny(input_size=9)
    with pytest.raises(ValueError, match="`depth` must be positive"):
        _tiny(depth=0)
    with pytest.raises(ValueError, match="divisible by num_heads"):
        _tiny(num_heads=3)
