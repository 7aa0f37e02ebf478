"""Exact multiply-accumulate (MAC) counts of one forward pass and of one training step of a network.

Built on ``torch.utils.flop_counter.FlopCounterMode`` (MACs = FLOPs / 2), with attention counted on every device.
Usage: ``count_macs(dit, x, t, y)``, ``count_train_macs(dit, x, t, y)``, ``macs_per_sample(dit, 64, 4)``.
"""

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["SDPA_FLOP_FORMULAS", "count_macs", "count_train_macs", "macs_per_sample"]

_DEVICES = ("auto", "meta", "same")


#################################################################################
#                     Attention formulas for FlopCounterMode                    #
#################################################################################
# What FlopCounterMode counts: only the ops in its registry, i.e. matmuls (mm, addmm, bmm, baddbmm), convolutions
# (forward and backward) and the fused attention kernels, each as 2 * m * n * k FLOPs (the bias add of addmm is not
# counted). Elementwise ops, norms, softmax, activations, embedding lookups and reductions count zero. Any other op
# is run uncounted, which is how attention goes missing on CPU: F.scaled_dot_product_attention dispatches there to
# aten._scaled_dot_product_flash_attention_for_cpu (and ..._for_cpu_backward), which the registry does not know.
# On the meta device SDPA takes the math path and is counted through its bmm ops instead.


def _attention_macs(query_shape: torch.Size, key_shape: torch.Size, value_shape: torch.Size) -> int:
    """MACs of softmax(Q K^T) V: Q K^T is (B, S_q, E) x (B, E, S_k), then (B, S_q, S_k) x (B, S_k, E_v)."""
    batch = 1
    for size in query_shape[:-2]:  # (N, heads) for the fused kernels; GQA key/value heads are broadcast to these
        batch *= size
    s_q, e_qk = query_shape[-2], query_shape[-1]
    s_k, e_v = key_shape[-2], value_shape[-1]
    return batch * s_q * s_k * (e_qk + e_v)


def _sdpa_forward_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * _attention_macs(query_shape, key_shape, value_shape)


def _sdpa_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    # Backward = 2 x forward: dP = dO V^T and dV = P^T dO for the second matmul, dQ = dS K and dK = dS^T Q for the
    # first. The fused kernels also recompute Q K^T (torch's own formula adds it); that is an implementation cost like
    # activation checkpointing, so it is left out and the count is the same on CPU, CUDA and meta (math path).
    return 4 * _attention_macs(query_shape, key_shape, value_shape)


def _sdpa_formulas() -> dict[Any, Callable[..., int]]:
    forward = ["_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
               "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
               "_scaled_dot_product_fused_attention_overrideable"]
    formulas = {}
    for name in forward:
        # Each fused op takes (query, key, value, ...) and its backward (grad_out, query, key, value, ...).
        for op_name, formula in ((name, _sdpa_forward_flops), (f"{name}_backward", _sdpa_backward_flops)):
            if hasattr(torch.ops.aten, op_name):  # the set of kernels differs between torch versions
                formulas[getattr(torch.ops.aten, op_name)] = formula
    return formulas


SDPA_FLOP_FORMULAS: dict[Any, Callable[..., int]] = _sdpa_formulas()
"""``FlopCounterMode(custom_mapping=SDPA_FLOP_FORMULAS)`` counts every fused SDPA kernel, backward = 2 x forward."""


#################################################################################
#                                  Counting                                     #
#################################################################################


def _is_routing_dependent(model: nn.Module) -> bool:
    return any(getattr(module, "routing_dependent", False) is True for module in model.modules())


def _resolve_device(model: nn.Module, device: str, caller: str) -> str:
    if device not in _DEVICES:
        raise ValueError(f"{caller}: `device` must be one of {_DEVICES}, got {device!r}")
    routed = _is_routing_dependent(model)
    if device == "meta" and routed:
        # Shapes alone cannot tell how many tokens each expert receives.
        raise ValueError(f"{caller}: the model has a module with `routing_dependent = True`, whose compute depends on "
                         "the data; count it on the real batch with `device='same'` (or 'auto')")
    if device == "auto":
        return "same" if routed else "meta"
    return device


def _map_tensors(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a NamedTuple takes its fields positionally
        return type(value)(*(_map_tensors(v, fn) for v in value))
    if isinstance(value, (list, tuple)):
        return type(value)(_map_tensors(v, fn) for v in value)
    if isinstance(value, dict):
        return {k: _map_tensors(v, fn) for k, v in value.items()}
    return value


def _tensors_in(value: Any) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []

    def _collect(tensor: torch.Tensor) -> torch.Tensor:
        found.append(tensor)
        return tensor

    _map_tensors(value, _collect)
    return found


def _meta_like(tensor: torch.Tensor) -> torch.Tensor:
    # Same shape, dtype and requires_grad, no storage: the counter only needs shapes.
    return torch.empty_like(tensor, device="meta").requires_grad_(tensor.requires_grad)


def _prepare(model: nn.Module, inputs: tuple, kwargs: dict, device: str) -> tuple[Callable[[], Any], list]:
    """Returns a thunk running the forward pass on the chosen device, and the tensors a backward may reach."""
    if device == "same":
        return (lambda: model(*inputs, **kwargs)), list(model.parameters()) + _tensors_in((inputs, kwargs))
    # functional_call swaps in meta parameters and buffers for this call only, so the model itself is neither
    # copied nor moved (a DiT-XL stays where it is, and costs no memory here).
    state = {name: _meta_like(p) for name, p in model.named_parameters()}
    state.update({name: _meta_like(b) for name, b in model.named_buffers()})
    meta_inputs, meta_kwargs = _map_tensors((inputs, kwargs), _meta_like)
    leaves = list(state.values()) + _tensors_in((meta_inputs, meta_kwargs))
    return (lambda: functional_call(model, state, meta_inputs, meta_kwargs)), leaves


def _flops_to_macs(flops: int) -> int:
    # Every registered formula is 2 * (multiplies), so the division is exact.
    return int(flops) // 2


def count_macs(model: nn.Module, *inputs: Any, device: str = "auto", **kwargs: Any) -> int:
    """Counts the multiply-accumulates of one forward call ``model(*inputs, **kwargs)``.

    Matmuls, convolutions and attention (QK^T and AV, also on CPU) are counted; elementwise ops, norms, softmax and
    embedding lookups are free (see the note at the top of this file). The model's train/eval mode is left as is.

    Args:
        model: The network.
        *inputs: Positional inputs of the forward call (e.g. ``x, t, y`` for a DiT).
        device: ``"meta"`` counts on storage-free copies of the parameters and inputs (exact and cheap for any
            model whose compute depends only on shapes); ``"same"`` runs the real forward on the given tensors;
            ``"auto"`` picks ``"same"`` when a module has ``routing_dependent = True`` (mixture of experts), else
            ``"meta"``. A forward keyword argument named ``device`` cannot be passed through.
        **kwargs: Keyword inputs of the forward call.

    Returns:
        MACs of the whole batch, not per sample.

    Raises:
        ValueError: On an unknown ``device``, or ``device="meta"`` for a routing-dependent model.
    """
    forward, _ = _prepare(model, inputs, kwargs, _resolve_device(model, device, "count_macs"))
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=SDPA_FLOP_FORMULAS) as counter:
        forward()
    return _flops_to_macs(counter.get_total_flops())


def _square_mean_loss(output: Any) -> torch.Tensor:
    tensors = [o for o in _tensors_in(output) if o.is_floating_point() and o.requires_grad]
    if not tensors:
        raise ValueError("count_train_macs: the model output has no floating tensor that requires grad")
    return sum(o.float().pow(2).mean() for o in tensors)


def count_train_macs(
    model: nn.Module,
    *inputs: Any,
    device: str = "auto",
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
    **kwargs: Any,
) -> int:
    """Counts the MACs of one optimisation step: the forward call plus the backward of a loss on its output.

    The backward is counted by the same counter. For a matmul ``Y = X W`` it costs ``dX = dY W^T`` plus
    ``dW = X^T dY``, i.e. 2x the forward, except that autograd skips ``dX`` when ``X`` needs no gradient (the
    network inputs: a DiT's patch-embedding conv and first timestep-MLP layer). Attention backward is 2x forward
    (``SDPA_FLOP_FORMULAS``). So a DiT step is just under 3x its forward. Gradients are taken with
    ``backward(inputs=...)`` and every ``.grad`` is put back as it was.

    The optimizer update is not counted: AdamW spends about a dozen elementwise FLOPs per parameter, O(P), while
    forward + backward spend 3 MACs per weight per token (per sample for adaLN weights, which see one vector per
    sample), so for a DiT at 256 px (T = 256) and batch 256 the update is about 5e-5 of the step.

    Args:
        model: The network; its parameters with ``requires_grad`` get gradients.
        *inputs: Positional inputs of the forward call; those with ``requires_grad`` get gradients too.
        device: ``"auto"``, ``"meta"`` or ``"same"``, as in :func:`count_macs`.
        loss_fn: Maps the output to a scalar; its own MACs count. Default: ``output.float().pow(2).mean()``, summed
            over the floating tensors of the output (zero MACs, so only the network is counted).
        **kwargs: Keyword inputs of the forward call.

    Returns:
        MACs of forward plus backward for the whole batch.

    Raises:
        ValueError: On an unknown ``device``, ``device="meta"`` for a routing-dependent model, or when nothing
            requires grad.
    """
    forward, leaves = _prepare(model, inputs, kwargs, _resolve_device(model, device, "count_train_macs"))
    leaves = [leaf for leaf in leaves if leaf.requires_grad]
    if not leaves:
        raise ValueError("count_train_macs: no parameter of the model (and no input) requires grad")
    # backward(inputs=...) rather than autograd.grad, whose module-tracker hooks fail on leaf inputs; the caller's
    # .grad fields are restored afterwards. Leaves without a gradient path (experts that got no token) are skipped.
    saved_grads = [leaf.grad for leaf in leaves]
    try:
        for leaf in leaves:
            leaf.grad = None
        with torch.enable_grad(), FlopCounterMode(display=False, custom_mapping=SDPA_FLOP_FORMULAS) as counter:
            loss = (loss_fn or _square_mean_loss)(forward())
            loss.backward(inputs=leaves)
    finally:
        for leaf, grad in zip(leaves, saved_grads, strict=True):
            leaf.grad = grad
    return _flops_to_macs(counter.get_total_flops())


def macs_per_sample(
    model: nn.Module, input_size: int, in_channels: int, batch: int = 1, *, device: str = "auto"
) -> int:
    """Forward MACs per sample of a DiT-style ``model(x, t, y)`` on ``input_size`` x ``input_size`` latents.

    Builds ``x`` (batch, in_channels, input_size, input_size), ``t`` (batch,) and ``y`` (batch,) = 0: storage-free
    on meta, else a seeded Gaussian ``x`` and random DDPM steps ``t`` (the global RNG is left alone).

    Args:
        model: A network called as ``model(x, t, y)``.
        input_size: Latent side in latent pixels (64 for 512 px images through the SD VAE).
        in_channels: Latent channels of ``x``.
        batch: Samples counted at once; more only matter for routing-dependent models, whose count is averaged.
        device: ``"auto"``, ``"meta"`` or ``"same"``, as in :func:`count_macs`.

    Returns:
        Total MACs // batch.
    """
    if batch <= 0:
        raise ValueError(f"macs_per_sample: `batch` must be positive, got {batch}")
    resolved = _resolve_device(model, device, "macs_per_sample")
    param = next(model.parameters(), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    shape = (batch, in_channels, input_size, input_size)
    if resolved == "meta":
        x = torch.empty(shape, dtype=dtype, device="meta")
        t = torch.zeros(batch, dtype=torch.long, device="meta")
    else:
        # Routing may depend on the values, so the batch looks like data rather than zeros.
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(shape, generator=generator, dtype=dtype)
        t = torch.randint(0, 1000, (batch,), generator=generator)
    y = torch.zeros(batch, dtype=torch.long, device=x.device)
    if resolved == "same" and param is not None:
        x, t, y = x.to(param.device), t.to(param.device), y.to(param.device)
    return count_macs(model, x, t, y, device=resolved) // batch
