"""Procedural class-conditional scene images for pretraining in the depth scenes' own visual world: each class is a
room layout (room, hall, corridor) times a material family (wood, tile, concrete), rendered by `render_depth_scene`.

Sample ``i`` of a split is drawn from ``split_rng(seed, split, i)`` and has class ``i % num_classes``, as in
`ProceduralClasses`. To run: ``diffperc fit --config configs/quickstart/pretrain.yaml
--config configs/quickstart/pretrain_scenes.yaml``.
"""

from dataclasses import replace

import numpy as np

from diffperc.data.procedural.base import signed_chw
from diffperc.data.procedural.classes import ProceduralClasses
from diffperc.data.procedural.depth import SceneStyle, render_depth_scene

# Layouts: where the walls stand and what stands on the floor. Materials: the surfaces' colours and textures.
_LAYOUTS = {
    # A small furnished room: close side walls, boxes.
    "room": dict(
        room_width=(1.8, 3.0), room_depth=(5.0, 9.0), num_boxes=(2, 5), num_spheres=(0, 1), num_cylinders=(0, 2)
    ),
    # An open hall: no side walls, a far back wall, tall pillars.
    "hall": dict(
        side_walls=False,
        room_width=(3.5, 6.0),
        room_depth=(14.0, 22.0),
        camera_height=(1.2, 2.0),
        num_boxes=(0, 2),
        num_spheres=(0, 1),
        num_cylinders=(2, 5),
        object_height=(1.8, 3.5),
    ),
    # A long narrow corridor with a few balls on the floor.
    "corridor": dict(
        room_width=(1.0, 1.6), room_depth=(12.0, 20.0), num_boxes=(0, 2), num_spheres=(1, 3), num_cylinders=(0, 1)
    ),
}
_MATERIALS = {
    "wood": dict(
        colour_low=(0.45, 0.25, 0.1), colour_high=(0.95, 0.6, 0.3), texture_kinds=(1, 2), texture_frequency=(2.0, 5.0)
    ),
    "tile": dict(
        colour_low=(0.1, 0.35, 0.55), colour_high=(0.5, 0.8, 1.0), texture_kinds=(0,), texture_frequency=(1.0, 2.5)
    ),
    "concrete": dict(
        colour_low=(0.3, 0.3, 0.3),
        colour_high=(0.85, 0.85, 0.85),
        saturation=0.1,
        texture_kinds=(2, 1),
        texture_frequency=(0.5, 1.2),
    ),
}
# Class order: layouts outer, materials inner, so "room_wood" is class 0.
SCENE_CLASSES: dict[str, SceneStyle] = {
    f"{layout}_{material}": replace(SceneStyle(), **layout_args, **material_args)
    for layout, layout_args in _LAYOUTS.items()
    for material, material_args in _MATERIALS.items()
}
SCENE_CLASS_NAMES = tuple(SCENE_CLASSES)


class ProceduralSceneClasses(ProceduralClasses):
    """Depth-scene images labelled by layout and material, generated from (seed, split, index), for pretraining.

    Samples are ``{"image": (3, H, W) float in [-1, 1], "label": int, "name": str}`` like `ProceduralClasses`;
    sample ``i`` has class ``i % num_classes`` (classes in ``SCENE_CLASS_NAMES`` order), so every class is equally
    frequent. The images come from `render_depth_scene`, the renderer of `ProceduralDepth`, with the class's style.

    Args:
        split: ``train``, ``val`` or ``test``; independent random streams.
        length: Number of samples in the split.
        resolution: Image side in pixels, or (H, W).
        seed: Base seed of the whole data set.
        num_classes: Use the first ``num_classes`` of the 9 classes (set ``--model.init_args.num_classes`` to it).
    """

    class_names = SCENE_CLASS_NAMES

    def __init__(
        self,
        split: str = "train",
        length: int = 10000,
        resolution: int | tuple[int, int] = 32,
        seed: int = 0,
        num_classes: int = len(SCENE_CLASS_NAMES),
    ):
        super().__init__(split, length, resolution, seed, num_classes)

    def sample(self, rng: np.random.Generator, index: int) -> dict:
        label = index % self.num_classes
        rgb, _ = render_depth_scene(rng, self.height, self.width, SCENE_CLASSES[SCENE_CLASS_NAMES[label]])
        return {"image": signed_chw(rgb), "label": label}
