"""diffusers' DiT layout (DiTTransformer2DModel) converted to the official one, on a tiny model built here (CPU)."""

import pytest
import torch
from diffusers import DiTTransformer2DModel
from diffusers.models.embeddings import get_timestep_embedding
from safetensors.torch import save_file

from diffperc.models.dit import DiT, TimestepEmbedder
from diffperc.models.pretrained import (
    architecture_mismatch,
    convert_diffusers_dit,
    load_pretrained,
    network_fields,
    read_network_state,
)

from helpers import TINY_DIFFUSERS_DIT

DIFFUSERS_CFG = TINY_DIFFUSERS_DIT  # the same network as DIT_CFG in diffusers' layout
DIT_CFG = dict(
    input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=10, learn_sigma=True
)


def _diffusers_dit(norm_eps: float = 1e-5, official_timesteps: bool = False) -> DiTTransformer2DModel:
    """A DiTTransformer2DModel with random weights (adaLN-Zero's zeros too) and one set of embedders in every block,
    as in diffusers' conversion of the official checkpoints."""
    model = DiTTransformer2DModel(**DIFFUSERS_CFG, norm_eps=norm_eps).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        embedders = model.transformer_blocks[0].norm1.emb.state_dict()
        for block in model.transformer_blocks[1:]:
            block.norm1.emb.load_state_dict(embedders)
    if official_timesteps:  # DiT's sinusoid: frequencies exp(-ln(1e4) i / half), not / (half - 1)
        for block in model.transformer_blocks:
            block.norm1.emb.time_proj.downscale_freq_shift = 0
    return model


def _inputs():
    g = torch.Generator().manual_seed(2)
    return torch.randn(5, 4, 8, 8, generator=g), torch.tensor([0, 1, 10, 500, 999]), torch.tensor([0, 3, 7, 9, 10])


def _pair(model):
    x, t, y = _inputs()
    dit = DiT(**DIT_CFG).eval()
    dit.load_state_dict(convert_diffusers_dit(model.state_dict(), sample_size=8), strict=True)
    with torch.inference_mode():
        return model(x, t, y).sample, dit(x, t, y)


def test_convert_diffusers_dit_maps_every_key_to_the_official_layout():
    model = _diffusers_dit()
    converted = convert_diffusers_dit(model.state_dict(), sample_size=8)
    reference = DiT(**DIT_CFG).state_dict()
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in reference.items()}
    sd = model.state_dict()
    q, k, v = (sd[f"transformer_blocks.1.attn1.to_{n}.weight"] for n in "qkv")
    torch.testing.assert_close(converted["blocks.1.attn.qkv.weight"], torch.cat([q, k, v]), rtol=0, atol=0)
    torch.testing.assert_close(converted["pos_embed"], reference["pos_embed"], rtol=0, atol=0)  # both sin-cos 4x4


def test_converted_dit_equals_diffusers_with_dit_timestep_features():
    # diffusers with DiT's timestep sinusoid and LayerNorm eps computes exactly what the converted DiT computes, at
    # every timestep: the renaming is exact (measured: bitwise equal outputs).
    ours_ref, ours = _pair(_diffusers_dit(norm_eps=1e-6, official_timesteps=True))
    torch.testing.assert_close(ours, ours_ref, rtol=0, atol=1e-5)


def test_converted_dit_differs_from_diffusers_only_through_its_timestep_features():
    # Stock diffusers (downscale_freq_shift=1, MLP LayerNorm eps 1e-5): the same weights compute another function.
    ref, ours = _pair(_diffusers_dit())
    rel = ((ref - ours).flatten(1).norm(dim=1) / ref.flatten(1).norm(dim=1)).tolist()  # t = 0, 1, 10, 500, 999
    # At t = 0 both sinusoids are (1, .., 1, 0, .., 0): only the eps differs (measured 1.7e-7). Then the gap grows with
    # t; golden values of this seeded random model (its weights are not trained: they amplify the gap).
    assert rel[0] < 1e-6
    assert rel[1:] == pytest.approx([0.0019, 0.0158, 0.942, 0.820], rel=0.05)
    # The cause, model-free: relative L2 distance between diffusers' and DiT's 256-d timestep features. Golden values
    # from this computation (float32): 0.13% at t = 1, 1.3% at t = 10, 13% at t = 100, 61% at t = 500, 101% at 999.
    t = torch.tensor([0, 1, 10, 100, 500, 999])
    theirs = get_timestep_embedding(t, 256, flip_sin_to_cos=True, downscale_freq_shift=1)
    official = TimestepEmbedder.timestep_embedding(t, 256)
    rel = ((theirs - official).norm(dim=1) / official.norm(dim=1)).tolist()
    assert rel == pytest.approx([0.0, 0.00129, 0.0129, 0.1287, 0.6071, 1.0107], abs=2e-4)
    # With downscale_freq_shift=0 diffusers' sinusoid is DiT's.
    same = get_timestep_embedding(t, 256, flip_sin_to_cos=True, downscale_freq_shift=0)
    torch.testing.assert_close(same, official, rtol=0, atol=1e-6)


def test_convert_diffusers_dit_refuses_unmapped_keys_and_diverged_embedders():
    sd = dict(_diffusers_dit().state_dict())
    with pytest.raises(ValueError, match=r"no counterpart in the official DiT layout: \['transformer_blocks.0.norm3"):
        convert_diffusers_dit({**sd, "transformer_blocks.0.norm3.weight": torch.ones(32)}, path="w.safetensors")
    key = "transformer_blocks.1.norm1.emb.class_embedder.embedding_table.weight"
    with pytest.raises(ValueError, match=rf"`{key}` differs from block 0's copy \(max difference 0.5\)"):
        convert_diffusers_dit({**sd, key: sd[key] + 0.5})


@pytest.mark.parametrize("layout", ["safetensors", "bin", "folder", "pipeline", "bare_file"])
def test_load_pretrained_reads_diffusers_files_folders_and_pipelines(tmp_path, layout):
    model = _diffusers_dit(norm_eps=1e-6, official_timesteps=True)
    model.save_pretrained(tmp_path / "pipe" / "transformer")  # config.json + diffusion_pytorch_model.safetensors
    folder = tmp_path / "pipe" / "transformer"
    if layout == "bin":
        (folder / "diffusion_pytorch_model.safetensors").unlink()
        torch.save(model.state_dict(), folder / "diffusion_pytorch_model.bin")
    bare = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, bare)
    path = {
        "safetensors": folder / "diffusion_pytorch_model.safetensors",
        "bin": folder / "diffusion_pytorch_model.bin",
        "folder": folder,
        "pipeline": tmp_path / "pipe",
        "bare_file": bare,
    }[layout]
    dit = DiT(**DIT_CFG).eval()
    report = load_pretrained(dit, path)
    assert report["format"] == "diffusers"
    # Without config.json the grid is unknown: pos_embed is built for the model's (the same 4x4 here).
    built = ["pos_embed: built for a 4x4 grid (not stored in the file)"]
    assert report["conversions"] == (built if layout == "bare_file" else [])
    x, t, y = _inputs()
    with torch.inference_mode():
        torch.testing.assert_close(dit(x, t, y), model(x, t, y).sample, rtol=0, atol=1e-5)


def test_load_pretrained_converts_diffusers_weights_for_a_perception_model(tmp_path):
    # The usual conversions follow the renaming: sigma outputs dropped, input widened for one condition latent,
    # 2 task rows from the class mean, a 16x16 latent grid.
    _diffusers_dit().save_pretrained(tmp_path / "transformer")
    dit = DiT(
        **{**DIT_CFG, "input_size": 16, "in_channels": 8, "num_classes": 2, "learn_sigma": False},
        class_dropout_prob=0.0,
        out_channels=4,
    )
    report = load_pretrained(dit, tmp_path / "transformer")
    assert [line.split(":")[0] for line in report["conversions"]] == [
        "final_layer.linear",
        "x_embedder.proj",
        "y_embedder.embedding_table",
        "pos_embed",
    ]


def test_read_network_state_and_fields_understand_the_diffusers_layout(tmp_path):
    _diffusers_dit().save_pretrained(tmp_path / "transformer")
    state = read_network_state(tmp_path / "transformer")
    assert network_fields(state) == {
        "hidden_size": 32,
        "depth": 2,
        "patch_size": 2,
        "num_experts": 0,
        "mlp_hidden_size": 128,
        "in_channels": 4,
        "out_channels": 8,
        "label_rows": 11,
        "num_patches": 16,
    }
    wider = DiT(**{**DIT_CFG, "hidden_size": 64}).state_dict()
    assert architecture_mismatch(state, wider) == (
        "`hidden_size` is 32 in the file, 64 in the model (`--model.init_args.backbone.hidden_size`)"
    )
