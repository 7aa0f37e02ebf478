"""Host syncs per training and sampling step stay where they are (``diffperc.profiling``; tiny DiTs on CPU).

A new ``.item()``, ``bool(tensor)``, boolean mask or ``.tolist()`` in the training step makes these tests fail: on a
GPU each one stalls the host until the device catches up. ``python benchmarks/bench_syncs.py`` shows the counts.
"""

import pytest
import torch

from diffperc.data import PerceptionDataModule, ProceduralDepth
from diffperc.diffusion import InferenceSettings, sample_ensemble
from diffperc.lit import Upcycle
from diffperc.profiling import StepSyncs, SyncCounter

from helpers import quiet_trainer, tiny_finetuning

GUARD = "_local_scalar_dense at diffperc/callbacks/nonfinite.py"  # NonFiniteGuard's one read per optimizer step
# Lightning turns every `prog_bar=True` metric into a Python float at every batch end (LoggerConnector.on_batch_end),
# with or without a progress bar: `train/loss`.
SAMPLER_TIMESTEPS = "tolist at diffperc/diffusion/sampling.py"


def test_sync_counter_counts_each_kind_of_read():
    x, mask = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([True, False, True])
    with SyncCounter(device="cpu") as syncs:
        x.sum().item()
        bool(x.max() > 2)
        x.tolist()
        x.nonzero()
        x[mask]
        y = x.clone()
        y[mask] = 0.0
        torch.repeat_interleave(torch.tensor([1, 2]))
        # No sync: shapes known without reading values.
        x.isfinite().all()
        x[1:]
        x[torch.tensor([0, 2])]
        torch.repeat_interleave(x, 2)
        x.split([1, 2])
    assert dict(syncs.by_op) == {
        "_local_scalar_dense": 2,
        "tolist": 1,
        "nonzero": 1,
        "index": 1,
        "index_put_": 1,
        "repeat_interleave": 1,
    }
    line = next(i for i, text in enumerate(open(__file__), 1) if text.strip() == "x.tolist()")
    assert syncs.by_site[f"tolist at tests/test_syncs.py:{line} (test_sync_counter_counts_each_kind_of_read)"] == 1
    assert "tolist" not in torch.Tensor.__dict__ and x.tolist() == [1.0, 2.0, 3.0]  # the method is restored


def test_sync_counter_leaves_out_optimizer_step_counters_and_other_devices():
    param = torch.nn.Parameter(torch.ones(3))
    param.grad = torch.ones(3)
    optimizer = torch.optim.AdamW([param])  # its step counter is a host tensor, read with .item() on CPU
    with SyncCounter(device="cpu") as syncs:
        optimizer.step()
    assert syncs.total == 0
    with SyncCounter(device="cuda") as syncs:  # a GPU run: reads of host tensors are no syncs
        torch.tensor(1.0).item()
    assert syncs.total == 0


def _step_syncs(tmp_path, module) -> SyncCounter:
    """The syncs of the third training step of a fit (the first ones measure MACs) that logs nothing."""
    counter = StepSyncs()
    data = PerceptionDataModule(train=ProceduralDepth("train", length=16, resolution=16), batch_size=2)
    trainer = quiet_trainer(
        max_steps=3, limit_val_batches=0, log_every_n_steps=1000, default_root_dir=tmp_path, callbacks=[counter]
    )
    trainer.fit(module, datamodule=data)
    assert len(counter.per_step) == 3
    return counter.per_step[-1]


def test_dense_training_step_syncs_once_for_the_guard(tmp_path):
    syncs = _step_syncs(tmp_path, tiny_finetuning(depth=2))
    sites = {site.split(":")[0] for site in syncs.by_site}
    assert sum(n for site, n in syncs.by_site.items() if site.startswith(GUARD)) == 1
    assert sites == {GUARD}, syncs.report()
    assert syncs.total == 1, syncs.report()


@pytest.mark.parametrize(("capacity_factor", "model_syncs"), [(None, 2), (1.0, 0)], ids=["dropless", "capacity"])
def test_moe_training_step_syncs(tmp_path, capacity_factor, model_syncs):
    # Dropless: one read of the expert sizes per MoE layer (2 blocks); capacity-padded: none.
    module = tiny_finetuning(depth=2, upcycle=Upcycle(num_experts=4, top_k=2, capacity_factor=capacity_factor))
    syncs = _step_syncs(tmp_path, module)
    assert syncs.by_op["tolist"] == model_syncs, syncs.report()
    assert {site.split(":")[0] for site in syncs.by_site} <= {GUARD, "tolist at diffperc/models/moe.py"}, syncs.report()
    assert syncs.total - model_syncs == 1, syncs.report()


def test_sampling_syncs_moe_capacity_adds_none(tmp_path):
    settings = InferenceSettings(num_steps=2, ensemble_size=2)
    counts = {}
    variants = {"dense": None, "dropless": Upcycle(4, 2), "capacity": Upcycle(4, 2, capacity_factor=1.0)}
    for name, upcycle in variants.items():
        module = tiny_finetuning(depth=2, upcycle=upcycle).eval()
        cond, y = torch.randn(2, 3, 16, 16), torch.zeros(2, dtype=torch.long)
        with torch.inference_mode(), SyncCounter(device="cpu") as syncs:
            sample_ensemble(module.net, cond, y, module.sampler, settings, module.latent_channels)
        counts[name] = syncs.total
        if name == "dense":  # one read: the DDIM timesteps, listed once on the host (no device sync on a GPU)
            assert list(syncs.by_site) == [next(k for k in syncs.by_site if k.startswith(SAMPLER_TIMESTEPS))]
    # The capacity-padded network reads nothing; the dropless one reads the expert sizes once per MoE layer and
    # step (2 steps x 2 layers).
    assert counts["capacity"] == counts["dense"] == 1
    assert counts["dropless"] == counts["dense"] + 4
