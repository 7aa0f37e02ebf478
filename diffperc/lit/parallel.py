"""Scaling a DiT over processes: FSDP2 (``fully_shard`` per DiT block, then the root) for Lightning's
``ModelParallelStrategy``, activation checkpointing of DiT blocks, and training noise that does not depend on how a
global batch is split over processes (nor on the global RNG).

``diffperc fit --config configs/quickstart/depth.yaml --config configs/trainer/fsdp2.yaml``
"""

import contextlib
import contextvars
import types

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from diffperc.seeding import derive_seed

#: ``derive_seed`` stream of pretraining's label dropout (DDIM sampling uses streams 0 and 1, the validation loss 2).
LABEL_DROP_STREAM = 3


#: False inside ``blocks_run_plainly()``: checkpointed blocks then run as plain ones.
_CHECKPOINTING = contextvars.ContextVar("diffperc_checkpointing", default=True)


@contextlib.contextmanager
def blocks_run_plainly():
    """Checkpointed DiT blocks run without checkpointing inside this context: what counting a training step's MACs
    needs (``MACsCounter``), since the count is the model's, not the recomputation's, and it swaps in meta parameters
    for the forward only, so a recomputation in backward would mix them with the real ones."""
    token = _CHECKPOINTING.set(False)
    try:
        yield
    finally:
        _CHECKPOINTING.reset(token)


def _checkpointed_forward(self: nn.Module, *args, **kwargs):
    forward = type(self).forward.__get__(self)  # the class's forward (FSDP2 subclasses the module's class)
    if not torch.is_grad_enabled() or not _CHECKPOINTING.get():
        return forward(*args, **kwargs)
    # Non-reentrant checkpointing: works with FSDP2's hooks and with inputs that do not require grad.
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def checkpoint_blocks(net: nn.Module) -> int:
    """Recomputes each DiT block's activations in backward instead of storing them (memory for ~1/3 more compute).

    Parameter names and the module tree are unchanged (no wrapper module), so checkpoints, ``load_pretrained`` and
    MoE tools see the same network. The patched ``forward`` is a bound method, so ``copy.deepcopy`` (EMA) binds it
    to the copy. Calling it again is a no-op.

    Args:
        net: A DiT (anything with a ``blocks`` ModuleList).

    Returns:
        The number of blocks newly checkpointed.
    """
    blocks = getattr(net, "blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        raise TypeError(f"checkpoint_blocks needs a DiT with a `blocks` ModuleList, got {type(net).__name__}")
    count = 0
    for block in blocks:
        if getattr(block.forward, "__func__", None) is _checkpointed_forward:
            continue
        block.forward = types.MethodType(_checkpointed_forward, block)
        count += 1
    return count


def apply_fsdp2(
    net: nn.Module,
    mesh=None,
    *,
    param_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype | None = None,
    reshard_after_forward: bool = True,
    activation_checkpointing: bool = False,
) -> nn.Module:
    """Shards a DiT with FSDP2: ``fully_shard`` on every block (the unit of all-gather), then on the root.

    Call it from ``LightningModule.configure_model`` under ``ModelParallelStrategy`` with ``self.device_mesh``; the
    data-parallel dimension of a 2-D mesh is used. Idempotent.

    Args:
        net: The DiT (``blocks`` ModuleList).
        mesh: A ``DeviceMesh``; a 2-D one must name a ``data_parallel`` dimension. None = all processes.
        param_dtype: Dtype of the gathered parameters for compute (e.g. ``torch.bfloat16``); None = keep.
        reduce_dtype: Dtype of gradient reduction; None = ``param_dtype``'s.
        reshard_after_forward: Free gathered block parameters after forward (gather again in backward) to save
            memory. The root is never resharded after forward: backward needs it first.
        activation_checkpointing: Also recompute block activations in backward (``checkpoint_blocks``).

    Returns:
        ``net``, now an ``FSDPModule`` with DTensor parameters.
    """
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    if activation_checkpointing:
        checkpoint_blocks(net)
    if isinstance(net, FSDPModule):
        return net
    if mesh is not None and mesh.ndim > 1:
        if "data_parallel" not in (mesh.mesh_dim_names or ()):
            raise ValueError(f"apply_fsdp2: a {mesh.ndim}-D mesh needs a `data_parallel` dimension, got "
                             f"{mesh.mesh_dim_names}")
        mesh = mesh["data_parallel"]
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    for block in net.blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(net, mesh=mesh, mp_policy=policy, reshard_after_forward=False)
    return net


def draw_noise_and_timesteps(
    x0: torch.Tensor,
    num_timesteps: int,
    seed: int,
    step: int,
    rank: int = 0,
    world_size: int = 1,
    task_id: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Training noise and timesteps for this process's share of a global batch, seeded by ``(seed, step)``.

    The whole global batch of ``world_size`` x N rows is drawn from one generator on ``x0``'s device and rank ``r``
    keeps rows ``r, r + W, ...``, the rows ``ResumableSampler`` gives it. So W processes with batch N draw exactly
    the noise one process with batch W * N draws, every rank gets different noise (seeding each rank alike would
    repeat the same noise on every rank), and a resumed run draws what it would have drawn (nothing depends on the
    global RNG's history).

    Args:
        x0: Clean target latents of this process (N, C, h, w).
        num_timesteps: Training timesteps T; t is uniform in [0, T).
        seed: Seed of the run's training noise.
        step: A counter that differs between batches and survives resume (e.g. ``trainer.fit_loop.total_batch_idx``).
        rank: Data-parallel rank.
        world_size: Data-parallel world size.
        task_id: A generalist's task, drawn from its own generator; None for a single-task or pretraining model.

    Returns:
        ``noise`` like ``x0`` and ``t`` (N,) int64, both on ``x0``'s device.
    """
    n = x0.shape[0]
    g = torch.Generator(device=x0.device)
    g.manual_seed(derive_seed(seed, step) if task_id is None else derive_seed(seed, step, task_id))
    t = torch.randint(0, num_timesteps, (n * world_size,), generator=g, device=x0.device)[rank::world_size]
    noise = torch.randn((n * world_size, *x0.shape[1:]), generator=g, device=x0.device, dtype=x0.dtype)
    return noise[rank::world_size].contiguous(), t.contiguous()


def draw_label_drop(
    n: int, prob: float, seed: int, step: int, rank: int = 0, world_size: int = 1, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Which of this process's ``n`` labels classifier-free-guidance training replaces by the null label at ``step``:
    a (n,) bool mask, each entry True with probability ``prob``.

    Drawn like ``draw_noise_and_timesteps``: one draw over the global batch from its own generator, seeded by
    ``derive_seed(seed, step, stream=LABEL_DROP_STREAM)``, of which rank ``r`` keeps entries ``r, r + W, ...``; so the
    ranks drop different labels, a resumed run drops what it would have dropped, and neither the global RNG nor
    validation changes which labels a step drops.
    """
    g = torch.Generator(device=device).manual_seed(derive_seed(seed, step, stream=LABEL_DROP_STREAM))
    return torch.rand(n * world_size, generator=g, device=device)[rank::world_size] < prob
