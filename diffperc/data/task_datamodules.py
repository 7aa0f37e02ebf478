"""One DataModule per task, chosen by name: `DepthDataModule`, `FlowDataModule`, `AmodalDataModule` and the multi-task
`GeneralistDataModule`. Each builds its train, val and test sets from a data set name (the procedural generator of
the embedded default, or the paper's data set) with the task's defaults, so a config names the data instead of
spelling out three readers:

    data:
      class_path: diffperc.data.DepthDataModule
      init_args: {dataset: hypersim, root: data/hypersim/processed, train_list: ..., val_list: ..., resolution: 512}

Procedural splits are 100000 / 64 / 256 samples (train / val / test) unless set. The real data sets test on their
validation split, as the paper reports them (Hypersim val, FlyingChairs val, pix2gestalt's held-out ids); depth is
scored at Hypersim's native 768x1024 there (``native_gt``). Everything else (batch size, workers, predict folders)
is the argument of the same name of `PerceptionDataModule` or `MultiTaskDataModule`.
"""

from pathlib import Path
from typing import Literal

from torch.utils.data import Dataset

from diffperc.data.datamodule import PerceptionDataModule
from diffperc.data.mixture import MultiTaskDataModule
from diffperc.data.procedural import ProceduralAmodal, ProceduralDepth, ProceduralFlow
from diffperc.data.real import FlyingChairsDataset, HypersimDataset, Pix2GestaltDataset

Splits = tuple[Dataset, Dataset, Dataset]  # train, val, test


def _procedural(cls, resolution: int, lengths: tuple[int, int, int]) -> Splits:
    for key, length in zip(("train_length", "val_length", "test_length"), lengths):
        if length < 1:
            raise ValueError(f"`--data.{key}` must be >= 1, got {length}")
    return tuple(cls(split, length, resolution) for split, length in zip(("train", "val", "test"), lengths))


def _check_dataset(dataset: str, known: tuple[str, ...], flag: str) -> None:
    if dataset not in known:
        raise ValueError(f"`{flag}` must be one of {list(known)}, got {dataset!r}")


def _required(value: str | None, flag: str, dataset: str) -> str:
    if value is None:
        raise ValueError(f"`{flag}` is required with `dataset: {dataset}`: set it to the data set's path")
    return value


def depth_splits(
    dataset: str,
    resolution: int,
    lengths: tuple[int, int, int],
    root: str | None = None,
    train_list: str | None = None,
    val_list: str | None = None,
    prefix: str = "--data.",
) -> Splits:
    """Train, val and test sets of depth: ``procedural`` scenes, or ``hypersim`` (``root``/train and ``root``/val
    with Marigold's filename lists; val and test score at the native size). ``prefix`` starts the flags errors name.
    """
    _check_dataset(dataset, ("procedural", "hypersim"), f"{prefix}dataset")
    if dataset == "procedural":
        return _procedural(ProceduralDepth, resolution, lengths)
    root = Path(_required(root, f"{prefix}root", dataset))
    train_list = _required(train_list, f"{prefix}train_list", dataset)
    val_list = _required(val_list, f"{prefix}val_list", dataset)
    val = HypersimDataset(root / "val", val_list, resolution, native_gt=True)  # scored at 768x1024, as Marigold
    return HypersimDataset(root / "train", train_list, resolution), val, val


def flow_splits(
    dataset: str, resolution: int, lengths: tuple[int, int, int], root: str | None = None, prefix: str = "--data."
) -> Splits:
    """Train, val and test sets of optical flow: ``procedural`` pairs, or ``flying_chairs`` (``root`` holds
    ``data/`` and the split file; batches keep ``flow_orig`` so EPE is measured at 384x512)."""
    _check_dataset(dataset, ("procedural", "flying_chairs"), f"{prefix}dataset")
    if dataset == "procedural":
        return _procedural(ProceduralFlow, resolution, lengths)
    root = _required(root, f"{prefix}root", dataset)
    val = FlyingChairsDataset(root, "val", resolution)
    return FlyingChairsDataset(root, "train", resolution), val, val


def amodal_splits(
    dataset: str,
    resolution: int,
    lengths: tuple[int, int, int],
    root: str | None = None,
    val_list: str | None = None,
    val_fraction: float = 0.01,
    prefix: str = "--data.",
) -> Splits:
    """Train, val and test sets of amodal segmentation: ``procedural`` scenes, or ``pix2gestalt`` (``root`` holds its
    four folders; the val split is ``val_list``'s ids, else ``val_fraction`` of the ids by hash)."""
    _check_dataset(dataset, ("procedural", "pix2gestalt"), f"{prefix}dataset")
    if dataset == "procedural":
        return _procedural(ProceduralAmodal, resolution, lengths)
    root = _required(root, f"{prefix}root", dataset)
    val = Pix2GestaltDataset(root, "val", resolution, val_list, val_fraction)
    return Pix2GestaltDataset(root, "train", resolution, val_list, val_fraction), val, val


class DepthDataModule(PerceptionDataModule):
    """Monocular depth data by name: procedural indoor scenes or Hypersim in Marigold's preprocessed layout.

    Args:
        dataset: ``procedural`` (generated, no files) or ``hypersim``.
        root: Hypersim: the folder holding Marigold's preprocessed ``train/`` and ``val/`` split folders.
        train_list: Hypersim: the training filename list (Marigold's ``filename_list_train_filtered.txt``).
        val_list: Hypersim: the validation filename list, also the test set (``filename_list_val_filtered.txt``).
        resolution: Side of the square samples, in pixels.
        train_length: Procedural: training samples per epoch.
        val_length: Procedural: validation samples.
        test_length: Procedural: test samples.
        predict_resolution: Long edge of ``images`` during prediction (default: ``resolution``).
        **kwargs: `PerceptionDataModule`'s loader arguments (``batch_size``, ``num_workers``, ``images``, ...).
    """

    def __init__(
        self,
        dataset: Literal["procedural", "hypersim"] = "procedural",
        root: str | None = None,
        train_list: str | None = None,
        val_list: str | None = None,
        resolution: int = 32,
        train_length: int = 100000,
        val_length: int = 64,
        test_length: int = 256,
        predict_resolution: int | None = None,
        **kwargs,
    ):
        lengths = (train_length, val_length, test_length)
        train, val, test = depth_splits(dataset, resolution, lengths, root, train_list, val_list)
        predict_resolution = resolution if predict_resolution is None else predict_resolution
        super().__init__(train, val, test, predict_resolution=predict_resolution, **kwargs)


class FlowDataModule(PerceptionDataModule):
    """Optical-flow data by name: procedural textured shapes under affine motion or FlyingChairs.

    Args:
        dataset: ``procedural`` (generated, no files) or ``flying_chairs``.
        root: FlyingChairs: the folder holding ``data/`` and ``FlyingChairs_train_val.txt``.
        resolution: Side of the square samples, in pixels (resizing rescales the flow vectors).
        train_length: Procedural: training samples per epoch.
        val_length: Procedural: validation samples.
        test_length: Procedural: test samples.
        predict_resolution: Long edge of ``images`` during prediction (default: ``resolution``).
        **kwargs: `PerceptionDataModule`'s loader arguments (``batch_size``, ``num_workers``, ``images``, ...).
    """

    def __init__(
        self,
        dataset: Literal["procedural", "flying_chairs"] = "procedural",
        root: str | None = None,
        resolution: int = 32,
        train_length: int = 100000,
        val_length: int = 64,
        test_length: int = 256,
        predict_resolution: int | None = None,
        **kwargs,
    ):
        train, val, test = flow_splits(dataset, resolution, (train_length, val_length, test_length), root)
        predict_resolution = resolution if predict_resolution is None else predict_resolution
        super().__init__(train, val, test, predict_resolution=predict_resolution, **kwargs)


class AmodalDataModule(PerceptionDataModule):
    """Amodal-segmentation data by name: procedural occluded shapes or pix2gestalt.

    Args:
        dataset: ``procedural`` (generated, no files) or ``pix2gestalt``.
        root: pix2gestalt: the folder holding ``occlusion/``, ``visible_object_mask/``, ``whole/`` and
            ``whole_mask/``.
        val_list: pix2gestalt: a file of the ids held out for validation and test (one a line).
        val_fraction: pix2gestalt without ``val_list``: the share of ids (by MD5 hash) held out.
        resolution: Side of the square samples, in pixels.
        train_length: Procedural: training samples per epoch.
        val_length: Procedural: validation samples.
        test_length: Procedural: test samples.
        predict_resolution: Long edge of ``images`` during prediction (default: ``resolution``).
        **kwargs: `PerceptionDataModule`'s loader arguments (``batch_size``, ``num_workers``, ``images``, ...).
    """

    def __init__(
        self,
        dataset: Literal["procedural", "pix2gestalt"] = "procedural",
        root: str | None = None,
        val_list: str | None = None,
        val_fraction: float = 0.01,
        resolution: int = 32,
        train_length: int = 100000,
        val_length: int = 64,
        test_length: int = 256,
        predict_resolution: int | None = None,
        **kwargs,
    ):
        lengths = (train_length, val_length, test_length)
        train, val, test = amodal_splits(dataset, resolution, lengths, root, val_list, val_fraction)
        predict_resolution = resolution if predict_resolution is None else predict_resolution
        super().__init__(train, val, test, predict_resolution=predict_resolution, **kwargs)


class GeneralistDataModule(MultiTaskDataModule):
    """Depth, flow and amodal data by name, mixed for training (paper §6.4): all procedural, or the paper's data sets.

    Args:
        names: The tasks, in the order of ``--model.init_args.task`` (any of ``depth``, ``flow``, ``amodal``;
            default all three, in that order).
        dataset: ``procedural`` (generated, no files) or ``real`` (Hypersim, FlyingChairs, pix2gestalt).
        hypersim_root: Real depth: the folder holding Marigold's preprocessed ``train/`` and ``val/``.
        hypersim_train_list: Real depth: Marigold's training filename list.
        hypersim_val_list: Real depth: Marigold's validation filename list (also the test set).
        flying_chairs_root: Real flow: the folder holding ``data/`` and ``FlyingChairs_train_val.txt``.
        pix2gestalt_root: Real amodal: the folder holding pix2gestalt's four folders.
        pix2gestalt_val_list: Real amodal: a file of held-out ids; without it 1% of the ids (by hash) are held out.
        resolution: Side of every task's square samples, in pixels.
        train_length: Procedural: training samples of each task's generator.
        val_length: Procedural: validation samples of each task.
        test_length: Procedural: test samples of each task.
        predict_resolution: Long edge of ``images`` during prediction (default: ``resolution``).
        **kwargs: `MultiTaskDataModule`'s arguments (``ratios``, ``length``, ``batch_size``, ``num_workers``, ...).
    """

    def __init__(
        self,
        names: list[str] | None = None,
        dataset: Literal["procedural", "real"] = "procedural",
        hypersim_root: str | None = None,
        hypersim_train_list: str | None = None,
        hypersim_val_list: str | None = None,
        flying_chairs_root: str | None = None,
        pix2gestalt_root: str | None = None,
        pix2gestalt_val_list: str | None = None,
        resolution: int = 32,
        train_length: int = 100000,
        val_length: int = 64,
        test_length: int = 256,
        predict_resolution: int | None = None,
        **kwargs,
    ):
        names = list(names) if names is not None else ["depth", "flow", "amodal"]
        _check_dataset(dataset, ("procedural", "real"), "--data.dataset")
        real = dataset == "real"
        lengths = (train_length, val_length, test_length)
        builders = {
            "depth": lambda: depth_splits(
                "hypersim" if real else "procedural",
                resolution,
                lengths,
                hypersim_root,
                hypersim_train_list,
                hypersim_val_list,
                prefix="--data.hypersim_",
            ),
            "flow": lambda: flow_splits(
                "flying_chairs" if real else "procedural",
                resolution,
                lengths,
                flying_chairs_root,
                prefix="--data.flying_chairs_",
            ),
            "amodal": lambda: amodal_splits(
                "pix2gestalt" if real else "procedural",
                resolution,
                lengths,
                pix2gestalt_root,
                pix2gestalt_val_list,
                prefix="--data.pix2gestalt_",
            ),
        }
        unknown = [name for name in names if name not in builders]
        if unknown:
            raise ValueError(f"`--data.names` holds {unknown}; a GeneralistDataModule knows {list(builders)}")
        splits = [builders[name]() for name in names]
        train, val, test = ([s[k] for s in splits] for k in range(3))
        predict_resolution = resolution if predict_resolution is None else predict_resolution
        super().__init__(names, train, val, test, predict_resolution=predict_resolution, **kwargs)
