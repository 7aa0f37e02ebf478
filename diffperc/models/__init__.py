"""Networks: DiT, presets and the conversions between them (tensors in, tensors out; no Lightning, no I/O
except ``load_pretrained``, which reads weight files)."""

from diffperc.models.build import MOE_PRESETS, build_model, widen_input_projection
from diffperc.models.dit import DiT, DiT_models, sincos_pos_embed
from diffperc.models.moe import (
    SparseMoE,
    expert_loads,
    moe_aux_loss,
    moe_config,
    parameter_counts,
    parse_moe_suffix,
    to_moe,
    upcycle,
)
from diffperc.models.pretrained import (
    drop_sigma,
    load_pretrained,
    read_network_state,
    task_embedding_rows,
    widen_patch_embedding,
)

__all__ = [
    "DiT",
    "DiT_models",
    "MOE_PRESETS",
    "SparseMoE",
    "build_model",
    "drop_sigma",
    "expert_loads",
    "load_pretrained",
    "moe_aux_loss",
    "moe_config",
    "parameter_counts",
    "parse_moe_suffix",
    "read_network_state",
    "sincos_pos_embed",
    "task_embedding_rows",
    "to_moe",
    "upcycle",
    "widen_input_projection",
    "widen_patch_embedding",
]
