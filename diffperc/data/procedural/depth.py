"""Procedural depth scenes, generated on the fly from (seed, split, index): the embedded default's data.

Each scene is ray-cast analytically: a pinhole camera at the origin looks down +z into a room (floor, back wall,
optional side walls) holding a few boxes, spheres and cylinders, all textured and Lambert-shaded. Depth is the exact
planar depth (z) of the first hit. A `SceneStyle` narrows the random layout and materials (the scene classes of
``scenes.py``); the default style draws the scenes of `ProceduralDepth`. Samples/s: ``python benchmarks/bench_data.py``.
"""

from dataclasses import dataclass

import numpy as np
import torch

from diffperc.data.procedural.base import ProceduralDataset, signed_chw


class _Rays:
    """Per-pixel ray directions (dx, dy, 1) for a pinhole camera; cached per resolution and field of view."""

    _cache: dict = {}

    @classmethod
    def get(cls, h: int, w: int, fov_deg: float) -> tuple[np.ndarray, np.ndarray]:
        key = (h, w, round(fov_deg, 3))
        if key not in cls._cache:
            f = 0.5 * max(h, w) / np.tan(np.deg2rad(fov_deg) / 2)
            v, u = np.meshgrid(np.arange(h) + 0.5, np.arange(w) + 0.5, indexing="ij")
            dx = ((u - w / 2) / f).reshape(-1).astype(np.float32)
            dy = (-(v - h / 2) / f).reshape(-1).astype(np.float32)
            cls._cache[key] = (dx, dy)
        return cls._cache[key]


@dataclass(frozen=True)
class SceneStyle:
    """The ranges a scene's layout and materials are drawn from; the defaults draw `ProceduralDepth`'s scenes.

    Ranges ``(low, high)`` are uniform draws; counts ``(low, high)`` are integers in [low, high). The default style
    makes the same random draws in the same order as every other style, so its scenes never change.

    Args:
        fov_deg: Field-of-view choices in degrees.
        camera_height: Camera height above the floor (m).
        room_depth: Distance of the back wall (m).
        room_width: Half-width of the room (m): where the side walls stand and how far out objects are placed.
        side_walls: Whether the room has side walls; without them the floor runs out to the back wall (a hall).
        num_boxes: Box count range.
        num_spheres: Sphere count range.
        num_cylinders: Vertical cylinder count range.
        object_height: Height range of boxes and cylinders (m).
        colour_low: Per-channel lower bound of each surface's base colour (RGB in [0, 1]).
        colour_high: Per-channel upper bound of each surface's base colour.
        saturation: Base colours pulled towards their grey (0 = grey surfaces, 1 = as drawn).
        texture_kinds: Textures surfaces choose from, uniformly: 0 checker, 1 stripes, 2 plain.
        texture_frequency: Texture frequency range (cycles per metre, roughly).
    """

    fov_deg: tuple[float, ...] = (55.0, 65.0, 75.0)
    camera_height: tuple[float, float] = (0.8, 1.8)
    room_depth: tuple[float, float] = (6.0, 14.0)
    room_width: tuple[float, float] = (2.0, 5.0)
    side_walls: bool = True
    num_boxes: tuple[int, int] = (1, 4)
    num_spheres: tuple[int, int] = (0, 3)
    num_cylinders: tuple[int, int] = (0, 3)
    object_height: tuple[float, float] = (0.3, 2.0)
    colour_low: tuple[float, float, float] = (0.1, 0.1, 0.1)
    colour_high: tuple[float, float, float] = (1.0, 1.0, 1.0)
    saturation: float = 1.0
    texture_kinds: tuple[int, ...] = (0, 1, 2)
    texture_frequency: tuple[float, float] = (0.8, 4.0)

    def __post_init__(self):
        if not self.fov_deg or not all(0 < f < 180 for f in self.fov_deg):
            raise ValueError(f"`SceneStyle.fov_deg` must be angles in (0, 180), got {self.fov_deg}")
        if self.room_depth[0] <= 2.5:
            raise ValueError(
                f"`SceneStyle.room_depth` must start beyond 2.5 m (objects stand at 1.5 m or more), got "
                f"{self.room_depth}"
            )
        for key in ("num_boxes", "num_spheres", "num_cylinders"):
            low, high = getattr(self, key)
            if not 0 <= low < high:
                raise ValueError(f"`SceneStyle.{key}` must be integers 0 <= low < high, got {(low, high)}")
        if not self.texture_kinds or not set(self.texture_kinds) <= {0, 1, 2}:
            raise ValueError(
                f"`SceneStyle.texture_kinds` must be a non-empty subset of 0, 1, 2; got {self.texture_kinds}"
            )


DEFAULT_STYLE = SceneStyle()


def render_depth_scene(
    rng: np.random.Generator, h: int, w: int, style: SceneStyle = DEFAULT_STYLE
) -> tuple[np.ndarray, np.ndarray]:
    """Renders one scene: returns an RGB image (H, W, 3) float32 in [0, 1] and its planar depth (H, W) in metres.

    ``style`` sets the ranges the layout and materials are drawn from (`SceneStyle`); the default gives
    `ProceduralDepth`'s scenes, pixel for pixel.
    """
    dx, dy = _Rays.get(h, w, fov_deg=float(rng.choice(list(style.fov_deg))))
    P = dx.shape[0]
    inf = np.float32(np.inf)
    f32 = np.float32

    # 1. The room: floor at y = -cam_h, back wall at z = room_d, side walls at x = -room_w / +room_w.
    cam_h = rng.uniform(*style.camera_height)
    room_d = rng.uniform(*style.room_depth)
    room_w = rng.uniform(*style.room_width)
    t_all = np.full((4, P), inf, dtype=f32)
    t_all[0] = np.where(dy < 0, -cam_h / np.minimum(dy, -1e-9), inf)  # floor
    t_all[1] = room_d  # back wall
    if style.side_walls:  # else they stay at infinity: never hit
        t_all[2] = np.where(dx < 0, -room_w / np.minimum(dx, -1e-9), inf)  # left wall
        t_all[3] = np.where(dx > 0, room_w / np.maximum(dx, 1e-9), inf)  # right wall
    plane_normals = np.array([[0, 1, 0], [0, 0, -1], [1, 0, 0], [-1, 0, 0]], dtype=f32)  # (4, 3)

    # 2. Objects standing on the floor: K boxes (slab test), spheres and vertical cylinders (quadratics).
    k_box, k_sph, k_cyl = (rng.integers(*r) for r in (style.num_boxes, style.num_spheres, style.num_cylinders))
    n_obj = k_box + k_sph + k_cyl
    cx = (rng.uniform(-0.8, 0.8, n_obj) * room_w).astype(f32)
    cz = rng.uniform(1.5, room_d - 1.0, n_obj).astype(f32)
    size = rng.uniform(0.3, 1.2, n_obj).astype(f32)
    height = rng.uniform(*style.object_height, n_obj).astype(f32)
    cam_h = f32(cam_h)
    obj_t = np.full((n_obj, P), inf, dtype=f32)
    obj_n = np.zeros((n_obj, 3, P), dtype=f32)
    d = np.stack([dx, dy, np.ones_like(dx)])  # (3, P)
    if n_obj == 0:
        obj_n = np.zeros((1, 3, P), dtype=f32)
    # Boxes: slabs [c - s, c + s] in x and z, [floor, floor + height] in y.
    if k_box:
        lo = np.stack([cx[:k_box] - size[:k_box], np.full(k_box, -cam_h), cz[:k_box] - size[:k_box]], 1)  # (K, 3)
        hi = np.stack([cx[:k_box] + size[:k_box], -cam_h + height[:k_box], cz[:k_box] + size[:k_box]], 1)
        with np.errstate(divide="ignore", invalid="ignore"):
            inv = 1.0 / d  # (3, P)
            t1 = lo[:, :, None] * inv[None]  # (K, 3, P)
            t2 = hi[:, :, None] * inv[None]
        t_near, t_far = np.minimum(t1, t2), np.maximum(t1, t2)
        entry = t_near.max(1)
        hit = (entry <= t_far.min(1)) & (entry > 0)
        obj_t[:k_box] = np.where(hit, entry, inf)
        axis = t_near.argmax(1)  # the slab entered last gives the face normal
        sign = -np.sign(np.take_along_axis(d[None].repeat(k_box, 0), axis[:, None], 1)[:, 0])
        for a in range(3):
            obj_n[:k_box, a] = np.where(axis == a, sign, 0.0)
    # Spheres resting on the floor: centre (cx, -cam_h + r, cz).
    s = slice(k_box, k_box + k_sph)
    if k_sph:
        r = size[s, None]
        c = np.stack([cx[s], -cam_h + size[s], cz[s]], 1)  # (K, 3)
        a_ = (d * d).sum(0)[None]
        b_ = c @ d  # (K, P)
        disc = b_ * b_ - a_ * ((c * c).sum(1)[:, None] - r * r)
        t = (b_ - np.sqrt(np.maximum(disc, 0))) / a_
        obj_t[s] = np.where((disc > 0) & (t > 0), t, inf)
        obj_n[s] = (t[:, None] * d[None] - c[:, :, None]) / r[:, None]
    # Vertical cylinders: side (x - cx)^2 + (z - cz)^2 = r^2 within the height, plus the top cap.
    s = slice(k_box + k_sph, n_obj)
    if k_cyl:
        r = size[s, None] * 0.7
        ccx, ccz, top = cx[s, None], cz[s, None], (-cam_h + height[s])[:, None]
        a_ = dx * dx + 1.0
        b_ = ccx * dx + ccz
        disc = b_ * b_ - a_ * (ccx * ccx + ccz * ccz - r * r)
        t_side = (b_ - np.sqrt(np.maximum(disc, 0))) / a_
        y_side = t_side * dy
        side_ok = (disc > 0) & (t_side > 0) & (y_side >= -cam_h) & (y_side <= top)
        with np.errstate(divide="ignore", invalid="ignore"):
            t_cap = top / dy
        cap_ok = (t_cap > 0) & ((t_cap * dx - ccx) ** 2 + (t_cap - ccz) ** 2 <= r * r)
        t_cap = np.where(cap_ok, t_cap, inf)
        t_side = np.where(side_ok, t_side, inf)
        use_cap = t_cap < t_side
        obj_t[s] = np.minimum(t_side, t_cap)
        obj_n[s, 0] = np.where(use_cap, 0.0, (t_side * dx - ccx) / r)
        obj_n[s, 1] = np.where(use_cap, 1.0, 0.0)
        obj_n[s, 2] = np.where(use_cap, 0.0, (t_side - ccz) / r)

    # 3. First hit over all surfaces.
    t_all = np.concatenate([t_all, obj_t])  # (S, P)
    sid = t_all.argmin(0)
    depth = np.take_along_axis(t_all, sid[None], 0)[0]
    oid = np.maximum(sid - 4, 0)
    n_obj_hit = obj_n[oid, :, np.arange(P)].T  # (3, P)
    n = np.where(sid < 4, np.take(plane_normals.T, np.minimum(sid, 3), axis=1), n_obj_hit)

    # 4. Texture: per-surface colours mixed by a checker or a stripe pattern in world coordinates.
    num_s = t_all.shape[0]
    col_a = rng.uniform(style.colour_low, style.colour_high, (num_s, 3)).astype(f32)
    if style.saturation != 1.0:  # skipped by the default style, whose colours stay exactly as drawn
        grey = col_a.mean(1, keepdims=True)
        col_a = grey + f32(style.saturation) * (col_a - grey)
    col_b = col_a * rng.uniform(0.2, 0.8, (num_s, 1)).astype(f32)
    freq = rng.uniform(*style.texture_frequency, num_s).astype(f32)
    # 0 checker, 1 stripes, 2 plain; the default's kinds (0, 1, 2) index themselves: the draw of integers(0, 3).
    kind = np.asarray(style.texture_kinds)[rng.integers(0, len(style.texture_kinds), num_s)]
    p = depth * d  # (3, P) world points
    f = np.take(freq, sid)  # np.take: much faster than fancy indexing for these gathers
    checker = (np.floor(p[0] * f) + np.floor(p[1] * f) + np.floor(p[2] * f)) % 2
    stripes = 0.5 + 0.5 * np.sin(2 * f * (p[0] + 0.7 * p[1] + 0.4 * p[2]))
    k = np.take(kind, sid)
    pattern = np.where(k == 0, checker, np.where(k == 1, stripes, f32(0)))
    albedo = np.take(col_a.T, sid, axis=1) * (1 - pattern) + np.take(col_b.T, sid, axis=1) * pattern  # (3, P)

    # 5. Shading: ambient + Lambert from a random light, with distance fall-off for a depth cue.
    light = np.array([rng.uniform(-0.6, 0.6), 1.0, rng.uniform(-1.0, -0.3)], dtype=f32)
    light /= np.linalg.norm(light)
    lambert = np.clip((n * light[:, None]).sum(0), 0.0, 1.0)
    shade = (0.35 + 0.65 * lambert) / (1 + 0.04 * depth)
    rgb = np.clip(albedo * shade, 0.0, 1.0).T.reshape(h, w, 3)
    return rgb.astype(np.float32), depth.reshape(h, w).astype(np.float32)


class ProceduralDepth(ProceduralDataset):
    """Procedural indoor scenes with exact depth; sample ``i`` of a split is the same on every machine.

    Args:
        split: ``train``, ``val`` or ``test``; the splits are independent random streams and never share a scene.
        length: Number of samples in the split (the generator can make any number).
        resolution: Image side in pixels, or (H, W).
        seed: Base seed of the whole data set.
    """

    def sample(self, rng: np.random.Generator, index: int) -> dict:
        rgb, depth = render_depth_scene(rng, self.height, self.width)
        return {
            "image": signed_chw(rgb),  # (3, H, W) in [-1, 1]
            "depth": torch.from_numpy(depth)[None],  # (1, H, W) metres
            "valid_mask": torch.from_numpy(np.isfinite(depth))[None],
        }
