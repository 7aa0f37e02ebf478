"""Procedural class-conditional images (10 classes of shapes and textures) for pretraining on the embedded default.

Sample ``i`` of a split is drawn from ``split_rng(seed, split, i)`` and has class ``i % num_classes``: no files, same
pixels on every machine. Samples/s: ``python benchmarks/bench_data.py``.
"""

import numpy as np

from diffperc.data.procedural.base import ProceduralDataset, signed_chw

CLASS_NAMES = ("disc", "square", "triangle", "ring", "cross", "h_stripes", "v_stripes", "diagonal", "checker", "dots")


def _shape_distance(label: int, x: np.ndarray, y: np.ndarray, size: float, freq: float) -> np.ndarray:
    """Approximate signed distance (positive inside) of class ``label``'s pattern at rotated coordinates (x, y)."""
    if label == 0:  # disc
        return size - np.hypot(x, y)
    if label == 1:  # square
        return 0.8 * size - np.maximum(np.abs(x), np.abs(y))
    if label == 2:  # triangle: inside three half-planes, normals 120 degrees apart
        angles = np.deg2rad([90.0, 210.0, 330.0])
        return np.min([0.5 * size - (x * np.cos(a) + y * np.sin(a)) for a in angles], axis=0)
    if label == 3:  # ring
        return 0.22 * size - np.abs(np.hypot(x, y) - 0.7 * size)
    if label == 4:  # cross: union of two bars
        bar = 0.25 * size
        return np.maximum(np.minimum(bar - np.abs(x), size - np.abs(y)), np.minimum(bar - np.abs(y), size - np.abs(x)))
    # Textures fill the image; sin(2 pi f t) / (2 pi f) is the distance to the nearest stripe edge near an edge.
    w = 2 * np.pi * freq
    if label == 5:  # horizontal stripes
        return np.sin(w * y) / w
    if label == 6:  # vertical stripes
        return np.sin(w * x) / w
    if label == 7:  # diagonal stripes
        return np.sin(w * (x + y) / np.sqrt(2)) / w
    if label == 8:  # checkerboard
        return np.sin(w * x / 2) * np.sin(w * y / 2) / (w / 2)
    # Dots on a grid of period 1 / freq.
    gx, gy = x * freq - np.round(x * freq), y * freq - np.round(y * freq)
    return (0.3 - np.hypot(gx, gy)) / freq


def render_class_image(label: int, rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """One image of class ``label`` (index into ``CLASS_NAMES``): RGB (H, W, 3) float32 in [0, 1]."""
    # 1. Pixel-centre coordinates in [-1, 1] (the short side), moved and rotated by the sample's pose.
    scale = 2.0 / min(h, w)
    v, u = np.meshgrid((np.arange(h) + 0.5 - h / 2) * scale, (np.arange(w) + 0.5 - w / 2) * scale, indexing="ij")
    is_shape = label < 5
    cx, cy = rng.uniform(-0.3, 0.3, 2) if is_shape else rng.uniform(-1.0, 1.0, 2)
    # Textures keep their orientation (it defines the stripe classes) up to a small jitter.
    theta = rng.uniform(0, 2 * np.pi) if is_shape else rng.uniform(-0.15, 0.15)
    x = np.cos(theta) * (u - cx) + np.sin(theta) * (v - cy)
    y = -np.sin(theta) * (u - cx) + np.cos(theta) * (v - cy)
    size = rng.uniform(0.45, 0.8)
    freq = rng.uniform(1.5, 3.0)
    # 2. Anti-aliased coverage from the signed distance (one pixel wide ramp).
    cover = np.clip(0.5 + _shape_distance(label, x, y, size, freq) / scale, 0.0, 1.0)[..., None]  # (H, W, 1)
    # 3. Colours: a background with a soft gradient and a foreground far from it in RGB.
    background = rng.uniform(0.0, 1.0, 3)
    foreground = (background + rng.uniform(0.3, 0.7, 3)) % 1.0
    gradient = 1.0 + 0.15 * (u * rng.uniform(-1, 1) + v * rng.uniform(-1, 1))[..., None]
    image = (background * (1 - cover) + foreground * cover) * gradient
    image = image + rng.normal(0.0, 0.02, image.shape)
    return np.clip(image, 0.0, 1.0).astype(np.float32)


class ProceduralClasses(ProceduralDataset):
    """Shapes and textures with class labels, generated from (seed, split, index); the pretraining embedded default.

    Samples are ``{"image": (3, H, W) float in [-1, 1], "label": int, "name": str}``; sample ``i`` has class
    ``i % num_classes`` (classes in ``CLASS_NAMES`` order), so every class is equally frequent.

    Args:
        split: ``train``, ``val`` or ``test``; independent random streams.
        length: Number of samples in the split.
        resolution: Image side in pixels, or (H, W).
        seed: Base seed of the whole data set.
        num_classes: Use the first ``num_classes`` of the 10 classes.
    """

    #: The class names, in label order (a subclass with other classes names its own).
    class_names: tuple[str, ...] = tuple(CLASS_NAMES)

    def __init__(
        self,
        split: str = "train",
        length: int = 10000,
        resolution: int | tuple[int, int] = 32,
        seed: int = 0,
        num_classes: int = len(CLASS_NAMES),
    ):
        super().__init__(split, length, resolution, seed)
        names = type(self).class_names
        if not 1 <= num_classes <= len(names):
            raise ValueError(f"`num_classes` must be in [1, {len(names)}], got {num_classes}")
        self.num_classes = num_classes

    def __getitem__(self, index: int) -> dict:
        sample = super().__getitem__(index)
        sample["name"] += f"_{type(self).class_names[sample['label']]}"
        return sample

    def sample(self, rng: np.random.Generator, index: int) -> dict:
        label = index % self.num_classes
        rgb = render_class_image(label, rng, self.height, self.width)
        return {"image": signed_chw(rgb), "label": label}
