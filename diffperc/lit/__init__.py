"""LightningModules: the training recipes (timestep sampling, noising, loss) around injected networks."""

from diffperc.lit.finetuning import Backbone, PerceptionFinetuning, Upcycle
from diffperc.lit.pretraining import DiffusionPretraining, EMASettings, SamplingSettings
from diffperc.lit.schedules import ExponentialDecayLR

__all__ = [
    "Backbone",
    "DiffusionPretraining",
    "EMASettings",
    "ExponentialDecayLR",
    "PerceptionFinetuning",
    "SamplingSettings",
    "Upcycle",
]
