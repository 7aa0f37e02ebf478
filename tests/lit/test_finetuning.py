import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback

from diffperc.cli import DiffpercCLI
from diffperc.data import PerceptionDataModule, ProceduralDepth
from diffperc.diffusion import InferenceSettings
from diffperc.lit import EMASettings, PerceptionFinetuning, Upcycle

from helpers import quiet_trainer, tiny_backbone, tiny_finetuning

QUICKSTART = Path(__file__).resolve().parents[2] / "configs" / "quickstart" / "depth.yaml"
TINY_ARGS = [
    "--model.init_args.backbone.hidden_size",
    "32",
    "--model.init_args.backbone.depth",
    "1",
    "--model.init_args.backbone.num_heads",
    "2",
    "--model.init_args.image_size",
    "16",
    "--model.init_args.inference.num_steps",
    "1",
    "--model.init_args.inference.ensemble_size",
    "2",
    "--data.init_args.train.init_args.resolution",
    "16",
    "--data.init_args.val.init_args.resolution",
    "16",
    "--data.init_args.test.init_args.resolution",
    "16",
    "--data.init_args.test.init_args.length",
    "8",
    "--data.init_args.batch_size",
    "4",
    "--data.init_args.num_workers",
    "0",
    "--trainer.enable_progress_bar",
    "false",
    "--trainer.enable_model_summary",
    "false",
]


class _LossRecorder(Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def _tiny_module(**kw) -> PerceptionFinetuning:
    return tiny_finetuning(depth=2, lr=3e-3, **kw)


def test_finetuning_input_is_widened_for_the_condition():
    module = _tiny_module()
    assert module.net.x_embedder.proj.weight.shape[1] == 6  # [RGB condition, noisy depth target]
    assert module.net.final_layer.linear.out_features == 2 * 2 * 3  # predicts one latent only


def test_seeded_20_step_fit_loss_falls(tmp_path):
    torch.manual_seed(0)
    recorder = _LossRecorder()
    dm = PerceptionDataModule(train=ProceduralDepth("train", 400, 16), batch_size=16)
    trainer = quiet_trainer(max_steps=20, callbacks=[recorder], limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(_tiny_module(), datamodule=dm)
    assert len(recorder.losses) == 20
    first, last = np.mean(recorder.losses[:5]), np.mean(recorder.losses[-5:])
    assert last < 0.8 * first, (first, last)  # seeded: 0.675 -> 0.446 when written


@pytest.mark.slow
def test_cli_fit_test_resume_predict_end_to_end(tmp_path):
    logger = ["--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.logger.init_args.name", "run"]
    common = ["--config", str(QUICKSTART), *TINY_ARGS, *logger]
    DiffpercCLI(
        args=[
            "fit",
            *common,
            "--trainer.max_steps",
            "4",
            "--trainer.val_check_interval",
            "2",
            "--model.init_args.lr_scheduler.init_args.total_steps",
            "10",
        ]
    )
    run = tmp_path / "run"
    assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "config.yaml").is_file()
    assert list(run.glob("events.out.tfevents.*"))
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 4

    # Resume: the step count carries on from the checkpoint.
    cli = DiffpercCLI(
        args=[
            "fit",
            *common,
            "--trainer.max_steps",
            "6",
            "--trainer.val_check_interval",
            "2",
            "--model.init_args.lr_scheduler.init_args.total_steps",
            "10",
            "--ckpt_path",
            "last",
        ]
    )
    assert cli.trainer.global_step == 6
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6

    # The command line wins over the checkpoint's saved hyper-parameters (the test-time grid relies on it).
    DiffpercCLI(args=["test", *common, "--ckpt_path", "last", "--model.init_args.inference.ensemble_size", "3"])
    results = json.loads((run / "test_metrics.json").read_text())
    for key in ("abs_rel", "delta1", "delta1_error", "baseline/abs_rel", "baseline/delta1"):
        assert np.isfinite(results[key]), key
    assert 0 < results["abs_rel"] < 5 and results["inference"]["ensemble_size"] == 3

    # Predict on user images of odd sizes: outputs come back at each input's own size.
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for name, (h, w) in {"a": (21, 37), "b": (40, 13)}.items():
        cv2.imwrite(str(images / f"{name}.png"), rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
    (images / "notes.txt").write_text("not an image")
    DiffpercCLI(
        args=[
            "predict",
            *common,
            "--ckpt_path",
            "last",
            "--data.init_args.images",
            str(images),
            "--data.init_args.predict_resolution",
            "16",
        ]
    )
    out = run / "predictions"
    for name, (h, w) in {"a": (21, 37), "b": (40, 13)}.items():
        assert cv2.imread(str(out / f"{name}_depth.png")).shape == (h, w, 3)
        assert cv2.imread(str(out / f"{name}_depth16.png"), cv2.IMREAD_UNCHANGED).dtype == np.uint16
        assert np.load(out / f"{name}_depth.npy").shape == (h, w)
        assert (out / f"{name}_uncertainty.png").is_file()  # ensemble_size 2 -> an uncertainty map


def test_test_macs_per_sample_is_members_times_steps_times_forward():
    module = _tiny_module(inference=InferenceSettings(num_steps=3, ensemble_size=2))
    D, T, C, p, L, C_out = 32, 64, 6, 2, 2, 3  # width, tokens (16 px / patch 2)^2, [RGB, target] channels, ...
    block = 6 * D * D + T * 3 * D * D + 2 * T * T * D + T * D * D + 8 * T * D * D  # adaLN, qkv, attn, proj, MLP
    forward = T * D * C * p * p + 256 * D + D * D + L * block + 2 * D * D + T * D * p * p * C_out
    assert module.test_macs_per_sample((3, 16, 16)) == 2 * 3 * forward  # the pixel codec costs nothing


def test_init_from_an_moe_file_without_records_needs_top_k_from_the_flags(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    source = _tiny_module(upcycle=Upcycle(num_experts=4, top_k=2))
    weights = {k: v.contiguous() for k, v in source.net.state_dict().items()}
    path = tmp_path / "moe.safetensors"
    save_file(weights, str(path))  # no .json beside it: nothing records top-k or the weight normalisation
    with pytest.raises(ValueError, match="holds a mixture of 4 experts") as info:
        _tiny_module(init_from=str(path))
    assert str(path) in str(info.value) and "--model.upcycle.top_k" in str(info.value)

    # The flags supply what the file can't tell (here another top-k than the source's); the tensors the rest.
    module = _tiny_module(init_from=str(path), upcycle=Upcycle(num_experts=4, top_k=1))
    moe = module.net.blocks[1].mlp
    assert (moe.num_experts, moe.experts_per_token, moe.num_shared_experts, moe.normalize_weights) == (4, 1, 0, True)
    assert all(torch.equal(module.net.state_dict()[k], v) for k, v in weights.items())
    with pytest.raises(ValueError, match="num_experts=4, which `--model.upcycle.num_experts 8"):
        _tiny_module(init_from=str(path), upcycle=Upcycle(num_experts=8, top_k=2))

    # A dense file into an MoE preset is refused with the way out, not a list of missing keys.
    dense = tmp_path / "dense.safetensors"
    save_file({k: v.contiguous() for k, v in _tiny_module().net.state_dict().items()}, str(dense))
    with pytest.raises(ValueError, match="is a dense network but `--model.backbone.name` t1-4E2A"):
        PerceptionFinetuning(
            task=source.task,
            backbone=tiny_backbone("t1-4E2A", depth=2),
            image_size=16,
            init_from=str(dense),
        )


def test_backbone_moe_fields_parse_from_the_command_line():
    from diffperc.models.moe import SwiGLU

    cli = DiffpercCLI(
        args=[
            "--config",
            str(QUICKSTART),
            *TINY_ARGS,
            "--model.init_args.backbone.name",
            "t1-4E2A",
            "--model.init_args.backbone.expert_type",
            "swiglu",
            "--model.init_args.backbone.num_shared_experts",
            "2",
            "--model.init_args.backbone.shared_expert_ratio",
            "1.0",
            "--model.init_args.backbone.normalize_weights",
            "false",
            "--trainer.logger",
            "false",
        ],
        run=False,
    )
    moe = cli.model.net.blocks[0].mlp
    D, H = 32, 128
    assert isinstance(moe.experts[0], SwiGLU) and moe.normalize_weights is False
    assert sum(p.numel() for p in moe.parameters()) == D * 4 + 4 * 3 * D * H + 3 * D * 2 * D == 55424
    assert cli.model.hparams["backbone"]["expert_type"] == "swiglu"  # plain values in the checkpoint
    with pytest.raises(SystemExit):
        DiffpercCLI(args=["--config", str(QUICKSTART), "--model.init_args.backbone.expert_type", "relu"], run=False)


# ------------------------------------------------------------------------------------------------ validation loss
def _val_data(length: int = 8) -> PerceptionDataModule:
    return PerceptionDataModule(
        train=ProceduralDepth("train", 64, 16), val=ProceduralDepth("val", length, 16), batch_size=4, eval_batch_size=4
    )


def _val_batches(dm: PerceptionDataModule) -> list[dict]:
    dm.setup("validate")
    return list(dm.val_dataloader())


def _randomized(module: PerceptionFinetuning) -> PerceptionFinetuning:
    # adaLN-Zero starts the output at zero, which would make the loss blind to the weights.
    with torch.no_grad():
        for param in module.net.parameters():
            param.normal_(0, 0.2)
    return module


class _LiveWeights(Callback):
    """The live network weights after every optimizer step (what training alone decides)."""

    def __init__(self):
        self.steps: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append(torch.cat([p.detach().flatten().clone() for p in pl_module.net.parameters()]))


def test_val_loss_is_the_training_loss_on_its_own_fixed_noise(tmp_path):
    from diffperc.seeding import derive_seed

    module = _randomized(_tiny_module(num_images_logged=0)).eval()
    batches = _val_batches(_val_data())
    with torch.inference_mode():
        # Oracle: eq. 2 with noise, then t, drawn from derive_seed(noise_seed 0, batch 1, stream 2), v-prediction.
        batch = batches[1]
        g = torch.Generator().manual_seed(derive_seed(0, 1, stream=2))
        x0 = module.codec.encode(module.task.encode_target(batch))
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, 1000, (4,), generator=g)
        x = torch.cat([module.encode_conditions(batch), module.noise_scheduler.add_noise(x0, noise, t)], dim=1)
        out = module.net(x, t, torch.zeros(4, dtype=torch.long))[:, :3]
        expected = F.mse_loss(out, module.noise_scheduler.get_velocity(x0, noise, t))
        rng = torch.get_rng_state()
        losses = [module.validation_loss(b, i) for i, b in enumerate(batches)]
        assert torch.equal(torch.get_rng_state(), rng)  # the global RNG is not drawn from
    torch.testing.assert_close(losses[1], expected, rtol=1e-6, atol=0)
    assert losses[0] != losses[1]  # other batch, other noise

    # Logged as their sample mean (two batches of 4), the same at every validation of the same weights.
    trainer = quiet_trainer(default_root_dir=tmp_path)
    first = trainer.validate(module, datamodule=_val_data(), verbose=False)[0]["val/loss"]
    second = trainer.validate(module, datamodule=_val_data(), verbose=False)[0]["val/loss"]
    assert first == second == pytest.approx(float(sum(losses)) / 2, rel=1e-6)


def test_val_loss_leaves_training_bit_identical(tmp_path):
    # Validation (sampling, the val loss, the EMA swap) after every 2 steps, or none: the same weights at every step.
    def live_weights(validate: bool) -> tuple[list[torch.Tensor], float | None]:
        torch.manual_seed(0)
        recorder = _LiveWeights()
        trainer = quiet_trainer(
            max_steps=6,
            val_check_interval=2,
            check_val_every_n_epoch=None,
            limit_val_batches=2 if validate else 0,
            default_root_dir=tmp_path,
            callbacks=[recorder],
        )
        trainer.fit(_tiny_module(num_images_logged=0, ema=EMASettings(decay=0.5)), datamodule=_val_data())
        return recorder.steps, trainer.callback_metrics.get("val/loss")

    with_val, val_loss = live_weights(True)
    without_val, none = live_weights(False)
    assert val_loss is not None and none is None
    assert len(with_val) == len(without_val) == 6
    for a, b in zip(with_val, without_val, strict=True):
        assert torch.equal(a, b)


def test_val_loss_uses_the_ema_weights(tmp_path):
    recorder = _LiveWeights()
    module = _tiny_module(num_images_logged=0, ema=EMASettings(decay=0.5))
    trainer = quiet_trainer(
        max_steps=3,
        val_check_interval=3,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
        callbacks=[recorder],
    )
    trainer.fit(module, datamodule=_val_data(4))
    (batch,) = _val_batches(_val_data(4))
    with torch.inference_mode():
        module.eval()
        ema = module.validation_loss(batch, 0)  # fit end copied the average into the live network
        torch.nn.utils.vector_to_parameters(recorder.steps[-1], module.net.parameters())
        live = module.validation_loss(batch, 0)
    assert trainer.callback_metrics["val/loss"].item() == pytest.approx(ema.item(), rel=1e-6)
    assert abs(live.item() - ema.item()) > 1e-3  # seeded: 0.8326 (live weights) against 0.8424 (EMA)


def test_generalist_logs_a_val_loss_per_task_and_their_sample_mean(tmp_path):
    from diffperc.data import MultiTaskDataModule, ProceduralFlow
    from diffperc.tasks import DepthTask, FlowTask

    def data():
        val = [ProceduralDepth("val", 4, 16), ProceduralFlow("val", 8, 16)]
        return MultiTaskDataModule(
            names=["depth", "flow"], train=val, val=val, length=8, batch_size=4, eval_batch_size=4
        )

    module = _randomized(
        tiny_finetuning([DepthTask(min_depth=0.1, max_depth=30.0), FlowTask()], patch_size=4, num_images_logged=0)
    )
    metrics = quiet_trainer(default_root_dir=tmp_path).validate(module, datamodule=data(), verbose=False)
    logged = {k: v for m in metrics for k, v in m.items()}
    depth, flow = logged["val/depth/loss"], logged["val/flow/loss"]
    assert logged["val/loss"] == pytest.approx((4 * depth + 8 * flow) / 12, rel=1e-6)  # weighted by samples
    dm = data()
    dm.setup("validate")
    depth_batch = next(iter(dm.val_dataloader()[0]))
    with torch.inference_mode():
        module.eval()
        assert module.validation_loss(depth_batch, 0, task_id=0).item() == pytest.approx(depth, rel=1e-6)
        assert module.validation_loss(depth_batch, 0, task_id=0) != module.validation_loss(depth_batch, 1, task_id=0)


def test_a_subclass_training_another_loss_logs_no_diffusion_val_loss(tmp_path):
    class _Scaled(PerceptionFinetuning):
        def training_step(self, batch, batch_idx):
            return 2 * super().training_step(batch, batch_idx)

    module = _tiny_module(cls=_Scaled, num_images_logged=0)
    (metrics,) = quiet_trainer(default_root_dir=tmp_path).validate(module, datamodule=_val_data(4), verbose=False)
    assert "val/loss" not in metrics and "val/depth/abs_rel" in metrics
