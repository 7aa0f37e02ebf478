"""Diffusion Transformer (DiT) with adaLN-Zero conditioning, in the official DiT parameter layout.

Architecture after Peebles & Xie, "Scalable Diffusion Models with Transformers" (https://arxiv.org/abs/2212.09748);
parameter names match the public DiT checkpoints so they load with ``strict=True``. Shape letters: N batch,
T tokens, D width, C/H/W image.
"""

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation of token features ``x`` (N, T, D) by per-sample ``shift`` and ``scale`` (N, D)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


#################################################################################
#                     Embedding layers for timesteps and labels                 #
#################################################################################


class PatchEmbed(nn.Module):
    """Image to patch tokens with one strided convolution (``x_embedder.proj`` in DiT checkpoints)."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor, task_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Embeds ``x`` (N, C, H, W) -> (N, T, D). ``task_ids`` is unused: the call signature of
        ``PatchEmbedRouter``, which embeds each sample with its task's projection."""
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """Embeds scalar diffusion timesteps into vectors: sinusoidal features, then a two-layer MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        """Sinusoidal timestep features (N, dim), cosines first, as in GLIDE and DiT."""
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))  # (N, D)


class LabelEmbedder(nn.Module):
    """Embeds class labels (or task ids); an extra last row is the "null" label used for classifier-free guidance."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        use_cfg_embedding = dropout_prob > 0
        self.embedding_table = nn.Embedding(num_classes + use_cfg_embedding, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Replaces a random ``dropout_prob`` fraction of labels (or the forced ones) by the null label."""
        if force_drop_ids is None:
            drop_ids = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop_ids = force_drop_ids == 1
        return torch.where(drop_ids, self.num_classes, labels)

    def forward(self, labels: torch.Tensor, train: bool, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)  # (N, D)


#################################################################################
#                                 Core DiT model                                #
#################################################################################


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection, computed by ``F.scaled_dot_product_attention``."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden_size={dim} must be divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, T, D = x.shape
        qkv = self.qkv(x).reshape(N, T, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (N, heads, T, D / heads)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(N, T, D))


class Mlp(nn.Module):
    """Transformer MLP: fc1 -> GELU(tanh) -> fc2."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim, bias=True)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_dim, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """A DiT block with adaptive layer norm zero (adaLN-Zero) conditioning."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        # A mixture-of-experts MLP (models/moe.py) returns its output only; its balance loss is kept on the module.
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x  # (N, T, D)


class FinalLayer(nn.Module):
    """The final layer of DiT: adaLN-modulated norm, then a linear map to per-patch pixels."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (N, T, p * p * C_out)


class DiT(nn.Module):
    """Diffusion model with a Transformer backbone.

    Args:
        input_size: Side of the (square) latent grid the position embedding is built for.
        patch_size: Side of one patch in latent pixels.
        in_channels: Input channels (for perception fine-tuning: (k + 1) x latent channels).
        hidden_size: Token width D.
        depth: Number of DiT blocks.
        num_heads: Attention heads.
        mlp_ratio: MLP hidden width / D.
        class_dropout_prob: Label dropout for classifier-free guidance (adds a null-label row when > 0).
        num_classes: Rows of the label table (classes for pretraining; tasks for perception).
        learn_sigma: Also predict the variance (doubles the output channels), as the official checkpoints do.
        out_channels: Predicted channels before the sigma doubling; defaults to ``in_channels`` as in DiT.
    """

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
        out_channels: int | None = None,
    ):
        super().__init__()
        for key, value in dict(
            input_size=input_size,
            patch_size=patch_size,
            in_channels=in_channels,
            hidden_size=hidden_size,
            depth=depth,
            num_heads=num_heads,
            num_classes=num_classes,
        ).items():
            if value <= 0:
                raise ValueError(f"DiT `{key}` must be positive, got {value}")
        if input_size % patch_size:
            raise ValueError(f"DiT `input_size`={input_size} must be a multiple of `patch_size`={patch_size}")
        self.learn_sigma = learn_sigma
        self.in_channels = in_channels
        self.base_out_channels = out_channels or in_channels
        self.out_channels = self.base_out_channels * 2 if learn_sigma else self.base_out_channels
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.input_size = input_size
        self.hidden_size, self.mlp_ratio = hidden_size, mlp_ratio
        self._pos_cache: dict = {}

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        num_patches = (input_size // patch_size) ** 2
        # Fixed sin-cos embedding; a buffer-like parameter so it sits in the state dict as in DiT checkpoints.
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    @property
    def config(self) -> dict:
        """Constructor keywords that rebuild this network's dense layout (after any input widening)."""
        return dict(
            input_size=self.input_size,
            patch_size=self.patch_size,
            in_channels=max(self.x_embedder.in_channels)
            if hasattr(self.x_embedder, "routes")
            else self.x_embedder.proj.in_channels,
            hidden_size=self.hidden_size,
            depth=len(self.blocks),
            num_heads=self.num_heads,
            mlp_ratio=self.mlp_ratio,
            class_dropout_prob=self.y_embedder.dropout_prob,
            num_classes=self.y_embedder.num_classes,
            learn_sigma=self.learn_sigma,
            out_channels=self.base_out_channels,
        )

    def initialize_weights(self) -> None:
        # Transformer layers: Xavier uniform weights, zero biases.
        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                torch.nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)

        self.apply(_basic_init)
        self.pos_embed.data.copy_(sincos_pos_embed(self.pos_embed.shape[-1], self.input_size // self.patch_size))
        # Patch embedding initialised like a linear layer over the flattened patch.
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.constant_(self.x_embedder.proj.bias, 0)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        # adaLN-Zero: every block starts as the identity, the output starts at zero.
        for block in self.blocks:
            nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(block.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)

    def unpatchify(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """(N, T, p * p * C) tokens -> (N, C, H, W) image; each token's features are laid out (p, p, C)."""
        p, c = self.patch_size, self.out_channels
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def _pos_embed_for(self, h: int, w: int, x: torch.Tensor) -> torch.Tensor:
        if h * w == self.pos_embed.shape[1] and h == w:
            return self.pos_embed
        # Another grid than the one built for (e.g. a non-square prediction input): the fixed embedding of that grid,
        # computed once per grid, device and dtype.
        key = (h, w, x.device, x.dtype)
        if key not in self._pos_cache:
            self._pos_cache[key] = sincos_pos_embed(self.pos_embed.shape[-1], (h, w)).to(x.device, x.dtype)[None]
        return self._pos_cache[key]

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, force_drop_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Predicts noise (and sigma) for latents ``x`` (N, C, H, W) at timesteps ``t`` (N,) with labels ``y`` (N,).

        ``force_drop_ids`` (N,): the labels to replace by the null label (where 1 / True) instead of the label
        embedder's own random draw in training mode (DiT's ``LabelEmbedder.token_drop``)."""
        h, w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        # A task router (models/router.py) embeds each sample with its task's projection; y holds the task ids.
        x = self.x_embedder(x, y) + self._pos_embed_for(h, w, x)  # (N, T, D), where T = H * W / patch_size ** 2
        c = self.t_embedder(t) + self.y_embedder(y, self.training, force_drop_ids)  # (N, D)
        for block in self.blocks:
            x = block(x, c)  # (N, T, D)
        x = self.final_layer(x, c)  # (N, T, patch_size ** 2 * out_channels)
        return self.unpatchify(x, h, w)  # (N, out_channels, H, W)

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float) -> torch.Tensor:
        """Classifier-free guidance: conditional and unconditional predictions in one batch, then mixed."""
        y_null = torch.full_like(y, self.y_embedder.num_classes)
        out = self.forward(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, y_null]))
        cond, uncond = out.chunk(2)
        return uncond + cfg_scale * (cond - uncond)


#################################################################################
#                   Sine/Cosine Positional Embedding Functions                  #
#################################################################################
# After MAE: https://github.com/facebookresearch/mae/blob/main/util/pos_embed.py


def sincos_pos_embed(embed_dim: int, grid_size: int | tuple[int, int]) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding (T, D) for a grid, rows first; half the channels encode each axis."""
    gh, gw = (grid_size, grid_size) if isinstance(grid_size, int) else grid_size
    grid_w, grid_h = np.meshgrid(np.arange(gw, dtype=np.float64), np.arange(gh, dtype=np.float64))
    # DiT encodes the column index with the first half of the channels and the row index with the second.
    emb = np.concatenate([_sincos_1d(embed_dim // 2, grid_w), _sincos_1d(embed_dim // 2, grid_h)], axis=1)
    return torch.from_numpy(emb).float()


def _sincos_1d(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    omega = 1.0 / 10000 ** (np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0))
    out = np.einsum("m,d->md", pos.reshape(-1), omega)  # (T, D / 2)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


#################################################################################
#                                   DiT Configs                                 #
#################################################################################

# name -> (hidden_size, depth, num_heads); the patch size is part of the name.
_SIZES = {"S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16), "XL": (1152, 28, 16)}
# The tiny ladder for CPU sweeps: width 64 * i, depth 2 * i, 4 heads.
_TINY = {f"t{i}": (64 * i, 2 * i, 4, 4) for i in range(1, 7)}

# The a1..a6 ladder for GPU-scale size sweeps (paper §3.1, Table 1): width and depth grow together with 16 heads and
# patch 2 throughout. a2..a5 are the paper authors' released models; a1 and a6 were not released and are extrapolated
# by the paper's rule: depth +4 per step (a1 = 12, a6 = 32), widths that keep 16 heads, continuing a2..a4's +256 steps
# down to a1 = 256 and a4 -> a5's +512 step up to a6 = 2048.
_LADDER = {
    "a1": (256, 12, 16, 2),  # extrapolated
    "a2": (512, 16, 16, 2),
    "a3": (768, 20, 16, 2),
    "a4": (1024, 24, 16, 2),
    "a5": (1536, 28, 16, 2),
    "a6": (2048, 32, 16, 2),  # extrapolated
}

DiT_models = {
    f"DiT-{s}/{p}": dict(hidden_size=d, depth=n, num_heads=h, patch_size=p)
    for s, (d, n, h) in _SIZES.items()
    for p in (2, 4, 8)
}
DiT_models.update(
    {
        name: dict(hidden_size=d, depth=n, num_heads=h, patch_size=p)
        for name, (d, n, h, p) in {**_LADDER, **_TINY}.items()
    }
)
