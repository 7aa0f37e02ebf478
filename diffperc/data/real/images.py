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

Sample names (and so output file names) are the input's stem, or its whole file name when two inputs share a stem
(``scene.png`` and ``scene.jpg``): see `output_names`.
"""

import re
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from diffperc.data.io import REDUCED_FLAGS, decode_image, image_header_size, truncated_jpeg
from diffperc.predict import fit_image, processing_size, to_model_range, visible_mask

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".tif", ".tiff", ".webp")
# Longest input side decoded at full size; larger inputs are decoded at 1/2, 1/4 or 1/8 scale (`ImageFolder`).
DEFAULT_MAX_IMAGE_SIDE = 8192
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
        names = output_names(files)
        return [(f"{names[a]}_{names[b]}", (a, b)) for a, b in zip(files[:-1], files[1:])]
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


def output_names(files: list[Path]) -> dict[Path, str]:
    """The sample name of each input file: its stem (``scene`` for ``scene.png``), or its whole file name when another
    input shares the stem (``scene.png`` and ``scene.jpg``) or is named like it, so no two inputs share a name (their
    predictions would overwrite each other)."""
    stems = Counter(p.stem for p in files)
    whole = {p.name for p in files}
    return {p: p.stem if stems[p.stem] == 1 and p.stem not in whole else p.name for p in files}


class ImageFolder(Dataset):
    """Every input in a folder (sorted by name), long edge resized to ``resolution``, padded to ``multiple``.

    Args:
        root: Folder of images (``--data.images``).
        resolution: Processing resolution: the long edge after resizing.
        multiple: Pad height and width up to a multiple of this (the codec factor x the patch size).
        layout: ``single``, ``pairs`` or ``masks`` (the task's ``predict_layout``; see the module docstring).
        max_image_side: Inputs with a longer side are decoded at 1/2, 1/4 or 1/8 scale, the least that brings the side
            to at most this (a JPEG is never held at full size); an input above 8x this is skipped. None = no limit.
    """

    def __init__(
        self,
        root: str,
        resolution: int = 32,
        multiple: int = 8,
        layout: str = "single",
        max_image_side: int | None = DEFAULT_MAX_IMAGE_SIDE,
    ):
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
            names = output_names(images)
            self.items = [(names[p], (p, masks[p.stem])) for p in images]
        elif layout == "pairs":
            self.items = flow_pairs(files)
        else:
            names = output_names(files)
            self.items = [(names[p], (p,)) for p in files]
        if not self.items:
            need = "two or more images" if layout == "pairs" else "images"
            raise ValueError(f"`--data.images` folder {self.root} holds no {need} ({', '.join(IMAGE_SUFFIXES)})")
        if resolution <= 0 or multiple <= 0:
            raise ValueError(f"`resolution` and `multiple` must be positive, got {resolution}, {multiple}")
        if max_image_side is not None and max_image_side < 1:
            raise ValueError(f"`--data.max_image_side` must be >= 1 or null, got {max_image_side}")
        self.resolution, self.multiple, self.layout = resolution, multiple, layout
        self.max_image_side = max_image_side

    def __len__(self) -> int:
        return len(self.items)

    def _read(self, path: Path, flags: int, factor: int | None = None) -> tuple[np.ndarray, tuple[int, int], int]:
        """Decodes ``path``: (image, its full-size (H, W), the scale-down factor it was decoded at). The factor is
        the least of 1, 2, 4, 8 that brings the longest side within ``max_image_side``, unless given (the second
        frame of a pair, a mask: the first image's)."""
        try:
            data = path.read_bytes()
        except OSError as err:
            raise _Unreadable(f"Cannot read image {path} ({err.strerror}); skipped") from err
        if data[:2] == b"\xff\xd8" and truncated_jpeg(data):  # libjpeg decodes the part it has without an error
            raise _Unreadable(f"Cannot read image {path} (truncated JPEG: no end-of-image marker); skipped")
        full = image_header_size(data)
        if full is None:  # not a PNG or JPEG: decoded at full size, then held to the same limit
            factor = 1
        elif factor is None:
            factor = self._factor(path, full)
        try:
            img = decode_image(np.frombuffer(data, np.uint8), REDUCED_FLAGS[flags][factor] if factor > 1 else flags)
        except cv2.error as err:  # some decoders raise instead of returning None
            raise _Unreadable(f"Cannot read image {path} ({str(err).strip().splitlines()[-1]}); skipped") from err
        if img is None or img.size == 0:
            raise _Unreadable(f"Cannot read image {path} (unreadable or not an image); skipped")
        if factor == 1:
            full = img.shape[:2]  # exact, EXIF rotation included
            self._factor(path, full)  # a format without a parsed header: the size limit still holds
        elif (img.shape[0] > img.shape[1]) != (full[0] > full[1]) and full[0] != full[1]:
            full = full[::-1]  # EXIF orientation turned the stored image by 90 degrees
        return img, (int(full[0]), int(full[1])), factor

    def _factor(self, path: Path, full: tuple[int, int]) -> int:
        limit = self.max_image_side
        for factor in (1, 2, 4, 8):
            if limit is None or -(-max(full) // factor) <= limit:
                return factor
        raise _Unreadable(
            f"Image {path} is {full[1]}x{full[0]} pixels, more than 8x `--data.init_args.max_image_side` {limit}: "
            "skipped (raise the limit to read it at 1/8 scale)"
        )

    def _fit(self, img: np.ndarray, size: tuple[int, int], nearest: bool = False) -> torch.Tensor:
        """Resize to ``size`` (h, w), pad right/bottom to the multiple (cropped off afterwards); (C, H, W). The
        same function as ``PerceptionPipeline``'s (``diffperc.predict``)."""
        return fit_image(img, size, self.multiple, nearest)

    def __getitem__(self, index: int) -> dict:
        name, paths = self.items[index]
        try:
            first, (h0, w0), factor = self._read(paths[0], cv2.IMREAD_COLOR)
            size = processing_size(h0, w0, self.resolution)
            # BGR -> RGB after resizing: flipping the channels of a full-size input would copy all of it.
            sample = {"image": to_model_range(self._fit(first, size).flip(0))}
            if self.layout == "pairs":
                second, second_size, _ = self._read(paths[1], cv2.IMREAD_COLOR, factor)
                if second_size != (h0, w0):
                    raise _Unreadable(f"Frames {paths[0]} and {paths[1]} differ in size; skipped")
                sample["image2"] = to_model_range(self._fit(second, size).flip(0))
            elif self.layout == "masks":
                mask, mask_size, _ = self._read(paths[1], cv2.IMREAD_GRAYSCALE, factor)
                if mask_size != (h0, w0):
                    raise _Unreadable(f"Mask {paths[1]} does not match image {paths[0]} in size; skipped")
                sample["visible_mask"] = visible_mask(self._fit(mask, size, nearest=True))
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
