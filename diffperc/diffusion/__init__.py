"""Noise schedules, DDIM sampling with batched ensembles, and ensemble reducers (separate from the networks)."""

from diffperc.diffusion.ensemble import ensemble
from diffperc.diffusion.sampling import REDUCERS, InferenceSettings, sample_ensemble
from diffperc.diffusion.schedules import (
    DiffusionSettings,
    check_num_steps,
    make_sampler,
    make_train_scheduler,
    training_target,
)

__all__ = [
    "REDUCERS",
    "DiffusionSettings",
    "InferenceSettings",
    "check_num_steps",
    "ensemble",
    "make_sampler",
    "make_train_scheduler",
    "sample_ensemble",
    "training_target",
]
