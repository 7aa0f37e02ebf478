"""Amodal-segmentation reader: pix2gestalt (the paper's amodal training set) in its release's four-folder layout."""

import hashlib
import os
from pathlib import Path

from torch.utils.data import Dataset

from diffperc.data.io import read_mask, read_rgb
from diffperc.data.real.common import (
    existing_dir,
    image_tensor,
    mask_tensor,
    missing_data,
    parse_resolution,
    resize_image,
    resize_nearest,
)

# Sample key -> (folder, file-name suffix after the id).
_PIX2GESTALT_FILES = {
    "image": ("occlusion", "_occlusion.png"),
    "visible_mask": ("visible_object_mask", "_visible_mask.png"),
    "whole": ("whole", "_whole.png"),
    "whole_mask": ("whole_mask", "_whole_mask.png"),
}


class Pix2GestaltDataset(Dataset):
    """pix2gestalt amodal-completion samples: occluded scene, visible mask, whole object and its amodal mask.

    Layout: ``<root>/occlusion/<id>_occlusion.png`` (RGB), ``<root>/visible_object_mask/<id>_visible_mask.png``
    (uint8 0/255), ``<root>/whole/<id>_whole.png`` (RGB, the whole object on white) and
    ``<root>/whole_mask/<id>_whole_mask.png`` (uint8 0/255). The release has no official split, so the val split is
    either the ids listed in `val_list`, or, without one, the ids whose MD5 hash falls in the lowest `val_fraction`
    of the hash range: deterministic, stable across machines and Python versions, and unchanged when samples are
    added. The rest is train. The whole object's mask can be recovered from `whole` as the pixels whose largest
    channel difference from white exceeds ~10 levels (IoU >= 0.97 against `whole_mask` on the shipped samples).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str | None = None,
        resolution: int | tuple[int, int] | None = None,
        val_list: str | os.PathLike | None = None,
        val_fraction: float = 0.01,
    ) -> None:
        """Lists the samples, checks every id has its four files, and picks the split.

        Args:
            root: the folder holding ``occlusion/``, ``visible_object_mask/``, ``whole/`` and ``whole_mask/``.
            split: None (every sample), "train" or "val".
            resolution: output size: an int side (square), an (H, W) pair, or None to keep 256x256.
            val_list: optional text file of sample ids (one a line) that form the val split; overrides
                `val_fraction`.
            val_fraction: share of ids (by hash) put in val when no `val_list` is given.
        """
        super().__init__()
        if split not in (None, "train", "val"):
            raise ValueError(f"`split` must be None, 'train' or 'val', got {split!r}")
        if not 0.0 <= val_fraction <= 1.0:
            raise ValueError(f"`val_fraction` must be in [0, 1], got {val_fraction}")
        self.root = Path(root)
        self.resolution = parse_resolution(resolution)
        listings = {}
        for key, (folder, _) in _PIX2GESTALT_FILES.items():
            listings[key] = set(os.listdir(existing_dir(self.root / folder, "pix2gestalt", "pix2gestalt folder")))
        folder, suffix = _PIX2GESTALT_FILES["image"]
        ids = sorted(f[: -len(suffix)] for f in listings["image"] if f.endswith(suffix))
        if not ids:
            raise ValueError(f"No *{suffix} files in {self.root / folder}")
        for sample_id in ids:
            for key, (folder, suffix) in _PIX2GESTALT_FILES.items():
                if sample_id + suffix not in listings[key]:
                    raise missing_data(
                        "pix2gestalt", f"pix2gestalt file missing: {self.root / folder / (sample_id + suffix)}"
                    )
        if split is not None:
            val_ids = self._read_val_list(Path(val_list), set(ids)) if val_list is not None else None
            in_val = [(i in val_ids) if val_ids is not None else _hash_fraction(i) < val_fraction for i in ids]
            ids = [i for i, v in zip(ids, in_val) if v == (split == "val")]
            if not ids:
                raise ValueError(f"The {split!r} split of {self.root} is empty; check `val_list` / `val_fraction`")
        self.ids = ids

    @staticmethod
    def _read_val_list(path: Path, known: set[str]) -> set[str]:
        if not path.is_file():
            raise missing_data("pix2gestalt", f"pix2gestalt val list not found: {path} (`val_list`)")
        val_ids = {line.strip() for line in path.read_text().splitlines() if line.strip()}
        unknown = sorted(val_ids - known)
        if unknown:
            raise ValueError(f"{path} lists {len(unknown)} ids with no sample, e.g. {unknown[0]!r}")
        return val_ids

    def __len__(self) -> int:
        return len(self.ids)

    def _path(self, key: str, sample_id: str) -> Path:
        folder, suffix = _PIX2GESTALT_FILES[key]
        return self.root / folder / f"{sample_id}{suffix}"

    def __getitem__(self, index: int) -> dict:
        sample_id = self.ids[index]
        image = read_rgb(self._path("image", sample_id))
        visible = read_mask(self._path("visible_mask", sample_id))
        whole = read_rgb(self._path("whole", sample_id))
        whole_mask = read_mask(self._path("whole_mask", sample_id))
        for key, arr in (("visible_mask", visible), ("whole", whole), ("whole_mask", whole_mask)):
            if arr.shape[:2] != image.shape[:2]:
                raise ValueError(
                    f"{self._path(key, sample_id)} is {arr.shape[:2]} but {self._path('image', sample_id)} is "
                    f"{image.shape[:2]} (H, W)"
                )
        if self.resolution is not None:
            image, whole = resize_image(image, self.resolution), resize_image(whole, self.resolution)
            visible = resize_nearest(visible, self.resolution)
            whole_mask = resize_nearest(whole_mask, self.resolution)
        return {
            "image": image_tensor(image),
            "visible_mask": mask_tensor(visible).float(),
            "whole": image_tensor(whole),
            "whole_mask": mask_tensor(whole_mask),
            "name": sample_id,
        }


def _hash_fraction(sample_id: str) -> float:
    """Maps an id to [0, 1) with MD5 (Python's hash() is salted per process, so it cannot define a split)."""
    return int.from_bytes(hashlib.md5(sample_id.encode()).digest()[:8], "big") / 2**64
