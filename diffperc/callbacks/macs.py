"""Cumulative training compute (``compute/train_macs``), the x-axis of every scaling plot, and test-time MACs.

Add it with ``--trainer.callbacks+=diffperc.callbacks.macs.MACsCounter`` (``diffperc sweep`` does this for you);
at fit end it writes ``train_macs.json`` into the run directory.
"""

from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from diffperc.compute import count_train_macs
from diffperc.lit.parallel import blocks_run_plainly
from diffperc.models import moe_config
from diffperc.utils import atomic_write_json

TRAIN_MACS_KEY = "compute/train_macs"
TEST_MACS_KEY = "compute/test_macs_per_sample"
TRAIN_MACS_FILE = "train_macs.json"


class MACsCounter(Callback):
    """Counts the multiply-accumulates of every optimisation step and logs their running total.

    What is counted: the network's forward and backward (``count_train_macs(pl_module.net, x, t, y)``) on the inputs
    it receives in ``training_step``, summed over the micro-batches of an optimisation step (gradient accumulation)
    and over all processes (DDP: each rank's batch counts). The frozen codec and the optimizer update are not counted
    (latents can be cached, and AdamW is O(parameters); see ``count_train_macs``). A dense network is measured once
    per batch shape on the meta device (free). A mixture of experts costs the same whatever the routing: without a
    capacity limit every token uses exactly k experts (measured once per shape on a real batch); with one, experts
    run capacity-padded batches of static shape (measured once per shape on the meta device, padding included: the
    compute that actually runs).

    The network inputs come from ``pl_module.net_inputs(batch)`` (``(x, t, y)`` exactly as ``training_step`` passes
    them to ``pl_module.net``; every ``diffperc.lit.DiffusionModule`` has it). The count runs under a forked RNG, so
    training is the same with or without the callback.

    Logging: after every ``trainer.log_every_n_steps``-th optimisation step k (and after the last one), each logger
    gets ``compute/train_macs`` = MACs of steps 1..k at ``step = k - 1``, the step under which Lightning logs that
    step's ``self.log`` metrics and the validation run after it. The total is part of the checkpoint
    (``state_dict``), so a resumed run keeps counting. At fit end, ``{"compute/train_macs": ..., "global_step": ...}``
    is written atomically to ``<trainer.log_dir>/train_macs.json``, with the keys of every ``add_to_record`` source
    (``PowerLawMonitor``: ``loss/train``, ``loss/val`` and ``laws``), so one writer owns the file. At test end, the
    module's ``test_results["compute/test_macs_per_sample"]`` (set by ``PerceptionFinetuning.on_test_epoch_end``) is
    logged too, when present.

    Args:
        filename: Name of the JSON file written into the run directory at fit end.
    """

    def __init__(self, filename: str = TRAIN_MACS_FILE):
        self.filename = filename
        self.train_macs = 0  # all processes, all optimisation steps so far (restored on resume)
        self._macs_by_shape: dict[tuple, int] = {}
        self._last_step = 0
        self._last_logged_step = -1
        self._record_sources: list[Callable[[], Mapping]] = []

    # ----------------------------------------------------------------- counting
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._last_step = trainer.global_step
        self._last_logged_step = trainer.global_step  # a resumed run already logged up to here

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx: int) -> None:
        # Measured before the step runs, so a mixture of experts is routed by the weights the step itself uses.
        moe = moe_config(pl_module.net)
        key = _shape_key(batch)
        if key not in self._macs_by_shape:
            # A dense step, and an MoE step, cost the same for every batch of a shape: without a capacity limit every
            # token uses exactly k experts (counted on real tensors: the dropless dispatch can't run on meta); with
            # one, the dispatch has static, capacity-padded shapes (counted on the meta device, padding included).
            dropless = moe is not None and moe.get("capacity_factor") is None
            self._macs_by_shape[key] = self._measure(pl_module, batch, device="same" if dropless else "auto")
        self.train_macs += self._macs_by_shape[key] * trainer.world_size
        pl_module.flops_per_batch = 2 * self._macs_by_shape[key]

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if step == self._last_step:  # a micro-batch inside gradient accumulation: no optimisation step yet
            return
        self._last_step = step
        if step % max(1, trainer.log_every_n_steps) == 0:
            self._log(trainer)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.global_step != self._last_logged_step:
            self._log(trainer)  # the final total is always in the logs
        log_dir = trainer.log_dir or trainer.default_root_dir  # a collective under DDP: every rank must ask
        if trainer.is_global_zero:
            record = {}
            for source in self._record_sources:
                record.update(source())
            record.update({TRAIN_MACS_KEY: self.train_macs, "global_step": trainer.global_step})
            atomic_write_json(Path(log_dir) / self.filename, record)

    def add_to_record(self, source: Callable[[], Mapping]) -> None:
        """Has ``source()``'s keys (finite JSON values) written into ``train_macs.json`` at fit end, on rank 0, after
        every training hook ran; adding the same source twice keeps one."""
        if source not in self._record_sources:
            self._record_sources.append(source)

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        results = getattr(pl_module, "test_results", None)
        if isinstance(results, Mapping) and results.get(TEST_MACS_KEY) is not None:
            for logger in trainer.loggers:
                step = results.get("global_step", trainer.global_step)  # the tested weights' step, as the metrics
                logger.log_metrics({TEST_MACS_KEY: float(results[TEST_MACS_KEY])}, step=step)

    # -------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return {"train_macs": self.train_macs}

    def load_state_dict(self, state_dict: dict) -> None:
        self.train_macs = int(state_dict["train_macs"])

    # ------------------------------------------------------------------ helpers
    def _log(self, trainer: Trainer) -> None:
        self._last_logged_step = trainer.global_step
        for logger in trainer.loggers:
            logger.log_metrics({TRAIN_MACS_KEY: float(self.train_macs)}, step=max(trainer.global_step - 1, 0))

    def _measure(self, pl_module: LightningModule, batch, device: str) -> int:
        net = _unsharded(pl_module.net)
        forked = [pl_module.device] if pl_module.device.type == "cuda" else []
        # The count's random inputs and forward leave the RNG as it was; activation checkpointing's recomputation
        # is not the model's compute (and would run outside the count's meta parameters).
        with torch.random.fork_rng(devices=forked), blocks_run_plainly():
            return count_train_macs(net, *_net_inputs(pl_module, batch), device=device)


def _unsharded(net: torch.nn.Module) -> torch.nn.Module:
    """A sharded (FSDP) DiT cannot run on the meta device: count an unsharded meta copy of the same layout."""
    if not any(type(m).__name__.startswith(("FSDP", "FullyShardedDataParallel")) for m in net.modules()):
        return net
    from diffperc.models import DiT, moe_config, to_moe
    from diffperc.models.router import PatchEmbedRouter

    moe, routes = moe_config(net), getattr(net.x_embedder, "in_channels", None)
    with torch.device("meta"):
        meta = DiT(**net.config)
        if isinstance(routes, list):
            meta.x_embedder = PatchEmbedRouter(routes, meta.patch_size, meta.hidden_size)
        return to_moe(meta, moe) if moe is not None else meta


def _shape_key(batch) -> tuple:
    """The shapes of every tensor in a batch: equal keys mean equal network input shapes."""
    if isinstance(batch, torch.Tensor):
        return (tuple(batch.shape),)
    if isinstance(batch, Mapping):
        return tuple((k, _shape_key(v)) for k, v in sorted(batch.items(), key=lambda kv: str(kv[0])))
    if isinstance(batch, (list, tuple)):
        return tuple(_shape_key(v) for v in batch)
    return ()


@torch.no_grad()
def _net_inputs(pl_module: LightningModule, batch) -> tuple:
    if not hasattr(pl_module, "net_inputs"):
        raise TypeError(
            f"MACsCounter: {type(pl_module).__name__} has no `net_inputs(batch)` returning the (x, t, y) its "
            "training_step passes to `self.net`; add one (see diffperc.lit.DiffusionModule)"
        )
    return tuple(pl_module.net_inputs(batch))
