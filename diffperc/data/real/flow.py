"""Optical-flow reader: FlyingChairs (the paper's flow training and validation set) in its original release's layout."""

import os
from pathlib import Path

import torch
from torch.utils.data import Dataset

from diffperc.data.io import read_flo, read_rgb
from diffperc.data.real.common import (
    existing_dir,
    flow_tensor,
    image_tensor,
    missing_data,
    parse_resolution,
    resize_flow,
    resize_image,
)

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
        self.data_dir = existing_dir(self.root / "data", "FlyingChairs", "FlyingChairs data folder")
        self.split = split
        self.resolution = parse_resolution(resolution)

        files = set(os.listdir(self.data_dir))
        ids = sorted(f[: -len("_flow.flo")] for f in files if f.endswith("_flow.flo"))
        if not ids:
            raise ValueError(f"No *_flow.flo files in {self.data_dir}")
        for sample_id in ids:
            for suffix in ("_img1.ppm", "_img2.ppm"):
                if sample_id + suffix not in files:
                    raise missing_data(
                        "FlyingChairs", f"FlyingChairs image missing: {self.data_dir / (sample_id + suffix)}"
                    )
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
            raise missing_data("FlyingChairs", f"FlyingChairs split file not found: {path} (`root`)")
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
            flow_orig = flow_tensor(flow)
            img1, img2 = resize_image(img1, self.resolution), resize_image(img2, self.resolution)
            flow = resize_flow(flow, self.resolution)
        out = {
            "image": image_tensor(img1),
            "image2": image_tensor(img2),
            "flow": flow_tensor(flow),
            "valid_mask": torch.ones(1, *flow.shape[:2], dtype=torch.bool),  # FlyingChairs flow is dense
            "name": sample_id,
        }
        if flow_orig is not None:
            out["flow_orig"] = flow_orig  # (2, H0, W0): EPE is measured at the original resolution
        return out
