"""Tests for loading official-layout DiT checkpoints and converting them into perception models (tiny, CPU)."""

import json
import pickle
import warnings
import zipfile

import pytest
import torch
from safetensors.torch import save_file

from diffperc.models.build import widen_input_projection
from diffperc.models.dit import DiT, sincos_pos_embed
from diffperc.models.pretrained import (
    drop_sigma,
    load_pretrained,
    read_network_state,
    task_embedding_rows,
    widen_patch_embedding,
)

# Tiny stand-in for an official checkpoint: depth 2, width 32, 2 heads, patch 2, 8x8 latents with 4 channels,
# 10 classes plus the null row (label dropout), learn_sigma.
CFG = {
    "input_size": 8,
    "patch_size": 2,
    "in_channels": 4,
    "hidden_size": 32,
    "depth": 2,
    "num_heads": 2,
    "mlp_ratio": 4.0,
    "class_dropout_prob": 0.1,
    "num_classes": 10,
    "learn_sigma": True,
}


def official_dit_shapes(
    input_size,
    patch_size,
    in_channels,
    hidden_size,
    depth,
    num_heads,
    mlp_ratio,
    class_dropout_prob,
    num_classes,
    learn_sigma,
):
    """Key -> shape of an official DiT state dict, written from the official model definition (models.py).

    Reference description of facebookresearch/DiT `DiT`:
    - `x_embedder` is timm's PatchEmbed: a Conv2d `proj` (kernel = stride = patch) with bias; its norm is Identity.
    - `t_embedder.mlp` = Linear(256 -> D), SiLU, Linear(D -> D): parameters at indices 0 and 2.
    - `y_embedder.embedding_table` = Embedding(num_classes + (class_dropout_prob > 0), D).
    - `pos_embed` = a (1, T, D) parameter, T = (input_size / patch)^2, filled with the fixed sin-cos embedding.
    - each block: LayerNorms `norm1`, `norm2` without affine parameters; timm Attention with qkv bias
      (`attn.qkv` D -> 3D, `attn.proj` D -> D; q/k norms are Identity); timm Mlp `fc1` D -> int(D * mlp_ratio),
      `fc2` back to D; `adaLN_modulation` = SiLU then Linear(D -> 6D) at index 1.
    - `final_layer`: affine-free LayerNorm, `linear` D -> p * p * out (out = 2 * in_channels when learn_sigma),
      `adaLN_modulation` = SiLU then Linear(D -> 2D) at index 1.
    """
    d, p, hidden = hidden_size, patch_size, int(hidden_size * mlp_ratio)
    out = in_channels * 2 if learn_sigma else in_channels
    shapes = {
        "pos_embed": (1, (input_size // p) ** 2, d),
        "x_embedder.proj.weight": (d, in_channels, p, p),
        "x_embedder.proj.bias": (d,),
        "t_embedder.mlp.0.weight": (d, 256),
        "t_embedder.mlp.0.bias": (d,),
        "t_embedder.mlp.2.weight": (d, d),
        "t_embedder.mlp.2.bias": (d,),
        "y_embedder.embedding_table.weight": (num_classes + int(class_dropout_prob > 0), d),
    }
    for i in range(depth):
        shapes.update(
            {
                f"blocks.{i}.attn.qkv.weight": (3 * d, d),
                f"blocks.{i}.attn.qkv.bias": (3 * d,),
                f"blocks.{i}.attn.proj.weight": (d, d),
                f"blocks.{i}.attn.proj.bias": (d,),
                f"blocks.{i}.mlp.fc1.weight": (hidden, d),
                f"blocks.{i}.mlp.fc1.bias": (hidden,),
                f"blocks.{i}.mlp.fc2.weight": (d, hidden),
                f"blocks.{i}.mlp.fc2.bias": (d,),
                f"blocks.{i}.adaLN_modulation.1.weight": (6 * d, d),
                f"blocks.{i}.adaLN_modulation.1.bias": (6 * d,),
            }
        )
    shapes.update(
        {
            "final_layer.linear.weight": (p * p * out, d),
            "final_layer.linear.bias": (p * p * out,),
            "final_layer.adaLN_modulation.1.weight": (2 * d, d),
            "final_layer.adaLN_modulation.1.bias": (2 * d,),
        }
    )
    return shapes


def _random_official(seed=0, **overrides):
    """A random state dict in the official layout; every tensor non-zero so each one changes the output."""
    cfg = {**CFG, **overrides}
    gen = torch.Generator().manual_seed(seed)
    sd = {k: 0.2 * torch.randn(s, generator=gen) for k, s in official_dit_shapes(**cfg).items()}
    sd["pos_embed"] = sincos_pos_embed(cfg["hidden_size"], cfg["input_size"] // cfg["patch_size"]).unsqueeze(0)
    return sd


def _inputs(channels=4, side=8, num_labels=10):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, channels, side, side, generator=gen)
    return x, torch.tensor([3.0, 500.0]), torch.tensor([1, num_labels - 1])


def _source_model(sd):
    model = DiT(**CFG).eval()
    model.load_state_dict(sd, strict=True)
    return model


def test_official_layout_matches_dit_keys_and_shapes():
    ours = {k: tuple(v.shape) for k, v in DiT(**CFG).state_dict().items()}
    assert ours == official_dit_shapes(**CFG)
    assert len(ours) == 8 + 10 * 2 + 4


def test_load_pretrained_official_pt_same_outputs(tmp_path):
    sd = _random_official()
    file = tmp_path / "DiT-tiny.pt"
    torch.save(sd, file)
    model = DiT(**CFG).eval()
    report = load_pretrained(model, file, strict=True)
    assert report["format"] == "dit" and report["prefix"] == "" and report["conversions"] == []
    assert report["missing_keys"] == [] and report["unexpected_keys"] == []
    x, t, y = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, y), _source_model(sd)(x, t, y), atol=1e-5, rtol=0)
        assert model(x, t, y).abs().max() > 0.1  # random weights: a real output, not adaLN-Zero's zeros


def test_drop_sigma_output_is_mean_channels(tmp_path):
    sd = _random_official()
    file = tmp_path / "sigma.pt"
    torch.save(sd, file)
    model = DiT(**{**CFG, "learn_sigma": False}).eval()
    report = load_pretrained(model, file)
    assert report["conversions"] == ["final_layer.linear: dropped sigma, 8 -> 4 channels per pixel"]
    x, t, y = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, y), _source_model(sd)(x, t, y)[:, :4], atol=1e-5, rtol=0)


def test_drop_sigma_selects_per_pixel_rows():
    # Row r of a (p, p, 2C) layout with p = 2, C = 1: pixel r // 2, channel r % 2; the means are rows 0, 2, 4, 6.
    sd = {
        "final_layer.linear.weight": torch.arange(8.0)[:, None].repeat(1, 3),
        "final_layer.linear.bias": torch.arange(8.0),
    }
    out = drop_sigma(sd, patch_size=2, out_channels=1)
    assert out["final_layer.linear.bias"].tolist() == [0.0, 2.0, 4.0, 6.0]
    assert out["final_layer.linear.weight"][:, 0].tolist() == [0.0, 2.0, 4.0, 6.0]
    with pytest.raises(ValueError, match="final_layer.linear.weight"):
        drop_sigma(sd, patch_size=2, out_channels=2)


def test_widen_patch_embedding_copies_give_source_response(tmp_path):
    sd = _random_official()
    file = tmp_path / "src.pt"
    torch.save(sd, file)
    model = DiT(**{**CFG, "in_channels": 12, "out_channels": 4}).eval()  # k = 2 conditioning latents
    report = load_pretrained(model, file)
    assert report["conversions"] == ["x_embedder.proj: widened 4 -> 12 input channels (3 latents)"]
    x, t, y = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(model(torch.cat([x, x, x], 1), t, y), _source_model(sd)(x, t, y), atol=1e-5, rtol=0)
        # Same rule as build.widen_input_projection on a model.
        widened = widen_input_projection(_source_model(sd), 3).x_embedder.proj.weight
    torch.testing.assert_close(widen_patch_embedding(sd, 3)["x_embedder.proj.weight"], widened)


def test_task_embedding_rows_mean_excludes_null_row():
    table = torch.tensor([[1.0, 2.0], [3.0, 6.0], [100.0, -100.0]])
    assert task_embedding_rows(table, 2, has_null_row=True).tolist() == [[2.0, 4.0], [2.0, 4.0]]
    torch.testing.assert_close(task_embedding_rows(table, 1, has_null_row=False), torch.tensor([[104 / 3, -92 / 3]]))


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_load_pretrained_task_rows_and_null_row(tmp_path, dropout):
    sd = _random_official()
    file = tmp_path / "src.pt"
    torch.save(sd, file)
    model = DiT(**{**CFG, "num_classes": 3, "class_dropout_prob": dropout})
    load_pretrained(model, file)
    table = model.y_embedder.embedding_table.weight.detach()
    source = sd["y_embedder.embedding_table.weight"]
    assert table.shape == (3 + (dropout > 0), 32)
    torch.testing.assert_close(table[:3], source[:10].mean(0).expand(3, -1))
    if dropout:
        torch.testing.assert_close(table[3], source[10])


def test_load_pretrained_perception_model_all_conversions(tmp_path):
    sd = _random_official()
    file = tmp_path / "DiT-tiny-512.pt"
    torch.save(sd, file)
    # Depth from RGB at a larger grid: 2 latents in, one out, no sigma, 1 task, 16x16 tokens.
    model = DiT(
        **{
            **CFG,
            "input_size": 32,
            "in_channels": 8,
            "out_channels": 4,
            "learn_sigma": False,
            "num_classes": 1,
            "class_dropout_prob": 0.0,
        }
    )
    report = load_pretrained(model, file, strict=True)
    assert [c.split(":")[0] for c in report["conversions"]] == [
        "final_layer.linear",
        "x_embedder.proj",
        "y_embedder.embedding_table",
        "pos_embed",
    ]
    torch.testing.assert_close(model.pos_embed.detach(), sincos_pos_embed(32, 16).unsqueeze(0), atol=0, rtol=0)
    torch.testing.assert_close(
        model.y_embedder.embedding_table.weight.detach(),
        sd["y_embedder.embedding_table.weight"][:10].mean(0, keepdim=True),
    )
    torch.testing.assert_close(model.blocks[1].mlp.fc2.weight.detach(), sd["blocks.1.mlp.fc2.weight"], atol=0, rtol=0)


def test_load_pretrained_warns_on_non_sincos_pos_embed(tmp_path):
    sd = _random_official()
    sd["pos_embed"] = sd["pos_embed"] + 1e-3
    file = tmp_path / "odd.pt"
    torch.save(sd, file)
    model = DiT(**CFG)
    with pytest.warns(UserWarning, match="odd.pt.*pos_embed.*kept"):
        load_pretrained(model, file)
    torch.testing.assert_close(model.pos_embed.detach(), sd["pos_embed"], atol=0, rtol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an exact sin-cos table gives no warning
        torch.save(_random_official(), file)
        load_pretrained(DiT(**CFG), file)


def _assert_weights(model, sd):
    got = model.state_dict()
    assert got.keys() == sd.keys()
    for key, value in sd.items():
        torch.testing.assert_close(got[key], value, atol=0, rtol=0, msg=key)


def test_load_pretrained_lightning_and_safetensors_same_weights(tmp_path):
    ema, live = _random_official(seed=0), _random_official(seed=1)
    extras = {
        "epoch": 3,
        "global_step": 40,
        "pytorch-lightning_version": "2.6.0",
        "hyper_parameters": {"lr": 1e-4},
        "optimizer_states": [{"state": {0: {"step": torch.tensor(40.0)}}, "param_groups": [{"lr": 1e-4}]}],
    }
    files = {
        # Plain Lightning checkpoint: the network under `net.`, next to a frozen codec that must be ignored.
        "plain.ckpt": (
            {**extras, "state_dict": {**{f"net.{k}": v for k, v in ema.items()}, "codec.scale": torch.ones(1)}},
            False,
        ),
        # EMA copy as a module of the LightningModule: it wins over the live weights.
        "prefix.ckpt": (
            {
                **extras,
                "state_dict": {
                    **{f"net.{k}": v for k, v in live.items()},
                    **{f"net_ema.{k}": v for k, v in ema.items()},
                },
            },
            True,
        ),
        # Lightning's WeightAveraging callback: average in `state_dict`, live weights in `current_model_state`.
        "averaged.ckpt": (
            {
                **extras,
                "state_dict": {f"net.{k}": v for k, v in ema.items()},
                "current_model_state": {f"net.{k}": v for k, v in live.items()},
                "averaging_state": {"n_averaged": torch.tensor(40)},
            },
            True,
        ),
    }
    for name, (ckpt, is_ema) in files.items():
        torch.save(ckpt, tmp_path / name)
        model = DiT(**CFG)
        report = load_pretrained(model, tmp_path / name)
        assert (report["format"], report["ema"]) == ("lightning", is_ema), name
        _assert_weights(model, ema)
    save_file(ema, str(tmp_path / "w.safetensors"))
    model = DiT(**CFG)
    assert load_pretrained(model, tmp_path / "w.safetensors")["format"] == "safetensors"
    _assert_weights(model, ema)


class _Payload:
    """Unpickling this object creates the file at ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_load_pretrained_refuses_malicious_pickle(tmp_path):
    marker = tmp_path / "pwned"
    file = tmp_path / "evil.pt"
    torch.save({**_random_official(), "extra": _Payload(marker)}, file)
    with pytest.raises(ValueError, match="evil.pt.*weights_only"):
        load_pretrained(DiT(**CFG), file)
    assert not marker.exists()
    # The payload is real: the file's pickle record calls it, and unpickling it creates the marker.
    with zipfile.ZipFile(file) as archive:
        record = archive.read(next(name for name in archive.namelist() if name.endswith("/data.pkl")))
    assert b"open" in record
    pickle.loads(pickle.dumps(_Payload(marker))).close()
    assert marker.exists()


def test_load_pretrained_errors_name_file_and_key(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.pt"):
        load_pretrained(DiT(**CFG), tmp_path / "nothere.pt")
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(TypeError, match="tensor.pt: not a state dict"):
        load_pretrained(DiT(**CFG), tmp_path / "tensor.pt")
    torch.save(_random_official(), tmp_path / "src.pt")
    with pytest.raises(ValueError, match=r"src.pt.*`blocks.0.mlp.fc1.weight` file \(128, 32\) vs model \(64, 32\)"):
        load_pretrained(DiT(**{**CFG, "mlp_ratio": 2.0}), tmp_path / "src.pt")
    sd = _random_official()
    del sd["blocks.1.attn.proj.bias"]
    torch.save(sd, tmp_path / "partial.pt")
    with pytest.raises(ValueError, match="partial.pt.*blocks.1.attn.proj.bias"):
        load_pretrained(DiT(**CFG), tmp_path / "partial.pt")
    report = load_pretrained(DiT(**CFG), tmp_path / "partial.pt", strict=False)
    assert report["missing_keys"] == ["blocks.1.attn.proj.bias"]


def test_missing_official_checkpoint_names_the_download_command_once(tmp_path):
    path = tmp_path / "checkpoints" / "DiT-XL-2-512x512.pt"
    for read in (lambda: load_pretrained(DiT(**CFG), path), lambda: read_network_state(path)):
        with pytest.raises(FileNotFoundError) as info:
            read()
        # The command puts the file exactly where the config expects it.
        assert str(info.value) == (
            f"Checkpoint file not found: {path}; fetch it with "
            f"`diffperc download DiT-XL/2-512 --out {tmp_path / 'checkpoints'}`"
        )
    # Any other missing file: no command to suggest.
    with pytest.raises(FileNotFoundError) as info:
        load_pretrained(DiT(**CFG), tmp_path / "runs" / "last.ckpt")
    assert str(info.value) == f"Checkpoint file not found: {tmp_path / 'runs' / 'last.ckpt'}"
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty: no weights in it \(a diffusers model folder holds"):
        load_pretrained(DiT(**CFG), tmp_path / "empty")


def test_payload_pickles_by_reference():
    # Guards the malicious-pickle test: the payload must pickle as a call to `open`, not as plain data.
    assert b"open" in pickle.dumps(_Payload("x"))


def _moe_state(**layout) -> dict[str, torch.Tensor]:
    """A tiny DiT-MoE's tensors (4 experts, top-2) in the given SparseMoE layout."""
    from diffperc.models.moe import to_moe

    model = to_moe(DiT(**CFG), dict(num_experts=4, experts_per_token=2, **layout))
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def test_read_moe_config_from_records_hyperparameters_and_tensors(tmp_path):
    from diffperc.models.pretrained import read_moe_config

    dit_moe = dict(expert_type="swiglu", num_shared_experts=2, shared_expert_hidden_size=32, normalize_weights=False)
    state = _moe_state(**dit_moe)
    full = dict(num_experts=4, experts_per_token=2, capacity_factor=None, balance_loss_coef=0.01, **dit_moe)

    # 1. The record a Lightning checkpoint of this project holds wins (the tensors alone say "1 shared expert 64 wide").
    ckpt = tmp_path / "run.ckpt"
    torch.save({"state_dict": {f"net.{k}": v for k, v in state.items()}, "diffperc": {"moe": full}}, ckpt)
    assert read_moe_config(ckpt) == full
    # 2. A checkpoint from before the record: the preset name in its hyper-parameters gives top-k, and normalisation
    #    is the default the preset was built with then (here contradicted by nothing the tensors can show).
    old = tmp_path / "old.ckpt"
    torch.save(
        {
            "state_dict": {f"net.{k}": v for k, v in state.items()},
            "hyper_parameters": {"backbone": {"name": "DiT-S/2-4E2A", "num_shared_experts": 2}},
        },
        old,
    )
    assert read_moe_config(old) == dict(
        num_experts=4,
        experts_per_token=2,
        num_shared_experts=2,
        shared_expert_hidden_size=32,
        expert_type="swiglu",
        normalize_weights=True,
    )
    # 3. A bare safetensors file: what the tensors show, and None for what only a record could tell.
    bare = tmp_path / "bare.safetensors"
    save_file(state, str(bare))
    assert read_moe_config(bare) == dict(
        num_experts=4,
        experts_per_token=None,
        normalize_weights=None,
        num_shared_experts=1,
        shared_expert_hidden_size=64,
        expert_type="swiglu",
    )
    # ... unless a `diffperc export` record lies beside it.
    exported = tmp_path / "exported.safetensors"
    save_file(state, str(exported))
    exported.with_suffix(".json").write_text(json.dumps({"moe": full}))
    assert read_moe_config(exported) == full
    # 4. An upcycled network's hyper-parameters: top-k of `upcycle`, normalised weights, no shared expert.
    upcycled = tmp_path / "upcycled.pt"
    torch.save({**_moe_state(num_shared_experts=0), "hyper_parameters": {"upcycle": {"top_k": 1}}}, upcycled)
    assert read_moe_config(upcycled) == dict(
        num_experts=4,
        experts_per_token=1,
        normalize_weights=True,
        num_shared_experts=0,
        shared_expert_hidden_size=128,
        expert_type="gelu",
    )
    dense = tmp_path / "dense.pt"
    torch.save(_random_official(), dense)
    assert read_moe_config(dense) is None
