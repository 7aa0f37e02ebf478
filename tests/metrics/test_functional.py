import pytest
import torch

from diffperc.metrics import AbsRel, Delta1
from diffperc.metrics.functional import abs_rel, align_scale_shift, delta1, epe, mask_iou


def test_align_scale_shift_recovers_affine_map_on_valid_pixels():
    target = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    pred = (target - 1.0) / 2.0  # target = 2 * pred + 1
    pred_bad = pred.clone()
    pred_bad[0, 0, 1, 1] = 100.0  # an invalid pixel must not affect the fit
    mask = torch.tensor([[[[True, True], [True, False]]]])
    aligned = align_scale_shift(pred_bad, target, mask)
    torch.testing.assert_close(aligned[mask], target[mask])
    assert aligned[0, 0, 1, 1] == pytest.approx(2 * 100.0 + 1)


def test_align_scale_shift_constant_prediction_gives_mean_target():
    target = torch.tensor([[[[1.0, 2.0, 6.0]]]])
    aligned = align_scale_shift(torch.zeros_like(target), target, torch.ones_like(target, dtype=torch.bool))
    torch.testing.assert_close(aligned, torch.full_like(target, 3.0))


def test_abs_rel_and_delta1_hand_values():
    target = torch.tensor([[[[1.0, 2.0, 4.0, 8.0]]]])
    output = torch.tensor([[[[1.5, 2.0, 3.0, 100.0]]]])
    mask = torch.tensor([[[[True, True, True, False]]]])
    # |1.5-1|/1 = 0.5, 0, |3-4|/4 = 0.25 -> mean 0.25; ratios 1.5, 1, 1.333 -> one of three under 1.25.
    assert abs_rel(output, target, mask).item() == pytest.approx(0.25)
    assert delta1(output, target, mask).item() == pytest.approx(1 / 3)


def test_depth_metrics_average_per_image_not_per_pixel():
    # Image 1: 1 valid pixel with error 1.0; image 2: 3 valid pixels with error 0. Per image mean = 0.5.
    target = torch.tensor([[[[1.0, 1.0, 1.0, 1.0]]], [[[1.0, 2.0, 3.0, 4.0]]]])
    pred = torch.tensor([[[[2.0, 9.0, 9.0, 9.0]]], [[[1.0, 2.0, 3.0, 4.0]]]])
    mask = torch.tensor([[[[True, False, False, False]]], [[[True, True, True, False]]]])
    metric = AbsRel(min_depth=0.5, max_depth=10.0, align=False)
    metric.update(pred, target, mask)
    assert metric.compute().item() == pytest.approx(0.5)
    d1 = Delta1(min_depth=0.5, max_depth=10.0, align=False)
    d1.update(pred, target, mask)
    assert d1.compute().item() == pytest.approx(0.5)


def test_depth_metric_clips_aligned_prediction_to_depth_range():
    target = torch.tensor([[[[1.0, 2.0]]]])
    pred = torch.tensor([[[[0.01, 50.0]]]])  # clipped to [0.5, 10] before scoring -> (0.5, 10)
    metric = AbsRel(min_depth=0.5, max_depth=10.0, align=False)
    metric.update(pred, target, torch.ones_like(target, dtype=torch.bool))
    assert metric.compute().item() == pytest.approx((0.5 / 1 + 8 / 2) / 2)


def test_epe_and_mask_iou_hand_values():
    flow = torch.zeros(1, 2, 1, 2)
    gt = torch.tensor([[[[3.0, 0.0]], [[4.0, 1.0]]]])  # errors 5 and 1
    assert epe(flow, gt).item() == pytest.approx(3.0)
    assert epe(flow, gt, torch.tensor([[[[True, False]]]])).item() == pytest.approx(5.0)
    a = torch.tensor([[[[1, 1, 0, 0]]]], dtype=torch.bool)
    b = torch.tensor([[[[0, 1, 1, 0]]]], dtype=torch.bool)
    assert mask_iou(a, b).item() == pytest.approx(1 / 3)
    assert mask_iou(torch.zeros_like(a), torch.zeros_like(b)).item() == 1.0
