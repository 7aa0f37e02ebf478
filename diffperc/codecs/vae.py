"""Latent codec: a frozen diffusers ``AutoencoderKL`` loaded from a local folder (the Stable Diffusion 2 VAE in the
paper's recipes). It never downloads: point ``path`` at a local copy of the VAE (a folder with ``config.json`` and
weights, or a pipeline folder with ``subfolder: vae``)."""

from pathlib import Path

import torch

from diffperc.codecs.base import Codec


class VAECodec(Codec):
    """Frozen AutoencoderKL encoder/decoder with latent scaling.

    Args:
        path: Local folder of the VAE (or of a pipeline holding it, with ``subfolder``).
        subfolder: Subfolder of ``path`` that holds the VAE (``vae`` for a Stable Diffusion pipeline folder).
        scaling_factor: Latent scale (0.18215 for the Stable Diffusion VAEs).
        sample_posterior: Encode by sampling the latent distribution instead of taking its mode.
        half_precision: Run the VAE in float16 on GPU (ignored on CPU).
        max_batch: Images per encode/decode call.
    """

    def __init__(
        self,
        path: str,
        subfolder: str | None = None,
        scaling_factor: float = 0.18215,
        sample_posterior: bool = False,
        half_precision: bool = False,
        max_batch: int = 16,
    ):
        super().__init__()
        from diffusers import AutoencoderKL

        folder = Path(path) / (subfolder or "")
        if not folder.is_dir():
            raise FileNotFoundError(
                f"VAE folder not found: {folder} (`--model.codec.path`). diffperc never downloads "
                "weights: save the VAE locally (e.g. AutoencoderKL.save_pretrained) and point here."
            )
        if not (folder / "config.json").is_file():
            raise ValueError(f"{folder} is not a diffusers VAE folder: it has no config.json (`--model.codec.path`)")
        try:
            self.vae = AutoencoderKL.from_pretrained(str(path), subfolder=subfolder, local_files_only=True)
        except Exception as err:  # diffusers raises several types for a wrong folder
            raise ValueError(f"Could not load an AutoencoderKL from {folder}: {err}") from err
        self.vae.requires_grad_(False).eval()
        self.scaling_factor = scaling_factor
        self.sample_posterior = sample_posterior
        self.half_precision = half_precision
        self.max_batch = max_batch
        self.latent_channels = self.vae.config.latent_channels
        self.downsample = 2 ** (len(self.vae.config.block_out_channels) - 1)

    def train(self, mode: bool = True) -> "VAECodec":
        super().train(mode)
        self.vae.eval()  # frozen: never switch to training mode
        return self

    def _dtype(self, device: torch.device) -> torch.dtype:
        return torch.float16 if self.half_precision and device.type == "cuda" else torch.float32

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        dtype = self._dtype(images.device)
        self.vae.to(dtype)
        out = []
        for chunk in images.split(self.max_batch):
            dist = self.vae.encode(chunk.to(dtype)).latent_dist
            out.append(dist.sample() if self.sample_posterior else dist.mode())
        return torch.cat(out).float() * self.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        dtype = self._dtype(latents.device)
        self.vae.to(dtype)
        out = [
            self.vae.decode((chunk / self.scaling_factor).to(dtype)).sample for chunk in latents.split(self.max_batch)
        ]
        return torch.cat(out).float().clamp(-1, 1)
