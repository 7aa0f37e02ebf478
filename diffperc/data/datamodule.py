"""The LightningDataModule wiring data sets (procedural or real readers) to loaders; the training loader is
resumable (``diffperc.data.sampler``), so ``--ckpt_path last`` continues the exact data order."""

from pathlib import Path

from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from diffperc.data.real.images import DEFAULT_MAX_IMAGE_SIDE, ImageFolder
from diffperc.data.sampler import ResumableDataLoader, ResumableSampler, data_parallel_layout


class PerceptionDataModule(LightningDataModule):
    """Train/val/test data sets given as objects (``class_path`` in YAML), plus a folder of images for predict.

    Args:
        train: Training data set.
        val: Validation data set.
        test: Test data set (also used by ``predict`` when no ``images`` folder is given).
        images: Folder of images for ``diffperc predict``.
        predict_resolution: Long edge of ``images`` during prediction (outputs are resized back).
        predict_multiple: Pad ``images`` to a multiple of this (codec downsample x patch size).
        max_image_side: Longest side of an ``images`` input decoded at full size (default 8192). Larger PNGs and
            JPEGs are decoded at 1/2, 1/4 or 1/8 scale (a JPEG never exists in memory at full size: reading a
            12000 x 9000 photo adds about 190 MB instead of 620 MB); an input above 8x this is skipped and listed in
            ``skipped.txt``. Outputs keep the input's original size. None = no limit.
        batch_size: Training batch size.
        eval_batch_size: Validation/test batch size (default: ``batch_size``).
        num_workers: Loader worker processes (samples are generated from their index, so workers need no seeding).
        pin_memory: Pin host memory for faster copies to a GPU.
        seed: Seed of the training shuffle order (epoch e uses seed + e; the same order for any number of processes).
    """

    def __init__(
        self,
        train: Dataset | None = None,
        val: Dataset | None = None,
        test: Dataset | None = None,
        images: str | None = None,
        predict_resolution: int = 32,
        predict_multiple: int = 8,
        max_image_side: int | None = DEFAULT_MAX_IMAGE_SIDE,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        seed: int = 0,
    ):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"`--data.batch_size` must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"`--data.num_workers` must be >= 0, got {num_workers}")
        for key, value in (
            ("eval_batch_size", 1 if eval_batch_size is None else eval_batch_size),
            ("max_image_side", 1 if max_image_side is None else max_image_side),
            ("predict_resolution", predict_resolution),
            ("predict_multiple", predict_multiple),
        ):
            if value < 1:
                raise ValueError(f"`--data.{key}` must be >= 1, got {value}")
        if images is not None and not Path(images).is_dir():  # fail before a run directory is created
            raise FileNotFoundError(f"`--data.images` folder not found: {images}")
        self.train_set, self.val_set, self.test_set = train, val, test
        self.images, self.predict_resolution, self.predict_multiple = images, predict_resolution, predict_multiple
        self.max_image_side = max_image_side
        self.batch_size = batch_size
        self.eval_batch_size = batch_size if eval_batch_size is None else eval_batch_size
        self.num_workers, self.pin_memory, self.seed = num_workers, pin_memory, seed

    def _loader(self, dataset: Dataset | None, name: str, batch_size: int, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise ValueError(f"No {name} data set configured: set `--data.{name}` (a class_path with init_args)")
        common = dict(num_workers=self.num_workers, pin_memory=self.pin_memory, persistent_workers=self.num_workers > 0)
        if not shuffle:
            return DataLoader(dataset, batch_size=batch_size, shuffle=False, **common)
        # Training: seeded shuffle sharded over the data-parallel ranks, resumable mid-epoch.
        rank, world = data_parallel_layout(self.trainer)
        if len(dataset) < world * batch_size:
            raise ValueError(
                f"The {name} data set has {len(dataset)} samples, fewer than one global batch of {world} processes x "
                f"`--data.batch_size` {batch_size}"
            )
        sampler = ResumableSampler(dataset, num_replicas=world, rank=rank, seed=self.seed, shuffle=True)
        return ResumableDataLoader(dataset, sampler, batch_size, drop_last=True, **common)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, "train", self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, "val", self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, "test", self.eval_batch_size, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        if self.images:
            return folder_loader(
                self, self.images, self.predict_resolution, self.predict_multiple, self.num_workers, self.max_image_side
            )
        return self._loader(self.test_set, "test", self.eval_batch_size, shuffle=False)


def check_predict_multiple(multiple: int, module, flag: str = "--data.init_args.predict_multiple") -> None:
    """Predict inputs are padded to ``multiple``: it must be a multiple of the model's codec downsample x patch size,
    or a padded input would not split into whole latent patches (and fail or lose its edge mid-run)."""
    codec, net = getattr(module, "codec", None), getattr(module, "net", None)
    if codec is None or not hasattr(net, "patch_size"):
        return
    tile = codec.downsample * net.patch_size
    if multiple % tile:
        raise ValueError(
            f"`{flag}` {multiple} must be a multiple of the codec's downsample {codec.downsample} x the patch size "
            f"{net.patch_size} = {tile}: inputs padded to {multiple} would not split into whole patches"
        )


def folder_loader(
    datamodule: LightningDataModule,
    images: str,
    resolution: int,
    multiple: int,
    num_workers: int = 0,
    max_image_side: int | None = DEFAULT_MAX_IMAGE_SIDE,
) -> DataLoader:
    """A loader over a folder of user inputs in the layout (``predict_layout``) of the task that the trainer's model
    predicts: single images for depth, frame pairs for flow, image + ``_mask`` pairs for amodal."""
    trainer = datamodule.trainer  # set by Lightning before it asks for loaders; None outside a run
    module = trainer.lightning_module if trainer is not None else None
    folder = predict_folder(module, images, resolution, multiple, max_image_side)
    # Inputs keep their aspect ratio, so sizes differ: one input per batch.
    return DataLoader(folder, batch_size=1, num_workers=num_workers)


def predict_folder(
    module, images: str, resolution: int, multiple: int, max_image_side: int | None = DEFAULT_MAX_IMAGE_SIDE
) -> ImageFolder:
    """The folder of user inputs ``images`` in the layout of ``module``'s task; fails, naming the folder, when it
    holds no inputs of that layout (also run before ``diffperc predict`` writes anything)."""
    task = getattr(module, "task", None)
    if task is None:
        raise ValueError(
            "`--data.images` is read in the layout of the model's task, but the trainer holds no model with a `task` "
            "(run `diffperc predict` with a fine-tuning model, e.g. `diffperc.lit.PerceptionFinetuning`)"
        )
    check_predict_multiple(multiple, module)
    return ImageFolder(images, resolution, multiple, layout=task.predict_layout, max_image_side=max_image_side)
