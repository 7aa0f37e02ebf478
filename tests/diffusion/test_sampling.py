import pytest
import torch

from diffperc.diffusion import DiffusionSettings, InferenceSettings, make_sampler, make_train_scheduler, sample_ensemble
from diffperc.models import DiT, widen_input_projection

from helpers import tiny_dit


def _net() -> DiT:
    model = tiny_dit(num_classes=1, randomize=0.05)
    return widen_input_projection(model, 2).eval()


@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_batched_and_one_by_one_ensembles_give_identical_members(eta):
    net, cond, y = _net(), torch.randn(3, 3, 8, 8), torch.zeros(3, dtype=torch.long)
    sampler = make_sampler(make_train_scheduler(DiffusionSettings()), "trailing", clip_sample=True)
    batched = sample_ensemble(net, cond, y, sampler, InferenceSettings(num_steps=3, ensemble_size=4, eta=eta), 3)
    one_by_one = sample_ensemble(
        net, cond, y, sampler, InferenceSettings(num_steps=3, ensemble_size=4, eta=eta, max_batch=1), 3
    )
    assert batched.shape == (4, 3, 3, 8, 8)
    torch.testing.assert_close(batched, one_by_one, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(batched[0], batched[1])  # members differ: each has its own noise


def test_timestep_spacing_sets_the_first_timestep():
    train = make_train_scheduler(DiffusionSettings())
    firsts = {}
    for spacing in ("leading", "trailing", "linspace"):
        sampler = make_sampler(train, spacing, clip_sample=False)
        sampler.set_timesteps(10)
        firsts[spacing] = sampler.timesteps[0].item()
    # trailing starts from pure noise (t = 999); leading with 10 of 1000 steps starts at 900.
    assert firsts == {"leading": 900, "trailing": 999, "linspace": 999}


def test_inference_settings_reject_bad_values_naming_the_flag():
    with pytest.raises(ValueError, match="--model.inference.ensemble_size"):
        InferenceSettings(ensemble_size=0)
    with pytest.raises(ValueError, match="--model.inference.reducer"):
        InferenceSettings(reducer="max")
    with pytest.raises(ValueError, match="--model.diffusion.prediction_type"):
        DiffusionSettings(prediction_type="noise")


class _Affine(torch.nn.Module):
    """A network with a known answer: out = 0.5 * noisy target - 0.25 * condition + t / 4000 + 0.1 * y."""

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        cond, target = x[:, :3], x[:, 3:]
        return 0.5 * target - 0.25 * cond + (t.float() / 4000 + 0.1 * y.float()).view(-1, 1, 1, 1)


def _ddim_by_hand(net, cond, y, alphas_cumprod, timesteps, step, noise, prediction_type):
    """Deterministic DDIM (eta 0, no clipping), written from the paper's formulas: from x_t, the clean estimate
    x0 and the noise estimate eps, then x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev) eps, abar_prev = 1 after
    the last step (``set_alpha_to_one``)."""
    x = noise
    for t in timesteps:
        out = net(torch.cat([cond, x], dim=1), torch.full((x.shape[0],), t), y).double()
        a = alphas_cumprod[t]
        if prediction_type == "epsilon":
            eps = out
            x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        else:  # v = sqrt(a) eps - sqrt(1 - a) x0
            x0 = a.sqrt() * x - (1 - a).sqrt() * out
            eps = a.sqrt() * out + (1 - a).sqrt() * x
        prev = t - step
        a_prev = alphas_cumprod[prev] if prev >= 0 else torch.tensor(1.0, dtype=torch.float64)
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    return x


@pytest.mark.parametrize(
    "prediction_type, spacing, steps", [("epsilon", "leading", 4), ("v_prediction", "trailing", 2)]
)
def test_sample_ensemble_equals_ddim_computed_by_hand(prediction_type, spacing, steps):
    # The sampler behind every reported metric, against the DDIM update written out: same initial noise (member m
    # draws from derive_seed(seed, m, stream=0)), same timesteps, same clean-sample and noise estimates.
    from diffperc.seeding import derive_seed

    train = make_train_scheduler(DiffusionSettings(prediction_type=prediction_type, beta_schedule="scaled_linear"))
    sampler = make_sampler(train, spacing, clip_sample=False)
    settings = InferenceSettings(num_steps=steps, ensemble_size=3, timestep_spacing=spacing, seed=11, max_batch=4)
    cond, y = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1])
    with torch.inference_mode():
        members = sample_ensemble(_Affine(), cond, y, sampler, settings, out_channels=3)

    T = train.config.num_train_timesteps
    step = T // steps
    first = T - 1 if spacing == "trailing" else (steps - 1) * step  # 999, 499 / 750, 500, 250, 0
    timesteps = [first - i * step for i in range(steps)]
    assert sampler.timesteps.tolist() == timesteps
    alphas_cumprod = train.alphas_cumprod.double()
    for m in range(3):
        g = torch.Generator().manual_seed(derive_seed(11, m, stream=0))
        noise = torch.randn((2, 3, 4, 4), generator=g).double()
        expected = _ddim_by_hand(_Affine(), cond.double(), y, alphas_cumprod, timesteps, step, noise, prediction_type)
        torch.testing.assert_close(members[m].double(), expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(members[0], members[1])  # members draw different noise
