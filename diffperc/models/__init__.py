"""Networks: DiT, presets and the conversions between them (tensors in, tensors out; no Lightning, no I/O
except ``load_pretrained``, which reads weight files)."""

from diffperc.models.build import MOE_PRESETS, build_model, widen_input_projection
from diffperc.models.dit import DiT, DiT_models, sincos_pos_embed
from diffperc.models.moe import SparseMoE, expert_loads, moe_aux_loss, parameter_counts, parse_moe_suffix, upcycle
from diffperc.models.pretrained import drop_sigma, load_pretrained, task_embedding_rows, widen_patch_embedding

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
    "parameter_counts",
    "parse_moe_suffix",
    "sincos_pos_embed",
    "task_embedding_rows",
    "upcycle",
    "widen_input_projection",
    "widen_patch_embedding",
]
