"""The one-step end-to-end control (``OneStepFinetuning``): its affine-invariant loss on hand-computed cases, its
inference as exactly one network call, and the shipped quickstart delta run for real through the CLI."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from diffperc.cli import DiffpercCLI
from diffperc.codecs import PixelCodec
from diffperc.compute import count_macs
from diffperc.diffusion import DiffusionSettings, InferenceSettings
from diffperc.lit import OneStepFinetuning, PerceptionFinetuning
from diffperc.lit.e2e import affine_invariant_l1
from diffperc.tasks import DepthTask, FlowTask

import tiny_runs
from helpers import tiny_backbone, tiny_finetuning

ROOT = Path(__file__).resolve().parents[2]
E2E = "configs/quickstart/depth_e2e.yaml"


def _designed_case() -> tuple[torch.Tensor, torch.Tensor]:
    """Two 2x3 images: valid pixels in the first two columns (gt 0, 1, 2, 3), the third column invalid."""
    gt = torch.tensor([[0.0, 1.0, 7.0], [2.0, 3.0, -5.0]]).expand(2, 1, 2, 3).clone()
    valid = torch.tensor([[True, True, False], [True, True, False]]).expand(2, 1, 2, 3).clone()
    return gt, valid


# e, orthogonal to 1 and to gt on the valid pixels (0 - 1 - 2 + 3 = 0): the fit then has the closed form used below.
E = torch.tensor([[1.0, -1.0, 0.0], [-1.0, 1.0, 0.0]])


def test_affine_invariant_l1_is_zero_for_any_scale_and_shift_of_the_truth():
    gt = torch.randint(0, 80, (3, 1, 8, 8)) / 8  # multiples of 1/8: a * gt + b below is exact in float32
    valid = torch.rand(3, 1, 8, 8) > 0.3
    for a, b in ((1.0, 0.0), (3.0, -0.75), (-2.5, 4.0), (0.25, 100.0)):
        assert affine_invariant_l1(a * gt + b, gt, valid).item() == pytest.approx(0.0, abs=1e-6), (a, b)


def test_affine_invariant_l1_of_a_designed_perturbation_is_the_hand_computed_value():
    gt, valid = _designed_case()
    pred = torch.stack([gt[0] + 0.1 * E, 2 * gt[1] + 1 + 0.3 * E])
    # s * pred + t is fitted to gt. With centred gt g = (-1.5, -0.5, 0.5, 1.5) (sum g^2 = 5) and e (sum e^2 = 4,
    # orthogonal to 1 and g), pred = a gt + b + c e gives s = cov / var = 5 a / (5 a^2 + 4 c^2), t = mean gt - s mean
    # pred, residual (a s - 1) g + c s e, whose |.| averages to c s (|(a s - 1) g| < c s: the g terms cancel in pairs).
    # Image 1 (a = 1, c = 0.1): 0.1 * 5 / 5.04; image 2 (a = 2, c = 0.3): 0.3 * 10 / 20.36; the loss is their mean.
    expected = (0.1 * 5 / 5.04 + 0.3 * 10 / 20.36) / 2
    assert affine_invariant_l1(pred, gt, valid).item() == pytest.approx(expected, rel=1e-5)  # 0.1232770


def test_affine_invariant_l1_ignores_invalid_pixels_and_empty_images():
    gt, valid = _designed_case()
    pred = torch.stack([gt[0] + 0.1 * E, 2 * gt[1] + 1 + 0.3 * E])
    before = affine_invariant_l1(pred, gt, valid)
    wild_pred, wild_gt = pred.clone(), gt.clone()
    wild_pred[..., 2], wild_gt[..., 2] = 1e4, -3e3  # only the invalid column
    assert affine_invariant_l1(wild_pred, wild_gt, valid).item() == before.item()
    # An image without valid pixels is not scored: the loss is the other image's.
    none_valid = valid.clone()
    none_valid[1] = False
    assert affine_invariant_l1(pred, gt, none_valid).item() == pytest.approx(0.1 * 5 / 5.04, rel=1e-5)


def test_affine_invariant_l1_of_a_constant_prediction_is_finite_with_zero_gradient():
    gt, valid = _designed_case()
    for value in (0.0, 0.1, -3.7):  # 0.1 and -3.7 leave float32 round-off in the variance
        pred = torch.full_like(gt, value, requires_grad=True)
        loss = affine_invariant_l1(pred, gt, valid)
        loss.backward()
        # s = 0, t = mean gt = 1.5: mean |gt - 1.5| = (1.5 + 0.5 + 0.5 + 1.5) / 4 = 1.
        assert loss.item() == pytest.approx(1.0, abs=1e-6), value
        assert torch.equal(pred.grad, torch.zeros_like(gt)), value


# ---------------------------------------------------------------------------------------------------------- module
def _tiny(prediction_type: str = "v_prediction", **kwargs) -> OneStepFinetuning:
    """helpers' tiny depth module (t1 width, depth 1, patch 2, 16 px) as the one-step model."""
    return OneStepFinetuning(
        task=kwargs.pop("task", DepthTask(min_depth=0.1, max_depth=30.0)),
        codec=PixelCodec(),
        backbone=tiny_backbone(depth=1, patch_size=2),
        image_size=16,
        diffusion=DiffusionSettings(prediction_type=prediction_type),
        **kwargs,
    )


def _module(**kwargs) -> OneStepFinetuning:
    module = _tiny(**kwargs)
    with torch.no_grad():  # random weights everywhere: zero-initialised layers would hide a wrong input or timestep
        for p in module.net.parameters():
            p.normal_(0, 0.2)
    return module.eval()


def test_one_step_inference_is_one_network_call_on_zero_target_channels_at_the_last_timestep():
    module = _module()
    image = torch.rand(2, 3, 16, 16) * 2 - 1
    calls = []
    module.net.register_forward_hook(lambda net, args, out: calls.append(args))
    with torch.inference_mode():
        pred, uncertainty = module.predict_batch({"image": image})
        assert len(calls) == 1 and uncertainty is None
        # By hand: [RGB, zeros] at t = T - 1 = 999, task id 0; x0 = -sqrt(1 - abar_999) v (v-prediction, x_t = 0).
        betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
        abar = torch.prod(1 - betas).item()  # 4.0358e-05 for DiT's linear betas
        x = torch.cat([image, torch.zeros(2, 3, 16, 16)], dim=1)
        t, y = torch.full((2,), 999), torch.zeros(2, dtype=torch.long)
        depth = (-math.sqrt(1 - abar) * module.net(x, t, y)).mean(1, keepdim=True)
    assert [a.tolist() for a in calls[0][1:]] == [t.tolist(), y.tolist()] and torch.equal(calls[0][0], x)
    lo, hi = depth.amin((1, 2, 3), keepdim=True), depth.amax((1, 2, 3), keepdim=True)
    torch.testing.assert_close(pred, (depth - lo) / (hi - lo) * 2 - 1)  # per image onto [-1, 1]
    assert pred.shape == (2, 1, 16, 16) and pred.amin().item() == -1.0 and pred.amax().item() == 1.0

    # Deterministic: nothing is drawn, so other global seeds give the same prediction.
    outs = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        with torch.inference_mode():
            outs.append(module.predict_batch({"image": image})[0])
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], pred)


def test_sample_prediction_takes_the_output_as_the_clean_estimate():
    v = _module()
    sample = _module(prediction_type="sample")
    assert sample.x0_coefficient == 1.0 and v.x0_coefficient == pytest.approx(-0.9999798, abs=1e-7)
    assert v.timestep == sample.timestep == 999


def test_test_macs_per_sample_is_one_forward_and_the_diffusion_models_one_step_one_member():
    module = _module()
    x, t, y = module.one_step_inputs(torch.zeros(1, 3, 16, 16), torch.zeros(1, dtype=torch.long))
    forward = count_macs(module.net, x, t, y)
    diffusion = tiny_finetuning(inference=InferenceSettings(num_steps=1, ensemble_size=1))
    assert module.test_macs_per_sample((3, 16, 16)) == forward == diffusion.test_macs_per_sample((3, 16, 16))
    assert forward == 1_139_712  # test_finetuning's formula for the t1-width DiT of depth 1 (patch 2, 16 px, C = 6)


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")  # a training step without a Trainer
def test_from_scratch_the_output_projection_gets_weights_so_the_loss_has_a_gradient():
    module = _tiny()
    assert module.net.final_layer.linear.weight.abs().sum() > 0  # adaLN-Zero left it all zeros
    from diffperc.data import ProceduralDepth

    batch = torch.utils.data.default_collate([ProceduralDepth("train", 4, 16)[i] for i in range(4)])
    loss = module.training_step(batch, 0)
    loss.backward()
    assert loss.item() > 0 and module.net.final_layer.linear.weight.grad.abs().sum() > 0


def test_refusals_name_the_flag():
    with pytest.raises(ValueError, match=r"`--model.init_args.inference.ensemble_size` 3: .*deterministic"):
        _tiny(inference=InferenceSettings(num_steps=1, ensemble_size=3))
    with pytest.raises(ValueError, match=r"`--model.init_args.inference.num_steps` 2"):
        _tiny(inference=InferenceSettings(num_steps=2))
    with pytest.raises(ValueError, match=r"`--model.init_args.diffusion.prediction_type` epsilon"):
        _tiny("epsilon")
    with pytest.raises(ValueError, match=r"`--model.init_args.task` FlowTask: OneStepFinetuning trains depth only"):
        _tiny(task=FlowTask())
    with pytest.raises(ValueError, match=r"`inference.ensemble_size` 2"), torch.inference_mode():
        _module().predict_batch({"image": torch.zeros(1, 3, 16, 16)}, InferenceSettings(num_steps=1, ensemble_size=2))


# --------------------------------------------------------------------------------------------------------------- CLI
def _train_losses(run) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    losses = []
    for f in run.glob("events.out.tfevents.*"):
        for event in EventFileLoader(str(f)).Load():
            for value in event.summary.value:
                if value.tag == "train/loss":
                    losses.append((event.step, value.simple_value or float(value.tensor.float_val[0])))
    return sorted(losses)


def _tiny_flags(tmp_path) -> list[str]:
    """The quickstart shrunk on the command line: helpers' tiny DiT at 16 px, batches of 8, 8 test scenes, CPU."""
    flags = {
        "model.init_args.backbone.hidden_size": 32,
        "model.init_args.backbone.depth": 1,
        "model.init_args.backbone.num_heads": 2,
        "model.init_args.backbone.patch_size": 2,
        "model.init_args.image_size": 16,
        "data.init_args.train.init_args.resolution": 16,
        "data.init_args.val.init_args.resolution": 16,
        "data.init_args.val.init_args.length": 8,
        "data.init_args.test.init_args.resolution": 16,
        "data.init_args.test.init_args.length": 8,
        "data.init_args.batch_size": 8,
        "data.init_args.num_workers": 0,
        "data.init_args.predict_resolution": 16,
        "trainer.accelerator": "cpu",
        "trainer.log_every_n_steps": 1,
        "trainer.enable_progress_bar": "false",
        "trainer.enable_model_summary": "false",
        "trainer.logger.init_args.save_dir": tmp_path,
    }
    return [str(a) for key, value in flags.items() for a in (f"--{key}", value)]


@pytest.mark.slow
def test_quickstart_e2e_config_fits_tests_and_predicts_with_one_forward_per_image(toy_assets, tmp_path):
    # The shipped files composed by the real CLI (not tiny_runs.compose), shrunk by flags.
    configs = ["--config", str(ROOT / "configs/quickstart/depth.yaml"), "--config", str(ROOT / E2E)]
    common = [*configs, *_tiny_flags(tmp_path)]
    steps = ["--trainer.max_steps", "60", "--trainer.val_check_interval", "60"]
    schedule = ["--model.init_args.lr_scheduler.init_args.total_steps", "60"]
    cli = tiny_runs.cli("fit", *common, *steps, *schedule, "--model.init_args.lr_scheduler.init_args.warmup_steps", "5")
    assert type(cli.model) is OneStepFinetuning
    run = tmp_path / "quickstart_depth_e2e"
    losses = _train_losses(run)
    assert [s for s, _ in losses] == list(range(60))
    first, last = np.mean([v for _, v in losses[:10]]), np.mean([v for _, v in losses[-10:]])
    assert last < 0.8 * first, (first, last)  # seeded: 0.679 -> 0.432 when written (a plateau until ~30)

    tiny_runs.cli("test", *common, "--ckpt_path", "last")
    record = tiny_runs.read_metrics(run / "test_metrics.json")  # every number finite
    assert record["inference"]["num_steps"] == record["inference"]["ensemble_size"] == 1 and record["global_step"] == 60
    for key in ("abs_rel", "delta1"):
        assert record["metrics"][f"test/depth/{key}"] == record[key] and f"baseline/{key}" in record
    # One network forward per test image: what the diffusion quickstart counts at 1 step x 1 member.
    one = ["--model.init_args.inference.num_steps", "1", "--model.init_args.inference.ensemble_size", "1"]
    diffusion = DiffpercCLI(args=[*configs[:2], *_tiny_flags(tmp_path), *one], run=False).model
    assert type(diffusion) is PerceptionFinetuning
    macs = diffusion.test_macs_per_sample((3, 16, 16))
    assert record["compute/test_macs_per_sample"] == record["metrics"]["compute/test_macs_per_sample"] == macs
    assert macs == 1_139_712  # test_finetuning's formula for the t1-width DiT of depth 1 (patch 2, 16 px, C = 6)

    images = toy_assets.images["depth"]
    tiny_runs.cli("predict", *common, "--ckpt_path", "last", "--data.init_args.images", images)
    tiny_runs.check_predictions(run / "predictions", "depth")
    assert not list((run / "predictions").glob("*_uncertainty.png"))  # one deterministic pass: no ensemble spread


def test_a_diffusion_checkpoint_is_refused_by_ckpt_path_but_its_own_record_loads():
    from diffperc.lit.checks import module_record

    module = _module()
    diffusion = {"diffperc": module_record(tiny_finetuning()), "state_dict": module.state_dict(), "global_step": 3}
    with pytest.raises(ValueError, match="checkpoint was trained as a diffusion model, not by OneStepFinetuning"):
        module.on_load_checkpoint(diffusion)
    own = {"state_dict": module.state_dict(), "global_step": 3}
    module.on_save_checkpoint(own)
    assert own["diffperc"]["objective"] == "one_step_affine_invariant"
    module.on_load_checkpoint(own)  # passes the parent's record check too
    assert module.trained_step == 3
