"""diffperc: Diffusion Transformers as dense perception models, and how they scale with compute.

``from diffperc import PerceptionPipeline`` loads a trained model (``diffperc export``) for prediction.
"""

__version__ = "0.1.0"
__all__ = ["PerceptionPipeline", "PerceptionOutput"]


def __getattr__(name: str):
    # Imported on first use: `import diffperc` (and every `diffperc.<module>` import) stays free of torch and Lightning.
    if name in __all__:
        from diffperc import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'diffperc' has no attribute {name!r}")
