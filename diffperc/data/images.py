"""A folder of user images for ``diffperc predict``: resized to the processing resolution and padded, with the
sizes needed to undo both recorded in each sample. An unreadable file becomes a placeholder sample carrying its
``error``, so one bad file is reported and skipped by the writer instead of ending the whole run."""

from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".tif", ".tiff", ".webp")


class ImageFolder(Dataset):
    """Every image in a folder (sorted by name), long edge resized to ``resolution``, padded to ``multiple``.

    Args:
        root: Folder of images (``--data.images``).
        resolution: Processing resolution: the long edge after resizing.
        multiple: Pad height and width up to a multiple of this (the codec factor x the patch size).
    """

    def __init__(self, root: str, resolution: int = 32, multiple: int = 8):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"`--data.images` folder not found: {self.root}")
        self.files = sorted(p for p in self.root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.files:
            raise ValueError(f"`--data.images` folder {self.root} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        if resolution <= 0 or multiple <= 0:
            raise ValueError(f"`resolution` and `multiple` must be positive, got {resolution}, {multiple}")
        self.resolution, self.multiple = resolution, multiple

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict:
        path = self.files[index]
        try:
            bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
        except cv2.error as err:  # some decoders raise instead of returning None
            bgr, reason = None, str(err).strip().splitlines()[-1]
        else:
            reason = "unreadable or not an image"
        if bgr is None or bgr.size == 0:
            return self._placeholder(path, f"Cannot read image {path} ({reason}); skipped")
        h0, w0 = bgr.shape[:2]
        scale = self.resolution / max(h0, w0)
        h, w = max(1, round(h0 * scale)), max(1, round(w0 * scale))
        rgb = cv2.resize(bgr, (w, h), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)[..., ::-1]
        image = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).float() / 127.5 - 1
        ph, pw = -h % self.multiple, -w % self.multiple
        image = F.pad(image[None], (0, pw, 0, ph), mode="replicate")[0]  # pad right/bottom; cropped off afterwards
        return {
            "image": image,
            "name": path.stem,
            "orig_size": torch.tensor([h0, w0]),
            "resized_size": torch.tensor([h, w]),
            "error": "",
        }

    def _placeholder(self, path: Path, error: str) -> dict:
        # A grey square of the processing size: it batches like any image; the writer drops its prediction.
        side = self.resolution + (-self.resolution % self.multiple)
        return {
            "image": torch.zeros(3, side, side),
            "name": path.stem,
            "orig_size": torch.tensor([side, side]),
            "resized_size": torch.tensor([side, side]),
            "error": error,
        }
