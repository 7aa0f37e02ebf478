"""Latent caching: shards equal fresh encodings, resume skips complete shards, and training reads latents."""

import json

import pytest
import torch
import yaml
from torch.utils.data import Dataset

from diffperc.codecs import VAECodec
from diffperc.data import ProceduralClasses
from diffperc.data.latents import LatentCache, cache_latents, main
from diffperc.lit.finetuning import Backbone
from diffperc.lit.pretraining import DiffusionPretraining, EMASettings

from helpers import tiny_vae


@pytest.fixture
def vae_path(tmp_path):
    tiny_vae().save_pretrained(tmp_path / "vae")
    return str(tmp_path / "vae")


class _Counting(Dataset):
    """Wraps a data set and counts reads, to see which samples a resumed run encodes."""

    def __init__(self, dataset):
        self.dataset, self.reads = dataset, []

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        self.reads.append(index)
        return self.dataset[index]


def test_cached_latents_equal_fresh_encodings(tmp_path, vae_path):
    data = ProceduralClasses("train", length=10, resolution=16)
    codec = VAECodec(vae_path)
    # Batches of 3 straddle the shards of 4: 10 samples -> shards of 4, 4, 2.
    manifest = cache_latents(data, codec, tmp_path / "cache", shard_size=4, batch_size=3)
    assert manifest["complete"] and manifest["latent_shape"] == [4, 8, 8]
    assert manifest["shards"] == ["shard_00000.safetensors", "shard_00001.safetensors", "shard_00002.safetensors"]
    assert manifest["num_classes"] == 10 and manifest["codec"]["scaling_factor"] == 0.18215

    cache = LatentCache(str(tmp_path / "cache"), flip=False)
    assert len(cache) == 10
    for i in (0, 3, 4, 9):
        image = data[i]["image"][None]
        torch.testing.assert_close(cache[i]["latent"], codec.encode(image)[0], rtol=1e-5, atol=1e-6)
        assert cache[i]["label"] == data[i]["label"] == i % 10
    # The flipped variant is the latent of the flipped image, not a flipped latent.
    from safetensors.torch import load_file

    shard = load_file(str(tmp_path / "cache" / "shard_00001.safetensors"))
    torch.testing.assert_close(
        shard["latent_flip"][1], codec.encode(data[5]["image"][None].flip(-1))[0], rtol=1e-5, atol=1e-6
    )
    assert shard["label"].tolist() == [4, 5, 6, 7]


def test_latent_cache_flips_at_random(tmp_path):
    data = ProceduralClasses("train", length=4, resolution=8)
    from diffperc.codecs import PixelCodec

    cache_latents(data, PixelCodec(), tmp_path, shard_size=4)
    cache = LatentCache(str(tmp_path), flip=True)
    image = data[2]["image"]
    torch.manual_seed(0)
    reads = [cache[2]["latent"] for _ in range(20)]
    assert all(torch.equal(r, image) or torch.equal(r, image.flip(-1)) for r in reads)
    assert 0 < sum(torch.equal(r, image) for r in reads) < 20


def test_cache_latents_resumes_by_skipping_complete_shards(tmp_path):
    from diffperc.codecs import PixelCodec

    data = _Counting(ProceduralClasses("val", length=10, resolution=8))
    cache_latents(data, PixelCodec(), tmp_path, shard_size=4, batch_size=4)
    first = (tmp_path / "shard_00000.safetensors").stat().st_mtime_ns
    # An interrupted run: the last shard never landed and the manifest is not complete.
    (tmp_path / "shard_00002.safetensors").unlink()
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    with pytest.raises(ValueError, match="incomplete"):
        LatentCache(str(tmp_path))

    data.reads.clear()
    cache_latents(data, PixelCodec(), tmp_path, shard_size=4, batch_size=4)
    assert data.reads == [0, 8, 9]  # the shape probe, then only the missing shard
    assert (tmp_path / "shard_00000.safetensors").stat().st_mtime_ns == first
    torch.testing.assert_close(LatentCache(str(tmp_path), flip=False)[9]["latent"], data.dataset[9]["image"])
    with pytest.raises(ValueError, match="other settings \\(shard_size"):
        cache_latents(data, PixelCodec(), tmp_path, shard_size=5)


def test_cache_latents_rejects_a_randomly_flipping_dataset(tmp_path):
    data = ProceduralClasses("train", length=4, resolution=8)
    data.flip = True
    from diffperc.codecs import PixelCodec

    with pytest.raises(ValueError, match="flip"):
        cache_latents(data, PixelCodec(), tmp_path)
    with pytest.raises(FileNotFoundError, match="manifest.json is missing"):
        LatentCache(str(tmp_path / "none"))


def test_cache_latents_main_reads_a_training_config(tmp_path, vae_path):
    config = {
        "model": {
            "class_path": "diffperc.lit.pretraining.DiffusionPretraining",
            "init_args": {"codec": {"class_path": "diffperc.codecs.VAECodec", "init_args": {"path": vae_path}}},
        },
        "data": {
            "class_path": "diffperc.data.PerceptionDataModule",
            "init_args": {
                "train": {
                    "class_path": "diffperc.data.ProceduralClasses",
                    "init_args": {"length": 50, "resolution": 16},
                }
            },
        },
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    manifest = main(
        [
            "--base",
            str(path),
            "--out",
            str(tmp_path / "out"),
            "--limit",
            "6",
            "--shard_size",
            "4",
            "--num_workers",
            "0",
            "--device",
            "cpu",
        ]
    )
    assert manifest["num_samples"] == 6 and len(manifest["shards"]) == 2
    assert manifest["codec"]["class"] == "diffperc.codecs.vae.VAECodec"
    assert LatentCache(str(tmp_path / "out"))[5]["latent"].shape == (4, 8, 8)


def test_pretraining_on_cached_latents_equals_encoding_images(tmp_path, vae_path):
    data = ProceduralClasses("train", length=4, resolution=16)
    codec = VAECodec(vae_path)
    cache_latents(data, codec, tmp_path / "cache", shard_size=4, flip=False)
    cache = LatentCache(str(tmp_path / "cache"))
    torch.manual_seed(0)
    module = DiffusionPretraining(
        codec=codec,
        image_size=16,
        ema=EMASettings(decay=None),
        backbone=Backbone("t1", patch_size=2, hidden_size=32, depth=1, num_heads=2),
    )
    for param in module.net.parameters():  # adaLN-Zero starts at a zero output; make the output see its input
        param.data.normal_(0, 0.1)
    module.eval()  # no label dropout, so both losses see the same labels
    images = torch.stack([data[i]["image"] for i in range(4)])
    latents = torch.stack([cache[i]["latent"] for i in range(4)])
    labels = torch.arange(4)
    losses = []
    for batch in ({"image": images, "label": labels}, {"latent": latents, "label": labels}):
        generator = torch.Generator().manual_seed(0)
        losses.append(module.diffusion_loss(module._latents(batch), module._labels(batch), generator))
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    generator = torch.Generator().manual_seed(0)
    other = module.diffusion_loss(latents + 1, labels, generator)
    assert (other - losses[1]).abs() > 1e-3  # the loss depends on the latents it gets
