"""LightningModules: the training recipes (timestep sampling, noising, loss) around injected networks."""

from diffperc.lit.base import DiffusionModule, EMASettings
from diffperc.lit.e2e import OneStepFinetuning
from diffperc.lit.finetuning import PerceptionFinetuning
from diffperc.lit.pretraining import DiffusionPretraining, SamplingSettings
from diffperc.lit.schedules import ExponentialDecayLR
from diffperc.models.build import Backbone, Upcycle

__all__ = [
    "Backbone",
    "DiffusionModule",
    "DiffusionPretraining",
    "EMASettings",
    "ExponentialDecayLR",
    "OneStepFinetuning",
    "PerceptionFinetuning",
    "SamplingSettings",
    "Upcycle",
]
