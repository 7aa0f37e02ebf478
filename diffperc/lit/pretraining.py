"""Class-conditional generative pretraining of a DiT or DiT-MoE (paper §3): epsilon MSE on DDPM-noised latents.

To run: ``diffperc fit --config configs/quickstart/pretrain.yaml``; then fine-tune from its EMA weights with
``diffperc fit --config configs/quickstart/depth.yaml --model.init_args.init_from <run>/checkpoints/last.ckpt``.
"""

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.callbacks import EMAWeightAveraging
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.loggers import TensorBoardLogger

from diffperc.codecs import Codec, PixelCodec
from diffperc.diffusion import DiffusionSettings, make_sampler, make_train_scheduler, training_target
from diffperc.lit.finetuning import Backbone
from diffperc.models import moe_config
from diffperc.utils import atomic_write_bytes


@dataclass
class EMASettings:
    """Exponential moving average of the weights, kept by Lightning's ``EMAWeightAveraging`` callback.

    The average is what validation and sample grids use and what checkpoints hold under ``state_dict`` (the live
    weights go to ``current_model_state``), so ``init_from`` loads it. At the end of fit the callback copies the
    average into the live model, so a checkpoint written only then (``ModelCheckpoint`` without
    ``every_n_train_steps``) holds the average in both places.

    Args:
        decay: Weight of the old average per update (DiT: 0.9999); None turns the EMA off.
        update_every_n_steps: Update the average every this many optimizer steps.
        start_step: First optimizer step (0-based) that updates the average; None = from the first step.
        cpu: Keep the average on the CPU (saves accelerator memory, costs a copy per update).
    """

    decay: float | None = 0.9999
    update_every_n_steps: int = 1
    start_step: int | None = None
    cpu: bool = False

    def __post_init__(self):
        if self.decay is not None and not 0.0 <= self.decay < 1.0:
            raise ValueError(f"`--model.ema.decay` must be in [0, 1) or null, got {self.decay}")
        if self.update_every_n_steps < 1:
            raise ValueError(f"`--model.ema.update_every_n_steps` must be >= 1, got {self.update_every_n_steps}")


@dataclass
class SamplingSettings:
    """The sample grid drawn at each validation (with the EMA weights): DDIM with classifier-free guidance.

    Args:
        num_samples: Images in the grid (0 = no grid).
        labels: Class of each image; None = 0, 1, 2, ... cycling over the classes.
        cfg_scale: Guidance scale w: eps = eps_null + w (eps_class - eps_null), computed on a doubled batch (1.0 gives
            the conditional prediction); None = conditional only, one forward per step.
        num_steps: DDIM steps.
        timestep_spacing: DDIM timestep spacing (``trailing`` starts from pure noise for any step count).
        eta: DDIM stochasticity (0 = deterministic).
        seed: Seed of the initial noise, so grids at different steps are comparable.
        columns: Images per grid row.
        clip_sample: Clip DDIM's clean estimate to [-1, 1]; None = the codec's choice (true in pixel space).
    """

    num_samples: int = 16
    labels: list[int] | None = None
    cfg_scale: float | None = 4.0
    num_steps: int = 50
    timestep_spacing: str = "trailing"
    eta: float = 0.0
    seed: int = 0
    columns: int = 8
    clip_sample: bool | None = None

    def __post_init__(self):
        for key in ("num_samples", "num_steps", "columns"):
            if getattr(self, key) < (0 if key == "num_samples" else 1):
                raise ValueError(f"`--model.sampling.{key}` is out of range: {getattr(self, key)}")
        if self.eta < 0:
            raise ValueError(f"`--model.sampling.eta` must be >= 0, got {self.eta}")


def _plain(value):
    """A hyperparameter as plain containers and scalars, so ``torch.load(weights_only=True)`` reads checkpoints."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _plain(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return f"{type(value).__module__}.{type(value).__qualname__}"


class DiffusionPretraining(LightningModule):
    """Trains a class-conditional DiT to predict the noise added to image latents, with label dropout for CFG.

    Batches hold ``label`` (N,) and either ``image`` (N, 3, H, W) in [-1, 1], encoded here by the frozen codec, or
    ``latent`` (N, C, h, w) already encoded (``diffperc.data.latents.LatentCache``), which skips the codec.

    Args:
        codec: Images <-> latents; ``PixelCodec`` (default) or ``VAECodec`` (frozen, left out of checkpoints).
        backbone: The DiT preset and overrides (a ``-8E2A`` preset builds a DiT-MoE; its expert layout is set by the
            MoE fields of ``Backbone``, e.g. ``expert_type: swiglu`` for DiT-MoE's experts).
        image_size: Training image side in pixels (sets the DiT's position-embedding grid).
        num_classes: Classes of the data set (1000 for ImageNet).
        class_dropout_prob: Label dropout: the fraction of training labels replaced by the null label (DiT: 0.1).
        init_from: Weights to start from (DiT ``.pt``, diffperc checkpoint or ``.safetensors``); None = from scratch.
        optimizer: Optimizer factory (AdamW, lr 1e-4, no weight decay in the paper).
        lr_scheduler: LR schedule factory, stepped every optimizer step; None = constant (the paper).
        diffusion: Training noise schedule and prediction type (epsilon in the paper).
        ema: EMA of the weights.
        sampling: The sample grid drawn at each validation.
        val_seed: Seed of the validation noise and timesteps, so validation losses are comparable across steps.
    """

    def __init__(
        self,
        codec: Codec | None = None,
        backbone: Backbone | None = None,
        image_size: int = 32,
        num_classes: int = 10,
        class_dropout_prob: float = 0.1,
        init_from: str | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        diffusion: DiffusionSettings | None = None,
        ema: EMASettings | None = None,
        sampling: SamplingSettings | None = None,
        val_seed: int = 0,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["codec", "optimizer", "lr_scheduler"])
        for key in list(self.hparams):
            self.hparams[key] = _plain(self.hparams[key])
        self.codec = codec if codec is not None else PixelCodec()
        self.backbone = _settings(Backbone, backbone)
        self.diffusion = _settings(DiffusionSettings, diffusion)
        self.ema = _settings(EMASettings, ema)
        self.sampling = _settings(SamplingSettings, sampling)
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler
        self.num_classes, self.val_seed = num_classes, val_seed
        if image_size % self.codec.downsample:
            raise ValueError(
                f"`--model.image_size`={image_size} must be a multiple of the codec's downsample factor "
                f"{self.codec.downsample}"
            )
        if not 0.0 <= class_dropout_prob < 1.0:
            raise ValueError(f"`--model.class_dropout_prob` must be in [0, 1), got {class_dropout_prob}")
        if self.sampling.cfg_scale is not None and class_dropout_prob == 0:
            raise ValueError(
                "`--model.sampling.cfg_scale` needs a null label: set `--model.class_dropout_prob` > 0 "
                "or `--model.sampling.cfg_scale null`"
            )
        bad = [y for y in self.sampling.labels or [] if not 0 <= y < num_classes]
        if bad:
            raise ValueError(f"`--model.sampling.labels` {bad} are not classes of `--model.num_classes`={num_classes}")

        # 1. The network: a preset DiT (or DiT-MoE) over one latent, with a label table of num_classes + null.
        self.latent_channels = self.codec.latent_channels
        self.net = self.backbone.build(
            input_size=image_size // self.codec.downsample,
            in_channels=self.latent_channels,
            num_classes=num_classes,
            class_dropout_prob=class_dropout_prob,
        )
        if init_from:
            from diffperc.models.pretrained import load_pretrained

            load_pretrained(self.net, init_from)
        self.is_moe = _has_moe(self.net)

        # 2. DDPM forward process for training; a DDIM sampler over the same betas for the sample grids.
        self.noise_scheduler = make_train_scheduler(self.diffusion)
        s = self.sampling
        self.sampler = make_sampler(
            self.noise_scheduler, s.timestep_spacing, self.codec.clip_sample if s.clip_sample is None else s.clip_sample
        )
        self.sample_grid: torch.Tensor | None = None

    # ------------------------------------------------------------------ training
    def _latents(self, batch: dict) -> torch.Tensor:
        if "latent" in batch:
            return batch["latent"].float()  # cached by `diffperc cache-latents`: the codec already ran
        if "image" not in batch:
            raise KeyError(f"A pretraining batch needs `image` or `latent`, got keys {sorted(batch)}")
        return self.codec.encode(batch["image"])

    def _labels(self, batch: dict) -> torch.Tensor:
        if "label" not in batch:
            raise KeyError(f"A pretraining batch needs class labels under `label`, got keys {sorted(batch)}")
        return batch["label"].long()

    def diffusion_loss(
        self, x0: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """MSE of the network's prediction for latents ``x0`` (N, C, h, w) noised at uniform timesteps (eq. 2).

        Label dropout happens inside the DiT while it is in training mode.
        """
        # 1. Noise at t ~ U{0, T - 1}: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps (DDPM eq. 4).
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        t = torch.randint(
            0, self.noise_scheduler.config.num_train_timesteps, (x0.shape[0],), generator=generator, device=x0.device
        )
        xt = self.noise_scheduler.add_noise(x0, noise, t)
        # 2. Regress the configured target (the noise for epsilon prediction); sigma outputs, if any, are ignored.
        out = self.net(xt, t, y)[:, : self.latent_channels]
        return F.mse_loss(out.float(), training_target(self.noise_scheduler, x0, noise, t).float())

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        x0, y = self._latents(batch), self._labels(batch)
        mse = self.diffusion_loss(x0, y)
        loss = mse
        if self.is_moe:
            from diffperc.models.moe import moe_aux_loss

            balance = moe_aux_loss(self.net)  # already scaled by each SparseMoE's balance_loss_coef
            loss = mse + balance
            self.log("train/mse", mse, batch_size=x0.shape[0])
            self.log("train/balance_loss", balance, batch_size=x0.shape[0])
        self.log("train/loss", loss, prog_bar=True, batch_size=x0.shape[0])
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        # Fixed noise and timesteps per batch, so the (EMA) validation loss is comparable across steps.
        x0, y = self._latents(batch), self._labels(batch)
        generator = torch.Generator(device=x0.device).manual_seed(self.val_seed * 1_000_003 + batch_idx)
        loss = self.diffusion_loss(x0, y, generator)
        self.log("val/loss", loss, prog_bar=True, batch_size=x0.shape[0], sync_dist=True)

    def on_validation_epoch_start(self) -> None:
        # The EMA callback's own hook ran first and swapped the averaged weights in, so the grid shows the EMA model.
        if self.trainer.sanity_checking or self.sampling.num_samples == 0:
            return
        log_dir = Path(self.trainer.log_dir or self.trainer.default_root_dir)  # a collective under DDP: all ranks ask
        if not self.trainer.is_global_zero:
            return
        images = self.sample(self.sample_labels())
        self.sample_grid = _grid((images + 1) / 2, self.sampling.columns)  # (3, rows * H, columns * W) in [0, 1]
        step = self.trainer.global_step
        for logger in self.trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image("val/samples", self.sample_grid, global_step=step)
        rgb = (self.sample_grid.permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
        ok, png = cv2.imencode(".png", np.ascontiguousarray(rgb[..., ::-1]))
        if ok:
            atomic_write_bytes(log_dir / f"samples_step{step}.png", png.tobytes())

    # ------------------------------------------------------------------ sampling
    def sample_labels(self) -> torch.Tensor:
        """The grid's labels: ``sampling.labels``, or 0, 1, 2, ... cycling over the classes."""
        n = self.sampling.num_samples
        labels = self.sampling.labels or [i % self.num_classes for i in range(n)]
        return torch.as_tensor(labels[:n], dtype=torch.long, device=self.device)

    @torch.no_grad()
    def sample_latents(
        self,
        labels: torch.Tensor,
        cfg_scale: float | None = None,
        num_steps: int | None = None,
        seed: int | None = None,
        eta: float | None = None,
    ) -> torch.Tensor:
        """DDIM-samples latents (N, C, h, w) of classes ``labels`` (N,); arguments default to ``self.sampling``.

        ``cfg_scale`` None runs the conditional model alone; a number runs ``DiT.forward_with_cfg``.
        """
        s = self.sampling
        num_steps = num_steps or s.num_steps
        seed = s.seed if seed is None else seed
        eta = s.eta if eta is None else eta
        side = self.net.input_size
        device = self.device
        generator = torch.Generator(device=device).manual_seed(seed)
        x = torch.randn((labels.shape[0], self.latent_channels, side, side), generator=generator, device=device)
        x = x * self.sampler.init_noise_sigma
        was_training = self.net.training
        self.net.eval()  # eval mode: no label dropout while sampling
        try:
            self.sampler.set_timesteps(num_steps, device=device)
            for t in self.sampler.timesteps:
                t_batch = t.expand(x.shape[0]).to(device)
                if cfg_scale is None:
                    out = self.net(x, t_batch, labels)
                else:
                    out = self.net.forward_with_cfg(x, t_batch, labels, cfg_scale)
                x = self.sampler.step(
                    out[:, : self.latent_channels].float(), t, x, eta=eta, generator=generator
                ).prev_sample
        finally:
            self.net.train(was_training)
        return x

    @torch.no_grad()
    def sample(self, labels: torch.Tensor, **kwargs) -> torch.Tensor:
        """Images (N, 3, H, W) in [-1, 1] of classes ``labels``; ``kwargs`` as ``sample_latents`` (default CFG scale:
        ``sampling.cfg_scale``)."""
        kwargs.setdefault("cfg_scale", self.sampling.cfg_scale)
        return self.codec.decode(self.sample_latents(labels, **kwargs)).clamp(-1, 1)

    # --------------------------------------------------------------- optimisation
    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self.net.parameters())
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_callbacks(self):
        from diffperc.callbacks import MACsCounter

        # Every fit counts its training MACs (train_macs.json, `compute/train_macs`): the x-axis of Fig. 2.
        present = {type(cb) for cb in self.trainer.callbacks} if self._trainer is not None else set()
        callbacks = [] if MACsCounter in present else [MACsCounter()]
        if self.ema.decay is None:
            return callbacks
        # Returned here so the recipe always has its EMA; it replaces an EMAWeightAveraging given in the config.
        return callbacks + [
            EMAWeightAveraging(
                device="cpu" if self.ema.cpu else None,
                decay=self.ema.decay,
                update_every_n_steps=self.ema.update_every_n_steps,
                update_starting_at_step=self.ema.start_step,
            )
        ]

    # ---------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # The frozen codec is rebuilt from its own folder: keep its weights out of `state_dict` (the EMA callback
        # already put the averaged weights there) and out of the live copy.
        for key in ("state_dict", "current_model_state"):
            if isinstance(checkpoint.get(key), dict):
                checkpoint[key] = {k: v for k, v in checkpoint[key].items() if not k.startswith("codec.")}
        # What rebuilds the network without the config, as PerceptionFinetuning writes it: `init_from` takes the
        # mixture-of-experts layout (experts, top-k, shared experts, expert type, normalisation) from here.
        checkpoint["diffperc"] = {"dit_config": self.net.config, "moe": moe_config(self.net), "task": None}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Put the codec's own weights back before Lightning (and the EMA callback) load the state strictly.
        codec_state = {f"codec.{k}": v for k, v in self.codec.state_dict().items()}
        for key in ("state_dict", "current_model_state"):
            if isinstance(checkpoint.get(key), dict):
                checkpoint[key] = {**codec_state, **checkpoint[key]}


def _settings(cls: type, value):
    """A settings dataclass from itself, None (the defaults) or a dict (hyperparameters read back from a checkpoint)."""
    if value is None:
        return cls()
    return cls(**value) if isinstance(value, dict) else value


def _has_moe(net: torch.nn.Module) -> bool:
    try:
        from diffperc.models.moe import SparseMoE
    except ImportError:
        return False
    return any(isinstance(m, SparseMoE) for m in net.modules())


def _grid(images: torch.Tensor, columns: int, pad: int = 2) -> torch.Tensor:
    """(N, 3, H, W) images -> one (3, rows * (H + pad) + pad, columns * (W + pad) + pad) grid on a white background."""
    n, c, h, w = images.shape
    columns = min(columns, n)
    rows = -(-n // columns)
    grid = torch.ones(c, rows * (h + pad) + pad, columns * (w + pad) + pad, dtype=images.dtype, device=images.device)
    for i, image in enumerate(images.clamp(0, 1)):
        r, col = divmod(i, columns)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        grid[:, top : top + h, left : left + w] = image
    return grid
