"""What the real-data readers share: output sizes, resizing, tensor conversion, Marigold filename lists, and the error
a reader raises when its data is not where the config points (naming the page that explains the data set's layout).

The conversions avoid full-size copies: images are decoded straight to RGB, resized as uint8, and converted to
float32 in one pass at the output size; masks are resized through a uint8 view instead of a converted copy.
"""

import os
from pathlib import Path, PurePosixPath, PureWindowsPath

import cv2
import numpy as np
import torch

#: Where each data set's layout is explained; a reader that cannot find its data names the page in its error.
LAYOUT_PAGES = {
    "Hypersim": "https://github.com/prs-eth/Marigold (Marigold's preprocessing: script/depth/dataset_preprocess/"
    "hypersim; its filename lists: data_split/hypersim_depth)",
    "FlyingChairs": "https://lmb.informatik.uni-freiburg.de/resources/datasets/FlyingChairs.en.html",
    "pix2gestalt": "https://github.com/cvlab-columbia/pix2gestalt",
    "Marigold": "https://github.com/prs-eth/Marigold (its filename lists: data_split/)",
}


def missing_data(dataset: str, message: str) -> FileNotFoundError:
    """The one error for data that is not where it was pointed: ``message`` (what is missing, the path, the setting
    that holds it), then the page that describes the layout, named once.

    Args:
        dataset: A key of ``LAYOUT_PAGES``.
        message: E.g. "FlyingChairs split file not found: <path> (`root`)".
    """
    return FileNotFoundError(f"{message}. The expected {dataset} layout is described at {LAYOUT_PAGES[dataset]}")


def existing_dir(path: str | os.PathLike, dataset: str, what: str, setting: str = "root") -> Path:
    """``path`` as a Path, or ``missing_data`` ("<what> not found: <path> (`<setting>`)") if it is not a folder."""
    path = Path(path)
    if not path.is_dir():
        raise missing_data(dataset, f"{what} not found: {path} (`{setting}`)")
    return path


def parse_resolution(resolution: int | tuple[int, int] | list[int] | None) -> tuple[int, int] | None:
    """An int side (square) or an (H, W) pair as (H, W); None stays None (keep the stored size)."""
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


def resize_nearest(arr: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of depth or a mask: every output pixel is one stored pixel, never a blend."""
    if arr.shape[:2] == tuple(hw):
        return arr
    src = arr.view(np.uint8) if arr.dtype == np.bool_ else arr  # cv2 has no bool images; a view, not a copy
    out = cv2.resize(src, (hw[1], hw[0]), interpolation=cv2.INTER_NEAREST_EXACT)
    return out.view(np.bool_) if arr.dtype == np.bool_ else out


def resize_flow(flow: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Resizes a flow field (H, W, 2) to `hw` and rescales its vectors: u by W_new / W_old, v by H_new / H_old."""
    h, w = flow.shape[:2]
    out = resize_image(flow.astype(np.float32, copy=False), hw)
    if out is flow:  # same size: nothing to rescale, and the caller's array must not change
        return out
    out[..., 0] *= hw[1] / w
    out[..., 1] *= hw[0] / h
    return out


def image_tensor(rgb: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> float32 (3, H, W) in [-1, 1]: transposed while still uint8 (a quarter of the bytes), then
    converted and scaled in place."""
    return torch.from_numpy(rgb).permute(2, 0, 1).contiguous().float().div_(127.5).sub_(1.0)


def flow_tensor(flow: np.ndarray) -> torch.Tensor:
    """float32 (H, W, 2) -> float32 (2, H, W) (numpy's transposing copy: faster here than torch's for 2 channels)."""
    return torch.from_numpy(np.ascontiguousarray(flow.transpose(2, 0, 1), dtype=np.float32))


def depth_tensor(depth: np.ndarray) -> torch.Tensor:
    """float (H, W) metres -> float32 (1, H, W)."""
    return torch.from_numpy(np.ascontiguousarray(depth, dtype=np.float32))[None]


def mask_tensor(mask: np.ndarray) -> torch.Tensor:
    """bool (H, W) -> bool (1, H, W)."""
    return torch.from_numpy(np.ascontiguousarray(mask, dtype=np.bool_))[None]


def _check_relative(entry: str, list_file: Path, line_no: int) -> None:
    """Rejects list entries that could read outside the data root: absolute paths, drives and `..` components."""
    posix = PurePosixPath(entry.replace("\\", "/"))
    if posix.is_absolute() or PureWindowsPath(entry).drive or ".." in posix.parts:
        raise ValueError(f"{list_file}:{line_no}: path {entry!r} escapes the data root; use paths relative to it")


def read_filename_list(list_file: str | os.PathLike, num_paths: int, dataset: str = "Marigold") -> list[list[str]]:
    """Reads a Marigold filename list: one sample per line, whitespace-separated fields, the first `num_paths` of
    them paths relative to the data root. Blank lines and lines starting with `#` are skipped.

    Args:
        list_file: The list file.
        num_paths: Leading fields of a line that are paths.
        dataset: The ``LAYOUT_PAGES`` key named when the file is missing.
    """
    list_file = Path(list_file)
    if not list_file.is_file():
        raise missing_data(dataset, f"Filename list not found: {list_file} (`filename_list`)")
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


def name_from_path(rel_path: str) -> str:
    """`scene/rgb_0001.png` -> `scene_rgb_0001`: unique across folders and usable as an output file name."""
    return "_".join(PurePosixPath(rel_path.replace("\\", "/")).with_suffix("").parts)
