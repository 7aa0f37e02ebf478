"""Test-time ensemble reducers: merge N predictions of the same input into one plus an uncertainty map.

`ensemble(preds, method)` with `method` in `mean`, `median` and `median_compilation` (Marigold's affine-invariant
depth ensembling, https://arxiv.org/abs/2312.02145 and diffusers' `MarigoldDepthPipeline.ensemble_depth`, which
this module re-implements natively). The method is picked by `--model.inference.reducer`.
"""

import math

import numpy as np
import scipy.optimize
import torch
import torch.nn.functional as F

ENSEMBLE_METHODS = ("mean", "median", "median_compilation")


def ensemble(
    preds: torch.Tensor, method: str = "median", *, output_uncertainty: bool = True, **kwargs
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Merge an ensemble of predictions pixel by pixel.

    Medians are lower medians (`torch.median`): for an even N the smaller of the two middle values, never their
    average, so the merged value is always one of the members' values (as in Marigold and diffusers).

    Args:
        preds: (N, B, C, H, W), N ensemble members for each of B inputs. A 4-D (N, C, H, W) tensor is one input
            (B = 1) and gives (1, C, H, W) and (1, 1, H, W) outputs.
        method: `"mean"` (uncertainty = standard deviation over members, unbiased; 0 for N = 1), `"median"`
            (uncertainty = median absolute deviation) or `"median_compilation"` (C = 1 only; see
            `_median_compilation` for its keyword arguments).
        output_uncertainty: Return the uncertainty map; when False the second output is None.
        **kwargs: Options of `median_compilation`: `reduction`, `regularizer_strength`, `max_iter`, `tol`,
            `max_res`, `value_range`.

    Returns:
        The merged prediction (B, C, H, W) in the dtype and on the device of `preds`, and the uncertainty (B, 1, H, W)
        averaged over channels, or None.
    """
    if method not in ENSEMBLE_METHODS:
        raise ValueError(
            f"Unknown ensemble method {method!r}; known: {', '.join(ENSEMBLE_METHODS)}. "
            "Set `--model.inference.reducer` to one of them."
        )
    if preds.dim() == 4:
        preds = preds.unsqueeze(1)  # (N, 1, C, H, W)
    if preds.dim() != 5:
        raise ValueError(f"ensemble expects preds of shape (N, B, C, H, W) or (N, C, H, W), got {tuple(preds.shape)}.")
    if preds.shape[0] == 0:
        raise ValueError(
            "ensemble got N = 0 predictions in preds (N, B, C, H, W); the ensemble size must be at least 1."
        )
    if method != "median_compilation" and kwargs:
        raise ValueError(f"Options {sorted(kwargs)} only apply to `--model.inference.reducer median_compilation`.")

    if method == "median_compilation":
        if preds.shape[2] != 1:
            raise ValueError(
                f"median_compilation aligns single-channel affine-invariant depth, got C = {preds.shape[2]}; reduce "
                "the channels first or use `--model.inference.reducer median`."
            )
        merged, spread = zip(*(_median_compilation(preds[:, b], **kwargs) for b in range(preds.shape[1])))
        merged, spread = torch.stack(merged), torch.stack(spread)  # (B, 1, H, W) each
    else:
        merged, spread = _reduce(preds, method)  # (B, C, H, W) each
    uncertainty = spread.mean(dim=1, keepdim=True) if output_uncertainty else None
    return merged, uncertainty


def _reduce(x: torch.Tensor, reduction: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Reduce over dim 0; returns the merge and the spread (std for mean, MAD for median)."""
    if reduction == "mean":
        merged = x.mean(dim=0)
        # Unbiased std as diffusers; one member has no spread rather than a NaN.
        return merged, x.std(dim=0, correction=1 if x.shape[0] > 1 else 0)
    if reduction == "median":
        merged = x.median(dim=0).values
        return merged, (x - merged).abs().median(dim=0).values
    raise ValueError(f"Unknown reduction {reduction!r} for median_compilation; use 'median' or 'mean'.")


def _median_compilation(
    members: torch.Tensor,
    reduction: str = "median",
    regularizer_strength: float = 0.02,
    max_iter: int = 2,
    tol: float = 1e-3,
    max_res: int | None = 50,
    value_range: tuple[float, float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Align N affine-invariant depth maps with one scale and shift each, then merge them (Marigold, Ke et al. 2024).

    Args:
        members: (N, 1, H, W) predictions of one input; not modified.
        reduction: `"median"` (pixel median, MAD uncertainty) or `"mean"` (mean, std), used both inside the
            regulariser and for the final merge.
        regularizer_strength: Weight of the term pulling the merged map's min and max to `value_range`.
        max_iter: BFGS iterations. Keep it small (Marigold and diffusers use 2): the min-max initialisation is
            already close, and the pairwise term shrinks with the scales, so a fully converged solve of noisy members
            can collapse every scale toward 0 (the weak regulariser only partly resists) and the final rescale then
            amplifies noise.
        tol: BFGS tolerance (`scipy.optimize.minimize(tol=...)`).
        max_res: Long side, in pixels, of the nearest-exact downsampled copy the alignment is fitted on; None fits at
            full resolution.
        value_range: (lo, hi) the result is pulled to and finally rescaled to. None uses the members' own range
            (median over members of their min and of their max), so the output stays in the members' units;
            (0.0, 1.0) reproduces diffusers' `MarigoldDepthPipeline.ensemble_depth`.

    Returns:
        The merged map (1, H, W) with min and max exactly `value_range`, and its uncertainty (1, H, W) in the same
        units.
    """
    flat = members.detach().reshape(members.shape[0], -1)
    if value_range is None:
        lo, hi = flat.amin(dim=1).median().item(), flat.amax(dim=1).median().item()
    else:
        lo, hi = float(value_range[0]), float(value_range[1])
    scale, shift = _fit_alignment(members, lo, hi, reduction, regularizer_strength, max_iter, tol, max_res)

    # Apply the fit at full resolution in the members' dtype and device, merge, and pin the range to (lo, hi).
    aligned = members * scale.to(members).view(-1, 1, 1, 1) + shift.to(members).view(-1, 1, 1, 1)
    merged, spread = _reduce(aligned, reduction)  # (1, H, W) each
    factor = (hi - lo) / (merged.max() - merged.min()).clamp(min=1e-6)
    return lo + (merged - merged.min()) * factor, spread * factor


def _fit_alignment(
    members: torch.Tensor,
    lo: float,
    hi: float,
    reduction: str,
    regularizer_strength: float,
    max_iter: int,
    tol: float,
    max_res: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit one scale and shift per member (N, 1, H, W) with BFGS; returns float64 CPU (N,) scales and (N,) shifts."""
    num_members = members.shape[0]
    # 1. Fit on a small float64 copy: the cost is a sum of RMS distances, cheap at 50 px, and float64 keeps the
    # gradient clean (diffusers evaluates it in float32 with finite differences).
    small = members.detach().to("cpu", torch.float64)
    if max_res is not None and max(small.shape[-2:]) > max_res:
        height, width = small.shape[-2:]
        size = (height * max_res // max(height, width), width * max_res // max(height, width))
        small = F.interpolate(small, size=size, mode="nearest-exact")
    with torch.inference_mode(False):  # an ordinary copy even under inference mode, so autograd may save it below
        small = small.reshape(num_members, -1).clone()  # (N, P)

    # 2. Initialise each member's scale and shift so its min and max land on lo and hi.
    small_min, small_max = small.amin(dim=1), small.amax(dim=1)
    scale = (hi - lo) / (small_max - small_min).clamp(min=1e-6)
    param0 = torch.cat([scale, lo - scale * small_min]).numpy()

    def cost_and_grad(param: np.ndarray) -> tuple[float, np.ndarray]:
        # Lightning runs validate/test/predict under inference mode (no autograd): switch it back on for the fit only.
        with torch.inference_mode(False), torch.enable_grad():
            param = torch.from_numpy(param).requires_grad_(True)
            cost = _alignment_cost(param, small, lo, hi, reduction, regularizer_strength)
            (grad,) = torch.autograd.grad(cost, param)
        return cost.item(), grad.numpy()

    # 3. A few BFGS steps from the min-max initialisation with the exact (autograd) gradient.
    result = scipy.optimize.minimize(
        cost_and_grad, param0, jac=True, method="BFGS", tol=tol, options={"maxiter": max_iter, "disp": False}
    )
    param = torch.from_numpy(result.x)
    return param[:num_members], param[num_members:]


def _alignment_cost(
    param: torch.Tensor, small: torch.Tensor, lo: float, hi: float, reduction: str, regularizer_strength: float
) -> torch.Tensor:
    """Marigold's alignment objective for param = [s_1..s_N, t_1..t_N] and members `small` (N, P).

    Sum over pairs i < j of RMS(d_i' - d_j') with d' = d * s + t, plus regularizer_strength times the distance of the
    merged map's min and max from lo and hi (without it every scale would shrink to 0).
    """
    num_members = small.shape[0]
    aligned = small * param[:num_members, None] + param[num_members:, None]  # (N, P)
    cost = torch.pdist(aligned).sum() / math.sqrt(small.shape[1])  # pdist gives the L2 norm; / sqrt(P) makes it RMS
    if regularizer_strength > 0:
        merged, _ = _reduce(aligned, reduction)
        cost = cost + regularizer_strength * ((merged.min() - lo).abs() + (hi - merged.max()).abs())
    return cost
