"""What every procedural data set shares: the splits, the per-sample random generator and the base class, so sample
``i`` of a split is rendered from ``(seed, split, i)`` alone and is the same on every machine and in every worker.
"""

import numpy as np
import torch
from torch.utils.data import Dataset

SPLITS = {"train": 0, "val": 1, "test": 2}


def _resolution(resolution: int | tuple[int, int]) -> tuple[int, int]:
    h, w = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
    if h <= 0 or w <= 0:
        raise ValueError(f"`resolution` must be positive, got {resolution}")
    return h, w


def signed_chw(rgb: np.ndarray) -> torch.Tensor:
    """An (H, W, 3) float image in [0, 1] as the (3, H, W) tensor in [-1, 1] that every sample holds."""
    return torch.from_numpy(rgb).permute(2, 0, 1) * 2 - 1


def split_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator for one sample. Distinct (seed, split, index) give independent streams, so splits never share
    a scene: the split is part of the seed sequence, not an offset into one stream."""
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; choose one of {list(SPLITS)}")
    return np.random.default_rng([seed, SPLITS[split], index])


class ProceduralDataset(Dataset):
    """Base of the procedural data sets: validated arguments, and sample ``index`` rendered from
    ``split_rng(seed, split, index)`` by the subclass's ``sample``, so it is the same on every machine.

    Args:
        split: ``train``, ``val`` or ``test``; the splits are independent random streams and never share a scene.
        length: Number of samples in the split (the generator can make any number).
        resolution: Image side in pixels, or (H, W).
        seed: Base seed of the whole data set.
    """

    def __init__(
        self, split: str = "train", length: int = 10000, resolution: int | tuple[int, int] = 32, seed: int = 0
    ):
        if split not in SPLITS:
            raise ValueError(f"Unknown split {split!r} (`split`); choose one of {list(SPLITS)}")
        if length <= 0:
            raise ValueError(f"`length` must be positive, got {length}")
        self.split, self.length, self.seed = split, length, seed
        self.height, self.width = _resolution(resolution)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} samples")
        return {"name": f"{self.split}_{index:06d}", **self.sample(split_rng(self.seed, self.split, index), index)}

    def sample(self, rng: np.random.Generator, index: int) -> dict:
        """The tensors of sample ``index``, drawn from ``rng`` only."""
        raise NotImplementedError
