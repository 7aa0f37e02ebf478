"""What the two diffusion LightningModules share: fine-tuning for perception (``PerceptionFinetuning``) and
class-conditional pretraining (``DiffusionPretraining``) differ in their data, network inputs and evaluation only.

Shared here: settings read from YAML or from a checkpoint's hyper-parameters, the frozen codec, the DDPM training
schedule and the DDIM sampler over the same betas, training noise seeded by (seed, batch counter, rank), the fixed
noise of the validation loss, the MoE balance loss, optimizers, sharding and activation checkpointing, an optional EMA
of the weights, and the callbacks every run gets.
"""

import dataclasses
import inspect
import warnings
from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler
from lightning.pytorch import LightningModule
from lightning.pytorch.callbacks import EMAWeightAveraging, RichProgressBar, TQDMProgressBar
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from diffperc.codecs import Codec, PixelCodec
from diffperc.data.sampler import data_parallel_layout
from diffperc.diffusion import DiffusionSettings, make_sampler, make_train_scheduler
from diffperc.lit.parallel import draw_noise_and_timesteps
from diffperc.models import moe_aux_loss, moe_config
from diffperc.seeding import derive_seed

#: ``derive_seed`` stream of the validation loss's noise and timesteps (DDIM sampling uses streams 0 and 1).
VAL_LOSS_STREAM = 2


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


def settings(cls: type, value, default=None):
    """A settings dataclass from an instance, a dict (hyper-parameters read back from a checkpoint) or None
    (``default``, else the dataclass defaults)."""
    if value is None:
        return default if default is not None else cls()
    return cls(**value) if isinstance(value, dict) else value


def plain(value):
    """A hyper-parameter as plain containers and scalars, so ``torch.load(weights_only=True)`` reads checkpoints."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return plain(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return f"{type(value).__module__}.{type(value).__qualname__}"


class DiffusionModule(LightningModule):
    """Base of the diffusion LightningModules. Subclasses build ``self.net`` (``diffperc.models.build_network``)
    and define ``training_step`` and ``net_inputs``.

    Args:
        codec: Images <-> latents; ``PixelCodec`` (default) or ``VAECodec`` (frozen).
        image_size: Training image side in pixels; a multiple of the codec's downsampling.
        optimizer: Optimizer factory.
        lr_scheduler: LR schedule factory, stepped every optimizer step; None = constant.
        diffusion: Training noise schedule and prediction type.
        ema: EMA of the weights (``decay`` None: off).
        noise_seed: Seed of the training noise and timesteps, drawn per batch from (noise_seed, batch counter) for
            this process's rows of the global batch, so resumed and re-sharded runs draw the same noise and every
            data-parallel rank draws different noise.
        activation_checkpointing: Recompute each DiT block's activations in backward (less memory, ~1/3 more compute).
    """

    def __init__(
        self,
        codec: Codec | None,
        image_size: int,
        optimizer: OptimizerCallable,
        lr_scheduler: LRSchedulerCallable | None,
        diffusion: DiffusionSettings | dict | None,
        ema: EMASettings | dict | None,
        noise_seed: int,
        activation_checkpointing: bool,
    ):
        super().__init__()
        self.codec = codec if codec is not None else PixelCodec()
        self.latent_channels = self.codec.latent_channels
        self.diffusion = settings(DiffusionSettings, diffusion)
        self.ema = settings(EMASettings, ema, default=EMASettings(decay=None))
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler
        self.noise_seed, self.activation_checkpointing = noise_seed, activation_checkpointing
        if image_size <= 0:
            raise ValueError(f"`--model.image_size` must be positive, got {image_size}")
        if image_size % self.codec.downsample:
            raise ValueError(
                f"`--model.image_size`={image_size} must be a multiple of the codec's downsample factor "
                f"{self.codec.downsample}"
            )
        self.noise_scheduler = make_train_scheduler(self.diffusion)

    def save_plain_hyperparameters(self, ignore: list[str]) -> None:
        """``save_hyperparameters`` with every value made plain (see ``plain``), called by the subclass's init."""
        self.save_hyperparameters(ignore=ignore, frame=inspect.currentframe().f_back)
        for key in list(self.hparams):
            self.hparams[key] = plain(self.hparams[key])

    def make_sampler(self, timestep_spacing: str, clip_sample: bool | None) -> DDIMScheduler:
        """A DDIM sampler over the training betas; ``clip_sample`` None takes the codec's choice."""
        clip = clip_sample if clip_sample is not None else self.codec.clip_sample
        return make_sampler(self.noise_scheduler, timestep_spacing, clip)

    # ------------------------------------------------------------------ training
    def training_noise(self, x0: torch.Tensor, task_id: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Noise like ``x0`` and timesteps t ~ U{0, T - 1} for this batch: drawn from (noise_seed, batch counter,
        task) for this process's rows of the global batch, independent of the global RNG and exact on resume."""
        step, rank, world = self.batch_position()
        num_timesteps = self.noise_scheduler.config.num_train_timesteps
        return draw_noise_and_timesteps(x0, num_timesteps, self.noise_seed, step, rank, world, task_id)

    def batch_position(self) -> tuple[int, int, int]:
        """(training batch counter, data-parallel rank, world size): what seeds this batch's training draws; the
        counter survives resume. (0, 0, 1) outside a Trainer."""
        if self._trainer is None:
            return 0, 0, 1
        return self.trainer.fit_loop.total_batch_idx, *data_parallel_layout(self._trainer)

    def validation_noise(self, x0: torch.Tensor, seed: int, *counters: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Noise like ``x0`` and timesteps t ~ U{0, T - 1} for the validation loss of one batch, from their own
        generator seeded by ``derive_seed(seed, *counters, stream=VAL_LOSS_STREAM)``: the same draws at every
        validation (``val/loss`` moves with the weights only), and neither the global RNG nor the training noise
        stream is touched, so a run trains the same with or without validation.

        As for the training noise, the draw covers the global batch and this process keeps rows ``rank::world``, the
        samples Lightning's distributed validation sampler gives it: W processes with batch N draw what one process
        with batch W * N draws, so ``val/loss`` does not depend on the number of processes."""
        _, rank, world = self.batch_position()
        g = torch.Generator(device=x0.device).manual_seed(derive_seed(seed, *counters, stream=VAL_LOSS_STREAM))
        n, steps = x0.shape[0], self.noise_scheduler.config.num_train_timesteps
        noise = torch.randn((n * world, *x0.shape[1:]), generator=g, device=x0.device, dtype=x0.dtype)
        t = torch.randint(0, steps, (n * world,), generator=g, device=x0.device)
        return noise[rank::world].contiguous(), t[rank::world].contiguous()

    def net_inputs(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Exactly the (x, t, y) ``training_step`` passes to the network (read by ``MACsCounter``)."""
        raise NotImplementedError

    @property
    def is_moe(self) -> bool:
        return moe_config(self.net) is not None

    def with_aux_loss(self, loss: torch.Tensor, batch_size: int) -> torch.Tensor:
        """``loss`` plus the MoE balance loss of this forward (already scaled by its coefficient), logged as
        ``train/moe_aux_loss``; ``loss`` itself for a dense network."""
        if not self.is_moe:
            return loss
        aux = moe_aux_loss(self.net)
        self.log("train/moe_aux_loss", aux, batch_size=batch_size)
        return loss + aux

    def on_before_optimizer_step(self, optimizer) -> None:
        # `train/grad_norm` (L2 over every gradient, after accumulation and before clipping) on the logging interval
        # only: reading it back is a host sync. Sharded gradients (FSDP) hold only this rank's part: not logged.
        from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

        trainer = self._trainer
        if trainer is None or not trainer._logger_connector.should_update_logs:
            return
        if isinstance(trainer.strategy, (FSDPStrategy, ModelParallelStrategy)):
            return
        grads = [p.grad for p in self.net.parameters() if p.grad is not None]
        if grads:
            self.log("train/grad_norm", torch.nn.utils.get_total_norm(grads))

    def configure_model(self) -> None:
        # FSDP2 under ModelParallelStrategy: shard each DiT block, then the root (idempotent: Lightning may call twice).
        from lightning.pytorch.strategies import ModelParallelStrategy

        from diffperc.lit.parallel import apply_fsdp2, checkpoint_blocks

        if self._trainer is not None and isinstance(self.trainer.strategy, ModelParallelStrategy):
            apply_fsdp2(self.net, self.device_mesh, activation_checkpointing=self.activation_checkpointing)
        elif self.activation_checkpointing:
            checkpoint_blocks(self.net)

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self.net.parameters())
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ----------------------------------------------------------------- callbacks
    @classmethod
    def default_callbacks(cls, hparams: dict, progress_bar: bool = True) -> list[dict]:
        """The callbacks every run of this module gets unless the trainer already has one of the same class, as
        ``trainer.callbacks`` entries (``class_path`` and ``init_args``).

        A function of the module's init arguments, so that the ``diffperc`` command lists them in the config it
        prints (``--print_config``) and saves (``config.yaml``) before the module exists, and runs them as trainer
        callbacks; ``configure_callbacks`` adds them to runs set up without the command.

        Args:
            hparams: The module's init arguments (as parsed from a config, or ``self.hparams``).
            progress_bar: Whether the trainer would show Lightning's default progress bar, which ``StepProgressBar``
                replaces; a user's own bar, or none, stays as it is.
        """
        # Every fit counts its training MACs (train_macs.json, `compute/train_macs`), logs samples/s (and MFU where
        # the device's peak is known), fits power laws of its losses and validation metrics against those MACs
        # (`laws/...`, the `laws` block of train_macs.json) and shows its progress in optimizer steps of `max_steps`.
        callbacks = [
            {"class_path": "diffperc.callbacks.MACsCounter"},
            {"class_path": "diffperc.callbacks.TrainingThroughput"},
            {"class_path": "diffperc.callbacks.PowerLawMonitor"},
        ]
        if progress_bar:
            callbacks.append({"class_path": "diffperc.callbacks.StepProgressBar"})
        return callbacks

    def configure_callbacks(self):
        # Lightning replaces a trainer callback by a model callback of the same type: keep the user's own ones. Under
        # the `diffperc` command the defaults are trainer callbacks already (its config lists them): none is added.
        from lightning.pytorch.cli import instantiate_class

        trainer = self._trainer
        present = {type(cb) for cb in trainer.callbacks} if trainer is not None else set()
        # StepProgressBar takes the place of Lightning's default bar: its tqdm bar (Lightning swaps a trainer callback
        # for a model callback of a subclass), or its rich bar where `rich` is installed (taken out here).
        bar = trainer.progress_bar_callback if trainer is not None else None
        default_bar = type(bar) in (TQDMProgressBar, RichProgressBar)
        specs = self.default_callbacks(dict(self.hparams), progress_bar=default_bar)
        callbacks = [cb for cb in (instantiate_class((), spec) for spec in specs) if type(cb) not in present]
        if type(bar) is RichProgressBar:
            trainer.callbacks.remove(bar)
        if self.ema.decay is None:
            return callbacks
        # Lightning warns whenever a module defines `configure_model`; ours shards only under ModelParallelStrategy.
        warnings.filterwarnings("ignore", "You're using the WeightAveraging callback with a model that overrides")
        # Returned here so the recipe always has its EMA; it replaces an EMAWeightAveraging given in the config.
        return callbacks + [
            EMAWeightAveraging(
                device="cpu" if self.ema.cpu else None,
                decay=self.ema.decay,
                update_every_n_steps=self.ema.update_every_n_steps,
                update_starting_at_step=self.ema.start_step,
            )
        ]
