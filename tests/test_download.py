"""``diffperc download`` (diffperc/hub.py) offline: file:// URLs for the hash checks, a Hub cache built in the test."""

import hashlib
import json

import pytest
import torch
from diffusers import AutoencoderKL, DiTTransformer2DModel

from diffperc import hub
from diffperc.models.dit import DiT
from diffperc.models.pretrained import load_pretrained

from helpers import TINY_DIFFUSERS_DIT

PAYLOAD = b"not really a DiT checkpoint\n" * 1000
REV = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    """No network, and every cache under tmp_path."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.delenv("HF_HOME", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))


@pytest.fixture
def source(tmp_path):
    path = tmp_path / "served" / "DiT-XL-2-256x256.pt"
    path.parent.mkdir()
    path.write_bytes(PAYLOAD)
    return path, hashlib.sha256(PAYLOAD).hexdigest()


def test_download_file_good_hash_lands_atomically(tmp_path, source):
    src, digest = source
    dest = tmp_path / "out" / "w.pt"
    assert hub.download_file(src.as_uri(), dest, digest) == digest
    assert dest.read_bytes() == PAYLOAD
    assert [p.name for p in dest.parent.iterdir()] == ["w.pt"]  # no temporary file left


def test_download_file_bad_hash_fails_in_one_line_and_leaves_nothing(tmp_path, source):
    src, digest = source
    dest = tmp_path / "out" / "w.pt"
    with pytest.raises(ValueError) as info:
        hub.download_file(src.as_uri(), dest, "0" * 64)
    assert str(info.value) == (
        f"SHA-256 mismatch for {src.as_uri()}: expected {'0' * 64}, got {digest}; the download was deleted (a "
        "truncated or altered file); run the command again"
    )
    from diffperc.cli import user_error

    assert user_error(info.value) == str(info.value)  # `diffperc ...` prints it as one line, no traceback
    assert list(dest.parent.iterdir()) == []
    with pytest.raises(ValueError, match=r"^Could not download file://.*/nothing\.pt: "):
        hub.download_file((tmp_path / "nothing.pt").as_uri(), dest)
    assert list(dest.parent.iterdir()) == []


def test_download_official_prints_the_flag_and_the_unverified_hash(tmp_path, source, monkeypatch, capsys):
    src, digest = source
    monkeypatch.setitem(hub.OFFICIAL, "DiT-XL/2-256", hub.Release("DiT-XL-2-256x256.pt", src.as_uri(), None))
    hub.main(["DiT-XL/2-256"])
    out, err = capsys.readouterr()
    dest = tmp_path / "xdg" / "diffperc" / "DiT-XL-2-256x256.pt"  # no HF_HOME: $XDG_CACHE_HOME/diffperc
    assert out == f"--model.init_args.init_from {dest}\n"
    assert f"SHA-256 {digest} (unverified: the DiT release publishes no checksum" in err
    assert dest.read_bytes() == PAYLOAD
    # Again, by file name, into --out, with a recorded hash: verified; a second call finds the file and checks it.
    monkeypatch.setitem(hub.OFFICIAL, "DiT-XL/2-256", hub.Release("DiT-XL-2-256x256.pt", src.as_uri(), digest))
    for _ in range(2):
        hub.main(["DiT-XL-2-256x256.pt", "--out", str(tmp_path / "ckpts")])
    out, err = capsys.readouterr()
    assert out == f"--model.init_args.init_from {tmp_path / 'ckpts' / 'DiT-XL-2-256x256.pt'}\n" * 2
    assert err.count(f"SHA-256 {digest} verified") == 2 and "is already there" in err
    (tmp_path / "ckpts" / "DiT-XL-2-256x256.pt").write_bytes(b"altered")
    with pytest.raises(ValueError, match="is not .*: SHA-256 expected .*, got .*; delete it and run the command"):
        hub.main(["DiT-XL/2-256", "--out", str(tmp_path / "ckpts")])


def test_download_official_refuses_the_network_offline_and_unknown_names(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"downloads are off \(HF_HUB_OFFLINE=1\): unset it, or copy https://"):
        hub.fetch_official("DiT-XL/2-512", tmp_path)
    with pytest.raises(ValueError, match="Unknown checkpoint 'DiT-XL/2-1024': give an official one"):
        hub.main(["DiT-XL/2-1024"])


def test_default_dir_follows_hf_home(monkeypatch, tmp_path):
    assert hub.default_dir() == tmp_path / "xdg" / "diffperc"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "big_disk"))
    assert hub.default_dir() == tmp_path / "big_disk" / "diffperc"
    monkeypatch.delenv("HF_HUB_CACHE")
    assert hub.hub_cache_dir() == tmp_path / "big_disk" / "hub"


def test_choose_files_keeps_one_format_per_folder():
    files = [
        "model_index.json",
        "transformer/config.json",
        "transformer/diffusion_pytorch_model.bin",
        "transformer/diffusion_pytorch_model.safetensors",
        "transformer/diffusion_pytorch_model.fp16.safetensors",
        "vae/config.json",
        "vae/diffusion_pytorch_model.bin",
        "vae/diffusion_flax_model.msgpack",
    ]
    assert hub._choose_files(files, None) == [
        "model_index.json",
        "transformer/config.json",
        "transformer/diffusion_pytorch_model.safetensors",
        "vae/config.json",
        "vae/diffusion_pytorch_model.bin",  # the only PyTorch weights of vae/
    ]
    assert hub._choose_files(files, "transformer/") == [
        "model_index.json",
        "transformer/config.json",
        "transformer/diffusion_pytorch_model.safetensors",
    ]


def _tiny_pipeline_in_cache(tmp_path, repo="org/tiny-dit") -> tuple:
    """A Hugging Face cache holding ``repo`` as a DiT pipeline (transformer/ and vae/), the way ``hf download`` leaves
    it: ``models--org--name/snapshots/<rev>/...`` plus ``refs/main``."""
    root = tmp_path / "hf_cache" / f"models--{repo.replace('/', '--')}"
    snap = root / "snapshots" / REV
    g = torch.Generator().manual_seed(0)
    dit = DiTTransformer2DModel(**TINY_DIFFUSERS_DIT, norm_eps=1e-6)
    with torch.no_grad():
        for p in dit.transformer_blocks[0].norm1.emb.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
        for block in dit.transformer_blocks[1:]:
            block.norm1.emb.load_state_dict(dit.transformer_blocks[0].norm1.emb.state_dict())
    dit.save_pretrained(snap / "transformer")
    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, latent_channels=4, layers_per_block=1)
    vae.save_pretrained(snap / "vae")
    (snap / "model_index.json").write_text(json.dumps({"_class_name": "DiTPipeline"}))
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(REV)
    return snap, dit


def test_download_hub_id_offline_resolves_the_cache_and_prints_both_flags(tmp_path, capsys):
    snap, _ = _tiny_pipeline_in_cache(tmp_path)
    hub.main(["org/tiny-dit"])
    out, err = capsys.readouterr()
    assert out.splitlines() == [
        f"--model.init_args.init_from {snap / 'transformer'}",
        f"--model.init_args.codec.init_args.path {snap / 'vae'}",
    ]
    assert f"org/tiny-dit is in {snap}" in err


def test_download_hub_id_not_cached_offline_names_the_fetch_command(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        hub.main(["stabilityai/sd-vae-ft-mse"])
    assert str(info.value) == (
        f"stabilityai/sd-vae-ft-mse is not in the Hugging Face cache ({tmp_path / 'hf_cache'}) and downloads are off "
        "(HF_HUB_OFFLINE=1): fetch it with `hf download stabilityai/sd-vae-ft-mse`"
    )


def test_load_pretrained_from_a_hub_id_in_the_cache(tmp_path):
    _, reference = _tiny_pipeline_in_cache(tmp_path)
    model = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=10)
    report = load_pretrained(model, "org/tiny-dit")
    assert report["format"] == "diffusers"
    torch.testing.assert_close(
        model.t_embedder.mlp[0].weight,
        reference.transformer_blocks[0].norm1.emb.timestep_embedder.linear_1.weight,
        rtol=0,
        atol=0,
    )
    with pytest.raises(FileNotFoundError, match=r"fetch it with `hf download org/missing`$"):
        load_pretrained(model, "org/missing")
