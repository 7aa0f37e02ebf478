"""Perception tasks: what differs between depth, flow and amodal segmentation, and nothing else."""

from diffperc.tasks.base import Task
from diffperc.tasks.depth import DepthTask

__all__ = ["DepthTask", "Task"]
