"""AmodalTask: conditioning, mask decoding (synthetic and on the shared pix2gestalt samples), the visible-mask
baseline, MaskIoU on hand-computed cases and the prediction files."""

from pathlib import Path

import cv2
import pytest
import torch

from diffperc.metrics.amodal import MaskIoU
from diffperc.tasks.amodal import AmodalTask

from helpers import tiny_backbone

FIXTURES = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures"
needs_fixtures = pytest.mark.skipif(not (FIXTURES / "Pix2Gestalt_small").is_dir(),
                                    reason=f"shared fixtures not found at {FIXTURES}")


def _whole_on_white() -> tuple[torch.Tensor, torch.Tensor]:
    """A 1x1x6x6 object mask and its object painted on white: values 11 levels below white and darker."""
    mask = torch.zeros(1, 1, 6, 6, dtype=torch.bool)
    mask[0, 0, 1:4, 2:5] = True
    mask[0, 0, 5, 0] = True
    levels = torch.full((1, 3, 6, 6), 255.0)
    levels[:, 0][mask[:, 0]] = 244.0  # 11 levels from white in one channel only: just above the threshold
    levels[:, 1][mask[:, 0]] = torch.tensor([0.0, 100.0, 255.0, 255.0, 255.0, 255.0, 255.0, 255.0, 255.0, 30.0])
    levels[0, :, 0, 0] = 246.0  # 9 levels from white everywhere: background
    return levels / 127.5 - 1, mask


def test_amodal_mask_of_synthetic_whole_on_white_is_exact():
    image, mask = _whole_on_white()
    task = AmodalTask()
    assert torch.equal(task.mask(task.decode(image)), mask)


def test_amodal_conditions_are_image_and_visible_mask_as_image():
    task = AmodalTask()
    visible = torch.tensor([[[[0.0, 1.0]]]])
    image = torch.rand(1, 3, 1, 2) * 2 - 1
    cond = task.conditions({"image": image, "visible_mask": visible})
    assert len(cond) == task.num_conditions == 2 and torch.equal(cond[0], image)
    assert torch.equal(cond[1], torch.tensor([-1.0, 1.0]).view(1, 1, 1, 2).expand(1, 3, 1, 2))


def test_amodal_baseline_decodes_to_the_visible_mask_and_scores_its_iou():
    task = AmodalTask()
    visible = torch.zeros(1, 1, 4, 4)
    visible[0, 0, 0, :2] = 1  # 2 visible pixels
    whole_mask = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    whole_mask[0, 0, 0, :] = True  # 4 pixels in the whole object
    batch = {"visible_mask": visible, "whole_mask": whole_mask, "whole": torch.ones(1, 3, 4, 4)}
    baseline = task.baseline(batch)
    assert torch.equal(task.mask(baseline), visible.bool())
    metrics = task.metrics()
    task.update_metrics(metrics, baseline, batch)
    assert metrics.compute()["mask_iou"].item() == 0.5


def test_mask_iou_averages_per_image():
    pred = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool).view(3, 1, 1, 4)
    target = torch.tensor([[1, 0, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool).view(3, 1, 1, 4)
    # IoUs 1/3, 1 and 1 (two empty masks agree).
    assert abs(MaskIoU()(pred, target).item() - (1 / 3 + 2) / 3) < 1e-6


@needs_fixtures
def test_amodal_decoding_pix2gestalt_whole_reproduces_whole_mask():
    from diffperc.data.real import Pix2GestaltDataset

    ds = Pix2GestaltDataset(FIXTURES / "Pix2Gestalt_small")
    task = AmodalTask()
    metrics = task.metrics()
    for i in range(len(ds)):
        s = ds[i]
        task.update_metrics(metrics, task.decode(s["whole"][None]), {"whole_mask": s["whole_mask"][None]})
    assert metrics.compute()["mask_iou"].item() >= 0.95


def test_amodal_save_prediction_writes_whole_and_mask(tmp_path):
    image, mask = _whole_on_white()
    paths = AmodalTask().save_prediction(image[0], None, tmp_path, "obj")
    assert [p.name for p in paths] == ["obj_whole.png", "obj_mask.png"]
    saved_mask = cv2.imread(str(paths[1]), cv2.IMREAD_UNCHANGED)
    assert saved_mask.dtype == "uint8" and (saved_mask > 127).tolist() == mask[0, 0].tolist()
    whole = cv2.imread(str(paths[0]))[..., ::-1]  # BGR on disk
    assert whole[1, 2].tolist() == [244, 0, 255]  # the first object pixel keeps its 8-bit colour exactly


def test_amodal_visualize_has_four_panels():
    task = AmodalTask()
    image, mask = _whole_on_white()
    batch = {"image": image, "whole": image, "whole_mask": mask}
    vis = task.visualize(image, batch)
    assert vis.shape == (1, 3, 6, 24) and vis.min() >= 0 and vis.max() <= 1
    # A perfect prediction has no red (extra) or blue-only (missed) pixels in the error panel: all white or black.
    errors = vis[0, :, :, 18:]
    assert torch.equal(errors[0], errors[1]) and torch.equal(errors[1], errors[2])


@pytest.mark.filterwarnings("ignore:.*self.trainer.*")  # training_step logs outside a Trainer
def test_amodal_task_trains_and_samples_in_the_shared_trainer():
    from torch.utils.data import default_collate

    from diffperc.data import ProceduralAmodal
    from diffperc.diffusion import InferenceSettings
    from diffperc.lit import PerceptionFinetuning

    task = AmodalTask()
    module = PerceptionFinetuning(
        task, backbone=tiny_backbone(patch_size=4), image_size=16,
        inference=InferenceSettings(num_steps=1, ensemble_size=2))
    batch = default_collate([ProceduralAmodal("train", 4, 16)[i] for i in range(4)])
    assert torch.isfinite(module.training_step(batch, 0))
    pred, _ = module.predict_batch(batch)
    assert pred.shape == (4, 3, 16, 16)
    metrics = task.metrics()
    task.update_metrics(metrics, pred, batch)
    # Mask IoU by hand: per image |P & G| / |P | G| (1 when both are empty), then the mean over the batch.
    pm, gm = task.mask(pred).flatten(1), batch["whole_mask"].bool().flatten(1)
    inter, union = (pm & gm).sum(1).double(), (pm | gm).sum(1).double()
    expected = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union)).mean().float()
    torch.testing.assert_close(metrics.compute()["mask_iou"], expected)
