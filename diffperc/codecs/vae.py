"""Latent codec: a frozen diffusers ``AutoencoderKL`` (the Stable Diffusion 2 VAE in the paper's recipes), from a local
folder or a Hugging Face Hub id. A Hub id is fetched through the Hugging Face cache (``HF_HOME`` / ``HF_HUB_CACHE``)
the first time and read from there afterwards; ``HF_HUB_OFFLINE=1`` or ``local_files_only: true`` never touches the
network. Examples: ``path: stabilityai/sd-vae-ft-mse``; ``path: stabilityai/stable-diffusion-2, subfolder: vae``;
``path: checkpoints/stable-diffusion-2, subfolder: vae`` (a local copy)."""

import json
import os
import re
from contextlib import nullcontext
from pathlib import Path

import torch

from diffperc.codecs.base import Codec

_VAE_CLASS = "AutoencoderKL"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


class VAECodec(Codec):
    """Frozen AutoencoderKL encoder/decoder with latent scaling.

    Args:
        path: Local folder of the VAE (or of a pipeline holding it, with ``subfolder``), or a Hub id
            (``stabilityai/sd-vae-ft-mse``; ``stabilityai/stable-diffusion-2`` with ``subfolder: vae``).
        subfolder: Subfolder of ``path`` that holds the VAE (``vae`` for a Stable Diffusion pipeline).
        scaling_factor: Latent scale; None (default) uses the VAE's own ``config.scaling_factor`` (0.18215 for the
            Stable Diffusion 1/2 VAEs, 0.13025 for SDXL's).
        sample_posterior: Encode by sampling the latent distribution instead of taking its mode.
        half_precision: Run the VAE in float16 on GPU (ignored on CPU).
        max_batch: Images per encode/decode call.
        local_files_only: Never download a Hub id, only read the Hugging Face cache (also set by
            ``HF_HUB_OFFLINE=1``).
    """

    def __init__(self, path: str, subfolder: str | None = None, scaling_factor: float | None = None,
                 sample_posterior: bool = False, half_precision: bool = False, max_batch: int = 16,
                 local_files_only: bool = False):
        super().__init__()
        if max_batch < 1:
            raise ValueError(f"`--model.codec.max_batch` must be >= 1, got {max_batch}")
        folder = Path(path) / (subfolder or "")
        if folder.is_dir():
            self.vae = _load_local(path, subfolder, folder)
        elif _HUB_ID.match(str(path)) and not Path(path).exists():
            self.vae = _load_hub(str(path), subfolder, local_files_only or _offline())
        else:
            raise FileNotFoundError(
                f"VAE folder not found: {folder} (`--model.codec.path`). Give a local folder (a VAE saved with "
                "AutoencoderKL.save_pretrained, or a pipeline folder with `--model.codec.subfolder vae`) or a Hub id "
                "such as stabilityai/sd-vae-ft-mse (fetch it ahead with `hf download stabilityai/sd-vae-ft-mse`)."
            )
        self.vae.requires_grad_(False).eval()
        self.path, self.subfolder, self.local_files_only = str(path), subfolder, local_files_only  # what rebuilds it
        self.scaling_factor = float(scaling_factor if scaling_factor is not None else self.vae.config.scaling_factor)
        self.sample_posterior = sample_posterior
        self.half_precision = half_precision
        self.max_batch = max_batch
        self.latent_channels = self.vae.config.latent_channels
        self.downsample = 2 ** (len(self.vae.config.block_out_channels) - 1)

    def train(self, mode: bool = True) -> "VAECodec":
        super().train(mode)
        self.vae.eval()  # frozen: never switch to training mode
        return self

    def _apply(self, fn, recurse: bool = True):
        # A cast of the whole model (Lightning's `bf16-true` / `16-true` precision, `.half()`) must not reach the VAE:
        # the SD VAEs overflow in low precision, and casting back to float32 would not restore the rounded weights.
        # Device moves still apply; the half-precision GPU option casts `self.vae` itself (`_dtype`).
        def keep_dtype(t: torch.Tensor) -> torch.Tensor:
            out = fn(t)
            return t.to(out.device) if out.is_floating_point() and out.dtype != t.dtype else out

        return super()._apply(keep_dtype, recurse)

    def _dtype(self, device: torch.device) -> torch.dtype:
        dtype = torch.float16 if self.half_precision and device.type == "cuda" else torch.float32
        if self.vae.dtype != dtype:  # cast once, not per call (diffusers warns on every cast)
            self.vae.to(dtype)
        return dtype

    def _no_autocast(self, device: torch.device):
        # The SD VAEs overflow in low precision (diffusers marks them `force_upcast`): run them in the dtype chosen
        # here, not in the trainer's bf16/fp16 autocast.
        return torch.autocast(device.type, enabled=False) if device.type in ("cuda", "cpu") else nullcontext()

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (N, 3, H, W) in [-1, 1] -> scaled latents (N, latent_channels, H / f, W / f), float32."""
        dtype = self._dtype(images.device)
        out = []
        with self._no_autocast(images.device):
            for chunk in images.split(self.max_batch):
                dist = self.vae.encode(chunk.to(dtype)).latent_dist
                out.append(dist.sample() if self.sample_posterior else dist.mode())
        return torch.cat(out).float() * self.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (N, latent_channels, h, w) -> images (N, 3, h * f, w * f) in [-1, 1], float32."""
        dtype = self._dtype(latents.device)
        with self._no_autocast(latents.device):
            out = [self.vae.decode((chunk.float() / self.scaling_factor).to(dtype)).sample
                   for chunk in latents.split(self.max_batch)]
        return torch.cat(out).float().clamp(-1, 1)


def _load_local(path: str, subfolder: str | None, folder: Path):
    from diffusers import AutoencoderKL

    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{folder} is not a diffusers VAE folder: it has no config.json (`--model.codec.path`)")
    try:
        class_name = json.loads(config_file.read_text()).get("_class_name", _VAE_CLASS)
    except (json.JSONDecodeError, AttributeError) as err:
        raise ValueError(f"{config_file} is not a valid diffusers config (`--model.codec.path`): {err}") from err
    # diffusers would otherwise build a randomly initialised VAE from another model's folder (a UNet's, say), with
    # only a warning about unused weights.
    if class_name != _VAE_CLASS:
        hint = " (a pipeline folder? set `--model.codec.subfolder vae`)" if (folder / "vae").is_dir() else ""
        raise ValueError(f"{folder} holds a {class_name}, not an {_VAE_CLASS} (`--model.codec.path`){hint}")
    try:
        vae, info = AutoencoderKL.from_pretrained(
            str(path), subfolder=subfolder, local_files_only=True, low_cpu_mem_usage=False, output_loading_info=True
        )
    except Exception as err:  # diffusers raises several types for a wrong folder
        raise ValueError(f"Could not load an AutoencoderKL from {folder}: {err}") from err
    if info["missing_keys"] or info["mismatched_keys"]:
        raise ValueError(f"{folder}: the weights do not fit its config.json (missing "
                         f"{info['missing_keys'][:5]}, mismatched {info['mismatched_keys'][:5]})")
    return vae


def _load_hub(repo_id: str, subfolder: str | None, local_files_only: bool):
    """An AutoencoderKL by Hub id through the Hugging Face cache (downloaded once unless ``local_files_only``)."""
    from diffusers import AutoencoderKL

    where = f"{repo_id}" + (f" (subfolder {subfolder})" if subfolder else "")
    try:
        return AutoencoderKL.from_pretrained(repo_id, subfolder=subfolder, local_files_only=local_files_only)
    except Exception as err:  # huggingface_hub / diffusers raise many types: missing cache, 404, no network, ...
        fetch = f"hf download {repo_id}" + (f" --include '{subfolder}/*'" if subfolder else "")
        if local_files_only:
            raise FileNotFoundError(
                f"VAE {where} is not in the Hugging Face cache and downloads are off (HF_HUB_OFFLINE=1 or "
                f"`--model.codec.local_files_only`): fetch it once with `{fetch}` (`--model.codec.path`)"
            ) from err
        raise ValueError(f"Could not load an AutoencoderKL from the Hub id {where} (`--model.codec.path`): "
                         f"{str(err).splitlines()[0] if str(err) else type(err).__name__}. Fetch it with `{fetch}`, "
                         "or give a local folder.") from err

