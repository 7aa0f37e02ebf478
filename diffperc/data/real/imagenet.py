"""ImageNet-layout folder reader (``<root>/<split>/<class>/*.JPEG``) with DiT's centre crop, without torchvision.

Class index = position of the class folder in sorted order (as torchvision's ImageFolder and DiT's training script).
The crop is ADM's ``center_crop_arr`` (https://github.com/openai/guided-diffusion, used by DiT's ``train.py``),
re-implemented on numpy with Pillow's fixed-point resampling (``libImaging/Resample.c``), so it needs no Pillow.
"""

import math
import os
from pathlib import Path

import cv2
import numpy as np
import scipy.sparse
import torch
from torch.utils.data import Dataset

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".bmp", ".webp")
# Pillow's fixed-point resampling precision for 8-bit images (libImaging/Resample.c: PRECISION_BITS = 32 - 8 - 2).
_PRECISION_BITS = 22


def _box(x: np.ndarray) -> np.ndarray:
    return ((x > -0.5) & (x <= 0.5)).astype(np.float64)


def _bicubic(x: np.ndarray) -> np.ndarray:
    # Keys' cubic with a = -0.5, Pillow's BICUBIC.
    a, x = -0.5, np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


_FILTERS = {"box": (_box, 0.5), "bicubic": (_bicubic, 2.0)}


def _resample_matrix(in_size: int, out_size: int, kind: str) -> scipy.sparse.csr_matrix:
    """Pillow's fixed-point (out_size, in_size) resampling weights along one axis (``precompute_coeffs``)."""
    kernel, support = _FILTERS[kind]
    scale = in_size / out_size
    filterscale = max(scale, 1.0)  # downscaling widens the kernel: antialiasing
    support = support * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    centers = (np.arange(out_size) + 0.5) * scale
    # C's (int) cast truncates toward zero.
    xmin = np.maximum(np.trunc(centers - support + 0.5).astype(np.int64), 0)
    xmax = np.minimum(np.trunc(centers + support + 0.5).astype(np.int64), in_size) - xmin
    x = np.arange(ksize)
    w = kernel((x[None] + xmin[:, None] - centers[:, None] + 0.5) * (1.0 / filterscale))
    w = np.where(x[None] < xmax[:, None], w, 0.0)  # (out, ksize)
    total = w.sum(axis=1, keepdims=True)
    w = np.where(total != 0, w / np.where(total == 0, 1.0, total), w)
    one = float(1 << _PRECISION_BITS)
    fixed = np.where(w < 0, np.trunc(-0.5 + w * one), np.trunc(0.5 + w * one)).astype(np.int64)
    cols = xmin[:, None] + x[None]
    keep = x[None] < xmax[:, None]
    rows = np.broadcast_to(np.arange(out_size)[:, None], cols.shape)
    return scipy.sparse.csr_matrix((fixed[keep], (rows[keep], cols[keep])), shape=(out_size, in_size))


def _resample_axis(image: np.ndarray, axis: int, out_size: int, kind: str) -> np.ndarray:
    """Resizes uint8 ``image`` along ``axis`` with Pillow's integer arithmetic (round half up, clip to 0..255)."""
    moved = np.moveaxis(image, axis, 0)
    flat = moved.reshape(moved.shape[0], -1).astype(np.int64)
    acc = _resample_matrix(moved.shape[0], out_size, kind) @ flat + (1 << (_PRECISION_BITS - 1))
    out = np.clip(acc >> _PRECISION_BITS, 0, 255).astype(np.uint8)
    return np.moveaxis(out.reshape(out_size, *moved.shape[1:]), 0, axis)


def pil_resize(image: np.ndarray, size: tuple[int, int], kind: str = "bicubic") -> np.ndarray:
    """``PIL.Image.resize`` on a uint8 (H, W, C) array: ``size`` is (height, width), ``kind`` ``box`` or ``bicubic``.

    A horizontal pass then a vertical pass, each rounded to uint8, each skipped when its size is unchanged: the
    pixels of Pillow <= 12 (which DiT's preprocessing ran on). One-axis resizes equal any Pillow's; Pillow 13 may run
    the two passes in the other order, which moves some pixels by a few levels.
    """
    if kind not in _FILTERS:
        raise ValueError(f"Unknown resampling filter {kind!r}; choose one of {list(_FILTERS)}")
    height, width = size
    if width != image.shape[1]:
        image = _resample_axis(image, 1, width, kind)
    if height != image.shape[0]:
        image = _resample_axis(image, 0, height, kind)
    return image


def center_crop_arr(image: np.ndarray, image_size: int) -> np.ndarray:
    """ADM/DiT centre crop of a uint8 (H, W, 3) image to (image_size, image_size, 3).

    1. Halve with a box filter while the short side is at least twice ``image_size`` (cheap, alias-free).
    2. Bicubic-resize so the short side is ``image_size`` (Python ``round`` on the long side, as ADM).
    3. Crop the centre square.
    """
    while min(image.shape[:2]) >= 2 * image_size:
        image = pil_resize(image, (image.shape[0] // 2, image.shape[1] // 2), "box")
    scale = image_size / min(image.shape[:2])
    image = pil_resize(image, (round(image.shape[0] * scale), round(image.shape[1] * scale)), "bicubic")
    top = (image.shape[0] - image_size) // 2
    left = (image.shape[1] - image_size) // 2
    return image[top : top + image_size, left : left + image_size]


class ImageNetFolder(Dataset):
    """Labelled images in the ImageNet layout ``<root>/<split>/<class>/<image>``, centre-cropped to a square.

    Samples are ``{"image": (3, R, R) float in [-1, 1], "label": int, "name": str}``. The horizontal flip (p = 0.5)
    draws from torch's RNG in the loading process: reproducible under ``seed_everything`` (DataLoader workers are
    seeded from the loader's generator), different every epoch.

    Args:
        root: Folder holding the split folders (``train``; ``val`` only once sorted into class folders).
        split: Subfolder of ``root`` to read.
        resolution: Output side R in pixels (256 or 512 in the paper).
        flip: Random horizontal flip (turn off when caching latents: the cache stores both orientations).
    """

    def __init__(self, root: str, split: str = "train", resolution: int = 256, flip: bool = True):
        if resolution <= 0:
            raise ValueError(f"`resolution` must be positive, got {resolution}")
        self.folder = Path(root) / split
        if not self.folder.is_dir():
            raise FileNotFoundError(
                f"ImageNet split folder not found: {self.folder} (`root`={root!r}, "
                f"`split`={split!r}); expected {self.folder}/<class>/*.JPEG"
            )
        self.resolution, self.flip = resolution, flip
        self.classes, self.files, self.labels = _scan(self.folder)
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict:
        label = int(self.labels[index])
        path = str(self.folder / self.classes[label] / self.files[index].decode())
        bgr = cv2.imread(path, cv2.IMREAD_COLOR)  # decodes by content: also ImageNet's CMYK and PNG-in-JPEG files
        if bgr is None:
            raise ValueError(f"Cannot read image {path} (corrupt or not an image)")
        rgb = center_crop_arr(np.ascontiguousarray(bgr[..., ::-1]), self.resolution)
        if self.flip and torch.rand(()) < 0.5:
            rgb = rgb[:, ::-1]
        image = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).float() / 127.5 - 1  # (3, R, R)
        return {"image": image, "label": label, "name": Path(path).stem}


def _scan(folder: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Sorted class folder names, then every image's file name and class index, sorted by class then file name.

    Names are kept in numpy arrays, not Python lists: DataLoader workers reading 1.28M list items would touch their
    reference counts and copy the parent's pages one by one (the "copy-on-read" memory growth).
    """
    entries = sorted(os.scandir(folder), key=lambda e: e.name)
    classes = [e.name for e in entries if e.is_dir() and not e.name.startswith(".")]
    if not classes:
        loose = [e.name for e in entries if e.is_file() and e.name.lower().endswith(IMAGE_SUFFIXES)]
        if loose:
            raise ValueError(
                f"{folder} holds {len(loose)} images (e.g. {loose[0]}) but no class folders: expected "
                f"{folder}/<class>/<image> (ImageNet's flat val folder must first be sorted into one "
                "folder per class)"
            )
        raise ValueError(f"{folder} is empty: expected one folder per class holding its images")
    files, labels = [], []
    for label, name in enumerate(classes):
        names = sorted(
            e.name for e in os.scandir(folder / name) if e.is_file() and e.name.lower().endswith(IMAGE_SUFFIXES)
        )
        if not names:
            raise ValueError(
                f"Class folder {folder / name} holds no images ({', '.join(IMAGE_SUFFIXES)}); remove it "
                "or fill it, since class indices come from the sorted folder list"
            )
        files.extend(names)
        labels.extend([label] * len(names))
    return classes, np.array([f.encode() for f in files], dtype=bytes), np.array(labels, dtype=np.int64)
