"""Metrics as plain functions of (output, target, valid_mask), one value per image (N,).

Depth follows Marigold's evaluation protocol (https://github.com/prs-eth/Marigold, ``src/util/metric.py``):
predictions are affine-invariant, so they are first aligned to the ground truth by least-squares scale and shift on
the valid pixels, clipped to the data set's depth range, then scored per image.
"""

import torch


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1)


def align_scale_shift(pred: torch.Tensor, target: torch.Tensor, valid_mask: torch.Tensor) -> torch.Tensor:
    """Least-squares scale s and shift t per image minimising ||s * pred + t - target||^2 over valid pixels.

    Returns the aligned prediction (same shape as ``pred``). A constant prediction (zero variance on the mask) gets
    s = 0 and t = mean target, the least-squares answer for a rank-deficient system.
    """
    p, g, m = _flat(pred).double(), _flat(target).double(), _flat(valid_mask).double()
    n = m.sum(1).clamp(min=1)
    p_mean, g_mean = (p * m).sum(1) / n, (g * m).sum(1) / n
    pc, gc = (p - p_mean[:, None]) * m, (g - g_mean[:, None]) * m
    var = (pc * pc).sum(1)
    cov = (pc * gc).sum(1)
    scale = torch.where(var > 1e-12 * n, cov / var.clamp(min=1e-30), torch.zeros_like(var))
    shift = g_mean - scale * p_mean
    aligned = scale.view(-1, *[1] * (pred.dim() - 1)) * pred.double() + shift.view(-1, *[1] * (pred.dim() - 1))
    return aligned.to(pred.dtype)


def abs_rel(output: torch.Tensor, target: torch.Tensor, valid_mask: torch.Tensor) -> torch.Tensor:
    """Mean |output - target| / target over the valid pixels of each image (N,)."""
    o, g, m = _flat(output).double(), _flat(target).double(), _flat(valid_mask).double()
    err = (o - g).abs() / torch.where(m > 0, g, torch.ones_like(g))
    return ((err * m).sum(1) / m.sum(1).clamp(min=1)).float()


def delta1(
    output: torch.Tensor, target: torch.Tensor, valid_mask: torch.Tensor, threshold: float = 1.25
) -> torch.Tensor:
    """Fraction of valid pixels with max(output / target, target / output) < ``threshold`` per image (N,)."""
    o, g, m = _flat(output).double(), _flat(target).double(), _flat(valid_mask).bool()
    safe_o = torch.where(m, o, torch.ones_like(o)).clamp(min=1e-12)
    safe_g = torch.where(m, g, torch.ones_like(g))
    ratio = torch.maximum(safe_o / safe_g, safe_g / safe_o)
    hits = ((ratio < threshold) & m).double().sum(1)
    return (hits / m.double().sum(1).clamp(min=1)).float()


def epe(output: torch.Tensor, target: torch.Tensor, valid_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean end-point error ||output - target||_2 of flows (N, 2, H, W) over valid pixels, per image (N,)."""
    err = (output.double() - target.double()).pow(2).sum(1).sqrt()  # (N, H, W)
    m = torch.ones_like(err) if valid_mask is None else valid_mask.reshape(err.shape).double()
    return ((_flat(err) * _flat(m)).sum(1) / _flat(m).sum(1).clamp(min=1)).float()


def mask_iou(output: torch.Tensor, target: torch.Tensor, valid_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Intersection over union of boolean masks per image (N,); two empty masks count as IoU 1."""
    o, g = _flat(output).bool(), _flat(target).bool()
    if valid_mask is not None:
        m = _flat(valid_mask).bool()
        o, g = o & m, g & m
    inter = (o & g).double().sum(1)
    union = (o | g).double().sum(1)
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union)).float()
