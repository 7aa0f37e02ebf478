"""Depth readers: `DepthListDataset` (RGB + metric depth listed in a Marigold filename list) and `HypersimDataset`
(Marigold's preprocessed Hypersim, the paper's training set). The evaluation sets build on it in ``depth_eval.py``.

Samples hold `image` (3, H, W) in [-1, 1], `depth` (1, H, W) in metres, `valid_mask` bool (1, H, W) and `name`.
"""

import os
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from diffperc.data.io import read_depth_png, read_rgb, read_rgb_at_least
from diffperc.data.real.common import (
    depth_tensor,
    existing_dir,
    image_tensor,
    mask_tensor,
    missing_data,
    name_from_path,
    parse_resolution,
    read_filename_list,
    resize_image,
    resize_nearest,
)


class DepthListDataset(Dataset):
    """RGB images with metric depth maps listed in a Marigold filename list ("rgb depth [more fields]" a line).

    Subclasses set the depth decoding (`_read_depth`), the valid-mask rule (`_valid_mask`) and an optional crop
    applied to both the image and the depth (`_crop`, with `crops = True`). Samples hold `image` (3, H, W) in
    [-1, 1], `depth` (1, H, W) in metres, `valid_mask` bool (1, H, W) and `name`. When `resolution` is set, depth
    and mask are resized with nearest-neighbour sampling, so no depth is blended with invalid (zero) neighbours and
    the mask still marks exactly the pixels that hold a measurement. A JPEG image at least twice `resolution` is
    decoded at reduced scale (``diffperc.data.io.read_rgb_at_least``); depth is always read at full size.

    For evaluation (`native_gt`), a resized sample also holds the ground truth at its native size (after any crop):
    `depth_native` (1, H0, W0) and `valid_native` (1, H0, W0). `DepthTask.update_metrics` then upsamples the
    prediction to it and scores there, as Marigold's protocol does. A batch stacks them, so its samples need one
    native size: true of Hypersim, NYUv2, ScanNet, DIODE and benchmark-cropped KITTI; otherwise evaluate with
    `--data.eval_batch_size 1`.
    """

    depth_scale = 1000.0  # stored units per metre for PNG depth (millimetres)
    num_paths = 2  # leading fields of a list line that are paths (checked against escaping the root)
    crops = False  # whether `_crop` cuts image and depth: the image is then decoded at full size, to crop it exactly
    layout = "Marigold"  # the `LAYOUT_PAGES` entry a missing-data error names

    def __init__(
        self,
        root: str | os.PathLike,
        filename_list: str | os.PathLike,
        resolution: int | tuple[int, int] | None = None,
        min_depth: float = 1e-5,
        max_depth: float = float("inf"),
        native_gt: bool = False,
    ) -> None:
        """Reads and validates the filename list; files themselves are checked when a sample is loaded.

        Args:
            root: the folder the list's paths are relative to.
            filename_list: the list file, one sample a line: rgb path, depth path, then data-set specific fields.
            resolution: output size: an int side (square), an (H, W) pair, or None to keep the original size.
            min_depth: depths at or below this (metres) are invalid.
            max_depth: depths at or above this (metres) are invalid.
            native_gt: when resized, also return `depth_native` and `valid_native` at the original size, so
                evaluation scores there (for val/test sets; training does not need them).
        """
        super().__init__()
        self.root = existing_dir(root, self.layout, "Data root folder")
        if not min_depth < max_depth:
            raise ValueError(f"`min_depth` ({min_depth}) must be below `max_depth` ({max_depth})")
        self.min_depth, self.max_depth = float(min_depth), float(max_depth)
        self.resolution = parse_resolution(resolution)
        self.native_gt = native_gt
        self.filename_list = Path(filename_list)
        entries = read_filename_list(self.filename_list, self.num_paths, self.layout)
        self.entries = [f for f in entries if self._keep_entry(f)]
        if not self.entries:
            raise ValueError(f"Filename list {self.filename_list} keeps no samples with ground-truth depth")

    def __len__(self) -> int:
        return len(self.entries)

    def _keep_entry(self, fields: list[str]) -> bool:
        return True

    def _read_depth(self, path: Path, image_hw: tuple[int, int]) -> np.ndarray:
        return read_depth_png(path, self.depth_scale)

    def _crop(self, arr: np.ndarray, path: Path) -> np.ndarray:
        return arr

    def _valid_mask(self, depth: np.ndarray, fields: list[str]) -> np.ndarray:
        return (depth > self.min_depth) & (depth < self.max_depth)

    def _read(self, fields: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """The image (possibly decoded at reduced scale) and the full-size depth of one list line."""
        rgb_path, depth_path = self.root / fields[0], self.root / fields[1]
        try:
            if self.resolution is not None and not self.crops:
                rgb, image_hw = read_rgb_at_least(rgb_path, self.resolution)
            else:
                rgb = read_rgb(rgb_path)
                image_hw = rgb.shape[:2]
        except FileNotFoundError as err:  # a list that does not match `root`: name the layout, in one message
            raise missing_data(self.layout, f"{err} (listed in {self.filename_list}, under `root`)") from None
        try:
            depth = self._read_depth(depth_path, image_hw)
        except FileNotFoundError as err:
            raise missing_data(self.layout, f"{err} (listed in {self.filename_list}, under `root`)") from None
        if depth.shape != tuple(image_hw):
            raise ValueError(f"Depth {depth_path} is {depth.shape} but image {rgb_path} is {tuple(image_hw)} (H, W)")
        lo, hi = depth.min(), depth.max()  # NaN and inf reach these; two passes instead of two full-size masks
        if not (np.isfinite(lo) and np.isfinite(hi)):
            raise ValueError(f"Depth {depth_path} holds NaN or infinite values")
        if lo < 0:
            raise ValueError(
                f"Depth {depth_path} holds negative values ({int((depth < 0).sum())} of them, min {float(lo):.3g} "
                "m); depth is a distance: mark missing pixels with 0 or the data set's mask"
            )
        if self.crops:
            rgb, depth = self._crop(rgb, rgb_path), self._crop(depth, depth_path)
        return rgb, depth

    def __getitem__(self, index: int) -> dict:
        fields = self.entries[index]
        rgb, depth = self._read(fields)
        valid = self._valid_mask(depth, fields)
        native = None
        if self.resolution is not None and self.resolution != depth.shape:
            if self.native_gt:
                native = {"depth_native": depth_tensor(depth), "valid_native": mask_tensor(valid)}
            rgb = resize_image(rgb, self.resolution)
            depth = resize_nearest(depth, self.resolution)
            valid = resize_nearest(valid, self.resolution)
        sample = {
            "image": image_tensor(rgb),
            "depth": depth_tensor(depth),
            "valid_mask": mask_tensor(valid),
            "name": name_from_path(fields[0]),
        }
        return {**sample, **native} if native else sample


class HypersimDataset(DepthListDataset):
    """Hypersim in Marigold's preprocessed layout: uint16 planar depth in millimetres, 0 = no measurement.

    Layout: ``<root>/<scene>/rgb_cam_XX_frYYYY.png`` (uint8 RGB, 1024x768) and
    ``<root>/<scene>/depth_plane_cam_XX_frYYYY.png`` (uint16 mm); the list file holds "rgb depth" pairs relative to
    ``<root>`` (e.g. Marigold's ``filename_list_val_filtered.txt`` with ``root = .../hypersim/processed/val``).
    """

    layout = "Hypersim"

    def __init__(
        self,
        root: str | os.PathLike,
        filename_list: str | os.PathLike,
        resolution: int | tuple[int, int] | None = None,
        min_depth: float = 1e-5,
        max_depth: float = 65.0,
        native_gt: bool = False,
    ) -> None:
        """Reads and validates the filename list.

        Args:
            root: the split folder (``.../val``) the list's paths are relative to.
            filename_list: the "rgb depth" list file.
            resolution: output size: an int side (square), an (H, W) pair, or None to keep 768x1024.
            min_depth: depths at or below this (metres) are invalid; stored zeros always are.
            max_depth: depths at or above this (metres) are invalid (Marigold: 65 m).
            native_gt: when resized, also return the 768x1024 ground truth (`depth_native`, `valid_native`) so
                depth is scored at its native size, as in Marigold; set it for the val and test sets.
        """
        super().__init__(root, filename_list, resolution, min_depth, max_depth, native_gt)
