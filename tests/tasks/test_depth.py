import torch

from diffperc.tasks import DepthTask


def test_depth_target_maps_quantiles_to_unit_range_and_decodes_by_channel_mean():
    depth = torch.linspace(1.0, 101.0, 101).view(1, 1, 1, 101)
    batch = {"depth": depth, "valid_mask": torch.ones_like(depth, dtype=torch.bool)}
    target = DepthTask(min_depth=0.5, max_depth=200.0).encode_target(batch)
    assert target.shape == (1, 3, 1, 101)
    # 2% quantile = 3, 98% = 99 (linear interpolation): those map to -1 and +1, and the rest is clipped.
    assert target[0, 0, 0, 2].item() == -1.0 and target[0, 0, 0, 98].item() == 1.0
    assert target[0, 0, 0, 50].item() == (51 - 3) / 96 * 2 - 1
    assert target.min() == -1 and target.max() == 1
    decoded = DepthTask().decode(target * torch.tensor([1.0, 0.5, 1.5]).view(1, 3, 1, 1))
    torch.testing.assert_close(decoded, target[:, :1])


def test_depth_target_ignores_invalid_pixels_for_quantiles():
    depth = torch.tensor([[[[1.0, 2.0, 3.0, 1000.0]]]])
    valid = torch.tensor([[[[True, True, True, False]]]])
    target = DepthTask(quantiles=(0.0, 1.0)).encode_target({"depth": depth, "valid_mask": valid})
    torch.testing.assert_close(target[0, 0, 0], torch.tensor([-1.0, 0.0, 1.0, 1.0]))


def test_depth_baseline_is_aligned_constant():
    task = DepthTask(min_depth=0.1, max_depth=10.0)
    depth = torch.tensor([[[[1.0, 2.0, 3.0, 6.0]]]])
    batch = {"depth": depth, "valid_mask": torch.ones_like(depth, dtype=torch.bool)}
    metrics = task.metrics()
    task.update_metrics(metrics, task.baseline(batch), batch)
    # Aligned constant = mean depth 3: abs_rel = (2/1 + 1/2 + 0 + 3/6) / 4 = 0.75.
    assert abs(metrics.compute()["abs_rel"].item() - 0.75) < 1e-6
