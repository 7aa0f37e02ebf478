"""Class-conditional generative pretraining of a DiT or DiT-MoE (paper §3): epsilon MSE on DDPM-noised latents.

To run: ``diffperc fit --config configs/quickstart/pretrain.yaml``; then fine-tune from its EMA weights with
``diffperc fit --config configs/quickstart/depth.yaml --model.init_args.init_from <run>/checkpoints/last.ckpt``.
"""

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.loggers import TensorBoardLogger

from diffperc.codecs import Codec
from diffperc.data.viz import image_grid
from diffperc.diffusion import DiffusionSettings, InferenceSettings, sample_ensemble, training_target
from diffperc.lit.base import DiffusionModule, EMASettings, settings
from diffperc.lit.parallel import draw_label_drop
from diffperc.models import moe_config
from diffperc.models.build import Backbone, build_network
from diffperc.utils import atomic_write_bytes

__all__ = ["DiffusionPretraining", "EMASettings", "SamplingSettings"]


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


class DiffusionPretraining(DiffusionModule):
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
        noise_seed: Seed of the training noise and timesteps, drawn per batch for this process's rows of the global
            batch: every data-parallel rank draws different noise, and a resumed run draws what it would have.
        activation_checkpointing: Recompute each DiT block's activations in backward (less memory, ~1/3 more compute).
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
        noise_seed: int = 0,
        activation_checkpointing: bool = False,
    ):
        super().__init__(
            codec,
            image_size,
            optimizer,
            lr_scheduler,
            diffusion,
            settings(EMASettings, ema),
            noise_seed,
            activation_checkpointing,
        )
        self.save_plain_hyperparameters(ignore=["codec", "optimizer", "lr_scheduler"])
        self.backbone = settings(Backbone, backbone)
        self.sampling = settings(SamplingSettings, sampling)
        self.num_classes, self.val_seed = num_classes, val_seed
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

        # A preset DiT (or DiT-MoE) over one latent, with a label table of num_classes + null (models/build.py).
        self.net = build_network(
            self.backbone,
            input_size=image_size // self.codec.downsample,
            in_channels=self.latent_channels,
            num_classes=num_classes,
            class_dropout_prob=class_dropout_prob,
            init_from=init_from,
        )
        self.sampler = self.make_sampler(self.sampling.timestep_spacing, self.sampling.clip_sample)
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

    def _noised(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.noise_scheduler.add_noise(x0, noise, t)  # x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps

    def diffusion_loss(
        self,
        x0: torch.Tensor,
        y: torch.Tensor,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
        t: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """MSE of the network's prediction for latents ``x0`` (N, C, h, w) noised at timesteps t (eq. 2).

        ``noise`` and ``t`` default to draws from ``generator`` (the global RNG when None): noise ~ N(0, I),
        t ~ U{0, T - 1}. In training mode labels are dropped as ``training_label_drop`` draws them; sigma outputs are
        ignored.
        """
        if noise is None or t is None:
            steps = self.noise_scheduler.config.num_train_timesteps
            noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
            t = torch.randint(0, steps, (x0.shape[0],), generator=generator, device=x0.device)
        drop = self.training_label_drop(y) if self.net.training else None
        out = self.net(self._noised(x0, noise, t), t, y, force_drop_ids=drop)[:, : self.latent_channels]
        return F.mse_loss(out.float(), training_target(self.noise_scheduler, x0, noise, t).float())

    def training_label_drop(self, y: torch.Tensor) -> torch.Tensor | None:
        """Which labels of this batch classifier-free-guidance training drops (a bool mask like ``y``; None without
        label dropout): drawn from (noise_seed, batch counter) for this process's rows of the global batch, like the
        training noise, so neither the global RNG nor validation changes them and a resumed run drops the same."""
        prob = self.net.y_embedder.dropout_prob
        if prob == 0:
            return None
        step, rank, world = self.batch_position()
        return draw_label_drop(y.shape[0], prob, self.noise_seed, step, rank, world, y.device)

    def net_inputs(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x0 = self._latents(batch)
        noise, t = self.training_noise(x0)
        return self._noised(x0, noise, t), t, self._labels(batch)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        # Noise and t ~ U{0, T - 1} from (noise_seed, batch counter) for this rank's rows of the global batch.
        x0, y = self._latents(batch), self._labels(batch)
        noise, t = self.training_noise(x0)
        mse = self.diffusion_loss(x0, y, noise=noise, t=t)
        loss = self.with_aux_loss(mse, x0.shape[0])
        if self.is_moe:
            self.log("train/mse", mse, batch_size=x0.shape[0])
        self.log("train/loss", loss, batch_size=x0.shape[0])  # shown by the progress bar at each log
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        # The training loss (without the MoE balance term: `train/mse` for an MoE) on the batch's images or cached
        # latents and labels, with the weights validation runs (the EMA callback swapped the average in) in eval mode
        # (no label dropout): noise and t from (val_seed, batch_idx) in their own stream, the same at every
        # validation, so `val/loss` is comparable across steps and training draws the same with or without it.
        x0, y = self._latents(batch), self._labels(batch)
        noise, t = self.validation_noise(x0, self.val_seed, batch_idx)
        loss = self.diffusion_loss(x0, y, noise=noise, t=t)
        self.log("val/loss", loss, prog_bar=True, batch_size=x0.shape[0], sync_dist=True)

    def on_validation_epoch_start(self) -> None:
        # The EMA callback's own hook ran first and swapped the averaged weights in, so the grid shows the EMA model.
        if self.trainer.sanity_checking or self.sampling.num_samples == 0:
            return
        log_dir = Path(self.trainer.log_dir or self.trainer.default_root_dir)  # a collective under DDP: all ranks ask
        if not self.trainer.is_global_zero:
            return
        images = self.sample(self.sample_labels())
        self.sample_grid = image_grid((images + 1) / 2, self.sampling.columns)  # (3, rows * H, columns * W) in [0, 1]
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

        The fine-tuning sampler (``sample_ensemble``) with no condition latents and one member; ``cfg_scale`` None
        runs the conditional model alone, a number runs ``DiT.forward_with_cfg``.
        """
        s = self.sampling
        side = self.net.input_size
        run = InferenceSettings(
            num_steps=num_steps or s.num_steps,
            timestep_spacing=s.timestep_spacing,
            eta=s.eta if eta is None else eta,
            seed=s.seed if seed is None else seed,
            max_batch=max(1, labels.shape[0]),
        )
        no_condition = torch.zeros((labels.shape[0], 0, side, side), device=self.device)
        was_training = self.net.training
        self.net.eval()  # eval mode: no label dropout while sampling
        try:
            latents = sample_ensemble(
                self.net, no_condition, labels, self.sampler, run, self.latent_channels, cfg_scale
            )
        finally:
            self.net.train(was_training)
        return latents[0]

    @torch.no_grad()
    def sample(self, labels: torch.Tensor, **kwargs) -> torch.Tensor:
        """Images (N, 3, H, W) in [-1, 1] of classes ``labels``; ``kwargs`` as ``sample_latents`` (default CFG scale:
        ``sampling.cfg_scale``)."""
        kwargs.setdefault("cfg_scale", self.sampling.cfg_scale)
        return self.codec.decode(self.sample_latents(labels, **kwargs)).clamp(-1, 1)

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
