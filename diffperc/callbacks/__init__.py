"""Callbacks that observe training and inference without changing the math."""

from diffperc.callbacks.images import PredictionImageLogger
from diffperc.callbacks.laws import PowerLawMonitor
from diffperc.callbacks.macs import MACsCounter
from diffperc.callbacks.moe import ExpertLoadLogger
from diffperc.callbacks.nonfinite import NonFiniteGuard
from diffperc.callbacks.progress import StepProgressBar, TrainingThroughput
from diffperc.callbacks.writer import PredictionWriter

__all__ = [
    "ExpertLoadLogger",
    "MACsCounter",
    "NonFiniteGuard",
    "PowerLawMonitor",
    "PredictionImageLogger",
    "PredictionWriter",
    "StepProgressBar",
    "TrainingThroughput",
]
