"""Task-routed patch embedding for one model that does several tasks (paper §6.4).

Tasks condition on different numbers of images, so their inputs have different widths: route i embeds the first
``in_channels[i]`` channels of its samples with its own strided convolution. Inputs are laid out per sample as
[condition latents, noisy target, zero padding to the widest route], so each route sees exactly the single-task
layout and a single-task checkpoint's ``x_embedder.proj`` can seed it. State-dict layout:
``x_embedder.routes.<i>.proj.{weight,bias}``, route i for task id i.
"""

import torch
from torch import nn

from diffperc.models.dit import PatchEmbed


class PatchEmbedRouter(nn.Module):
    """One patch embedding per task, chosen per sample by its task id.

    Args:
        in_channels: Input channels of each task's route, indexed by task id.
        patch_size: Patch side in latent pixels.
        hidden_size: Token width D.
    """

    #: Which route runs depends on the task ids, so ``count_macs`` counts on real tensors, not on the meta device.
    routing_dependent = True

    def __init__(self, in_channels: list[int], patch_size: int, hidden_size: int):
        super().__init__()
        if not in_channels or min(in_channels) <= 0:
            raise ValueError(f"PatchEmbedRouter needs one positive width per task, got {in_channels}")
        self.in_channels = list(in_channels)
        self.patch_size = patch_size
        self.routes = nn.ModuleList([PatchEmbed(patch_size, c, hidden_size) for c in in_channels])

    @classmethod
    def from_patch_embed(cls, embed: PatchEmbed, num_inputs: list[int]) -> "PatchEmbedRouter":
        """Routes initialised from one pretrained one-latent embedding by the widening rule: route i takes
        ``num_inputs[i]`` latents, its weights repeated ``num_inputs[i]`` times and divided by it."""
        proj = embed.proj
        router = cls([proj.in_channels * n for n in num_inputs], embed.patch_size, proj.out_channels)
        router.to(device=proj.weight.device, dtype=proj.weight.dtype)
        with torch.no_grad():
            for route, n in zip(router.routes, num_inputs):
                route.proj.weight.copy_(proj.weight.repeat(1, n, 1, 1) / n)
                route.proj.bias.copy_(proj.bias)
        return router

    def forward(self, x: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        """Embeds ``x`` (N, C_max, H, W) -> (N, T, D); sample n goes through route ``task_ids[n]``."""
        groups = [(i, torch.nonzero(task_ids == i).flatten()) for i in range(len(self.routes))]
        groups = [(i, idx) for i, idx in groups if idx.numel()]
        if len(groups) == 1 and groups[0][1].numel() == x.shape[0]:  # one task: no gather/scatter
            i = groups[0][0]
            out = self.routes[i](x[:, : self.in_channels[i]])
        else:  # one batched convolution per task present in the batch
            out = None
            for i, idx in groups:
                tokens = self.routes[i](x.index_select(0, idx)[:, : self.in_channels[i]])  # (n_i, T, D)
                if out is None:
                    out = tokens.new_zeros(x.shape[0], *tokens.shape[1:])
                out = out.index_copy(0, idx, tokens)
        if torch.is_grad_enabled() and len(groups) < len(self.routes):
            # DDP without find_unused_parameters needs every parameter in every step's graph: a task absent from the
            # batch adds its route times 0, so that route's gradient is an exact zero instead of missing.
            present = {i for i, _ in groups}
            unused = [p.sum() for i, r in enumerate(self.routes) if i not in present for p in r.parameters()]
            out = out + torch.stack(unused).sum().to(out.dtype) * 0
        return out
