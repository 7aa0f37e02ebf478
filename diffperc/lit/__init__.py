"""LightningModules: the training recipes (timestep sampling, noising, loss) around injected networks."""

from diffperc.lit.finetuning import Backbone, PerceptionFinetuning
from diffperc.lit.schedules import ExponentialDecayLR

__all__ = ["Backbone", "ExponentialDecayLR", "PerceptionFinetuning"]
