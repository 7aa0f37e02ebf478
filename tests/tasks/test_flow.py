"""FlowTask: target coding round trip, EPE and outlier rates on hand-computed cases, scoring at the original
resolution, the Middlebury colour wheel and the prediction files."""

import numpy as np
import pytest
import torch

from diffperc.data.io import read_flo
from diffperc.data.viz import flow_to_color, make_colorwheel
from diffperc.metrics.flow import EPE, OutlierRate
from diffperc.tasks.flow import FlowTask

from helpers import tiny_backbone


def _batch(flow: torch.Tensor, **extra) -> dict:
    n, _, h, w = flow.shape
    return {"flow": flow, "valid_mask": torch.ones(n, 1, h, w, dtype=torch.bool), **extra}


def test_flow_target_round_trips_within_clip_range():
    task = FlowTask(max_flow=5.0)
    flow = torch.empty(2, 2, 8, 8).uniform_(-5, 5)
    target = task.encode_target(_batch(flow))
    assert target.shape == (2, 3, 8, 8) and target.min() >= -1 and target.max() <= 1
    assert torch.equal(target[:, 2], torch.zeros(2, 8, 8))  # the documented constant third channel
    torch.testing.assert_close(task.decode(target), flow, rtol=0, atol=1e-6)
    # Decoding reads channels 0-1 only: garbage in channel 2 changes nothing.
    noisy = target.clone()
    noisy[:, 2] = 0.7
    torch.testing.assert_close(task.decode(noisy), flow, rtol=0, atol=1e-6)


def test_flow_target_clips_vectors_beyond_max_flow():
    task = FlowTask(max_flow=2.0)
    flow = torch.tensor([3.0, -1.0]).view(1, 2, 1, 1)
    target = task.encode_target(_batch(flow))
    assert target[0, :, 0, 0].tolist() == [1.0, -0.5, 0.0]
    assert task.decode(target)[0, :, 0, 0].tolist() == [2.0, -1.0]


def test_flow_metrics_match_hand_computed_errors():
    # Errors of a 1x4 image: (3, 4) -> 5 px, (0, 0.5) -> 0.5 px, (2, 0) -> 2 px, (0, 0) -> 0 px.
    target = torch.zeros(1, 2, 1, 4)
    pred = torch.tensor([[[[3.0, 0.0, 2.0, 0.0]], [[4.0, 0.5, 0.0, 0.0]]]])
    assert abs(EPE()(pred, target).item() - 7.5 / 4) < 1e-6
    assert OutlierRate(1.0)(pred, target).item() == 0.5  # 5 and 2 exceed 1 px
    assert OutlierRate(3.0)(pred, target).item() == 0.25
    assert OutlierRate(5.0)(pred, target).item() == 0.0  # strictly greater: exactly 5 px is not an outlier
    valid = torch.tensor([[[[False, True, True, True]]]])
    assert abs(EPE()(pred, target, valid).item() - 2.5 / 3) < 1e-6


def test_flow_metrics_average_per_image_and_skip_images_without_valid_pixels():
    metric = EPE()
    target = torch.zeros(3, 2, 1, 2)
    pred = torch.zeros(3, 2, 1, 2)
    pred[:, 0] = torch.tensor([1.0, 3.0, 100.0]).view(3, 1, 1)  # EPE 1, 3 and 100 px
    valid = torch.tensor([True, True, False]).view(3, 1, 1, 1).expand(3, 1, 1, 2)
    metric.update(pred, target, valid)
    assert metric.compute().item() == 2.0  # (1 + 3) / 2; the third image has no valid pixel


def test_flow_task_metric_names_and_zero_baseline():
    task = FlowTask(max_flow=4.0)
    flow = torch.zeros(1, 2, 2, 2)
    flow[0, 0] = 3.0  # 3 px to the right everywhere
    batch = _batch(flow)
    metrics = task.metrics()
    task.update_metrics(metrics, task.baseline(batch), batch)
    values = {k: v.item() for k, v in metrics.compute().items()}
    assert values == {"epe": 3.0, "outlier_1px": 1.0, "outlier_3px": 0.0, "outlier_5px": 0.0}


def test_flow_epe_at_original_resolution_after_2x_downsample_is_exact():
    task = FlowTask(max_flow=4.0)
    flow_orig = torch.tensor([3.0, -2.0]).view(1, 2, 1, 1).expand(1, 2, 16, 32).contiguous()
    flow = flow_orig[:, :, ::2, ::2] / 2  # the reader's rescale: both sides halved
    batch = _batch(flow, flow_orig=flow_orig)
    pred = task.decode(task.encode_target(batch))
    assert pred.shape == (1, 2, 8, 16)
    metrics = task.metrics()
    task.update_metrics(metrics, pred, batch)
    assert metrics.compute()["epe"].item() < 1e-6
    # A prediction 0.5 px off at the working size is 1 px off at the original size.
    metrics.reset()
    task.update_metrics(metrics, pred + torch.tensor([0.5, 0.0]).view(1, 2, 1, 1), batch)
    assert abs(metrics.compute()["epe"].item() - 1.0) < 1e-6


def test_flow_resize_prediction_rescales_each_component_by_its_axis():
    task = FlowTask()
    pred = torch.tensor([1.0, 1.0]).view(1, 2, 1, 1).expand(1, 2, 4, 4)
    out = task.resize_prediction(pred, (8, 12))  # H x2, W x3
    assert out.shape == (1, 2, 8, 12)
    torch.testing.assert_close(out[0, :, 3, 5], torch.tensor([3.0, 2.0]))


def test_colorwheel_has_the_55_middlebury_colours():
    wheel = make_colorwheel()
    assert wheel.shape == (55, 3)
    # Segment starts: red, yellow, green, cyan, blue, magenta (RY 15, YG 6, GC 4, CB 11, BM 13, MR 6).
    starts = {0: (255, 0, 0), 15: (255, 255, 0), 21: (0, 255, 0), 25: (0, 255, 255), 36: (0, 0, 255), 49: (255, 0, 255)}
    for index, colour in starts.items():
        assert tuple(wheel[index]) == colour


def test_flow_to_color_maps_directions_to_the_documented_colours():
    flow = np.array([[[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0], [0.0, 0.0], [0.5, 0.0]]])  # (1, 6, 2)
    rgb = flow_to_color(flow, max_flow=1.0)
    assert rgb.dtype == np.uint8 and rgb.shape == (1, 6, 3)
    assert tuple(rgb[0, 0]) == (255, 0, 0)  # right: red
    assert tuple(rgb[0, 1]) == (255, 229, 0)  # down: halfway between wheel colours 13 (221) and 14 (238) of RY
    assert tuple(rgb[0, 2]) == (0, 209, 255)  # left: wheel colour 27 = CB step 2
    assert tuple(rgb[0, 3]) == (88, 0, 255)  # up: halfway between BM steps 4 (78) and 5 (98)
    assert tuple(rgb[0, 4]) == (255, 255, 255)  # no motion: white
    assert tuple(rgb[0, 5]) == (255, 127, 127)  # half the scale: halfway to white
    # (2, H, W) input gives the same picture.
    np.testing.assert_array_equal(flow_to_color(flow.transpose(2, 0, 1), max_flow=1.0), rgb)


def test_flow_save_prediction_writes_color_png_and_flo(tmp_path):
    task = FlowTask()
    pred = torch.randn(2, 6, 10)
    paths = task.save_prediction(pred, torch.rand(1, 6, 10), tmp_path / "out", "pair")
    assert [p.name for p in paths] == ["pair_flow.png", "pair_flow.flo"]
    np.testing.assert_array_equal(read_flo(paths[1]), pred.numpy().transpose(1, 2, 0))
    assert all(p.stat().st_size > 0 for p in paths)


def test_flow_visualize_stacks_frame_truth_and_prediction():
    task = FlowTask()
    batch = _batch(torch.randn(2, 2, 8, 8), image=torch.zeros(2, 3, 8, 8))
    vis = task.visualize(batch["flow"], batch)
    assert vis.shape == (2, 3, 8, 24) and vis.min() >= 0 and vis.max() <= 1
    torch.testing.assert_close(vis[..., 8:16], vis[..., 16:])  # a perfect prediction looks like the truth


def test_flow_task_rejects_nonpositive_max_flow():
    with pytest.raises(ValueError, match="max_flow"):
        FlowTask(max_flow=0)


@pytest.mark.filterwarnings("ignore:.*self.trainer.*")  # training_step logs outside a Trainer
def test_flow_task_trains_and_samples_in_the_shared_trainer():
    from torch.utils.data import default_collate

    from diffperc.data import ProceduralFlow
    from diffperc.diffusion import InferenceSettings
    from diffperc.lit import PerceptionFinetuning

    module = PerceptionFinetuning(
        FlowTask(max_flow=2.0), backbone=tiny_backbone(patch_size=4),
        image_size=16, inference=InferenceSettings(num_steps=1, ensemble_size=3))
    assert module.net.x_embedder.proj.in_channels == 9  # frame 1, frame 2 and the noisy target
    batch = default_collate([ProceduralFlow("train", 4, 16)[i] for i in range(4)])
    assert torch.isfinite(module.training_step(batch, 0))
    pred, uncertainty = module.predict_batch(batch)
    assert pred.shape == (4, 2, 16, 16) and uncertainty.shape == (4, 1, 16, 16)
    assert pred.abs().max() <= 2.0  # decoded from a clipped image: within +-max_flow
