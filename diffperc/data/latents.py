"""Latent caching: encode a data set once through the frozen codec into ``.safetensors`` shards, then train on them.

To run: ``diffperc cache-latents --base configs/pretrain/base.yaml --out /data/latents/in256`` (the training config's
``data.init_args.train`` and ``model.init_args.codec`` are used), then train with ``diffperc.data.latents.LatentCache``
as the data set. Each shard holds ``latent`` (and ``latent_flip``, the horizontally flipped image's latent) and
``label``; ``manifest.json`` describes them. Shards are written atomically, so an interrupted run resumes by skipping
the shards already on disk.
"""

import json
import os
import time
from collections.abc import Mapping
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from diffperc.codecs import Codec, PixelCodec
from diffperc.utils import atomic_write_bytes, atomic_write_json

MANIFEST = "manifest.json"
FORMAT = "diffperc-latents-v1"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Settings a resumed run must share with the shards already written.
_SETTINGS = ("format", "num_samples", "shard_size", "flip", "dtype", "codec", "latent_shape", "has_label")


def _shard_name(index: int) -> str:
    return f"shard_{index:05d}.safetensors"


def _codec_record(codec: Codec) -> dict:
    record = {
        "class": f"{type(codec).__module__}.{type(codec).__qualname__}",
        "latent_channels": int(codec.latent_channels),
        "downsample": int(codec.downsample),
    }
    for key in ("scaling_factor", "sample_posterior", "unshuffle"):
        if hasattr(codec, key):
            record[key] = getattr(codec, key)
    return record


@torch.no_grad()
def cache_latents(
    dataset: Dataset,
    codec: Codec,
    out_dir: str | Path,
    *,
    shard_size: int = 1024,
    batch_size: int = 64,
    num_workers: int = 0,
    flip: bool = True,
    device: str | torch.device = "cpu",
    dtype: str = "float32",
    limit: int | None = None,
    log_every: int = 0,
) -> dict:
    """Encodes ``dataset`` (samples with ``image`` in [-1, 1] and optionally ``label``) into latent shards.

    Args:
        dataset: Map-style data set; its own random flip must be off (the cache stores both orientations).
        codec: The frozen codec training will use (same scaling factor).
        out_dir: Folder for the shards and ``manifest.json``; created if needed.
        shard_size: Samples per shard (the last shard may be shorter).
        batch_size: Images per encode call.
        num_workers: DataLoader workers that read and decode images.
        flip: Also store the latent of each horizontally flipped image (``latent_flip``).
        device: Where the codec runs.
        dtype: Storage dtype of the latents (``float32``, ``float16`` or ``bfloat16``).
        limit: Cache only the first ``limit`` samples.
        log_every: Print progress every this many shards (0 = quiet).

    Returns:
        The manifest (also written to ``out_dir/manifest.json``).

    Raises:
        ValueError: Bad arguments, a data set that flips at random, or an ``out_dir`` holding a cache made with other
            settings (delete it or choose another ``--out``).
    """
    from safetensors.torch import save

    if shard_size < 1 or batch_size < 1:
        raise ValueError(f"`shard_size` and `batch_size` must be >= 1, got {shard_size}, {batch_size}")
    if dtype not in _DTYPES:
        raise ValueError(f"`dtype` must be one of {list(_DTYPES)}, got {dtype!r}")
    if getattr(dataset, "flip", False):
        raise ValueError(
            f"{type(dataset).__name__} flips images at random (`flip=True`); set `flip: false` for "
            "caching, the cache stores the flipped latent itself"
        )
    num_samples = len(dataset) if limit is None else min(limit, len(dataset))
    if num_samples < 1:
        raise ValueError(f"Nothing to cache: the data set has {len(dataset)} samples (limit {limit})")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    codec = codec.to(device).eval()

    # 1. Probe one sample for the latent shape and the label, then check any existing cache against these settings.
    probe = dataset[0]
    if "image" not in probe:
        raise ValueError(f"{type(dataset).__name__} samples have no `image` key (keys: {sorted(probe)})")
    latent_shape = list(codec.encode(probe["image"][None].to(device)).shape[1:])
    num_shards = -(-num_samples // shard_size)
    manifest = {
        "format": FORMAT,
        "num_samples": num_samples,
        "shard_size": shard_size,
        "flip": flip,
        "dtype": dtype,
        "codec": _codec_record(codec),
        "latent_shape": latent_shape,
        "has_label": "label" in probe,
        "num_classes": getattr(dataset, "num_classes", None),
        "dataset": type(dataset).__name__,
        "shards": [_shard_name(k) for k in range(num_shards)],
        "complete": False,
    }
    manifest_path = out_dir / MANIFEST
    if manifest_path.is_file():
        old = json.loads(manifest_path.read_text())
        differ = [k for k in _SETTINGS if old.get(k) != manifest[k]]
        if differ:
            raise ValueError(
                f"{out_dir} holds a latent cache made with other settings ({', '.join(differ)}: "
                f"{[old.get(k) for k in differ]} vs {[manifest[k] for k in differ]}); delete it or "
                "choose another `--out`"
            )
    atomic_write_json(manifest_path, manifest)

    # 2. Encode the missing shards in order; complete shards on disk are kept (they were written atomically).
    todo = [k for k in range(num_shards) if not (out_dir / _shard_name(k)).is_file()]
    indices = [i for k in todo for i in range(k * shard_size, min(num_samples, (k + 1) * shard_size))]
    loader = DataLoader(
        Subset(dataset, indices),
        batch_size=batch_size,
        num_workers=num_workers,
        shuffle=False,
        collate_fn=_collate_images,
    )
    store = _DTYPES[dtype]
    pending: dict[str, list[torch.Tensor]] = {"latent": [], "latent_flip": [], "label": []}
    filled, shard_iter, start = 0, iter(todo), time.perf_counter()
    shard = next(shard_iter, None)
    for images, labels in loader:
        images = images.to(device)
        pending["latent"].append(codec.encode(images).to("cpu", store))
        if flip:
            pending["latent_flip"].append(codec.encode(images.flip(-1)).to("cpu", store))
        if labels is not None:
            pending["label"].append(labels)
        filled += images.shape[0]
        # Flush every shard the buffer now covers (a batch may straddle two shards).
        while shard is not None and filled >= _shard_len(shard, shard_size, num_samples):
            count = _shard_len(shard, shard_size, num_samples)
            tensors = {}
            for key, parts in pending.items():
                if parts:
                    rows = torch.cat(parts)
                    tensors[key] = rows[:count].contiguous()
                    pending[key] = [rows[count:]] if rows.shape[0] > count else []
            meta = {"start": str(shard * shard_size), "count": str(count)}
            atomic_write_bytes(out_dir / _shard_name(shard), save(tensors, metadata=meta))
            filled -= count
            done = todo.index(shard) + 1
            if log_every and (done % log_every == 0 or done == len(todo)):
                rate = sum(_shard_len(k, shard_size, num_samples) for k in todo[:done]) / (time.perf_counter() - start)
                print(f"cache-latents: shard {shard + 1}/{num_shards} written ({rate:.1f} images/s)", flush=True)
            shard = next(shard_iter, None)
    manifest["complete"] = True
    atomic_write_json(manifest_path, manifest)
    return manifest


def _shard_len(shard: int, shard_size: int, num_samples: int) -> int:
    return min(shard_size, num_samples - shard * shard_size)


def _collate_images(samples: list[dict]) -> tuple[torch.Tensor, torch.Tensor | None]:
    images = torch.stack([s["image"] for s in samples])
    labels = torch.as_tensor([int(s["label"]) for s in samples]) if "label" in samples[0] else None
    return images, labels


class LatentCache(Dataset):
    """Latents written by ``cache_latents``: samples ``{"latent": (C, h, w) float32, "label": int}``.

    With ``flip``, each read returns the flipped image's latent with probability 0.5 (torch's RNG in the loading
    process, as ``ImageNetFolder``'s flip). Shards are memory-mapped and read one row at a time.

    Args:
        root: Folder holding ``manifest.json`` and the shards (``--out`` of ``diffperc cache-latents``).
        flip: Use the stored flipped latents as random horizontal-flip augmentation.
    """

    def __init__(self, root: str, flip: bool = True):
        self.root = Path(root)
        path = self.root / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(
                f"No latent cache in {self.root}: {MANIFEST} is missing (`root`); create one with "
                "`diffperc cache-latents --base <training config> --out <folder>`"
            )
        self.manifest = json.loads(path.read_text())
        if self.manifest.get("format") != FORMAT:
            raise ValueError(f"{path}: unknown cache format {self.manifest.get('format')!r} (expected {FORMAT!r})")
        if not self.manifest.get("complete"):
            raise ValueError(
                f"The latent cache in {self.root} is incomplete (interrupted?): rerun the same "
                "`diffperc cache-latents` command to finish it"
            )
        missing = [name for name in self.manifest["shards"] if not (self.root / name).is_file()]
        if missing:
            raise FileNotFoundError(f"The latent cache in {self.root} lacks {len(missing)} shards, e.g. {missing[0]}")
        self.flip = flip and self.manifest["flip"]
        self.num_classes = self.manifest.get("num_classes")
        self._handles: dict = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return self.manifest["num_samples"]

    def __getstate__(self) -> dict:
        # Open shard handles can't be pickled (spawned workers); each process reopens its own.
        return {**self.__dict__, "_handles": {}}

    def _shard(self, index: int):
        from safetensors import safe_open

        if os.getpid() != self._pid:  # a forked worker: don't share the parent's handles
            self._handles, self._pid = {}, os.getpid()
        if index not in self._handles:
            self._handles[index] = safe_open(str(self.root / self.manifest["shards"][index]), framework="pt")
        return self._handles[index]

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} cached samples")
        shard, row = divmod(index, self.manifest["shard_size"])
        handle = self._shard(shard)
        key = "latent_flip" if self.flip and torch.rand(()) < 0.5 else "latent"
        sample = {"latent": handle.get_slice(key)[row : row + 1][0].float()}
        if self.manifest["has_label"]:
            sample["label"] = int(handle.get_slice("label")[row : row + 1][0])
        return sample


# ---------------------------------------------------------------------------------------------- command line
def _deep_merge(base: dict, update: Mapping) -> dict:
    out = dict(base)
    for key, value in update.items():
        nested = isinstance(value, Mapping) and isinstance(out.get(key), dict)
        out[key] = _deep_merge(out[key], value) if nested else value
    return out


def _load_configs(paths: list[str]) -> dict:
    import yaml

    merged: dict = {}
    for path in paths:
        if not Path(path).is_file():
            raise FileNotFoundError(f"`--config` file not found: {path}")
        merged = _deep_merge(merged, yaml.safe_load(Path(path).read_text()) or {})
    return merged


def _instantiate(dataset_spec: dict, codec_spec: dict | None) -> tuple[Dataset, Codec]:
    """Builds the data set and codec from their ``class_path``/``init_args`` config entries (as LightningCLI)."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--dataset", type=Dataset)
    parser.add_argument("--codec", type=Codec | None, default=None)
    config = parser.parse_object({"dataset": dataset_spec, "codec": codec_spec})
    objects = parser.instantiate_classes(config)
    return objects.dataset, objects.codec if objects.codec is not None else PixelCodec()


def main(argv: list[str] | None = None) -> dict:
    """``diffperc cache-latents --base TRAINING.yaml --out DIR``: encodes a training config's data set with its codec
    (``argv`` without the subcommand name); the flags are declared in ``diffperc.cli``."""
    from diffperc.cli import parse_command

    args = parse_command("cache-latents", argv)
    config = _load_configs(args.base)
    data_args = config.get("data", {}).get("init_args", config.get("data", {}))
    dataset_spec = data_args.get(args.split)
    if not isinstance(dataset_spec, Mapping):
        raise ValueError(f"`--base` {args.base}: no `data.init_args.{args.split}` data set (class_path, init_args)")
    dataset_spec = _deep_merge(dataset_spec, {})
    if "flip" in dataset_spec.get("init_args", {}):
        dataset_spec["init_args"]["flip"] = False  # the cache stores both orientations
    model_args = config.get("model", {}).get("init_args", config.get("model", {}))
    dataset, codec = _instantiate(dataset_spec, model_args.get("codec"))
    if getattr(dataset, "flip", False):
        dataset.flip = False
    start = time.perf_counter()
    manifest = cache_latents(
        dataset,
        codec,
        args.out,
        shard_size=args.shard_size,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        flip=not args.no_flip,
        device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"),
        dtype=args.dtype,
        limit=args.limit,
        log_every=10,
    )
    print(
        f"cache-latents: {manifest['num_samples']} samples in {len(manifest['shards'])} shards at {args.out} "
        f"({time.perf_counter() - start:.1f} s)"
    )
    return manifest


if __name__ == "__main__":
    main()
