"""Sparse mixture-of-experts MLP for DiT blocks, dense -> MoE upcycling, and the ``-8E2A`` preset suffix.

``SparseMoE`` drops into ``DiTBlock.mlp`` (same ``forward(x) -> x`` signature as the dense ``Mlp``). Routing after
DiT-MoE (Fei et al. 2024, https://github.com/feizc/DiT-MoE) and litgpt's ``LLaMAMoE``
(https://github.com/Lightning-AI/litgpt/blob/main/litgpt/model.py); upcycling after Komatsuzaki et al.,
"Sparse Upcycling" (https://arxiv.org/abs/2212.05055). Benchmark: ``python benchmarks/bench_moe.py``.
"""

import copy
import math
import re
from collections.abc import Mapping
from operator import attrgetter
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from diffperc.models.dit import DiT, Mlp

#################################################################################
#                                    Experts                                    #
#################################################################################


class SwiGLU(nn.Module):
    """SwiGLU expert as in DiT-MoE: down_proj(silu(gate_proj(x)) * up_proj(x)), no biases."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def _make_expert(expert_type: str, dim: int, hidden_dim: int) -> nn.Module:
    if expert_type == "gelu":
        return Mlp(dim, hidden_dim)  # fc1 -> GELU(tanh) -> fc2, the DiT MLP, so upcycling is a plain copy
    if expert_type == "swiglu":
        return SwiGLU(dim, hidden_dim)
    raise ValueError(f"SparseMoE `expert_type` must be 'gelu' or 'swiglu', got {expert_type!r}")


#################################################################################
#                                   MoE layer                                   #
#################################################################################


class SparseMoE(nn.Module):
    """Top-k routed mixture of MLP experts, with optional shared experts and a Switch-style balance loss.

    Per token x (width D): ``p = softmax(router(x))`` over E experts; the k largest ``p_e`` pick the experts; the
    output is ``sum_{e in top-k} w_e * expert_e(x) + shared(x)``, with ``w_e = p_e / sum_{top-k} p`` when
    ``normalize_weights`` (else ``w_e = p_e``). The router is ``self.router = nn.Linear(D, E, bias=False)``.

    After every forward (train and eval) the module keeps:
    - ``aux_loss``: ``balance_loss_coef * E * sum_e f_e * P_e`` (a scalar tensor with its graph), where, over the
      M = N * T tokens of the call, ``f_e`` = (number of top-k assignments to expert e) / (M * k) and
      ``P_e`` = mean over tokens of ``p_e``. Perfectly even routing gives ``balance_loss_coef``. ``f_e`` has no
      gradient; the loss trains the router through ``P_e`` (DiT-MoE's ``MoEGate`` with ``seq_aux=False``).
    - ``last_load``: ``f_e`` as a detached (E,) tensor, counted before any capacity dropping.

    Args:
        hidden_size: Token width D.
        mlp_hidden_size: Hidden width of one expert (DiT: ``mlp_ratio * D``).
        num_experts: Routed experts E.
        experts_per_token: Experts k each token is sent to (top-k).
        num_shared_experts: Experts every token uses, added with weight 1; stored fused as one MLP
            ``shared_experts`` of hidden width ``num_shared_experts * shared_expert_hidden_size`` (0 = none).
        shared_expert_hidden_size: Hidden width of one shared expert; None = ``mlp_hidden_size``. DiT-MoE: D, so its
            2 shared experts are one SwiGLU of width 2D.
        expert_type: ``"gelu"`` (DiT's fc1 -> GELU(tanh) -> fc2, with biases) or ``"swiglu"`` (DiT-MoE's experts).
        normalize_weights: Renormalise the k routing weights of a token to sum to 1 (upcycling; DiT-MoE does not).
        capacity_factor: If set, each expert keeps at most ``C = ceil(capacity_factor * M * k / E)`` assignments per
            call. Assignments are ranked per expert by choice slot first (all first choices before second
            choices), then by token position in the flattened (N * T) order; the rest are dropped and contribute
            zero (their weights are not renormalised again). The experts then run as one batched matmul on
            zero-padded (E, C, D) batches: static shapes and no host sync (``torch.compile`` and CUDA graphs
            friendly). ``None`` (default) = dropless: every assignment runs, each expert on its own slice, with one
            host sync per call. Both give the same output when nothing is dropped (``capacity_factor >= E / k``).
        balance_loss_coef: Multiplier already applied to ``aux_loss`` (0 keeps the value at zero).
    """

    @property
    def routing_dependent(self) -> bool:
        """True for the dropless path, whose expert batch sizes come from the routing (a host read), so ``count_macs``
        runs it on real batches; the capacity path has static shapes and is counted on the meta device."""
        return self.capacity_factor is None

    def __init__(
        self,
        hidden_size: int,
        mlp_hidden_size: int,
        num_experts: int = 8,
        experts_per_token: int = 2,
        num_shared_experts: int = 0,
        shared_expert_hidden_size: int | None = None,
        expert_type: Literal["gelu", "swiglu"] = "gelu",
        normalize_weights: bool = True,
        capacity_factor: float | None = None,
        balance_loss_coef: float = 0.01,
    ):
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"SparseMoE `num_experts` must be >= 1, got {num_experts}")
        if not 1 <= experts_per_token <= num_experts:
            raise ValueError(
                f"SparseMoE `experts_per_token`={experts_per_token} must be in [1, `num_experts`={num_experts}]"
            )
        if num_shared_experts < 0:
            raise ValueError(f"SparseMoE `num_shared_experts` must be >= 0, got {num_shared_experts}")
        if shared_expert_hidden_size is not None and shared_expert_hidden_size < 1:
            raise ValueError(
                f"SparseMoE `shared_expert_hidden_size` must be >= 1 or None, got {shared_expert_hidden_size}"
            )
        if capacity_factor is not None and capacity_factor <= 0:
            raise ValueError(f"SparseMoE `capacity_factor` must be > 0 or None, got {capacity_factor}")
        self.hidden_size = hidden_size
        self.mlp_hidden_size = mlp_hidden_size
        self.num_experts = num_experts
        self.experts_per_token = experts_per_token
        self.num_shared_experts = num_shared_experts
        self.shared_expert_hidden_size = shared_expert_hidden_size or mlp_hidden_size
        self.expert_type = expert_type
        self.normalize_weights = normalize_weights
        self.capacity_factor = capacity_factor
        self.balance_loss_coef = balance_loss_coef

        self.router = nn.Linear(hidden_size, num_experts, bias=False)
        self.experts = nn.ModuleList(
            [_make_expert(expert_type, hidden_size, mlp_hidden_size) for _ in range(num_experts)]
        )
        # n shared experts summed equal one MLP n times as wide (GELU: fc2 biases add up into one bias).
        shared_width = num_shared_experts * self.shared_expert_hidden_size
        self.shared_experts = _make_expert(expert_type, hidden_size, shared_width) if num_shared_experts else None
        self.aux_loss: torch.Tensor | None = None
        self.last_load: torch.Tensor | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """DiT's convention for the experts (Xavier uniform, zero biases); a near-uniform router (std 0.02)."""
        for module in self.modules():
            if isinstance(module, nn.Linear) and module is not self.router:
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.normal_(self.router.weight, std=0.02)

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, experts_per_token={self.experts_per_token}, "
            f"num_shared_experts={self.num_shared_experts}, "
            f"shared_expert_hidden_size={self.shared_expert_hidden_size}, "
            f"expert_type={self.expert_type}, normalize_weights={self.normalize_weights}, "
            f"capacity_factor={self.capacity_factor}"
        )

    def expert_capacity(self, num_tokens: int) -> int | None:
        """Most assignments one expert keeps in a call over ``num_tokens`` tokens (None without a capacity)."""
        if self.capacity_factor is None:
            return None
        return math.ceil(self.capacity_factor * num_tokens * self.experts_per_token / self.num_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, D, E, k = x.shape, x.shape[-1], self.num_experts, self.experts_per_token
        x_flat = x.reshape(-1, D)  # (M, D), M = N * T
        M = x_flat.shape[0]
        if M == 0:
            raise ValueError(f"SparseMoE got an input with no tokens, shape {tuple(shape)}")

        # 1. Route: softmax in float32 so bf16 autocast does not flatten close scores.
        probs = self.router(x_flat).float().softmax(dim=-1)  # (M, E)
        top_p, top_e = probs.topk(k, dim=-1)  # (M, k), best first
        weights = top_p / top_p.sum(dim=-1, keepdim=True) if self.normalize_weights else top_p

        # 2. Flatten the M * k assignments slot-major (every first choice, then every second choice, ...): assignment
        # a = slot * M + token. This is the capacity drop order, and a stable sort by expert keeps it per expert.
        flat_e = top_e.t().reshape(-1)  # (k * M,)
        flat_w = weights.t().reshape(-1)  # (k * M,)
        # scatter_add, not bincount: bincount reads the largest id back to the host on a GPU.
        counts = torch.zeros(E, dtype=torch.long, device=x.device).scatter_add_(0, flat_e, torch.ones_like(flat_e))

        # 3. Balance loss and load from the routing before any drop (Switch Transformer eq. 4,
        # https://arxiv.org/abs/2101.03961, with f_e counted over all k choices as in DiT-MoE).
        load = counts.float() / (M * k)  # f_e, (E,)
        self.aux_loss = self.balance_loss_coef * E * (load * probs.mean(dim=0)).sum()
        self.last_load = load.detach()

        # 4-5. Dispatch to the experts and combine their weighted outputs per token.
        if self.capacity_factor is None:
            out = self._dropless(x_flat, flat_e, flat_w, counts)
        else:
            out = self._capacity_padded(x_flat, flat_e, flat_w)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x_flat)
        return out.reshape(shape)  # (N, T, D)

    def _dropless(self, x_flat: torch.Tensor, flat_e: torch.Tensor, flat_w: torch.Tensor, counts: torch.Tensor):
        """Every assignment runs: each expert on its contiguous slice of the tokens sorted by expert.

        ``tolist()`` is the one host sync per call (torch.split needs Python sizes). An expert with no token still runs
        on its empty (0, D) slice: the output is unchanged, but every expert parameter is in the graph and gets a
        (zero) gradient, so plain DDP (find_unused_parameters=False) never waits for a missing one.
        """
        M, D = x_flat.shape
        order = torch.argsort(flat_e, stable=True)  # (k * M,), grouped by expert
        tok = order % M  # (k * M,), the token of each sorted assignment
        xs = x_flat.index_select(0, tok)  # (k * M, D)
        ys = torch.cat([expert(chunk) for expert, chunk in zip(self.experts, xs.split(counts.tolist()))])
        ys = ys * flat_w[order].to(ys.dtype).unsqueeze(1)  # (k * M, D)
        return torch.zeros(M, D, dtype=ys.dtype, device=x_flat.device).index_add_(0, tok, ys)  # (M, D)

    def _capacity_padded(self, x_flat: torch.Tensor, flat_e: torch.Tensor, flat_w: torch.Tensor) -> torch.Tensor:
        """Static shapes, no host sync: every expert gets a (C, D) batch, zero-padded, and all E run as one batched
        matmul on their stacked weights (after GShard, https://arxiv.org/abs/2006.16668, and Switch Transformer).

        Padding rows run through the experts too (E * C rows whatever the routing) but are never read back.
        """
        (M, D), E, k = x_flat.shape, self.num_experts, self.experts_per_token
        C = min(self.expert_capacity(M), M)  # an expert can't get more than one assignment per token
        # Rank of each assignment among its expert's, in the flat (slot, token) order: the first C are kept.
        # (F.one_hot would check the ids' range with two host reads.)
        one_hot = torch.zeros(k * M, E, dtype=torch.long, device=x_flat.device).scatter_(1, flat_e.unsqueeze(1), 1)
        rank = one_hot.cumsum(0).gather(1, flat_e.unsqueeze(1)).squeeze(1) - 1  # (k * M,)
        # Row of each assignment in the (E * C) expert batches; dropped assignments go to the spare row E * C.
        row = torch.where(rank < C, flat_e * C + rank, E * C)  # (k * M,)

        # 4. Dispatch: the token each batch row holds (empty rows hold the zero token M), then one gather.
        row_tok = torch.full((E * C + 1,), M, dtype=torch.long, device=x_flat.device)
        row_tok.scatter_(0, row, torch.arange(k * M, device=x_flat.device) % M)  # the spare row's value is unused
        x_pad = torch.cat([x_flat, x_flat.new_zeros(1, D)])  # (M + 1, D)
        xs = x_pad.index_select(0, row_tok[: E * C]).view(E, C, D)  # (E, C, D)
        ys = self._batched_experts(xs).reshape(E * C, D)  # (E * C, D)

        # 5. Combine: read each assignment's row back (dropped ones read a zero row) and sum the k weighted slots.
        ys = torch.cat([ys, ys.new_zeros(1, D)])  # (E * C + 1, D)
        y = ys.index_select(0, row).view(k, M, D) * flat_w.view(k, M, 1).to(ys.dtype)  # (k, M, D)
        return y.sum(0)  # (M, D)

    def _batched_experts(self, xs: torch.Tensor) -> torch.Tensor:
        """All experts on their (C, D) batches at once: (E, C, D) -> (E, C, D), with the experts' own weights stacked
        (a copy per call; the parameters and their state-dict names stay those of the per-expert modules)."""
        stack = lambda name: torch.stack([attrgetter(name)(expert) for expert in self.experts])  # noqa: E731
        if self.expert_type == "swiglu":
            gate = torch.bmm(xs, stack("gate_proj.weight").transpose(1, 2))  # (E, C, H)
            up = torch.bmm(xs, stack("up_proj.weight").transpose(1, 2))  # (E, C, H)
            return torch.bmm(F.silu(gate) * up, stack("down_proj.weight").transpose(1, 2))  # (E, C, D)
        h = torch.baddbmm(stack("fc1.bias").unsqueeze(1), xs, stack("fc1.weight").transpose(1, 2))  # (E, C, H)
        h = F.gelu(h, approximate="tanh")  # the Mlp's activation
        return torch.baddbmm(stack("fc2.bias").unsqueeze(1), h, stack("fc2.weight").transpose(1, 2))  # (E, C, D)

    def _expert_params(self) -> int:
        return sum(p.numel() for p in self.experts[0].parameters())

    def num_active_parameters(self) -> int:
        """Parameters one token uses: the router, k routed experts and the shared experts."""
        shared = sum(p.numel() for p in self.shared_experts.parameters()) if self.shared_experts is not None else 0
        return self.router.weight.numel() + self.experts_per_token * self._expert_params() + shared

    def macs_per_token(self) -> int:
        """Forward multiply-accumulates per token: router + k experts + shared experts (weight matmuls only)."""
        per_hidden = (3 if self.expert_type == "swiglu" else 2) * self.hidden_size  # MACs per hidden unit
        routed = self.experts_per_token * self.mlp_hidden_size
        shared = self.num_shared_experts * self.shared_expert_hidden_size
        return self.hidden_size * self.num_experts + per_hidden * (routed + shared)


#################################################################################
#                          Model-level helpers and upcycling                    #
#################################################################################


def moe_aux_loss(model: nn.Module) -> torch.Tensor:
    """Sum of ``aux_loss`` over the SparseMoE modules of ``model`` from their last forward (0 when none)."""
    losses = [m.aux_loss for m in model.modules() if isinstance(m, SparseMoE) and m.aux_loss is not None]
    if losses:
        return torch.stack(losses).sum()
    param = next(model.parameters(), None)
    return torch.zeros((), device=param.device if param is not None else None)


def expert_loads(model: nn.Module) -> dict[str, torch.Tensor]:
    """``last_load`` (E,) of every SparseMoE that has run, keyed by module name (``"blocks.0.mlp"``)."""
    return {
        name: m.last_load for name, m in model.named_modules() if isinstance(m, SparseMoE) and m.last_load is not None
    }


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(total, active) parameter counts; active counts k routed experts per SparseMoE instead of all E."""
    total = sum(p.numel() for p in model.parameters())
    inactive = sum(
        (m.num_experts - m.experts_per_token) * m._expert_params() for m in model.modules() if isinstance(m, SparseMoE)
    )
    return total, total - inactive


@torch.no_grad()
def upcycle(
    dense: DiT,
    num_experts: int,
    top_k: int,
    capacity_factor: float | None = None,
    balance_loss_coef: float = 0.01,
    router_init_std: float = 0.02,
) -> DiT:
    """A deep copy of ``dense`` whose every block MLP is a SparseMoE of ``num_experts`` copies of that MLP.

    The routing weights are renormalised over the ``top_k`` experts and there is no shared expert, so without a
    capacity limit the new model computes exactly the dense function whatever the router says. The router is
    drawn from N(0, ``router_init_std``) (0 gives zeros) from the global RNG: a random router spreads tokens over
    the experts, so they receive different gradients and can diverge. ``dense`` is left unchanged.

    Args:
        dense: A DiT whose ``blocks[i].mlp`` are dense ``Mlp`` modules.
        num_experts: Experts E per block.
        top_k: Experts per token k.
        capacity_factor: Passed to SparseMoE (dropping breaks the exact equivalence).
        balance_loss_coef: Passed to SparseMoE.
        router_init_std: Standard deviation of the new router weights.
    """
    model = copy.deepcopy(dense)
    for i, block in enumerate(model.blocks):
        mlp = block.mlp
        if not isinstance(mlp, Mlp):
            raise TypeError(f"upcycle: blocks.{i}.mlp is {type(mlp).__name__}, expected a dense Mlp")
        moe = SparseMoE(
            mlp.fc1.in_features,
            mlp.fc1.out_features,
            num_experts=num_experts,
            experts_per_token=top_k,
            num_shared_experts=0,
            expert_type="gelu",
            normalize_weights=True,
            capacity_factor=capacity_factor,
            balance_loss_coef=balance_loss_coef,
        ).to(device=mlp.fc1.weight.device, dtype=mlp.fc1.weight.dtype)
        for expert in moe.experts:
            expert.load_state_dict(mlp.state_dict())
        if router_init_std > 0:
            nn.init.normal_(moe.router.weight, std=router_init_std)
        else:
            moe.router.weight.zero_()
        moe.train(mlp.training)
        block.mlp = moe
    return model


_SUFFIX = re.compile(r"^(?P<base>.+)-(?P<experts>\d+)E(?P<active>\d+)A$")


def parse_moe_suffix(name: str) -> tuple[str, int, int] | None:
    """Splits a preset name with the paper's MoE suffix: ``"DiT-S/2-8E2A"`` -> ``("DiT-S/2", 8, 2)``.

    Returns None for a name without a ``-<E>E<k>A`` suffix (upper-case E and A, e.g. a dense ``"t3"``), and raises
    ValueError for a suffix that cannot be built (E < 1, k < 1 or k > E). The base name is not checked here.
    """
    match = _SUFFIX.match(name)
    if match is None:
        return None
    base, num_experts, top_k = match["base"], int(match["experts"]), int(match["active"])
    if num_experts < 1 or not 1 <= top_k <= num_experts:
        raise ValueError(
            f"Model preset {name!r}: the MoE suffix needs 1 <= active experts ({top_k}) <= experts ({num_experts})"
        )
    return base, num_experts, top_k


_MOE_KEYS = (
    "num_experts",
    "experts_per_token",
    "num_shared_experts",
    "shared_expert_hidden_size",
    "expert_type",
    "normalize_weights",
    "capacity_factor",
    "balance_loss_coef",
)


def moe_config(model: nn.Module) -> dict | None:
    """The SparseMoE settings of a model (those of its first MoE layer), or None for a dense model."""
    layer = next((m for m in model.modules() if isinstance(m, SparseMoE)), None)
    return None if layer is None else {key: getattr(layer, key) for key in _MOE_KEYS}


_EXPERT_KEY = re.compile(r"^blocks\.0\.mlp\.experts\.(\d+)\.")


def infer_moe_config(state: Mapping[str, torch.Tensor], num_shared_experts: int | None = None) -> dict | None:
    """The parts of a network's SparseMoE layout that its tensors show (None for a dense state dict).

    ``num_experts`` from the ``blocks.0.mlp.experts.<i>`` keys, ``expert_type`` from the expert's parameter names
    (``gate_proj``: swiglu, ``fc1``: gelu), and the shared experts from the fused ``shared_experts`` width W: split
    into ``num_shared_experts`` experts when given and W divides, else into W / (routed expert width) experts when
    that divides, else one expert of width W (the same function and parameters either way). Top-k and the weight
    normalisation leave no trace in the tensors: the caller takes them from the file's metadata.
    """
    prefix = "blocks.0.mlp."
    ids = {int(m[1]) for key in state if (m := _EXPERT_KEY.match(key))}
    if not ids:
        return None
    swiglu = f"{prefix}experts.0.gate_proj.weight" in state
    first = "gate_proj" if swiglu else "fc1"
    hidden = state[f"{prefix}experts.0.{first}.weight"].shape[0]
    shared = state.get(f"{prefix}shared_experts.{first}.weight")
    width = 0 if shared is None else shared.shape[0]
    if width == 0:
        count, each = 0, hidden
    elif num_shared_experts and width % num_shared_experts == 0:
        count, each = num_shared_experts, width // num_shared_experts
    elif width % hidden == 0:
        count, each = width // hidden, hidden
    else:
        count, each = 1, width
    return dict(
        num_experts=max(ids) + 1,
        num_shared_experts=count,
        shared_expert_hidden_size=each,
        expert_type="swiglu" if swiglu else "gelu",
    )


def to_moe(model: DiT, config: dict) -> DiT:
    """Replaces every block MLP of ``model`` in place by a freshly initialised SparseMoE with ``config``
    (``moe_config`` keys); the layout to load an MoE checkpoint into."""
    for block in model.blocks:
        dim, hidden = block.mlp.fc1.in_features, block.mlp.fc1.out_features
        device = block.mlp.fc1.weight.device
        block.mlp = SparseMoE(dim, hidden, **{k: config[k] for k in _MOE_KEYS if k in config}).to(device)
    return model
