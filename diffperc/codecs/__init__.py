"""Latent codecs: ``PixelCodec`` (the embedded default) and ``VAECodec`` (a frozen local AutoencoderKL)."""

from diffperc.codecs.base import Codec
from diffperc.codecs.pixel import PixelCodec
from diffperc.codecs.vae import VAECodec

__all__ = ["Codec", "PixelCodec", "VAECodec"]
