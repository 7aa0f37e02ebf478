"""Tests for the test-time ensemble reducers: hand-computed medians and means, Marigold median compilation."""

import importlib.util
import math
import sys
import types

import pytest
import scipy.optimize
import torch

from diffperc.diffusion.ensemble import _alignment_cost, _fit_alignment, ensemble


def _marigold_depth_pipeline(monkeypatch) -> type:
    """diffusers' ``MarigoldDepthPipeline``, the reference for median compilation (its static ``ensemble_depth``).

    Its module imports transformers' CLIP classes for the pipeline's text encoder, which ``ensemble_depth`` never
    touches; transformers is no dependency of diffperc (and costs every process a second of import through
    torchmetrics), so where it is not installed two empty classes stand in for those names while the module loads.
    """
    import diffusers.pipelines  # noqa: F401  (diffusers looks transformers up once, when it is imported)

    if importlib.util.find_spec("transformers") is None:
        names = types.ModuleType("transformers")
        names.CLIPTextModel, names.CLIPTokenizer = type("CLIPTextModel", (), {}), type("CLIPTokenizer", (), {})
        monkeypatch.setitem(sys.modules, "transformers", names)
    from diffusers.pipelines.marigold.pipeline_marigold_depth import MarigoldDepthPipeline

    return MarigoldDepthPipeline


def _perturbed_copies(depth: torch.Tensor, num_members: int, noise: float, seed: int) -> torch.Tensor:
    """(N, B, 1, H, W) members s_i * (depth + noise * eps_i) + t_i with s_i in [0.5, 2.5] and t_i in [-1, 1]."""
    gen = torch.Generator().manual_seed(seed)
    scale = 0.5 + 2.0 * torch.rand(num_members, 1, 1, 1, 1, generator=gen)
    shift = 2.0 * torch.rand(num_members, 1, 1, 1, 1, generator=gen) - 1.0
    eps = torch.randn(num_members, *depth.shape, generator=gen)
    return scale * (depth + noise * eps) + shift


def _aligned_rms(pred: torch.Tensor, target: torch.Tensor) -> float:
    """RMS of pred - target after the least-squares scale and shift of pred to target."""
    design = torch.stack([pred.flatten(), torch.ones_like(pred.flatten())], dim=1).double()
    coef = torch.linalg.lstsq(design, target.flatten().double()[:, None]).solution
    return (design @ coef - target.flatten().double()[:, None]).pow(2).mean().sqrt().item()


def test_ensemble_median_identical_members_exact():
    member = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    merged, mad = ensemble(member.expand(5, -1, -1, -1, -1).clone(), "median")
    assert merged.shape == (2, 3, 8, 8) and mad.shape == (2, 1, 8, 8)
    assert torch.equal(merged, member)
    assert torch.equal(mad, torch.zeros(2, 1, 8, 8))


def test_ensemble_median_even_n_takes_lower_median():
    # Two pixels, N = 4. Pixel 0: sorted [0, 1, 5, 10] -> lower median 1; |x - 1| sorted [0, 1, 4, 9] -> MAD 1
    # (the two-middle average would give 3 and 2.5). Pixel 1: sorted [-1, 3, 7, 8] -> 3; |x - 3| = [5, 4, 4, 0] -> 4.
    preds = torch.tensor([[0.0, 8.0], [10.0, -1.0], [1.0, 7.0], [5.0, 3.0]]).view(4, 1, 1, 1, 2)
    merged, mad = ensemble(preds, "median")
    torch.testing.assert_close(merged, torch.tensor([1.0, 3.0]).view(1, 1, 1, 2), rtol=0, atol=0)
    torch.testing.assert_close(mad, torch.tensor([1.0, 4.0]).view(1, 1, 1, 2), rtol=0, atol=0)
    # Odd N: [3, 1, 2] -> 2, |x - 2| = [1, 1, 0] -> 1.
    merged, mad = ensemble(torch.tensor([3.0, 1.0, 2.0]).view(3, 1, 1, 1), "median")
    assert merged.item() == 2.0 and mad.item() == 1.0


def test_ensemble_mean_hand_computed():
    # One input as (N, C, H, W) = (4, 2, 1, 1). Channel 0: [1, 2, 3, 6] -> mean 3, unbiased std sqrt(14 / 3).
    # Channel 1: [0, 0, 0, 4] -> mean 1, std sqrt(12 / 3) = 2. The uncertainty is the channel average.
    preds = torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [6.0, 4.0]], dtype=torch.float64).view(4, 2, 1, 1)
    merged, std = ensemble(preds, "mean")
    assert merged.dtype == torch.float64 and merged.shape == (1, 2, 1, 1) and std.shape == (1, 1, 1, 1)
    torch.testing.assert_close(merged.flatten(), torch.tensor([3.0, 1.0], dtype=torch.float64))
    assert std.item() == pytest.approx((math.sqrt(14 / 3) + 2.0) / 2, rel=1e-12)
    # One member: the merge is the member and the spread is 0, not NaN; output_uncertainty=False gives None.
    merged, std = ensemble(preds[:1], "mean")
    assert torch.equal(merged, preds[:1]) and torch.equal(std, torch.zeros(1, 1, 1, 1, dtype=torch.float64))
    assert ensemble(preds, "median", output_uncertainty=False)[1] is None


def test_ensemble_rejects_bad_input():
    preds = torch.zeros(3, 2, 1, 4, 4)
    with pytest.raises(ValueError, match=r"mean, median, median_compilation.*--model\.inference\.reducer"):
        ensemble(preds, "mode")
    with pytest.raises(ValueError, match="N = 0"):
        ensemble(torch.zeros(0, 2, 1, 4, 4), "median")
    with pytest.raises(ValueError, match="C = 3"):
        ensemble(torch.zeros(3, 2, 3, 4, 4), "median_compilation")
    with pytest.raises(ValueError, match="max_iter"):
        ensemble(preds, "median", max_iter=3)


def test_ensemble_median_compilation_recovers_depth():
    gen = torch.Generator().manual_seed(0)
    depth = 1.0 + 4.0 * torch.rand(2, 1, 40, 64, generator=gen)  # B = 2; 64 px > max_res = 50 exercises the resize

    # 1. Exact affine copies: the min-max initialisation already aligns them and BFGS must not move away, so with the
    # range fixed to (0, 1) the merge is the min-max normalised truth up to float32 rounding.
    members = _perturbed_copies(depth, 5, noise=0.0, seed=1)
    merged, mad = ensemble(members, "median_compilation", value_range=(0.0, 1.0))
    flat = depth.flatten(1)
    expected = (flat - flat.amin(1, keepdim=True)) / (flat.amax(1, keepdim=True) - flat.amin(1, keepdim=True))
    torch.testing.assert_close(merged.flatten(1), expected, rtol=0, atol=1e-5)
    assert mad.abs().max().item() < 1e-5

    # 2. Noisy copies (noise sigma = 0.04, 1% of the depth range, in truth units): the pixel median of 5 members has
    # about 0.55 sigma of noise, so after a global scale/shift the merge must be within 0.75 sigma RMS of the truth
    # and beat the best single member (about 1 sigma).
    sigma = 0.04
    members = _perturbed_copies(depth, 5, noise=sigma, seed=2)
    before = members.clone()
    merged, mad = ensemble(members, "median_compilation")
    assert torch.equal(members, before)
    assert merged.shape == (2, 1, 40, 64) and mad.shape == (2, 1, 40, 64) and merged.dtype == torch.float32
    for b in range(2):
        rms = _aligned_rms(merged[b], depth[b])
        assert rms < 0.75 * sigma
        assert rms < min(_aligned_rms(members[i, b], depth[b]) for i in range(5))
        # value_range=None keeps the members' units: min and max are the medians of the members' minima and maxima.
        member_min = members[:, b].flatten(1).amin(1).median()
        member_max = members[:, b].flatten(1).amax(1).median()
        torch.testing.assert_close(merged[b].min(), member_min, rtol=0, atol=1e-5)
        torch.testing.assert_close(merged[b].max(), member_max, rtol=0, atol=1e-5)


def test_ensemble_median_compilation_fit_lowers_cost():
    depth = torch.rand(1, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    members = _perturbed_copies(depth, 4, noise=0.05, seed=4)[:, 0].double()  # (N, 1, H, W)
    small = members.reshape(4, -1)
    cost = lambda scale, shift: _alignment_cost(torch.cat([scale, shift]), small, 0.0, 1.0, "median", 0.02).item()
    lo_hi = small.amin(1), small.amax(1)
    init_scale = 1.0 / (lo_hi[1] - lo_hi[0])
    fit = _fit_alignment(members, 0.0, 1.0, "median", 0.02, max_iter=2, tol=1e-3, max_res=None)
    assert cost(*fit) < cost(init_scale, -init_scale * lo_hi[0]) - 1e-3


@pytest.mark.parametrize("reduction", ["median", "mean"])
def test_ensemble_median_compilation_matches_diffusers(reduction, monkeypatch):
    MarigoldDepthPipeline = _marigold_depth_pipeline(monkeypatch)

    settings = dict(reduction=reduction, regularizer_strength=0.02, tol=1e-3, max_res=50)
    depth = torch.rand(1, 1, 40, 64, generator=torch.Generator().manual_seed(5))

    def both(members: torch.Tensor, max_iter: int):
        ref = MarigoldDepthPipeline.ensemble_depth(members, output_uncertainty=True, max_iter=max_iter, **settings)
        ours = ensemble(members, "median_compilation", max_iter=max_iter, value_range=(0.0, 1.0), **settings)
        return ref, ours

    # 1. Exact affine copies with the default 2 BFGS steps, and noisy copies with 0 steps (initialisation, resize,
    # merge and final rescale only): float32 rounding is all that may differ (measured <= 3e-7).
    for members, max_iter in [
        (_perturbed_copies(depth, 5, 0.0, 6)[:, 0], 2),
        (_perturbed_copies(depth, 5, 0.05, 7)[:, 0], 0),
    ]:
        (ref, ref_unc), (ours, unc) = both(members, max_iter)
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
        torch.testing.assert_close(unc, ref_unc, rtol=0, atol=1e-6)

    # 2. Same objective: diffusers' cost function and starting point, captured from its scipy call, equal ours.
    calls = []
    real_minimize = scipy.optimize.minimize
    monkeypatch.setattr(
        scipy.optimize, "minimize", lambda fun, x0, **kw: calls.append((fun, x0)) or real_minimize(fun, x0, **kw)
    )
    members = _perturbed_copies(depth, 5, 0.02, 8)[:, 0]
    (ref, _), (ours, _) = both(members, max_iter=2)
    (ref_fun, ref_x0), (our_fun, our_x0) = calls
    torch.testing.assert_close(torch.from_numpy(our_x0), torch.from_numpy(ref_x0), rtol=1e-5, atol=1e-6)
    gen = torch.Generator().manual_seed(9)
    for _ in range(3):
        param = ref_x0 * (1.0 + 0.05 * torch.randn(ref_x0.shape, generator=gen, dtype=torch.float64).numpy())
        assert our_fun(param)[0] == pytest.approx(ref_fun(param), rel=1e-5)
    # 3. End to end with noise and 2 BFGS steps the two differ only by diffusers' float32 finite-difference gradient
    # (measured here: 8.9e-3 for median, 1.6e-4 for mean; 2e-3 to 7e-3 for median on other seeds at noise 0.01).
    assert (ours - ref).abs().max().item() < 2e-2


@pytest.mark.parametrize("mode", ["inference_mode", "no_grad"])
def test_ensemble_median_compilation_runs_without_autograd(mode):
    # Lightning runs validate, test and predict under torch.inference_mode(); the BFGS fit must switch autograd back
    # on locally and give exactly what it gives with gradients enabled.
    depth = 1.0 + torch.rand(2, 1, 24, 40, generator=torch.Generator().manual_seed(10))
    members = _perturbed_copies(depth, 4, noise=0.03, seed=11)
    expected, expected_unc = ensemble(members, "median_compilation")
    context = torch.inference_mode() if mode == "inference_mode" else torch.no_grad()
    with context:
        merged, unc = ensemble(members.clone(), "median_compilation")
    torch.testing.assert_close(merged, expected, rtol=0, atol=0)
    torch.testing.assert_close(unc, expected_unc, rtol=0, atol=0)
    assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()


def test_ensemble_median_compilation_agrees_with_diffusers_under_inference_mode(monkeypatch):
    MarigoldDepthPipeline = _marigold_depth_pipeline(monkeypatch)

    depth = torch.rand(1, 1, 40, 64, generator=torch.Generator().manual_seed(12))
    members = _perturbed_copies(depth, 5, 0.03, 13)[:, 0]  # (N, 1, H, W), values around [0, 1]
    with torch.inference_mode():
        ref, _ = MarigoldDepthPipeline.ensemble_depth(members, output_uncertainty=True)
        ours, _ = ensemble(members, "median_compilation")  # in the members' own units
    # After an affine fit of ours onto diffusers' (both are affine-invariant), within 2% of the range.
    a = torch.stack([ours.flatten(), torch.ones(ours.numel())], dim=1).double()
    coef = torch.linalg.lstsq(a, ref.flatten().double()[:, None]).solution
    aligned = (a @ coef).flatten()
    err = (aligned - ref.flatten().double()).abs().max().item() / (ref.max() - ref.min()).item()
    assert err < 0.02, err
