"""Pixel-space codec: the identity, optionally folding f x f pixel blocks into channels (pixel-unshuffle)."""

import torch
import torch.nn.functional as F

from diffperc.codecs.base import Codec


class PixelCodec(Codec):
    """Identity codec in [-1, 1]; ``unshuffle`` > 1 folds each f x f block of pixels into 3 f^2 channels.

    Args:
        unshuffle: Pixel-unshuffle factor f (1 = plain pixels).
    """

    clip_sample = True

    def __init__(self, unshuffle: int = 1):
        super().__init__()
        if unshuffle < 1:
            raise ValueError(f"`--model.codec.unshuffle` must be >= 1, got {unshuffle}")
        self.unshuffle = unshuffle
        self.latent_channels = 3 * unshuffle**2
        self.downsample = unshuffle

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return F.pixel_unshuffle(images, self.unshuffle) if self.unshuffle > 1 else images

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return F.pixel_shuffle(latents, self.unshuffle) if self.unshuffle > 1 else latents
