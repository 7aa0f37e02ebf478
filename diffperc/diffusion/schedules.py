"""Noise schedules: diffusers' DDPM scheduler for training and a DDIM sampler built from the same betas."""

from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler, DDPMScheduler

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


@dataclass
class DiffusionSettings:
    """How the model is trained to denoise (a training choice: sampling reuses the same betas).

    Args:
        num_train_timesteps: T, the number of DDPM steps.
        beta_schedule: ``linear`` (DiT), ``scaled_linear`` (Stable Diffusion) or ``squaredcos_cap_v2`` (cosine).
        beta_start: First beta of the linear schedules.
        beta_end: Last beta of the linear schedules.
        prediction_type: What the network predicts: ``epsilon`` (the noise), ``v_prediction`` or ``sample``.
    """

    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"
    beta_start: float = 0.0001
    beta_end: float = 0.02
    prediction_type: str = "epsilon"

    def __post_init__(self):
        if self.beta_schedule not in BETA_SCHEDULES:
            raise ValueError(
                f"`--model.diffusion.beta_schedule` must be one of {BETA_SCHEDULES}, got {self.beta_schedule!r}"
            )
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"`--model.diffusion.prediction_type` must be one of {PREDICTION_TYPES}, got {self.prediction_type!r}"
            )
        if self.num_train_timesteps < 1:
            raise ValueError(f"`--model.diffusion.num_train_timesteps` must be >= 1, got {self.num_train_timesteps}")


def check_num_steps(num_steps: int, settings: DiffusionSettings, flag: str = "--model.init_args.inference.num_steps"):
    """DDIM takes at most one step per training timestep; diffusers would only refuse more when sampling starts."""
    if num_steps > settings.num_train_timesteps:
        raise ValueError(
            f"`{flag}` {num_steps} is more than the {settings.num_train_timesteps} training timesteps "
            "(`--model.init_args.diffusion.num_train_timesteps`): DDIM takes at most one step per training timestep"
        )


def make_train_scheduler(settings: DiffusionSettings) -> DDPMScheduler:
    """The DDPM forward process used for noising during training."""
    return DDPMScheduler(
        num_train_timesteps=settings.num_train_timesteps,
        beta_schedule=settings.beta_schedule,
        beta_start=settings.beta_start,
        beta_end=settings.beta_end,
        prediction_type=settings.prediction_type,
        clip_sample=False,
    )


def make_sampler(train_scheduler: DDPMScheduler, timestep_spacing: str, clip_sample: bool) -> DDIMScheduler:
    """A DDIM sampler over the training betas; ``set_alpha_to_one`` makes the last step return the clean estimate."""
    if timestep_spacing not in TIMESTEP_SPACINGS:
        raise ValueError(
            f"`--model.inference.timestep_spacing` must be one of {TIMESTEP_SPACINGS}, got {timestep_spacing!r}"
        )
    return DDIMScheduler.from_config(
        train_scheduler.config, timestep_spacing=timestep_spacing, clip_sample=clip_sample, set_alpha_to_one=True
    )


def training_target(scheduler: DDPMScheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The regression target for the configured prediction type."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(x0, noise, t)
    return x0
