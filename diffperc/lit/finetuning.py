"""Image-to-image diffusion fine-tuning for perception (paper §4, Marigold's recipe), one class for every task.

To run: ``diffperc fit --config configs/quickstart/depth.yaml`` then ``diffperc test ... --ckpt_path last``.
"""

from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torchmetrics import MetricCollection

from diffperc.codecs import Codec, PixelCodec
from diffperc.diffusion import (
    DiffusionSettings,
    InferenceSettings,
    ensemble,
    make_sampler,
    make_train_scheduler,
    sample_ensemble,
    training_target,
)
from diffperc.models import build_model, moe_aux_loss, moe_config, widen_input_projection
from diffperc.models import upcycle as upcycle_dense
from diffperc.models.moe import to_moe
from diffperc.tasks import Task
from diffperc.utils import atomic_write_json


@dataclass
class Backbone:
    """The DiT to build: a preset name plus optional overrides of its shape.

    Args:
        name: Preset (``t1``..``t6``, ``DiT-S/2`` .. ``DiT-XL/8``; ``python -m diffperc.models`` lists them).
        patch_size: Override of the preset's patch size.
        hidden_size: Override of the preset's width.
        depth: Override of the preset's number of blocks.
        num_heads: Override of the preset's attention heads.
        learn_sigma: Keep DiT's variance outputs (ignored by the loss; only for official-checkpoint layouts).
    """

    name: str = "t2"
    patch_size: int | None = None
    hidden_size: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    learn_sigma: bool = False


@dataclass
class Upcycle:
    """Upcycling a dense network into a mixture of experts before fine-tuning (paper §4.4).

    Args:
        num_experts: Experts E per block; each starts as a copy of the block's dense MLP.
        top_k: Experts per token k (weights renormalised over the k, so the upcycled model starts equal to the dense).
        balance_loss_coef: Coefficient of the expert balance loss added to the training loss.
        capacity_factor: Optional expert capacity (drops assignments beyond it; None keeps all).
        router_init_std: Standard deviation of the new router's weights.
    """

    num_experts: int = 8
    top_k: int = 2
    balance_loss_coef: float = 0.01
    capacity_factor: float | None = None
    router_init_std: float = 0.02

    def __post_init__(self):
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"`--model.upcycle.top_k` must be in 1..num_experts={self.num_experts}, got {self.top_k}")


def _as(cls, value):
    """A dataclass argument given as an instance, a dict (from a checkpoint's hyper-parameters) or None."""
    if value is None or isinstance(value, cls):
        return value
    return cls(**value)


class PerceptionFinetuning(LightningModule):
    """Fine-tunes a DiT to denoise a task's target latent given its condition latents.

    Args:
        task: The perception task (conditioning, target coding, metrics), e.g. ``diffperc.tasks.DepthTask``.
        codec: Images <-> latents; ``PixelCodec`` (default) or ``VAECodec``.
        backbone: The DiT preset and overrides.
        image_size: Training image side in pixels (sets the DiT's stored position-embedding grid).
        init_from: Pretrained weights (DiT ``.pt``, diffperc checkpoint or ``.safetensors``); None = from scratch.
        upcycle: Upcycle the (loaded) dense network into a mixture of experts before training; None = keep it.
        optimizer: Optimizer factory (AdamW in the paper's recipes).
        lr_scheduler: LR schedule factory, stepped every optimisation step (exponential decay in the recipes).
        diffusion: Training noise schedule and prediction type.
        inference: Sampling settings for validation, test and predict.
        num_images_logged: Validation images written to TensorBoard at each validation.
    """

    def __init__(
        self,
        task: Task,
        codec: Codec | None = None,
        backbone: Backbone | None = None,
        image_size: int = 32,
        init_from: str | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        diffusion: DiffusionSettings | None = None,
        inference: InferenceSettings | None = None,
        num_images_logged: int = 4,
        upcycle: Upcycle | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["task", "codec", "optimizer", "lr_scheduler"])
        for key, value in list(self.hparams.items()):  # plain values only, so weights_only loading accepts them
            if is_dataclass(value):
                self.hparams[key] = asdict(value)
        self.task = task
        self.codec = codec if codec is not None else PixelCodec()
        self.backbone = _as(Backbone, backbone) or Backbone()
        self.diffusion = _as(DiffusionSettings, diffusion) or DiffusionSettings()
        self.inference = _as(InferenceSettings, inference) or InferenceSettings()
        self.upcycle = _as(Upcycle, upcycle)
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler
        self.num_images_logged = num_images_logged
        if image_size % self.codec.downsample:
            raise ValueError(
                f"`--model.image_size`={image_size} must be a multiple of the codec's downsample factor "
                f"{self.codec.downsample}"
            )

        # 1. Build the DiT for one latent and widen its input for k conditions: the widening rule keeps the response
        #    of an all-RGB input, and load_pretrained applies the same rule to a one-latent checkpoint.
        c = self.codec.latent_channels
        b = self.backbone
        self.net = build_model(
            b.name,
            input_size=image_size // self.codec.downsample,
            in_channels=c,
            patch_size=b.patch_size,
            hidden_size=b.hidden_size,
            depth=b.depth,
            num_heads=b.num_heads,
            learn_sigma=b.learn_sigma,
            num_classes=1,
            class_dropout_prob=0.0,
        )
        widen_input_projection(self.net, task.num_conditions + 1)
        self.latent_channels = c
        # 2. Pretrained weights, then upcycling. A checkpoint that is already a mixture of experts (from
        #    `diffperc upcycle` or an upcycled run) is loaded into the MoE layout instead.
        u = self.upcycle
        moe = (
            dict(
                num_experts=u.num_experts,
                experts_per_token=u.top_k,
                balance_loss_coef=u.balance_loss_coef,
                capacity_factor=u.capacity_factor,
            )
            if u
            else None
        )
        if init_from:
            from diffperc.models.pretrained import load_pretrained, read_network_state

            if any(".mlp.experts." in k for k in read_network_state(init_from)):
                if u is None:
                    raise ValueError(
                        f"`--model.init_from` {init_from} is a mixture of experts: set "
                        "`--model.upcycle.num_experts` and `--model.upcycle.top_k` to match it"
                    )
                to_moe(self.net, moe)
            load_pretrained(self.net, init_from)
        if u and moe_config(self.net) is None:
            self.net = upcycle_dense(
                self.net, u.num_experts, u.top_k, u.capacity_factor, u.balance_loss_coef, u.router_init_std
            )

        # 3. Noise schedule for training; DDIM sampler over the same betas for inference.
        self.noise_scheduler = make_train_scheduler(self.diffusion)
        clip = self.inference.clip_sample if self.inference.clip_sample is not None else self.codec.clip_sample
        self.sampler = make_sampler(self.noise_scheduler, self.inference.timestep_spacing, clip)
        self.val_metrics = task.metrics()
        self.test_metrics = task.metrics()
        self.baseline_metrics = task.metrics()
        self.val_visuals: torch.Tensor | None = None

    # ------------------------------------------------------------------ training
    def _task_ids(self, batch: dict) -> torch.Tensor:
        n = next(v for v in batch.values() if isinstance(v, torch.Tensor)).shape[0]
        return torch.zeros(n, dtype=torch.long, device=self.device)

    def encode_conditions(self, batch: dict) -> torch.Tensor:
        """Condition latents (N, k * C, h, w), encoded once per batch."""
        return torch.cat([self.codec.encode(img) for img in self.task.conditions(batch)], dim=1)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        cond = self.encode_conditions(batch)
        x0 = self.codec.encode(self.task.encode_target(batch))
        # 1. Noise only the target latent at uniformly sampled timesteps (paper eq. 1).
        noise = torch.randn_like(x0)
        t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (x0.shape[0],), device=x0.device)
        xt = self.noise_scheduler.add_noise(x0, noise, t)
        # 2. Predict from [condition latents, noisy target] and regress the configured target (paper eq. 2).
        out = self.net(torch.cat([cond, xt], dim=1), t, self._task_ids(batch))[:, : self.latent_channels]
        loss = F.mse_loss(out.float(), training_target(self.noise_scheduler, x0, noise, t).float())
        self.log("train/loss", loss, prog_bar=True, batch_size=x0.shape[0])
        if self.is_moe:
            aux = moe_aux_loss(self.net)  # the balance loss of this forward, already scaled by its coefficient
            self.log("train/moe_aux_loss", aux, batch_size=x0.shape[0])
            loss = loss + aux
        return loss

    @property
    def is_moe(self) -> bool:
        return moe_config(self.net) is not None

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # What rebuilds the network without the config (used by `diffperc export` and `load_pretrained` users).
        checkpoint["diffperc"] = {"dit_config": self.net.config, "moe": moe_config(self.net), "task": self.task.name}

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self.net.parameters())
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ----------------------------------------------------------------- inference
    @torch.no_grad()
    def predict_batch(self, batch: dict, settings: InferenceSettings | None = None):
        """Samples, decodes and merges an ensemble: returns (prediction, uncertainty or None)."""
        settings = settings or self.inference
        cond = self.encode_conditions(batch)
        latents = sample_ensemble(self.net, cond, self._task_ids(batch), self.sampler, settings, self.latent_channels)
        n, b = latents.shape[:2]
        images = self.codec.decode(latents.flatten(0, 1)).clamp(-1, 1)
        preds = self.task.decode(images, batch)
        preds = preds.view(n, b, *preds.shape[1:])  # (N, B, C, H, W)
        if n == 1:
            return preds[0], None
        return ensemble(preds, settings.reducer or self.task.reducer)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        pred, _ = self.predict_batch(batch)
        self.task.update_metrics(self.val_metrics, pred, batch)
        if batch_idx == 0 and self.num_images_logged > 0:
            k = self.num_images_logged
            self.val_visuals = self.task.visualize(pred[:k], {key: v[:k] for key, v in batch.items()})

    def on_validation_epoch_end(self) -> None:
        self._log_metrics(self.val_metrics, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        if batch_idx == 0:
            self._test_image_shape = tuple(self.task.conditions(batch)[0].shape[1:])
        pred, _ = self.predict_batch(batch)
        self.task.update_metrics(self.test_metrics, pred, batch)
        baseline = self.task.baseline(batch)
        if baseline is not None:
            self.task.update_metrics(self.baseline_metrics, baseline, batch)

    def on_test_epoch_end(self) -> None:
        results = self._log_metrics(self.test_metrics, "test")
        results.update({f"baseline/{k}": v for k, v in self._compute(self.baseline_metrics).items()})
        if self.trainer.is_global_zero:
            log_dir = Path(self.trainer.log_dir or self.trainer.default_root_dir)
            record = {"task": self.task.name, **results, "inference": asdict(self.inference)}
            if getattr(self, "_test_image_shape", None):
                record["compute/test_macs_per_sample"] = self.test_macs_per_sample(self._test_image_shape)
            atomic_write_json(log_dir / "test_metrics.json", record)
            self.test_results = record

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        pred, uncertainty = self.predict_batch(batch)
        return {"pred": pred, "uncertainty": uncertainty, "batch": batch}

    def test_macs_per_sample(self, image_shape: tuple[int, int, int]) -> int:
        """Inference MACs for one input of ``image_shape`` (C, H, W): N members x steps x one network forward, plus
        encoding the conditions once and decoding the N predicted latents (zero for the pixel codec)."""
        from diffperc.compute import count_macs

        settings = self.inference
        x = torch.zeros(1, *image_shape, device=self.device)
        latent = self.codec.encode(x)
        net_in = torch.zeros(1, latent.shape[1] * (self.task.num_conditions + 1), *latent.shape[2:], device=self.device)
        t, y = (
            torch.zeros(1, dtype=torch.long, device=self.device),
            torch.zeros(1, dtype=torch.long, device=self.device),
        )
        forward = count_macs(self.net, net_in, t, y)
        codec = _CodecMACs(self.codec)
        encode = count_macs(codec, x, mode="encode") * self.task.num_conditions
        decode = count_macs(codec, latent, mode="decode") * settings.ensemble_size
        return int(settings.ensemble_size * settings.num_steps * forward + encode + decode)

    # ------------------------------------------------------------------- helpers
    def _compute(self, metrics: MetricCollection) -> dict[str, float]:
        if not any(m.update_count for m in metrics.values()):
            return {}
        values = {k: float(v) for k, v in metrics.compute().items()}
        if "delta1" in values:
            values["delta1_error"] = 1.0 - values["delta1"]
        metrics.reset()
        return values

    def _log_metrics(self, metrics: MetricCollection, stage: str) -> dict[str, float]:
        values = self._compute(metrics)
        for key, value in values.items():
            self.log(f"{stage}/{self.task.name}/{key}", value)  # torchmetrics already synced across processes
        return values

    def configure_callbacks(self):
        from diffperc.callbacks import ExpertLoadLogger, PredictionImageLogger, PredictionWriter

        return [PredictionImageLogger(), PredictionWriter(), *([ExpertLoadLogger()] if self.is_moe else [])]


class _CodecMACs(torch.nn.Module):
    """Lets ``count_macs`` see a codec's encode or decode as one module call."""

    def __init__(self, codec: Codec):
        super().__init__()
        self.codec = codec

    def forward(self, x: torch.Tensor, mode: str) -> torch.Tensor:
        return self.codec.encode(x) if mode == "encode" else self.codec.decode(x)
