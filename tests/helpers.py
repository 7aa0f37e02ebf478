"""Builders shared by the tests: the tiny DiT (as a network, a backbone or a fine-tuning module), a quiet CPU
Trainer and an isolated subprocess runner.

Importable as ``helpers`` from any test (pytest puts ``tests/`` on ``sys.path`` through its conftest).
"""

import contextlib
import os
import signal
import subprocess
from pathlib import Path

import torch
from lightning.pytorch import Trainer

from diffperc.codecs import PixelCodec
from diffperc.diffusion import DiffusionSettings, InferenceSettings
from diffperc.lit import Backbone, PerceptionFinetuning
from diffperc.models import DiT
from diffperc.tasks import DepthTask

#: The tests' DiT shape: a t1-width network (32 wide, 2 heads), one block, patch 2.
TINY = dict(hidden_size=32, depth=1, num_heads=2, patch_size=2)


#: A tiny diffusers ``DiTTransformer2DModel`` (diffusers' own test sizes): depth 2, width 2 x 16 = 32, patch 2,
#: 8x8 latents of 4 channels, learn_sigma (8 outputs), 10 classes plus the null row.
TINY_DIFFUSERS_DIT = dict(
    num_attention_heads=2,
    attention_head_dim=16,
    in_channels=4,
    out_channels=8,
    num_layers=2,
    sample_size=8,
    patch_size=2,
    num_embeds_ada_norm=10,
)


def tiny_backbone(name: str = "t1", **overrides) -> Backbone:
    """The tiny DiT as a ``Backbone`` (``name`` may carry an MoE suffix, e.g. ``t1-4E2A``)."""
    return Backbone(name=name, **{**TINY, **overrides})


def tiny_dit(input_size: int = 8, in_channels: int = 3, num_classes: int = 3, randomize: float | None = None,
             **overrides) -> DiT:
    """The tiny DiT as a network (no label dropout, no sigma outputs); ``randomize`` replaces every trainable
    weight by N(0, randomize^2) draws, so zero-initialised layers (adaLN-Zero, the output) do not hide errors."""
    kwargs = dict(input_size=input_size, in_channels=in_channels, num_classes=num_classes, class_dropout_prob=0.0,
                  learn_sigma=False)
    model = DiT(**{**kwargs, **TINY, **overrides})
    if randomize is not None:
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.normal_(0, randomize)
    return model


def tiny_finetuning(task=None, *, depth: int = 1, patch_size: int = 2, lr: float = 1e-3, cls=PerceptionFinetuning,
                    **kwargs) -> PerceptionFinetuning:
    """A t1-width DiT (32 wide, 2 heads) on 16 px pixel-space depth (or ``task``), v-prediction, one DDIM step."""
    kwargs.setdefault("inference", InferenceSettings(num_steps=1))
    return cls(
        task=DepthTask(min_depth=0.1, max_depth=30.0) if task is None else task,
        codec=PixelCodec(),
        backbone=tiny_backbone(depth=depth, patch_size=patch_size),
        image_size=16,
        optimizer=lambda params: torch.optim.AdamW(params, lr=lr),
        diffusion=DiffusionSettings(prediction_type="v_prediction"),
        **kwargs,
    )


def tiny_vae():
    """A seeded 2-level AutoencoderKL (8/16 channels, 4 latent channels, downsample 2): the VAE tests save and load."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=16,
    )


def quiet_trainer(**kwargs) -> Trainer:
    """A CPU Trainer without logger, checkpoints, progress bar or model summary, unless ``kwargs`` says otherwise."""
    defaults = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False)
    return Trainer(**{**defaults, **kwargs})


def run_isolated(cmd: list[str], cwd: Path, env: dict, timeout: float) -> subprocess.CompletedProcess:
    """Runs ``cmd`` in its own process group and kills the whole group afterwards, so workers it started never
    outlive the test (not even after a timeout)."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        if proc.returncode is None:
            out, err = proc.communicate()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
