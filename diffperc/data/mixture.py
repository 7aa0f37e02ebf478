"""A multi-task mixture (paper §6.4): per-task data sets mixed into one training stream of mixed batches, with one
validation and test loader per task. ``diffperc fit --config configs/quickstart/generalist.yaml`` trains on it.
"""

from collections.abc import Iterator, Sequence
from functools import partial

import numpy as np
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, default_collate

from diffperc.data.datamodule import folder_loader
from diffperc.data.real.images import DEFAULT_MAX_IMAGE_SIDE
from diffperc.data.sampler import ResumableDataLoader, ResumableSampler, data_parallel_layout

#: The paper's fine-tuning steps per task (§6.1-6.3): the default mixing ratios of a generalist.
PAPER_STEPS = {"depth": 30000, "flow": 40000, "amodal": 6000}

# Third entry of every sample's seed sequence: distinct from the procedural splits' 0, 1, 2 (``split_rng``), so a
# mixture seeded like its data sets never replays their streams.
_MIXTURE_STREAM = 7


def _default_ratios(names: Sequence[str]) -> list[float]:
    """The paper's step counts when every task is one of the paper's, else equal ratios."""
    if all(name in PAPER_STEPS for name in names):
        return [float(PAPER_STEPS[name]) for name in names]
    return [1.0] * len(names)


def _check_lists(names: Sequence[str], **lists: Sequence | None) -> None:
    """Raises unless ``names`` are distinct and non-empty and every given list has one entry per name."""
    if not names:
        raise ValueError("`--data.names` must list at least one task")
    if len(set(names)) != len(names):
        raise ValueError(f"`--data.names` must be distinct, got {list(names)}")
    for key, value in lists.items():
        if value is not None and len(value) != len(names):
            raise ValueError(
                f"`--data.{key}` has {len(value)} entries but `--data.names` has {len(names)} ({list(names)}): "
                "give one per task, in the same order"
            )


class MixtureDataset(Dataset):
    """Sample ``i`` is ``(task index, sample)``: a task drawn by the mixing ratios, then a sample of its data set.

    Both draws come from ``np.random.default_rng([seed, 7, i])``, so the stream depends only on the seed and the
    index, not on workers, processes or what was drawn before. Any index ``i >= 0`` is valid: ``length`` only sets
    the epoch size, and the training sampler continues the stream at ``epoch * length + i`` in later epochs.

    Args:
        datasets: One data set per task, in task-id order.
        names: Task names, in the same order (the tasks' ``name`` attributes: ``depth``, ``flow``, ``amodal``).
        ratios: Relative sampling frequency of each task (any positive scale; zero never draws the task). Default:
            the paper's step counts (depth 30K : flow 40K : amodal 6K) when every name is one of those, else equal.
        length: Samples per epoch.
        seed: Seed of the task and sample draws.
    """

    def __init__(
        self,
        datasets: Sequence[Dataset],
        names: Sequence[str],
        ratios: Sequence[float] | None = None,
        length: int = 100000,
        seed: int = 0,
    ):
        _check_lists(names, train=datasets, ratios=ratios)
        ratios = list(ratios) if ratios is not None else _default_ratios(names)
        p = np.asarray(ratios, dtype=np.float64)
        if not np.all(np.isfinite(p)) or np.any(p < 0) or p.sum() <= 0:
            raise ValueError(f"`--data.ratios` must be finite, >= 0 and not all zero, got {ratios}")
        for name, dataset, r in zip(names, datasets, p):
            if r > 0 and len(dataset) == 0:
                raise ValueError(f"The `{name}` training data set (`--data.train`) is empty but its ratio is {r}")
        if length < 1:
            raise ValueError(f"`--data.length` must be >= 1, got {length}")
        self.datasets, self.names, self.length, self.seed = list(datasets), list(names), length, seed
        self.probs = p / p.sum()
        self._cdf = np.cumsum(self.probs)
        self._cdf[-1] = 1.0  # rounding must not leave a gap above the last task

    def __len__(self) -> int:
        return self.length

    def draw(self, index: int) -> tuple[int, int]:
        """(task index, index inside that task's data set) of mixture sample ``index``."""
        if index < 0:
            raise IndexError(f"MixtureDataset: index {index} is negative")
        rng = np.random.default_rng([self.seed, _MIXTURE_STREAM, index])
        task = int(np.searchsorted(self._cdf, rng.random(), side="right"))  # zero-ratio tasks have empty intervals
        return task, int(rng.integers(len(self.datasets[task])))

    def __getitem__(self, index: int) -> tuple[int, dict]:
        task, inner = self.draw(index)
        return task, self.datasets[task][inner]


def collate_mixed(samples: Sequence[tuple[int, dict]], names: Sequence[str]) -> dict[str, dict]:
    """Groups ``(task index, sample)`` pairs by task and collates each group: ``{task name: batch}`` in task order.

    Tasks absent from the batch have no entry. Each group is an ordinary single-task batch (its own keys and image
    widths), so the model can route every group through its task's input projection.

    Args:
        samples: The ``(task index, sample dict)`` pairs of one batch (``MixtureDataset`` items).
        names: Task names by task index.
    """
    groups: dict[int, list[dict]] = {}
    for task, sample in samples:
        if not 0 <= task < len(names):
            raise ValueError(f"collate_mixed: task index {task} is not in 0..{len(names) - 1} ({list(names)})")
        groups.setdefault(task, []).append(sample)
    return {names[task]: default_collate(groups[task]) for task in sorted(groups)}


class _StreamSampler(ResumableSampler):
    """The resumable sequential sampler, shifted by ``epoch * len(dataset)`` so every epoch draws new samples."""

    def __iter__(self) -> Iterator[int]:
        offset = self.epoch * len(self.dataset)
        return (offset + i for i in super().__iter__())


class MultiTaskDataModule(LightningDataModule):
    """Per-task data sets mixed for training (mixed batches) and kept apart for validation and test (one loader each).

    A training batch is ``{task name: batch}`` (``collate_mixed``); validation and test return one loader per task in
    task order, so Lightning's ``dataloader_idx`` is the task id. The training stream is sequential over a
    ``MixtureDataset`` (already random), sharded over data-parallel ranks and resumable mid-epoch.

    Args:
        names: Task names in task-id order; they must match the model's tasks' ``name`` (``depth``, ``flow``,
            ``amodal``) and their order in ``--model.init_args.task``.
        train: Training data set of each task, in the order of ``names``.
        val: Validation data set of each task, in the order of ``names``.
        test: Test data set of each task, in the order of ``names``.
        ratios: Mixing ratios of the tasks (relative; zero drops a task from training). Default: the paper's step
            counts (depth 30K : flow 40K : amodal 6K) for those tasks, else equal.
        length: Mixture samples per training epoch (each epoch continues the stream with new draws).
        batch_size: Training batch size (all tasks together).
        eval_batch_size: Validation/test batch size (default: ``batch_size``).
        num_workers: Loader worker processes (samples depend only on their index, so workers need no seeding).
        pin_memory: Pin host memory for faster copies to a GPU.
        seed: Seed of the mixture's task and sample draws.
        images: Folder of inputs for ``diffperc predict`` (in the predict task's layout).
        predict_resolution: Long edge of ``images`` during prediction (outputs are resized back).
        predict_multiple: Pad ``images`` to a multiple of this (codec downsample x patch size).
        max_image_side: Longest side of an ``images`` input decoded at full size (default 8192); larger inputs are
            decoded at 1/2, 1/4 or 1/8 scale and one above 8x this is skipped, as in ``PerceptionDataModule``.
            None = no limit.
    """

    def __init__(
        self,
        names: list[str],
        train: list[Dataset],
        val: list[Dataset] | None = None,
        test: list[Dataset] | None = None,
        ratios: list[float] | None = None,
        length: int = 100000,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        seed: int = 0,
        images: str | None = None,
        predict_resolution: int = 32,
        predict_multiple: int = 8,
        max_image_side: int | None = DEFAULT_MAX_IMAGE_SIDE,
    ):
        super().__init__()
        _check_lists(names, train=train, val=val, test=test)
        if batch_size < 1:
            raise ValueError(f"`--data.batch_size` must be >= 1, got {batch_size}")
        if eval_batch_size is not None and eval_batch_size < 1:
            raise ValueError(f"`--data.eval_batch_size` must be >= 1, got {eval_batch_size}")
        if num_workers < 0:
            raise ValueError(f"`--data.num_workers` must be >= 0, got {num_workers}")
        if max_image_side is not None and max_image_side < 1:
            raise ValueError(f"`--data.max_image_side` must be >= 1 or null, got {max_image_side}")
        self.names = list(names)
        self.train_set = MixtureDataset(train, names, ratios, length, seed)  # validates ratios and length now
        self.val_sets, self.test_sets = val, test
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers, self.pin_memory, self.seed = num_workers, pin_memory, seed
        self.images, self.predict_resolution, self.predict_multiple = images, predict_resolution, predict_multiple
        self.max_image_side = max_image_side

    def _common(self) -> dict:
        return dict(num_workers=self.num_workers, pin_memory=self.pin_memory, persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        rank, world = data_parallel_layout(self.trainer)
        mixture = self.train_set
        if len(mixture) < world * self.batch_size:
            raise ValueError(
                f"`--data.length` {len(mixture)} is less than one global batch of {world} processes x "
                f"`--data.batch_size` {self.batch_size}"
            )
        sampler = _StreamSampler(mixture, num_replicas=world, rank=rank, seed=self.seed, shuffle=False)
        collate = partial(collate_mixed, names=self.names)  # a partial, not a lambda: workers must pickle it
        return ResumableDataLoader(
            mixture, sampler, self.batch_size, drop_last=True, collate_fn=collate, **self._common()
        )

    def _eval_loaders(self, datasets: list[Dataset] | None, stage: str) -> list[DataLoader]:
        if datasets is None:
            raise ValueError(
                f"No {stage} data sets configured: set `--data.{stage}` to one data set per task ({self.names})"
            )
        return [DataLoader(d, batch_size=self.eval_batch_size, shuffle=False, **self._common()) for d in datasets]

    def val_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders(self.val_sets, "val")

    def test_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders(self.test_sets, "test")

    def predict_dataloader(self) -> DataLoader:
        """``--data.images`` in the predict task's layout, else the predict task's test set
        (``--model.predict_task``, default the first task)."""
        if self.images:
            return folder_loader(
                self, self.images, self.predict_resolution, self.predict_multiple, self.num_workers, self.max_image_side
            )
        module = self.trainer.lightning_module if self.trainer is not None else None
        name = getattr(getattr(module, "task", None), "name", self.names[0])
        if self.test_sets is None:
            raise ValueError("`diffperc predict` needs `--data.images` or `--data.test` (one data set per task)")
        if name not in self.names:
            raise ValueError(f"The model predicts `{name}`, which is not one of `--data.names` {self.names}")
        return self._eval_loaders(self.test_sets, "test")[self.names.index(name)]
