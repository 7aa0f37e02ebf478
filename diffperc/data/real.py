"""Readers for the real data sets in their original layouts: Hypersim (Marigold's preprocessing), FlyingChairs and
pix2gestalt. Each returns dicts of tensors: images (3, H, W) in [-1, 1], masks (1, H, W), a `name` for output files.

Try it: ``python -m diffperc.data.real FlyingChairs <root>`` prints the first sample's keys and shapes.
"""

import hashlib
import os
import sys
from pathlib import Path, PurePosixPath, PureWindowsPath

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from diffperc.data.io import read_depth_png, read_flo, read_mask, read_rgb

# ----------------------------------------------------------------------------------------------------------------------
# Shared helpers: resolution parsing, resizing, tensor conversion, filename lists
# ----------------------------------------------------------------------------------------------------------------------


def _parse_resolution(resolution: int | tuple[int, int] | list[int] | None) -> tuple[int, int] | None:
    if resolution is None:
        return None
    if isinstance(resolution, int):
        hw = (resolution, resolution)
    elif isinstance(resolution, (tuple, list)) and len(resolution) == 2 and all(isinstance(v, int) for v in resolution):
        hw = (int(resolution[0]), int(resolution[1]))
    else:
        raise ValueError(f"`resolution` must be an int side, an (H, W) pair or None, got {resolution!r}")
    if hw[0] <= 0 or hw[1] <= 0:
        raise ValueError(f"`resolution` must be positive, got {resolution!r}")
    return hw


def resize_image(img: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Resizes an (H, W[, C]) image with area averaging when shrinking and bilinear interpolation otherwise."""
    h, w = img.shape[:2]
    if (h, w) == tuple(hw):
        return img
    shrink = hw[0] <= h and hw[1] <= w
    # Area averaging is the anti-aliased choice for downsampling; it degrades to nearest when enlarging.
    return cv2.resize(img, (hw[1], hw[0]), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def _resize_nearest(arr: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    if arr.shape[:2] == tuple(hw):
        return arr
    src = arr.astype(np.uint8) if arr.dtype == np.bool_ else arr  # cv2 has no bool images
    out = cv2.resize(src, (hw[1], hw[0]), interpolation=cv2.INTER_NEAREST_EXACT)
    return out.astype(np.bool_) if arr.dtype == np.bool_ else out


def resize_flow(flow: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Resizes a flow field (H, W, 2) to `hw` and rescales its vectors: u by W_new / W_old, v by H_new / H_old."""
    h, w = flow.shape[:2]
    out = resize_image(flow.astype(np.float32), hw)
    out[..., 0] *= hw[1] / w
    out[..., 1] *= hw[0] / h
    return out


def _image_tensor(rgb: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> float32 (3, H, W) in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1))).float() / 127.5 - 1.0


def _depth_tensor(depth: np.ndarray) -> torch.Tensor:
    """float (H, W) metres -> float32 (1, H, W)."""
    return torch.from_numpy(np.ascontiguousarray(depth, dtype=np.float32))[None]


def _mask_tensor(mask: np.ndarray) -> torch.Tensor:
    """bool (H, W) -> bool (1, H, W)."""
    return torch.from_numpy(np.ascontiguousarray(mask, dtype=np.bool_))[None]


def _check_relative(entry: str, list_file: Path, line_no: int) -> None:
    """Rejects list entries that could read outside the data root: absolute paths, drives and `..` components."""
    posix = PurePosixPath(entry.replace("\\", "/"))
    if posix.is_absolute() or PureWindowsPath(entry).drive or ".." in posix.parts:
        raise ValueError(f"{list_file}:{line_no}: path {entry!r} escapes the data root; use paths relative to it")


def _read_filename_list(list_file: str | os.PathLike, num_paths: int) -> list[list[str]]:
    """Reads a Marigold filename list: one sample per line, whitespace-separated fields, the first `num_paths` of
    them paths relative to the data root. Blank lines and lines starting with `#` are skipped."""
    list_file = Path(list_file)
    if not list_file.is_file():
        raise FileNotFoundError(f"Filename list not found: {list_file}")
    entries = []
    for line_no, line in enumerate(list_file.read_text().splitlines(), start=1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        if len(fields) < num_paths:
            raise ValueError(f"{list_file}:{line_no}: expected at least {num_paths} paths per line, got {line!r}")
        for entry in fields[:num_paths]:
            _check_relative(entry, list_file, line_no)
        entries.append(fields)
    if not entries:
        raise ValueError(f"Filename list {list_file} lists no samples")
    return entries


def _name_from_path(rel_path: str) -> str:
    """`scene/rgb_0001.png` -> `scene_rgb_0001`: unique across folders and usable as an output file name."""
    return "_".join(PurePosixPath(rel_path.replace("\\", "/")).with_suffix("").parts)


def _existing_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(f"{what} folder not found: {path}")
    return path


# ----------------------------------------------------------------------------------------------------------------------
# Depth: a generic filename-list reader and Hypersim
# ----------------------------------------------------------------------------------------------------------------------


class DepthListDataset(Dataset):
    """RGB images with metric depth maps listed in a Marigold filename list ("rgb depth [more fields]" a line).

    Subclasses set the depth decoding (`_read_depth`), the valid-mask rule (`_valid_mask`) and an optional crop
    applied to both the image and the depth (`_crop`). Samples hold `image` (3, H, W) in [-1, 1], `depth` (1, H, W)
    in metres, `valid_mask` bool (1, H, W) and `name`. When `resolution` is set, depth and mask are resized with
    nearest-neighbour sampling, so no depth is blended with invalid (zero) neighbours and the mask still marks
    exactly the pixels that hold a measurement.

    For evaluation (`native_gt`), a resized sample also holds the ground truth at its native size (after any crop):
    `depth_native` (1, H0, W0) and `valid_native` (1, H0, W0). `DepthTask.update_metrics` then upsamples the
    prediction to it and scores there, as Marigold's protocol does. A batch stacks them, so its samples need one
    native size: true of Hypersim, NYUv2, ScanNet, DIODE and benchmark-cropped KITTI; otherwise evaluate with
    `--data.eval_batch_size 1`.
    """

    depth_scale = 1000.0  # stored units per metre for PNG depth (millimetres)
    num_paths = 2  # leading fields of a list line that are paths (checked against escaping the root)

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
        self.root = _existing_dir(Path(root), "Data root")
        if not min_depth < max_depth:
            raise ValueError(f"`min_depth` ({min_depth}) must be below `max_depth` ({max_depth})")
        self.min_depth, self.max_depth = float(min_depth), float(max_depth)
        self.resolution = _parse_resolution(resolution)
        self.native_gt = native_gt
        self.filename_list = Path(filename_list)
        self.entries = [f for f in _read_filename_list(self.filename_list, self.num_paths) if self._keep_entry(f)]
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

    def __getitem__(self, index: int) -> dict:
        fields = self.entries[index]
        rgb_path, depth_path = self.root / fields[0], self.root / fields[1]
        rgb = read_rgb(rgb_path)
        depth = self._read_depth(depth_path, rgb.shape[:2])
        if depth.shape != rgb.shape[:2]:
            raise ValueError(f"Depth {depth_path} is {depth.shape} but image {rgb_path} is {rgb.shape[:2]} (H, W)")
        if not np.isfinite(depth).all():
            raise ValueError(f"Depth {depth_path} holds NaN or infinite values")
        if (depth < 0).any():
            raise ValueError(
                f"Depth {depth_path} holds negative values ({int((depth < 0).sum())} of them, min "
                f"{float(depth.min()):.3g} m); depth is a distance: mark missing pixels with 0 or the data set's mask"
            )
        rgb, depth = self._crop(rgb, rgb_path), self._crop(depth, depth_path)
        valid = self._valid_mask(depth, fields)
        native = None
        if self.resolution is not None and self.resolution != depth.shape:
            if self.native_gt:
                native = {"depth_native": _depth_tensor(depth), "valid_native": _mask_tensor(valid)}
            rgb = resize_image(rgb, self.resolution)
            depth = _resize_nearest(depth, self.resolution)
            valid = _resize_nearest(valid, self.resolution)
        sample = {
            "image": _image_tensor(rgb),
            "depth": _depth_tensor(depth),
            "valid_mask": _mask_tensor(valid),
            "name": _name_from_path(fields[0]),
        }
        return {**sample, **native} if native else sample


class HypersimDataset(DepthListDataset):
    """Hypersim in Marigold's preprocessed layout: uint16 planar depth in millimetres, 0 = no measurement.

    Layout: ``<root>/<scene>/rgb_cam_XX_frYYYY.png`` (uint8 RGB, 1024x768) and
    ``<root>/<scene>/depth_plane_cam_XX_frYYYY.png`` (uint16 mm); the list file holds "rgb depth" pairs relative to
    ``<root>`` (e.g. Marigold's ``filename_list_val_filtered.txt`` with ``root = .../hypersim/processed/val``).
    """

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


# ----------------------------------------------------------------------------------------------------------------------
# Optical flow: FlyingChairs
# ----------------------------------------------------------------------------------------------------------------------

_CHAIRS_SPLIT_CODES = {"train": 1, "val": 2}  # the codes used in FlyingChairs_train_val.txt


class FlyingChairsDataset(Dataset):
    """FlyingChairs image pairs with ground-truth flow, in the original release's layout.

    Layout: ``<root>/data/NNNNN_img1.ppm``, ``NNNNN_img2.ppm``, ``NNNNN_flow.flo`` and
    ``<root>/FlyingChairs_train_val.txt``, one line per sample in sorted order: 1 = train, 2 = val.
    Samples hold `image`, `image2` (3, H, W) in [-1, 1], `flow` (2, H, W) in pixels of the returned size,
    `valid_mask` (all True), `name`, and when resized `flow_orig` (2, H0, W0) so EPE can be measured at the
    original resolution.
    """

    split_file_name = "FlyingChairs_train_val.txt"

    def __init__(
        self, root: str | os.PathLike, split: str = "train", resolution: int | tuple[int, int] | None = None
    ) -> None:
        """Lists the samples and checks them against the split file.

        Args:
            root: the folder holding ``data/`` and ``FlyingChairs_train_val.txt``.
            split: "train" or "val".
            resolution: output size: an int side (square), an (H, W) pair, or None to keep 384x512.
        """
        super().__init__()
        if split not in _CHAIRS_SPLIT_CODES:
            raise ValueError(f"`split` must be one of {list(_CHAIRS_SPLIT_CODES)}, got {split!r}")
        self.root = Path(root)
        self.data_dir = _existing_dir(self.root / "data", "FlyingChairs data")
        self.split = split
        self.resolution = _parse_resolution(resolution)

        files = set(os.listdir(self.data_dir))
        ids = sorted(f[: -len("_flow.flo")] for f in files if f.endswith("_flow.flo"))
        if not ids:
            raise ValueError(f"No *_flow.flo files in {self.data_dir}")
        for sample_id in ids:
            for suffix in ("_img1.ppm", "_img2.ppm"):
                if sample_id + suffix not in files:
                    raise FileNotFoundError(f"FlyingChairs image missing: {self.data_dir / (sample_id + suffix)}")
        codes = self._read_split_file(self.root / self.split_file_name)
        if len(codes) != len(ids):
            raise ValueError(
                f"{self.root / self.split_file_name} has {len(codes)} lines but {self.data_dir} holds {len(ids)} "
                "samples; the split file needs one line per sample in sorted order"
            )
        self.ids = [i for i, c in zip(ids, codes) if c == _CHAIRS_SPLIT_CODES[split]]
        if not self.ids:
            raise ValueError(f"No {split!r} samples in {self.root / self.split_file_name}")

    @staticmethod
    def _read_split_file(path: Path) -> list[int]:
        if not path.is_file():
            raise FileNotFoundError(f"FlyingChairs split file not found: {path}")
        lines = path.read_text().split()
        bad = [(n, v) for n, v in enumerate(lines, start=1) if v not in ("1", "2")]
        if bad:
            raise ValueError(f"{path}: line {bad[0][0]} is {bad[0][1]!r}; every line must be 1 (train) or 2 (val)")
        return [int(v) for v in lines]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict:
        sample_id = self.ids[index]
        paths = [self.data_dir / f"{sample_id}{s}" for s in ("_img1.ppm", "_img2.ppm", "_flow.flo")]
        img1, img2, flow = read_rgb(paths[0]), read_rgb(paths[1]), read_flo(paths[2])
        for path, arr in ((paths[1], img2), (paths[2], flow)):
            if arr.shape[:2] != img1.shape[:2]:
                raise ValueError(f"{path} is {arr.shape[:2]} but {paths[0]} is {img1.shape[:2]} (H, W)")
        flow_orig = None
        if self.resolution is not None and self.resolution != img1.shape[:2]:
            flow_orig = torch.from_numpy(flow.transpose(2, 0, 1).copy())
            img1, img2 = resize_image(img1, self.resolution), resize_image(img2, self.resolution)
            flow = resize_flow(flow, self.resolution)
        out = {
            "image": _image_tensor(img1),
            "image2": _image_tensor(img2),
            "flow": torch.from_numpy(np.ascontiguousarray(flow.transpose(2, 0, 1))),
            "valid_mask": torch.ones(1, *flow.shape[:2], dtype=torch.bool),  # FlyingChairs flow is dense
            "name": sample_id,
        }
        if flow_orig is not None:
            out["flow_orig"] = flow_orig  # (2, H0, W0): EPE is measured at the original resolution
        return out


# ----------------------------------------------------------------------------------------------------------------------
# Amodal segmentation: pix2gestalt
# ----------------------------------------------------------------------------------------------------------------------

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
        self.resolution = _parse_resolution(resolution)
        listings = {}
        for key, (folder, _) in _PIX2GESTALT_FILES.items():
            listings[key] = set(os.listdir(_existing_dir(self.root / folder, "pix2gestalt")))
        folder, suffix = _PIX2GESTALT_FILES["image"]
        ids = sorted(f[: -len(suffix)] for f in listings["image"] if f.endswith(suffix))
        if not ids:
            raise ValueError(f"No *{suffix} files in {self.root / folder}")
        for sample_id in ids:
            for key, (folder, suffix) in _PIX2GESTALT_FILES.items():
                if sample_id + suffix not in listings[key]:
                    raise FileNotFoundError(f"pix2gestalt file missing: {self.root / folder / (sample_id + suffix)}")
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
            raise FileNotFoundError(f"pix2gestalt val list not found: {path}")
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
            visible = _resize_nearest(visible, self.resolution)
            whole_mask = _resize_nearest(whole_mask, self.resolution)
        return {
            "image": _image_tensor(image),
            "visible_mask": _mask_tensor(visible).float(),
            "whole": _image_tensor(whole),
            "whole_mask": _mask_tensor(whole_mask),
            "name": sample_id,
        }


def _hash_fraction(sample_id: str) -> float:
    """Maps an id to [0, 1) with MD5 (Python's hash() is salted per process, so it cannot define a split)."""
    return int.from_bytes(hashlib.md5(sample_id.encode()).digest()[:8], "big") / 2**64


if __name__ == "__main__":
    readers = {"Hypersim": HypersimDataset, "FlyingChairs": FlyingChairsDataset, "Pix2Gestalt": Pix2GestaltDataset}
    if len(sys.argv) < 3 or sys.argv[1] not in readers:
        sys.exit(f"usage: python -m diffperc.data.real {{{','.join(readers)}}} <root> [<filename_list>]")
    sample = readers[sys.argv[1]](*sys.argv[2:])[0]
    for key, value in sample.items():
        print(key, tuple(value.shape) if torch.is_tensor(value) else value, getattr(value, "dtype", ""))
