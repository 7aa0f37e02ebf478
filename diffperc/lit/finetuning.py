"""Image-to-image diffusion fine-tuning for perception (paper §4, Marigold's recipe), one class for every task.

To run: ``diffperc fit --config configs/quickstart/depth.yaml`` then ``diffperc test ... --ckpt_path last``.
"""

import math
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torchmetrics import MetricCollection

from diffperc.codecs import Codec, PixelCodec
from diffperc.data.sampler import data_parallel_layout
from diffperc.diffusion import (
    DiffusionSettings,
    InferenceSettings,
    check_num_steps,
    ensemble,
    make_sampler,
    make_train_scheduler,
    sample_ensemble,
    training_target,
)
from diffperc.lit.checks import check_init_from, check_max_steps, check_record, module_record
from diffperc.lit.parallel import draw_noise_and_timesteps
from diffperc.models import (
    DiT,
    build_model,
    load_pretrained,
    moe_aux_loss,
    moe_config,
    parse_moe_suffix,
    read_network_state,
    widen_input_projection,
)
from diffperc.models import upcycle as upcycle_dense
from diffperc.models.moe import to_moe
from diffperc.models.pretrained import read_moe_config
from diffperc.models.router import PatchEmbedRouter
from diffperc.tasks import Task
from diffperc.utils import atomic_write_json


@dataclass
class Backbone:
    """The DiT to build: a preset name plus optional overrides of its shape and, for MoE presets, its expert layout.

    The MoE fields apply to ``-<E>E<k>A`` presets (``t1-4E2A``, ``DiT-S/2-8E2A``). Their defaults are this project's
    layout (GELU experts, one shared expert as wide as a routed one, normalised top-k weights); DiT-MoE's (paper §3.2)
    is ``expert_type: swiglu``, ``num_shared_experts: 2``, ``shared_expert_ratio: 1.0`` (two shared experts of width
    D, one fused SwiGLU of width 2D) and ``normalize_weights: false``. Fine-tuning from an MoE checkpoint
    (``--model.init_from``) takes the layout from the checkpoint instead.

    Args:
        name: Preset (``t1``..``t6``, ``DiT-S/2`` .. ``DiT-XL/8``, optionally ``-<E>E<k>A``; ``python -m
            diffperc.models`` lists them).
        patch_size: Override of the preset's patch size.
        hidden_size: Override of the preset's width.
        depth: Override of the preset's number of blocks.
        num_heads: Override of the preset's attention heads.
        learn_sigma: Keep DiT's variance outputs (ignored by the loss; only for official-checkpoint layouts).
        num_shared_experts: MoE presets: experts every token uses besides its top-k (0 = none).
        shared_expert_ratio: MoE presets: hidden width of one shared expert / width D; null = the MLP ratio (4), as
            wide as a routed expert.
        expert_type: MoE presets: ``gelu`` (DiT's MLP, so dense weights copy in) or ``swiglu`` (DiT-MoE's experts).
        normalize_weights: MoE presets: renormalise each token's top-k routing weights to sum to 1.
    """

    name: str = "t2"
    patch_size: int | None = None
    hidden_size: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    learn_sigma: bool = False
    num_shared_experts: int = 1
    shared_expert_ratio: float | None = None
    expert_type: Literal["gelu", "swiglu"] = "gelu"
    normalize_weights: bool = True

    def __post_init__(self):
        if self.num_shared_experts < 0:
            raise ValueError(f"`--model.backbone.num_shared_experts` must be >= 0, got {self.num_shared_experts}")
        if self.shared_expert_ratio is not None and self.shared_expert_ratio <= 0:
            raise ValueError(
                f"`--model.backbone.shared_expert_ratio` must be > 0 or null, got {self.shared_expert_ratio}"
            )
        if self.expert_type not in ("gelu", "swiglu"):
            raise ValueError(f"`--model.backbone.expert_type` must be gelu or swiglu, got {self.expert_type!r}")

    def build(self, dense: bool = False, **dit_kwargs) -> DiT:
        """The network: ``build_model`` on this preset (its dense base when ``dense``) with these overrides and
        ``dit_kwargs`` (``input_size``, ``in_channels``, ``num_classes``, ...)."""
        moe = parse_moe_suffix(self.name)
        return build_model(
            moe[0] if moe and dense else self.name,
            num_shared_experts=self.num_shared_experts,
            expert_type=self.expert_type,
            shared_expert_ratio=self.shared_expert_ratio,
            normalize_weights=self.normalize_weights,
            patch_size=self.patch_size,
            hidden_size=self.hidden_size,
            depth=self.depth,
            num_heads=self.num_heads,
            learn_sigma=self.learn_sigma,
            **dit_kwargs,
        )


@dataclass
class Upcycle:
    """Upcycling a dense network into a mixture of experts before fine-tuning (paper §4.4).

    When ``--model.init_from`` is already a mixture of experts, its own layout is loaded: ``num_experts`` and
    ``top_k`` may restate it (and stand in for a file that does not record its top-k) but not change it, and
    ``balance_loss_coef`` and ``capacity_factor`` apply to it.

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
        task: The perception task (conditioning, target coding, metrics), e.g. ``diffperc.tasks.DepthTask``; or a
            list of tasks for one generalist model (task id = list index): each task gets its own input projection
            (``PatchEmbedRouter``) and label row, training batches may mix tasks (``{task name: batch}``), and
            validation/test take one dataloader per task in the same order.
        codec: Images <-> latents; ``PixelCodec`` (default) or ``VAECodec``.
        backbone: The DiT preset and overrides.
        image_size: Training image side in pixels (sets the DiT's stored position-embedding grid).
        init_from: Pretrained weights (DiT ``.pt``, diffperc checkpoint or ``.safetensors``); None = from scratch.
        upcycle: Upcycle the (loaded) dense network into a mixture of experts before training; None = keep it.
        predict_task: Which task ``predict`` (and image logging) runs for a multi-task model (default: the first).
        activation_checkpointing: Recompute each DiT block's activations in backward (less memory, ~1/3 more compute).
        noise_seed: Seed of the training noise and timesteps, drawn per batch from (noise_seed, batch counter) for
            this process's rows of the global batch, so resumed and re-sharded runs draw the same noise.
        nonfinite: On a non-finite loss: ``raise`` (stop, naming the step and batch) or ``skip`` (drop the update and
            count it in ``train/skipped_batches``).
        optimizer: Optimizer factory (AdamW in the paper's recipes).
        lr_scheduler: LR schedule factory, stepped every optimisation step (exponential decay in the recipes).
        diffusion: Training noise schedule and prediction type.
        inference: Sampling settings for validation, test and predict.
        num_images_logged: Validation images written to TensorBoard at each validation.
    """

    def __init__(
        self,
        task: Task | list[Task],
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
        predict_task: str | None = None,
        activation_checkpointing: bool = False,
        noise_seed: int = 0,
        nonfinite: str = "raise",
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["task", "codec", "optimizer", "lr_scheduler"])
        for key, value in list(self.hparams.items()):  # plain values only, so weights_only loading accepts them
            if is_dataclass(value):
                self.hparams[key] = asdict(value)
        self.tasks: list[Task] = list(task) if isinstance(task, (list, tuple)) else [task]
        names = [t.name for t in self.tasks]
        if not self.tasks or len(set(names)) != len(names):
            raise ValueError(f"`--model.task` must hold one or more tasks with distinct names, got {names}")
        self.task_index = {name: i for i, name in enumerate(names)}
        if predict_task is not None and predict_task not in self.task_index:
            raise ValueError(f"`--model.predict_task` {predict_task!r} is not one of the model's tasks {names}")
        self.task = self.tasks[self.task_index[predict_task] if predict_task else 0]  # the task predict runs
        self.codec = codec if codec is not None else PixelCodec()
        self.backbone = _as(Backbone, backbone) or Backbone()
        self.diffusion = _as(DiffusionSettings, diffusion) or DiffusionSettings()
        self.inference = _as(InferenceSettings, inference) or InferenceSettings()
        self.upcycle = _as(Upcycle, upcycle)
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler
        self.num_images_logged = num_images_logged
        self.activation_checkpointing, self.noise_seed, self.nonfinite = activation_checkpointing, noise_seed, nonfinite
        if image_size <= 0:
            raise ValueError(f"`--model.image_size` must be positive, got {image_size}")
        if image_size % self.codec.downsample:
            raise ValueError(
                f"`--model.image_size`={image_size} must be a multiple of the codec's downsample factor "
                f"{self.codec.downsample}"
            )
        check_num_steps(self.inference.num_steps, self.diffusion)

        # 1. Build the DiT for one latent. A checkpoint that is already a mixture of experts (pretrained as one,
        #    `diffperc upcycle`, an upcycled run) brings its own layout: the dense base of the preset, then every
        #    MLP swapped for the checkpoint's SparseMoE layout.
        c = self.codec.latent_channels
        self.latent_channels = c
        multi = len(self.tasks) > 1
        source = read_network_state(init_from) if init_from else {}
        if init_from:
            check_init_from(init_from, self)  # a fine-tuned checkpoint of another task, schedule or codec
        stored = self._checkpoint_moe(init_from, source) if init_from else None
        self.net = self.backbone.build(
            dense=stored is not None,
            input_size=image_size // self.codec.downsample,
            in_channels=c,
            num_classes=len(self.tasks),  # label rows = task ids; no class label at fine-tuning time
            class_dropout_prob=0.0,
        )
        if stored is not None:
            to_moe(self.net, stored)
        # 2. One task: widen its input for [k condition latents, noisy target] (the widening rule keeps the response
        #    of an all-RGB input; load_pretrained applies the same rule to a one-latent checkpoint). Several tasks:
        #    one widened projection per task (PatchEmbedRouter).
        if not multi:
            widen_input_projection(self.net, self.task.num_conditions + 1)
        elif not source or any(k.startswith("x_embedder.routes.") for k in source):
            self._route_inputs()
        # 3. Pretrained weights, then upcycling of a dense network.
        u = self.upcycle
        if init_from:
            if stored is None and moe_config(self.net) is not None:
                raise ValueError(
                    f"`--model.init_from` {init_from} is a dense network but `--model.backbone.name` "
                    f"{self.backbone.name} is a mixture of experts: name its dense preset and set "
                    "`--model.upcycle.num_experts` / `--model.upcycle.top_k` to upcycle it"
                )
            load_pretrained(self.net, init_from)
            del source
        if multi and not hasattr(self.net.x_embedder, "routes"):
            self._route_inputs()  # routes initialised from the loaded one-latent projection
        if u and moe_config(self.net) is None:
            self.net = upcycle_dense(
                self.net, u.num_experts, u.top_k, u.capacity_factor, u.balance_loss_coef, u.router_init_std
            )

        # 4. Noise schedule for training; DDIM sampler over the same betas for inference.
        self.noise_scheduler = make_train_scheduler(self.diffusion)
        clip = self.inference.clip_sample if self.inference.clip_sample is not None else self.codec.clip_sample
        self.sampler = make_sampler(self.noise_scheduler, self.inference.timestep_spacing, clip)
        self.val_metrics = torch.nn.ModuleDict({t.name: t.metrics() for t in self.tasks})
        self.test_metrics = torch.nn.ModuleDict({t.name: t.metrics() for t in self.tasks})
        self.baseline_metrics = torch.nn.ModuleDict({t.name: t.metrics() for t in self.tasks})
        self.val_visuals: torch.Tensor | None = None
        self._test_image_shapes: dict[str, tuple[int, int, int]] = {}

    def _route_inputs(self) -> None:
        self.net.x_embedder = PatchEmbedRouter.from_patch_embed(
            self.net.x_embedder, [t.num_conditions + 1 for t in self.tasks]
        )

    def _checkpoint_moe(self, init_from: str, source: dict[str, torch.Tensor]) -> dict | None:
        """The SparseMoE layout to load ``init_from`` into, None for a dense file: the checkpoint's own (experts,
        top-k, shared experts, expert type, normalisation), which a preset suffix or ``--model.upcycle`` may restate
        but not contradict, plus the balance-loss and capacity settings of ``--model.upcycle`` when given."""
        stored = read_moe_config(init_from, source)
        if stored is None:
            return None
        b, u = self.backbone, self.upcycle
        suffix = parse_moe_suffix(b.name)
        asks = []  # (flag, layout it implies): fills in what a file without records can't tell, and must agree
        if suffix:
            implied = dict(num_experts=suffix[1], experts_per_token=suffix[2], normalize_weights=b.normalize_weights)
            asks.append((f"`--model.backbone.name {b.name}`", implied))
        if u:
            implied = dict(num_experts=u.num_experts, experts_per_token=u.top_k, normalize_weights=True)
            asks.append((f"`--model.upcycle.num_experts {u.num_experts} --model.upcycle.top_k {u.top_k}`", implied))
        layout = dict(stored)
        for flag, implied in asks:
            layout.update({k: v for k, v in implied.items() if layout[k] is None})
            wrong = [f"{k}={layout[k]}" for k in ("num_experts", "experts_per_token") if layout[k] != implied[k]]
            if wrong:
                raise ValueError(
                    f"`--model.init_from` {init_from} is a mixture of experts with {', '.join(wrong)}, which {flag} "
                    "contradicts: match the checkpoint, or leave the layout out (it is read from the checkpoint)"
                )
        if layout["experts_per_token"] is None or layout["normalize_weights"] is None:
            e, base = layout["num_experts"], suffix[0] if suffix else b.name
            raise ValueError(
                f"`--model.init_from` {init_from} holds a mixture of {e} experts with no record of how many are "
                f"active per token: set `--model.upcycle.num_experts {e} --model.upcycle.top_k <k>` (an upcycled "
                f"network), or `--model.backbone.name {base}-{e}E<k>A` with `--model.backbone.normalize_weights` "
                "(one pretrained as a mixture of experts)"
            )
        if u:  # training settings, not layout
            layout.update(balance_loss_coef=u.balance_loss_coef, capacity_factor=u.capacity_factor)
        return layout

    # ------------------------------------------------------------------ training
    def _groups(self, batch: dict) -> list[tuple[int, dict]]:
        """(task id, single-task batch) pairs: a mixed batch is ``{task name: batch}``, anything else is one task's."""
        if batch and all(isinstance(v, dict) for v in batch.values()):
            unknown = set(batch) - set(self.task_index)
            if unknown:
                raise ValueError(
                    f"Batch holds tasks {sorted(unknown)} the model was not built for: {list(self.task_index)}"
                )
            return [(self.task_index[name], sub) for name, sub in batch.items()]
        return [(self.tasks.index(self.task), batch)]

    def _task_ids(self, batch: dict, task_id: int = 0) -> torch.Tensor:
        n = next(v for v in batch.values() if isinstance(v, torch.Tensor)).shape[0]
        return torch.full((n,), task_id, dtype=torch.long, device=self.device)

    def encode_conditions(self, batch: dict, task: Task | None = None) -> torch.Tensor:
        """Condition latents (N, k * C, h, w), encoded once per batch."""
        return torch.cat([self.codec.encode(img) for img in (task or self.task).conditions(batch)], dim=1)

    def _training_inputs(self, batch: dict):
        """Network inputs (x, t, y), the regression target and the (task id, rows) groups of a training batch."""
        groups = self._groups(batch)
        width = max((self.tasks[i].num_conditions + 1) * self.latent_channels for i, _ in groups)
        rank, world = data_parallel_layout(self._trainer) if self._trainer is not None else (0, 1)
        step = self.trainer.fit_loop.total_batch_idx if self._trainer is not None else 0
        inputs, targets, timesteps, task_ids, rows = [], [], [], [], []
        for i, sub in groups:
            task = self.tasks[i]
            cond = self.encode_conditions(sub, task)
            x0 = self.codec.encode(task.encode_target(sub))
            # 1. Noise only the target latent at uniformly sampled timesteps (paper eq. 1); noise and timesteps come
            #    from (seed, batch counter, task), independent of the global RNG and exact on resume.
            noise, t = draw_noise_and_timesteps(
                x0, self.noise_scheduler.config.num_train_timesteps, self.noise_seed + 7919 * i, step, rank, world
            )
            x = torch.cat([cond, self.noise_scheduler.add_noise(x0, noise, t)], dim=1)  # [conditions, noisy target]
            inputs.append(F.pad(x, (0, 0, 0, 0, 0, width - x.shape[1])))  # zero channels up to the widest task
            targets.append(training_target(self.noise_scheduler, x0, noise, t))
            timesteps.append(t)
            task_ids.append(self._task_ids(sub, i))
            rows.append((i, x0.shape[0]))
        x, t, y = torch.cat(inputs), torch.cat(timesteps), torch.cat(task_ids)
        return (x, t, y), torch.cat(targets), rows

    def net_inputs(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Exactly what ``training_step`` passes to the network (read by the MACs counter)."""
        return self._training_inputs(batch)[0]

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        (x, t, y), target, rows = self._training_inputs(batch)
        # 2. One network call for the whole (possibly mixed) batch; regress the configured target (paper eq. 2).
        out = self.net(x, t, y)[:, : self.latent_channels]
        n = out.shape[0]
        loss = F.mse_loss(out.float(), target.float())
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        if len(self.tasks) > 1:
            start = 0
            for i, count in rows:
                part = slice(start, start + count)
                start += count
                task_loss = F.mse_loss(out[part].float(), target[part].float())
                self.log(f"train/{self.tasks[i].name}/loss", task_loss, batch_size=count)
        if self.is_moe:
            aux = moe_aux_loss(self.net)  # the balance loss of this forward, already scaled by its coefficient
            self.log("train/moe_aux_loss", aux, batch_size=n)
            loss = loss + aux
        return loss

    def configure_model(self) -> None:
        # FSDP2 under ModelParallelStrategy: shard each DiT block, then the root (idempotent: Lightning may call twice).
        from lightning.pytorch.strategies import ModelParallelStrategy

        from diffperc.lit.parallel import apply_fsdp2, checkpoint_blocks

        if self._trainer is not None and isinstance(self.trainer.strategy, ModelParallelStrategy):
            apply_fsdp2(self.net, self.device_mesh, activation_checkpointing=self.activation_checkpointing)
        elif self.activation_checkpointing:
            checkpoint_blocks(self.net)

    @property
    def is_moe(self) -> bool:
        return moe_config(self.net) is not None

    def setup(self, stage: str) -> None:
        if stage == "fit":
            check_max_steps(self.trainer)  # the CLI checks before writing anything; this is for Python callers

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # What rebuilds the network without the config (used by `diffperc export` and `load_pretrained` users), and
        # what a model loading the checkpoint must match: tasks, prediction type and schedule, codec (`lit/checks.py`).
        checkpoint["diffperc"] = module_record(self)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # `--ckpt_path` (resume, test, sweep tts): one line naming the first field that differs, instead of
        # Lightning's size-mismatch dump, or a silent wrong score where the shapes agree. The CLI ran the same check
        # before writing anything (`check_before_run`); this one covers `trainer.test(model, ckpt_path=...)`.
        from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

        trainer = self._trainer
        # Sharded strategies have wrapped or already loaded the weights: compare the records only.
        sharded = trainer is not None and isinstance(trainer.strategy, (FSDPStrategy, ModelParallelStrategy))
        check_record(trainer.ckpt_path if trainer is not None else "checkpoint", checkpoint, self, weights=not sharded)

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self.net.parameters())
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ----------------------------------------------------------------- inference
    @torch.no_grad()
    def predict_batch(self, batch: dict, settings: InferenceSettings | None = None, task_id: int | None = None):
        """Samples, decodes and merges an ensemble for one task's batch: returns (prediction, uncertainty or None)."""
        settings = settings or self.inference
        task_id = self.tasks.index(self.task) if task_id is None else task_id
        task = self.tasks[task_id]
        cond = self.encode_conditions(batch, task)
        y = self._task_ids(batch, task_id)
        latents = sample_ensemble(self.net, cond, y, self.sampler, settings, self.latent_channels)
        n, b = latents.shape[:2]
        images = self.codec.decode(latents.flatten(0, 1)).clamp(-1, 1)
        preds = task.decode(images, batch)
        preds = preds.view(n, b, *preds.shape[1:])  # (N, B, C, H, W)
        if n == 1:
            return preds[0], None
        return ensemble(preds, settings.reducer or task.reducer)

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        task = self.tasks[dataloader_idx]  # one validation loader per task, in task order
        pred, _ = self.predict_batch(batch, task_id=dataloader_idx)
        task.update_metrics(self.val_metrics[task.name], pred, batch)
        if batch_idx == 0 and dataloader_idx == 0 and self.num_images_logged > 0:
            k = self.num_images_logged
            self.val_visuals = task.visualize(pred[:k], {key: v[:k] for key, v in batch.items()})

    def on_validation_epoch_end(self) -> None:
        for task in self.tasks:
            self._log_metrics(self.val_metrics[task.name], "val", task.name)

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        task = self.tasks[dataloader_idx]
        if batch_idx == 0:
            self._test_image_shapes[task.name] = tuple(task.conditions(batch)[0].shape[1:])
        pred, _ = self.predict_batch(batch, task_id=dataloader_idx)
        task.update_metrics(self.test_metrics[task.name], pred, batch)
        baseline = task.baseline(batch)
        if baseline is not None:
            task.update_metrics(self.baseline_metrics[task.name], baseline, batch)

    def on_test_epoch_end(self) -> None:
        # One task: flat keys (`abs_rel`, `baseline/abs_rel`); several: prefixed by the task (`depth/abs_rel`,
        # `baseline/depth/abs_rel`, `depth/compute/test_macs_per_sample`).
        multi = len(self.tasks) > 1
        record: dict = {"task": self.task.name if not multi else [t.name for t in self.tasks]}
        for task in self.tasks:
            prefix = f"{task.name}/" if multi else ""
            values = self._log_metrics(self.test_metrics[task.name], "test", task.name)
            record.update({prefix + k: v for k, v in values.items()})
            baseline = self._compute(self.baseline_metrics[task.name])
            record.update({f"baseline/{prefix}{k}": v for k, v in baseline.items()})
            if task.name in self._test_image_shapes:
                macs = self.test_macs_per_sample(self._test_image_shapes[task.name], task)
                record[f"{prefix}compute/test_macs_per_sample"] = macs
        record["inference"] = asdict(self.inference)
        bad = [k for k, v in record.items() if isinstance(v, float) and not math.isfinite(v)]
        if bad:  # never written: strict JSON has no NaN, and a NaN score must not pass for a result
            raise FloatingPointError(
                f"Test metric `{bad[0]}` is {record[bad[0]]}"
                + (f" (and {len(bad) - 1} more: {bad[1:4]})" if len(bad) > 1 else "")
                + ": non-finite predictions or empty ground truth; test_metrics.json was not written"
            )
        log_dir = Path(self.trainer.log_dir or self.trainer.default_root_dir)  # a collective under DDP: all ranks ask
        if self.trainer.is_global_zero:
            atomic_write_json(log_dir / "test_metrics.json", record)
        self.test_results = record

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        pred, uncertainty = self.predict_batch(batch)
        return {"pred": pred, "uncertainty": uncertainty, "batch": batch}

    def test_macs_per_sample(self, image_shape: tuple[int, int, int], task: Task | None = None) -> int:
        """Inference MACs for one input of ``image_shape`` (C, H, W): N members x steps x one network forward, plus
        encoding the conditions once and decoding the N predicted latents (zero for the pixel codec)."""
        from diffperc.callbacks.macs import _unsharded
        from diffperc.compute import count_macs

        settings, task = self.inference, task or self.task
        x = torch.zeros(1, *image_shape, device=self.device)
        latent = self.codec.encode(x)
        net_in = torch.zeros(1, latent.shape[1] * (task.num_conditions + 1), *latent.shape[2:], device=self.device)
        t = torch.zeros(1, dtype=torch.long, device=self.device)
        y = torch.full((1,), self.tasks.index(task), dtype=torch.long, device=self.device)
        forward = count_macs(_unsharded(self.net), net_in, t, y)
        codec = _CodecMACs(self.codec)
        encode = count_macs(codec, x, mode="encode") * task.num_conditions
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

    def _log_metrics(self, metrics: MetricCollection, stage: str, task_name: str) -> dict[str, float]:
        values = self._compute(metrics)
        for key, value in values.items():
            self.log(f"{stage}/{task_name}/{key}", value)  # torchmetrics already synced across processes
        return values

    def configure_callbacks(self):
        from diffperc.callbacks import (
            ExpertLoadLogger,
            MACsCounter,
            NonFiniteGuard,
            PredictionImageLogger,
            PredictionWriter,
        )
        from diffperc.checkpoint_io import RNGStateCheckpoint

        extra = [ExpertLoadLogger()] if self.is_moe else []
        callbacks = [
            PredictionImageLogger(),
            PredictionWriter(),
            MACsCounter(),
            NonFiniteGuard(self.nonfinite),
            RNGStateCheckpoint(),
            *extra,
        ]
        # Lightning replaces a trainer callback by a model callback of the same type: keep the user's own ones.
        present = {type(cb) for cb in self.trainer.callbacks} if self._trainer is not None else set()
        return [cb for cb in callbacks if type(cb) not in present]


class _CodecMACs(torch.nn.Module):
    """Lets ``count_macs`` see a codec's encode or decode as one module call."""

    def __init__(self, codec: Codec):
        super().__init__()
        self.codec = codec

    def forward(self, x: torch.Tensor, mode: str) -> torch.Tensor:
        return self.codec.encode(x) if mode == "encode" else self.codec.decode(x)
