"""diffperc: Diffusion Transformers as dense perception models, and how they scale with compute."""

__version__ = "0.1.0"
