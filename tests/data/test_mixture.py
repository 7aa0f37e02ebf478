"""The multi-task mixture: a seed-determined stream with the configured task frequencies, mixed batches grouped by
task, one evaluation loader per task, and errors that name the flag."""

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from diffperc.data.mixture import MixtureDataset, MultiTaskDataModule, collate_mixed
from diffperc.data.procedural import ProceduralAmodal, ProceduralDepth, ProceduralFlow

NAMES = ["depth", "flow", "amodal"]
KEYS = {
    "depth": {"image", "depth", "valid_mask", "name"},
    "flow": {"image", "image2", "flow", "valid_mask", "name"},
    "amodal": {"image", "visible_mask", "whole", "whole_mask", "name"},
}


class _Indexed(Dataset):
    """A data set whose sample is its own index (cheap, for counting draws)."""

    def __init__(self, length: int):
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        return {"index": torch.tensor(index)}


def _procedural(split: str, length: int) -> list[Dataset]:
    return [cls(split, length, 16) for cls in (ProceduralDepth, ProceduralFlow, ProceduralAmodal)]


def test_mixture_is_deterministic_given_the_seed_and_changes_with_it():
    sets = [_Indexed(50), _Indexed(70), _Indexed(30)]
    draws = [MixtureDataset(sets, NAMES, seed=s).draw(i) for s in (3, 3, 4) for i in range(200)]
    a, b, c = draws[:200], draws[200:400], draws[400:]
    assert a == b and a != c
    assert sum(x != y for x, y in zip(a, c)) > 100  # a new seed redraws most samples, not just a few
    for task, inner in a:
        assert 0 <= inner < len(sets[task])
    # The samples themselves follow the draws, on real generators too.
    mix = MixtureDataset(_procedural("train", 20), NAMES, seed=3)
    task, sample = mix[5]
    again_task, again = MixtureDataset(_procedural("train", 20), NAMES, seed=3)[5]
    assert task == again_task == a[5][0]  # the task draw does not depend on the data sets' lengths
    assert set(sample) == KEYS[NAMES[task]] and sample["name"] == f"train_{mix.draw(5)[1]:06d}"
    assert torch.equal(sample["image"], again["image"])


@pytest.mark.parametrize(
    "ratios, expected",
    [(None, [30 / 76, 40 / 76, 6 / 76]), ([1.0, 0.0, 3.0], [0.25, 0.0, 0.75])],
    ids=["paper_steps", "custom"],
)
def test_mixture_task_frequencies_match_ratios(ratios, expected):
    mix = MixtureDataset([_Indexed(10)] * 3, NAMES, ratios, seed=1)
    np.testing.assert_allclose(mix.probs, expected)
    n = 3000
    counts = np.bincount([mix.draw(i)[0] for i in range(n)], minlength=3)
    for count, p in zip(counts, expected):
        sigma = np.sqrt(n * p * (1 - p))
        assert abs(count - n * p) <= 3 * sigma, (counts, expected)
    if ratios is not None:
        assert counts[1] == 0  # a zero ratio never draws its task


def test_mixture_default_ratios_are_equal_for_other_task_names():
    mix = MixtureDataset([_Indexed(4), _Indexed(4)], ["depth", "normals"])
    np.testing.assert_allclose(mix.probs, [0.5, 0.5])
    # A subset of the paper's tasks keeps the paper's proportions: 30K : 6K.
    np.testing.assert_allclose(MixtureDataset([_Indexed(4)] * 2, ["depth", "amodal"]).probs, [30 / 36, 6 / 36])


def test_collate_mixed_groups_by_task_in_task_order():
    depth, flow, amodal = _procedural("val", 4)
    samples = [(2, amodal[0]), (0, depth[0]), (1, flow[0]), (0, depth[1]), (2, amodal[1]), (0, depth[2])]
    batch = collate_mixed(samples, NAMES)
    assert list(batch) == NAMES  # task-id order, not order of first appearance
    sizes = {name: sub["image"].shape[0] for name, sub in batch.items()}
    assert sizes == {"depth": 3, "flow": 1, "amodal": 2}
    for name, sub in batch.items():
        assert set(sub) == KEYS[name]
    assert batch["flow"]["flow"].shape == (1, 2, 16, 16) and batch["amodal"]["visible_mask"].shape == (2, 1, 16, 16)
    # Within a group, samples keep their batch order.
    assert batch["depth"]["name"] == ["val_000000", "val_000001", "val_000002"]
    torch.testing.assert_close(batch["amodal"]["whole"], torch.stack([amodal[0]["whole"], amodal[1]["whole"]]))
    # Absent tasks have no entry.
    only = collate_mixed([(1, flow[2]), (1, flow[3])], NAMES)
    assert list(only) == ["flow"] and only["flow"]["image2"].shape == (2, 3, 16, 16)
    with pytest.raises(ValueError, match="task index 3"):
        collate_mixed([(3, flow[0])], NAMES)


def test_multitask_datamodule_mixed_train_batches_and_one_eval_loader_per_task():
    train, val, test = _procedural("train", 50), _procedural("val", 3), _procedural("test", 5)
    dm = MultiTaskDataModule(NAMES, train, val, test, ratios=[1, 1, 1], length=16, batch_size=8, eval_batch_size=2)
    loader = dm.train_dataloader()
    batches = list(loader)
    assert len(batches) == 2
    mix = dm.train_set
    for b, batch in enumerate(batches):
        expected = [mix.draw(b * 8 + i) for i in range(8)]
        present = [NAMES[t] for t in sorted({t for t, _ in expected})]
        assert list(batch) == present
        for name, sub in batch.items():
            task = NAMES.index(name)
            assert set(sub) == KEYS[name]
            assert sub["name"] == [f"train_{inner:06d}" for t, inner in expected if t == task]
    # The next epoch continues the stream instead of repeating it.
    loader.sampler.set_epoch(1)
    first = next(iter(loader))
    expected = [mix.draw(16 + i) for i in range(8)]
    assert sum(sub["image"].shape[0] for sub in first.values()) == 8
    assert [n for sub in first.values() for n in sub["name"]] == [
        f"train_{inner:06d}" for t in range(3) for tt, inner in expected if tt == t
    ]
    for stage, count in (("val", 3), ("test", 5)):
        loaders = getattr(dm, f"{stage}_dataloader")()
        assert len(loaders) == 3
        for name, task_loader in zip(NAMES, loaders):
            sizes = [b["image"].shape[0] for b in task_loader]
            assert sizes == [2] * (count // 2) + [1] * (count % 2)
            assert set(next(iter(task_loader))) == KEYS[name]  # ordinary single-task batches


def test_multitask_datamodule_train_loader_resumes_mid_epoch():
    sets = [_Indexed(40), _Indexed(40), _Indexed(40)]
    dm = MultiTaskDataModule(NAMES, sets, length=12, batch_size=4, seed=2)
    full = list(dm.train_dataloader())
    loader = dm.train_dataloader()
    it = iter(loader)
    next(it)
    state = loader.state_dict()
    resumed = MultiTaskDataModule(NAMES, sets, length=12, batch_size=4, seed=2).train_dataloader()
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert len(rest) == 2
    for a, b in zip(rest, full[1:]):
        assert list(a) == list(b)
        for name in a:
            assert torch.equal(a[name]["index"], b[name]["index"])


@pytest.mark.parametrize(
    "kwargs, flag",
    [
        (dict(val=[_Indexed(2)] * 2), "--data.val"),
        (dict(test=[_Indexed(2)] * 4), "--data.test"),
        (dict(train=[_Indexed(2)] * 2), "--data.train"),
        (dict(ratios=[1.0, 2.0]), "--data.ratios"),
        (dict(ratios=[1.0, -1.0, 2.0]), "--data.ratios"),
        (dict(ratios=[0.0, 0.0, 0.0]), "--data.ratios"),
        (dict(names=["depth", "depth", "flow"]), "--data.names"),
        (dict(length=0), "--data.length"),
        (dict(batch_size=0), "--data.batch_size"),
        (dict(eval_batch_size=0), "--data.eval_batch_size"),
        (dict(num_workers=-1), "--data.num_workers"),
        (dict(train=[_Indexed(2), _Indexed(0), _Indexed(2)]), "--data.train"),
    ],
)
def test_multitask_datamodule_bad_arguments_name_the_flag(kwargs, flag):
    args = dict(names=NAMES, train=[_Indexed(2)] * 3) | kwargs
    with pytest.raises(ValueError, match=flag):
        MultiTaskDataModule(**args)


def test_multitask_datamodule_missing_eval_sets_and_short_length_name_the_flag():
    dm = MultiTaskDataModule(NAMES, [_Indexed(2)] * 3, length=3, batch_size=4)
    with pytest.raises(ValueError, match="--data.val"):
        dm.val_dataloader()
    with pytest.raises(ValueError, match="--data.length"):
        dm.train_dataloader()
