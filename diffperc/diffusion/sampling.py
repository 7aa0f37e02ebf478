"""DDIM sampling of image-to-image predictions with batched test-time ensembles.

All ensemble members of all inputs in a batch go through the network together (in chunks of ``max_batch`` rows);
member ``m`` always draws its noise from its own generator seeded by (seed, m), so chunking never changes a member.
"""

from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler
from torch import nn

from diffperc.seeding import derive_seed

REDUCERS = ("median", "mean", "median_compilation")


@dataclass
class InferenceSettings:
    """Test-time compute: sampling steps, ensemble size and how members are merged (used by validate/test/predict).

    Args:
        num_steps: DDIM denoising steps.
        ensemble_size: Predictions from different noise merged into one (N in the paper).
        reducer: How members are merged: ``median``, ``mean`` or ``median_compilation``; None = the task's default.
        timestep_spacing: DDIM timestep spacing. ``trailing`` (default) starts at the last training timestep, i.e.
            from pure noise, for any step count; ``leading`` with few steps starts far from t = T - 1 (e.g. t = 900
            for 10 steps of 1000), where training never saw pure-noise inputs, which hurts few-step inference.
        eta: DDIM stochasticity (0 = deterministic DDIM).
        seed: Seed of the sampling noise; member m uses seed (seed, m).
        max_batch: Rows (members x inputs) per network call.
        clip_sample: Clip DDIM's clean-sample estimate to [-1, 1]; None = the codec's choice (true in pixel space).
    """

    num_steps: int = 10
    ensemble_size: int = 1
    reducer: str | None = None
    timestep_spacing: str = "trailing"
    eta: float = 0.0
    seed: int = 0
    max_batch: int = 64
    clip_sample: bool | None = None

    def __post_init__(self):
        for key in ("num_steps", "ensemble_size", "max_batch"):
            if getattr(self, key) < 1:
                raise ValueError(f"`--model.inference.{key}` must be >= 1, got {getattr(self, key)}")
        if self.reducer is not None and self.reducer not in REDUCERS:
            raise ValueError(f"`--model.inference.reducer` must be one of {REDUCERS}, got {self.reducer!r}")
        if self.eta < 0:
            raise ValueError(f"`--model.inference.eta` must be >= 0, got {self.eta}")


def _member_generator(seed: int, member: int, stream: int, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(derive_seed(seed, member, stream=stream))
    return g


@torch.no_grad()
def sample_ensemble(
    net: nn.Module,
    cond: torch.Tensor,
    y: torch.Tensor,
    sampler: DDIMScheduler,
    settings: InferenceSettings,
    out_channels: int,
    cfg_scale: float | None = None,
) -> torch.Tensor:
    """Denoises ``settings.ensemble_size`` target latents per input: the one DDIM loop behind validation, test,
    predict and the pretraining sample grids.

    Args:
        net: The DiT; called as ``net(x, t, y)`` on [cond, noisy target] concatenated on channels.
        cond: Condition latents (B, C_cond, h, w), encoded once and shared by all members.
        y: Labels / task ids (B,).
        sampler: A DDIM scheduler; ``set_timesteps`` is called here.
        settings: Steps, ensemble size, eta, seed and chunking.
        out_channels: Channels of the target latent (the network may also output sigma channels; they are dropped).
        cfg_scale: Classifier-free guidance for class-conditional generation (``cond`` with 0 channels):
            eps = eps_null + w (eps_class - eps_null) through ``net.forward_with_cfg``; None = the conditional model.

    Returns:
        Clean target latents (N, B, out_channels, h, w) for N = ``settings.ensemble_size`` members.
    """
    B, _, h, w = cond.shape
    N = settings.ensemble_size
    device = cond.device
    sampler.set_timesteps(settings.num_steps)  # on the host: reading a timestep costs no device sync
    timesteps = sampler.timesteps.tolist()
    members_per_call = max(1, settings.max_batch // B)
    out = []
    for first in range(0, N, members_per_call):
        members = range(first, min(N, first + members_per_call))
        gens = [_member_generator(settings.seed, m, 0, device) for m in members]
        eta_gens = [_member_generator(settings.seed, m, 1, device) for m in members]
        latents = torch.cat([torch.randn((B, out_channels, h, w), generator=g, device=device) for g in gens])
        latents = latents * sampler.init_noise_sigma
        cond_rep = cond.repeat(len(members), 1, 1, 1)  # (M * B, C_cond, h, w): encoded once, reused per member
        y_rep = y.repeat(len(members))
        for t in timesteps:
            t_batch = torch.full((latents.shape[0],), t, dtype=torch.long, device=device)
            x = torch.cat([cond_rep, latents], dim=1)
            if cfg_scale is None:
                model_out = net(x, t_batch, y_rep)[:, :out_channels]
            else:
                model_out = net.forward_with_cfg(x, t_batch, y_rep, cfg_scale)[:, :out_channels]
            variance_noise = None
            if settings.eta > 0:
                variance_noise = torch.cat(
                    [torch.randn((B, out_channels, h, w), generator=g, device=device) for g in eta_gens]
                )
            latents = sampler.step(
                model_out.float(), t, latents, eta=settings.eta, variance_noise=variance_noise
            ).prev_sample
        out.append(latents.view(len(members), B, out_channels, h, w))
    return torch.cat(out)  # (N, B, C, h, w)
