"""Procedural data for every task, generated on the fly from (seed, split, index): no files, no downloads, the same
samples on every machine. The embedded default's data: depth scenes, flow pairs, amodal scenes, and for pretraining
ten classes of shapes and textures or nine classes of depth scenes (layout x material).
"""

from diffperc.data.procedural.amodal import ProceduralAmodal, render_amodal_scene
from diffperc.data.procedural.base import SPLITS, ProceduralDataset, split_rng
from diffperc.data.procedural.classes import CLASS_NAMES, ProceduralClasses
from diffperc.data.procedural.depth import ProceduralDepth, SceneStyle, render_depth_scene
from diffperc.data.procedural.flow import ProceduralFlow, render_flow_pair
from diffperc.data.procedural.scenes import SCENE_CLASS_NAMES, SCENE_CLASSES, ProceduralSceneClasses

__all__ = [
    "CLASS_NAMES",
    "SCENE_CLASSES",
    "SCENE_CLASS_NAMES",
    "SPLITS",
    "ProceduralAmodal",
    "ProceduralClasses",
    "ProceduralDataset",
    "ProceduralDepth",
    "ProceduralFlow",
    "ProceduralSceneClasses",
    "SceneStyle",
    "render_amodal_scene",
    "render_depth_scene",
    "render_flow_pair",
    "split_rng",
]
