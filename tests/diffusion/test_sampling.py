import pytest
import torch

from diffperc.diffusion import DiffusionSettings, InferenceSettings, make_sampler, make_train_scheduler, sample_ensemble
from diffperc.models import DiT, widen_input_projection


def _net() -> DiT:
    model = DiT(
        input_size=8,
        patch_size=2,
        in_channels=3,
        hidden_size=32,
        depth=1,
        num_heads=2,
        num_classes=1,
        class_dropout_prob=0.0,
        learn_sigma=False,
    )
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
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
