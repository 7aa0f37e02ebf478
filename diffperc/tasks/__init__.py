"""Perception tasks: what differs between depth, flow and amodal segmentation, and nothing else."""

from diffperc.tasks.amodal import AmodalTask
from diffperc.tasks.base import Task
from diffperc.tasks.depth import DepthTask
from diffperc.tasks.flow import FlowTask

__all__ = ["AmodalTask", "DepthTask", "FlowTask", "Task"]
