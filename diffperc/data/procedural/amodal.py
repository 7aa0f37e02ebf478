"""Procedural amodal segmentation, generated on the fly from (seed, split, index): pix2gestalt-like samples.

A textured background holds overlapping textured shapes (ellipses, rectangles, diamonds) painted back to front; one
of them, the target, is partly hidden by 1-2 shapes in front of it. Samples give the occluded scene, the target's
visible mask, the whole target rendered on white and its exact amodal mask. Try it: ``python -m
diffperc.data.procedural.amodal`` prints the mean visible / whole area (the visible-mask baseline's IoU).
"""

import numpy as np
import torch

from diffperc.data.procedural.base import ProceduralDataset, signed_chw
from diffperc.data.procedural.flow import (
    pick_layer_rows,
    pixel_grid,
    sample_textures,
    shade,
    shape_inverse_pose,
    shape_masks,
    texture_rows,
)

# Object colours stay at or below this (in [0, 1]), so every object pixel differs from the white background by at
# least 25 of 255 grey levels in some channel: decoding the whole image with a 10-level threshold is exact.
MAX_OBJECT_VALUE = 0.9
# Fraction of the target's area that stays visible; outside it the scene is redrawn (too little left to infer the
# shape, or too little hidden to need completing).
VISIBLE_RANGE = (0.3, 0.9)
_MAX_TRIES = 20


def render_amodal_scene(rng: np.random.Generator, h: int, w: int) -> dict:
    """Renders one scene.

    Returns:
        ``image`` float32 (H, W, 3) in [0, 1] (the occluded scene); ``whole`` float32 (H, W, 3), the whole target
        object on white; bool (H, W) masks ``visible_mask`` (the target's visible pixels), ``whole_mask`` (all its
        pixels) and ``occluder_mask`` (the shapes painted in front of it).
    """
    s = max(h, w)
    grid = pixel_grid(h, w)  # (3, P)
    extent = np.array([w / s, h / s])
    for _ in range(_MAX_TRIES):
        # 1. Layers back to front: background, 0-1 shapes behind the target, the target, 1-2 occluders in front.
        n_behind, n_front = int(rng.integers(0, 2)), int(rng.integers(1, 3))
        L = 2 + n_behind + n_front
        j = 1 + n_behind  # the target's layer
        centre = rng.uniform(0.15, 0.85, (L, 2)) * extent
        centre[0] = extent / 2
        centre[j] = rng.uniform(0.3, 0.7, 2) * extent
        half_axes = rng.uniform(0.08, 0.25, (L, 2))
        half_axes[0] = 1e3  # the background covers everything
        half_axes[j] = rng.uniform(0.12, 0.28, 2)
        # Occluders sit around the target's rim so they hide part of it, not all of it.
        direction = rng.uniform(0, 2 * np.pi, n_front)
        reach = rng.uniform(0.6, 1.4, n_front) * half_axes[j].mean()
        centre[j + 1 :] = centre[j] + reach[:, None] * np.stack([np.cos(direction), np.sin(direction)], -1)
        theta = rng.uniform(0, 2 * np.pi, L)
        kinds = rng.integers(0, 3, L)
        tex = sample_textures(rng, L, max_value=MAX_OBJECT_VALUE)

        # 2. Shape coordinates and texture arguments for every layer at every pixel, then the topmost layer.
        rows = np.concatenate([shape_inverse_pose(centre, half_axes, theta), texture_rows(tex)], 1)  # (L, 4, 3)
        values = rows.astype(np.float32) @ grid  # (L, 4, P)
        inside = shape_masks(values[:, :2], kinds)
        inside[0] = True
        ids = (L - 1) - np.argmax(inside[::-1], axis=0)
        whole_mask = inside[j]
        visible = ids == j
        area = whole_mask.sum()
        if area and VISIBLE_RANGE[0] <= visible.sum() / area <= VISIBLE_RANGE[1]:
            break
    image = shade(tex, ids, pick_layer_rows(values, ids, first_row=2))
    target = shade(tex, np.full_like(ids, j), values[j, 2:])
    whole = np.where(whole_mask[:, None], target, np.float32(1.0))
    return {
        "image": image.reshape(h, w, 3),
        "whole": whole.reshape(h, w, 3),
        "visible_mask": visible.reshape(h, w),
        "whole_mask": whole_mask.reshape(h, w),
        "occluder_mask": (ids > j).reshape(h, w),
    }


class ProceduralAmodal(ProceduralDataset):
    """Procedural occluded objects with exact amodal masks; sample ``i`` of a split is the same on every machine.

    Samples hold ``image`` (3, H, W) in [-1, 1], ``visible_mask`` float (1, H, W) in {0, 1}, ``whole`` (3, H, W) in
    [-1, 1] (the whole target on white), ``whole_mask`` bool (1, H, W) and ``name``, like ``Pix2GestaltDataset``.

    Args:
        split: ``train``, ``val`` or ``test``; the splits are independent random streams and never share a scene.
        length: Number of samples in the split (the generator can make any number).
        resolution: Image side in pixels, or (H, W).
        seed: Base seed of the whole data set.
    """

    def sample(self, rng: np.random.Generator, index: int) -> dict:
        scene = render_amodal_scene(rng, self.height, self.width)
        return {
            "image": signed_chw(scene["image"]),  # (3, H, W) in [-1, 1]
            "visible_mask": torch.from_numpy(scene["visible_mask"])[None].float(),
            "whole": signed_chw(scene["whole"]),
            "whole_mask": torch.from_numpy(scene["whole_mask"])[None],
        }


if __name__ == "__main__":
    ds = ProceduralAmodal("train", length=200, resolution=64)  # samples/s: benchmarks/bench_data.py
    ratio = [float(ds[i]["visible_mask"].sum() / ds[i]["whole_mask"].sum()) for i in range(200)]
    print(f"visible / whole area: mean {np.mean(ratio):.2f} (the visible-mask baseline's expected IoU)")
