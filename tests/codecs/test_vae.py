"""VAECodec with a tiny AutoencoderKL saved by the test (never downloaded), and bf16 mixed precision around it."""

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from diffusers import UNet2DModel

from diffperc.codecs import VAECodec

from helpers import tiny_vae

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def vae_dir(tmp_path):
    vae = tiny_vae()
    vae.save_pretrained(tmp_path / "vae")
    return tmp_path / "vae", vae


def test_vae_codec_round_trip_matches_the_saved_autoencoder(vae_dir):
    path, vae = vae_dir
    codec = VAECodec(str(path))
    assert (codec.latent_channels, codec.downsample) == (4, 2)
    assert not any(p.requires_grad for p in codec.parameters())
    images = torch.rand(3, 3, 16, 16) * 2 - 1

    latents = codec.encode(images)
    assert latents.shape == (3, 4, 8, 8)
    # Encoding by the mode is deterministic and equals the original model's mean latent times 0.18215.
    torch.testing.assert_close(codec.encode(images), latents, rtol=0, atol=0)
    with torch.no_grad():
        expected = vae.encode(images).latent_dist.mode() * 0.18215
        decoded_expected = vae.decode(latents / 0.18215).sample.clamp(-1, 1)
    torch.testing.assert_close(latents, expected)

    decoded = codec.decode(latents)
    assert decoded.shape == (3, 3, 16, 16)
    torch.testing.assert_close(decoded, decoded_expected)
    assert decoded.min() >= -1 and decoded.max() <= 1


def test_vae_codec_batches_and_stays_frozen(vae_dir):
    path, _ = vae_dir
    images = torch.rand(5, 3, 16, 16) * 2 - 1
    whole = VAECodec(str(path), max_batch=16).encode(images)
    codec = VAECodec(str(path), max_batch=2, scaling_factor=0.5)
    # Chunks of 2, 2, 1 give the same latents (up to the scale).
    torch.testing.assert_close(codec.encode(images) / 0.5, whole / 0.18215, rtol=1e-5, atol=1e-5)
    codec.train()
    assert codec.training and not codec.vae.training


def test_vae_codec_loads_from_a_pipeline_subfolder(tmp_path):
    tiny_vae().save_pretrained(tmp_path / "pipe" / "vae")
    assert VAECodec(str(tmp_path / "pipe"), subfolder="vae").latent_channels == 4
    with pytest.raises(ValueError, match="no config.json"):
        VAECodec(str(tmp_path / "pipe"))


def test_vae_codec_rejects_missing_and_non_vae_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="VAE folder not found"):
        VAECodec(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        VAECodec(str(tmp_path / "empty"))
    # Another diffusers model: diffusers alone would build a random VAE with a warning.
    unet = UNet2DModel(sample_size=8, block_out_channels=(8, 16), norm_num_groups=8, layers_per_block=1,
                       down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2)
    unet.save_pretrained(tmp_path / "unet")
    with pytest.raises(ValueError, match="holds a UNet2DModel, not an AutoencoderKL"):
        VAECodec(str(tmp_path / "unet"))
    # A VAE config without weights.
    tiny_vae().save_pretrained(tmp_path / "noweights")
    (tmp_path / "noweights" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ValueError, match="Could not load an AutoencoderKL"):
        VAECodec(str(tmp_path / "noweights"))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a valid diffusers config"):
        VAECodec(str(tmp_path / "broken"))


def _hub_cache(cache: Path, repo_id: str, vae, subfolder: str | None = None) -> None:
    """A Hugging Face cache holding ``repo_id`` at one snapshot, as `hf download` leaves it."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    vae.save_pretrained(repo / "snapshots" / commit / (subfolder or ""))


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "hub"


def test_vae_codec_loads_a_hub_id_from_the_cache_offline_with_its_own_scaling_factor(offline_cache):
    vae = tiny_vae()
    vae.register_to_config(scaling_factor=0.13025)  # SDXL's: the codec must not assume 0.18215
    _hub_cache(offline_cache, "tiny-org/tiny-vae", vae)
    _hub_cache(offline_cache, "tiny-org/tiny-pipeline", vae, subfolder="vae")
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        expected = vae.encode(images).latent_dist.mode()
    for codec in (VAECodec("tiny-org/tiny-vae"), VAECodec("tiny-org/tiny-pipeline", subfolder="vae")):
        assert codec.scaling_factor == 0.13025
        torch.testing.assert_close(codec.encode(images), expected * 0.13025)
    assert VAECodec("tiny-org/tiny-vae", scaling_factor=0.18215).scaling_factor == 0.18215  # the user's choice wins


def test_vae_codec_hub_id_missing_offline_names_the_download_command(offline_cache):
    with pytest.raises(FileNotFoundError, match=r"tiny-org/absent.*HF_HUB_OFFLINE.*`hf download tiny-org/absent`"):
        VAECodec("tiny-org/absent")
    with pytest.raises(FileNotFoundError, match=r"--include 'vae/\*'"):
        VAECodec("tiny-org/absent", subfolder="vae")


def test_vae_codec_stays_float32_under_bf16_autocast_and_a_bf16_cast(vae_dir):
    # `--trainer.precision bf16-mixed` runs everything under bf16 autocast, `bf16-true` casts the whole module: the
    # SD VAEs overflow in low precision, so the codec runs float32 either way, bit for bit as without them.
    path, _ = vae_dir
    codec = VAECodec(str(path))
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    latents, decoded = codec.encode(images), codec.decode(codec.encode(images))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto_latents = codec.encode(images)
        auto_decoded = codec.decode(auto_latents.bfloat16().float())
    assert auto_latents.dtype == auto_decoded.dtype == torch.float32
    torch.testing.assert_close(auto_latents, latents, rtol=0, atol=0)
    torch.testing.assert_close(codec.decode(latents.bfloat16().float()), auto_decoded, rtol=0, atol=0)
    codec.to(torch.bfloat16)
    torch.testing.assert_close(codec.encode(images.bfloat16()), codec.encode(images.bfloat16().float()), rtol=0, atol=0)
    assert codec.vae.dtype == torch.float32
    torch.testing.assert_close(codec.decode(latents), decoded, rtol=0, atol=0)


def test_bf16_mixed_fit_and_test_through_the_cli_write_finite_metrics(vae_dir, tmp_path):
    # The quickstart depth recipe on the tiny VAE's latents, width-32 DiT, one bf16-mixed step on CPU, then test.
    path, _ = vae_dir
    config = tmp_path / "bf16.yaml"
    config.write_text(f"""
trainer:
  precision: bf16-mixed
  max_steps: 1
  limit_test_batches: 1
  enable_progress_bar: false
  logger:
    init_args: {{save_dir: {tmp_path / "runs"}}}
model:
  init_args:
    codec:
      class_path: diffperc.codecs.VAECodec
      init_args: {{path: {path}}}
    backbone: {{hidden_size: 32, depth: 1, num_heads: 2}}
data:
  init_args:
    batch_size: 2
    num_workers: 0
""")
    from diffperc.cli import main

    args = ["--config", str(ROOT / "configs" / "quickstart" / "depth.yaml"), "--config", str(config)]
    main(["fit", *args])
    main(["test", *args, "--ckpt_path", "last"])
    run = tmp_path / "runs" / "quickstart_depth"
    assert yaml.safe_load((run / "config.yaml").read_text())["trainer"]["precision"] == "bf16-mixed"
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 1
    assert all(v.dtype == torch.float32 for v in ckpt["state_dict"].values() if v.is_floating_point())  # fp32 master
    record = json.loads((run / "test_metrics.json").read_text())
    for key in ("abs_rel", "delta1", "baseline/abs_rel"):
        assert isinstance(record[key], float) and math.isfinite(record[key]) and record[key] >= 0, (key, record)
    assert 0 <= record["delta1"] <= 1 and record["abs_rel"] != record["baseline/abs_rel"]
