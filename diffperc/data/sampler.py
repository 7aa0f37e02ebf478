"""Resumable training order: a seeded, rank-sharded shuffle and a DataLoader that saves how far an epoch got.

Lightning stores ``state_dict()`` of every training DataLoader in the checkpoint (``loops.fit_loop.combined_loader``)
and calls ``load_state_dict()`` before creating the resumed iterator, so a run resumed mid-epoch sees exactly the
batches it would have seen without the interruption.
"""

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler


class ResumableSampler(DistributedSampler):
    """A seeded shuffle sharded over data-parallel ranks, as ``DistributedSampler``, that can start mid-epoch.

    The permutation of epoch ``e`` is ``torch.randperm(len(dataset))`` under seed ``seed + e`` (the same one on every
    rank, any world size); rank ``r`` of ``W`` takes positions ``r, r + W, ...``. One global batch of ``W`` x ``B``
    samples is therefore the same samples as one batch of ``W * B`` on a single process. Subclassing
    ``DistributedSampler`` keeps Lightning from replacing it with its own under DDP / FSDP.

    Args:
        dataset: The data set to sample from.
        num_replicas: Data-parallel world size.
        rank: This process's data-parallel rank.
        seed: Base seed of the shuffle.
        shuffle: Shuffle (training) or keep the data set's order.
        drop_last: Drop the tail so every rank gets the same number of samples (otherwise the head is repeated).
    """

    def __init__(
        self,
        dataset: Dataset,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
    ):
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"ResumableSampler: rank {rank} is not in 0..num_replicas-1 = 0..{num_replicas - 1}")
        if len(dataset) < num_replicas:
            raise ValueError(
                f"ResumableSampler: the data set has {len(dataset)} samples, fewer than the "
                f"{num_replicas} data-parallel processes"
            )
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last)
        self._skip: tuple[int, int] | None = None  # (epoch, samples) still to skip

    def skip(self, epoch: int, num_samples: int) -> None:
        """Makes the next iteration of ``epoch`` start at this rank's ``num_samples``-th sample (once)."""
        if not 0 <= num_samples <= self.num_samples:
            raise ValueError(f"ResumableSampler: cannot skip {num_samples} of {self.num_samples} samples per rank")
        self._skip = (epoch, num_samples)

    @property
    def start(self) -> int:
        """Where the next iteration starts in this rank's share of the current epoch."""
        return self._skip[1] if self._skip is not None and self._skip[0] == self.epoch else 0

    def __iter__(self) -> Iterator[int]:
        start, self._skip = self.start, None  # the offset belongs to the resumed epoch only
        indices = list(super().__iter__())
        return iter(indices[start:])


class ResumableDataLoader(DataLoader):
    """A DataLoader over a ``ResumableSampler`` whose ``state_dict`` records the epoch and the batches consumed.

    Batches are counted as this loader hands them out (not as workers prefetch them), so the count is exactly the
    number of training steps taken in the epoch. The loader's own generator is reseeded every epoch from
    ``(seed, epoch)``: worker seeds then never draw from the global RNG, and creating an iterator does not change
    the training noise.

    Args:
        dataset: The data set.
        sampler: Its resumable sampler (sets the order, the shard and the seed).
        batch_size: Samples per batch on this process.
        **kwargs: Other ``DataLoader`` arguments (``num_workers``, ``pin_memory``, ``drop_last``, ...).
    """

    def __init__(self, dataset: Dataset, sampler: ResumableSampler, batch_size: int, **kwargs):
        if not isinstance(sampler, ResumableSampler):
            raise TypeError(f"ResumableDataLoader needs a ResumableSampler, got {type(sampler).__name__}")
        kwargs.pop("shuffle", None)  # the sampler shuffles; Lightning may pass shuffle when it rebuilds a loader
        kwargs.setdefault("generator", torch.Generator())
        super().__init__(dataset, sampler=sampler, batch_size=batch_size, **kwargs)
        self._batches = 0  # batches handed out in the current epoch

    def __iter__(self) -> Iterator:
        sampler = self.sampler
        self.generator.manual_seed(sampler.seed * 1_000_003 + sampler.epoch)
        self._batches = sampler.start // self.batch_size
        for batch in super().__iter__():
            self._batches += 1
            yield batch

    def state_dict(self) -> dict:
        """What resumes this epoch: the epoch, samples consumed on all ranks together, and the layout they had."""
        sampler = self.sampler
        return {
            "epoch": sampler.epoch,
            "seed": sampler.seed,
            "dataset_length": len(self.dataset),
            "global_samples": self._batches * self.batch_size * sampler.num_replicas,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continues the saved epoch at the next unseen global batch; any world size that divides it works."""
        sampler = self.sampler
        if state["seed"] != sampler.seed or state["dataset_length"] != len(self.dataset):
            raise ValueError(
                f"The checkpoint's training order (seed {state['seed']}, {state['dataset_length']} samples) differs "
                f"from this run's (`--data.seed` {sampler.seed}, {len(self.dataset)} samples): resume with the same "
                "`--data.seed` and training data set"
            )
        per_rank, rest = divmod(state["global_samples"], sampler.num_replicas)
        if rest or per_rank % self.batch_size:
            raise ValueError(
                f"The checkpoint stopped after {state['global_samples']} samples of epoch {state['epoch']}, which is "
                f"not a whole number of global batches of {sampler.num_replicas} processes x `--data.batch_size` "
                f"{self.batch_size}; resume with the batch layout it was trained with"
            )
        sampler.set_epoch(state["epoch"])
        sampler.skip(state["epoch"], min(per_rank, sampler.num_samples))
        self._batches = per_rank // self.batch_size


def data_parallel_layout(trainer) -> tuple[int, int]:
    """(rank, world size) of the data-parallel group: (0, 1) without a trainer or a parallel strategy."""
    if trainer is None:
        return 0, 1
    kwargs = getattr(trainer.strategy, "distributed_sampler_kwargs", None)
    if not kwargs:
        return 0, 1
    return int(kwargs.get("rank", 0)), int(kwargs.get("num_replicas", 1))
