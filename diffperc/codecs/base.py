"""The codec interface: images in [-1, 1] <-> latents the DiT denoises."""

import torch
from torch import nn


class Codec(nn.Module):
    """Maps images (N, 3, H, W) in [-1, 1] to latents (N, latent_channels, H / downsample, W / downsample) and back."""

    #: Latent channels per encoded 3-channel image.
    latent_channels: int = 3
    #: Image pixels per latent pixel along each side.
    downsample: int = 1
    #: Whether sampled latents live in [-1, 1], so DDIM may clip its x0 estimate (true in pixel space).
    clip_sample: bool = False

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError
