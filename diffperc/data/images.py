"""A folder of user inputs for ``diffperc predict``: resized to the processing resolution and padded, with the
sizes needed to undo both recorded in each sample. An unreadable file becomes a placeholder sample carrying its
``error``, so one bad file is reported and skipped by the writer instead of ending the whole run.

Layouts (a task's ``predict_layout``): ``single`` (depth: every image), ``pairs`` (flow: frame 1 and frame 2, see
below), ``masks`` (amodal: ``<name>.png`` with its visible-object mask ``<name>_mask.png``).

Flow pairs: if any image is named ``<name>_1.<ext>`` / ``<name>_2.<ext>`` or ``<name>_img1.<ext>`` /
``<name>_img2.<ext>`` (FlyingChairs), the folder holds independent named pairs: each ``<name>`` is one sample, and
a first frame without its second (or the reverse) or an image that is not part of a pair is an error naming the
file. Otherwise the folder is one video: consecutive images in name order, frames i and i + 1, named
``<frame i>_<frame i + 1>``.
"""

import re
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".tif", ".tiff", ".webp")
LAYOUTS = ("single", "pairs", "masks")
# `<name>_1` / `<name>_2` or `<name>_img1` / `<name>_img2`: the named frames of one flow pair.
_NAMED_FRAME = re.compile(r"(?P<name>.+)_(?P<marker>img)?(?P<frame>[12])")


class _Unreadable(Exception):
    pass


def flow_pairs(files: list[Path]) -> list[tuple[str, tuple[Path, Path]]]:
    """(sample name, (frame 1, frame 2)) of the images ``files`` (sorted by name), by the rule in the module docstring.

    Raises:
        ValueError: named pairs with a frame missing, a frame given twice, or an image outside the pairs.
    """
    named: dict[tuple[str, str], dict[str, Path]] = {}
    others = []
    for path in files:
        match = _NAMED_FRAME.fullmatch(path.stem)
        if match is None:
            others.append(path)
            continue
        frames = named.setdefault((match["name"], match["marker"] or ""), {})
        if match["frame"] in frames:
            raise ValueError(f"`--data.images`: {frames[match['frame']]} and {path} are the same flow frame; keep one")
        frames[match["frame"]] = path
    if not named:  # one video: consecutive frames
        return [(f"{a.stem}_{b.stem}", (a, b)) for a, b in zip(files[:-1], files[1:])]
    if others:
        raise ValueError(
            f"`--data.images` holds named flow pairs (`<name>_1`/`<name>_2` or `<name>_img1`/`<name>_img2`), so every "
            f"image must belong to one; {others[0]} does not (a folder of video frames must not use those suffixes)"
        )
    pairs = []
    for (name, marker), frames in sorted(named.items()):
        for have, want in (("1", "2"), ("2", "1")):
            if want not in frames:
                raise ValueError(
                    f"`--data.images`: {frames[have]} has no `{name}_{marker}{want}.<ext>` beside it "
                    "(a named flow pair needs both frames)"
                )
        pairs.append((name, (frames["1"], frames["2"])))
    seen: dict[str, Path] = {}
    for name, (first, _) in pairs:  # `a_1` and `a_img1` would both write `a_flow.*`
        if name in seen:
            raise ValueError(f"`--data.images`: {seen[name]} and {first} both name the pair `{name}`; rename one")
        seen[name] = first
    return pairs


class ImageFolder(Dataset):
    """Every input in a folder (sorted by name), long edge resized to ``resolution``, padded to ``multiple``.

    Args:
        root: Folder of images (``--data.images``).
        resolution: Processing resolution: the long edge after resizing.
        multiple: Pad height and width up to a multiple of this (the codec factor x the patch size).
        layout: ``single``, ``pairs`` or ``masks`` (the task's ``predict_layout``; see the module docstring).
    """

    def __init__(self, root: str, resolution: int = 32, multiple: int = 8, layout: str = "single"):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"`--data.images` folder not found: {self.root}")
        if layout not in LAYOUTS:
            raise ValueError(f"Unknown predict layout {layout!r}; choose one of {LAYOUTS}")
        files = sorted(p for p in self.root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if layout == "masks":
            masks = {p.stem[: -len("_mask")]: p for p in files if p.stem.endswith("_mask")}
            images = [p for p in files if not p.stem.endswith("_mask")]
            missing = [p.name for p in images if p.stem not in masks]
            if missing:
                raise ValueError(f"`--data.images` {self.root}: no `<name>_mask.png` for {missing[:5]}")
            self.items = [(p.stem, (p, masks[p.stem])) for p in images]
        elif layout == "pairs":
            self.items = flow_pairs(files)
        else:
            self.items = [(p.stem, (p,)) for p in files]
        if not self.items:
            need = "two or more images" if layout == "pairs" else "images"
            raise ValueError(f"`--data.images` folder {self.root} holds no {need} ({', '.join(IMAGE_SUFFIXES)})")
        if resolution <= 0 or multiple <= 0:
            raise ValueError(f"`resolution` and `multiple` must be positive, got {resolution}, {multiple}")
        self.resolution, self.multiple, self.layout = resolution, multiple, layout

    def __len__(self) -> int:
        return len(self.items)

    def _read(self, path: Path, flags: int) -> np.ndarray:
        try:
            img = cv2.imread(str(path), flags)
        except cv2.error as err:  # some decoders raise instead of returning None
            raise _Unreadable(f"Cannot read image {path} ({str(err).strip().splitlines()[-1]}); skipped") from err
        if img is None or img.size == 0:
            raise _Unreadable(f"Cannot read image {path} (unreadable or not an image); skipped")
        return img

    def _fit(self, img: np.ndarray, size: tuple[int, int], nearest: bool = False) -> torch.Tensor:
        """Resize to ``size`` (h, w), pad right/bottom to the multiple (cropped off afterwards); (C, H, W)."""
        h, w = size
        shrink = w < img.shape[1]
        interp = cv2.INTER_NEAREST if nearest else (cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
        out = cv2.resize(img, (w, h), interpolation=interp)
        out = torch.from_numpy(np.ascontiguousarray(out if out.ndim == 3 else out[..., None])).permute(2, 0, 1)
        return F.pad(out.float()[None], (0, -w % self.multiple, 0, -h % self.multiple), mode="replicate")[0]

    def __getitem__(self, index: int) -> dict:
        name, paths = self.items[index]
        try:
            first = self._read(paths[0], cv2.IMREAD_COLOR)
            h0, w0 = first.shape[:2]
            scale = self.resolution / max(h0, w0)
            size = (max(1, round(h0 * scale)), max(1, round(w0 * scale)))
            sample = {"image": self._fit(first[..., ::-1], size) / 127.5 - 1}
            if self.layout == "pairs":
                second = self._read(paths[1], cv2.IMREAD_COLOR)
                if second.shape[:2] != (h0, w0):
                    raise _Unreadable(f"Frames {paths[0]} and {paths[1]} differ in size; skipped")
                sample["image2"] = self._fit(second[..., ::-1], size) / 127.5 - 1
            elif self.layout == "masks":
                mask = self._read(paths[1], cv2.IMREAD_GRAYSCALE)
                if mask.shape[:2] != (h0, w0):
                    raise _Unreadable(f"Mask {paths[1]} does not match image {paths[0]} in size; skipped")
                sample["visible_mask"] = (self._fit(mask, size, nearest=True) > 127).float()
        except _Unreadable as err:
            return self._placeholder(name, str(err))
        sample.update(name=name, orig_size=torch.tensor([h0, w0]), resized_size=torch.tensor(size), error="")
        return sample

    def _placeholder(self, name: str, error: str) -> dict:
        # Grey inputs of the processing size: they batch like any sample; the writer drops the prediction.
        side = self.resolution + (-self.resolution % self.multiple)
        sample = {
            "image": torch.zeros(3, side, side),
            "name": name,
            "orig_size": torch.tensor([side, side]),
            "resized_size": torch.tensor([side, side]),
            "error": error,
        }
        if self.layout == "pairs":
            sample["image2"] = torch.zeros(3, side, side)
        elif self.layout == "masks":
            sample["visible_mask"] = torch.zeros(1, side, side)
        return sample
