"""Image-to-image diffusion fine-tuning for perception (paper §4, Marigold's recipe), one class for every task.

To run: ``diffperc fit --config configs/quickstart/depth.yaml`` then ``diffperc test ... --ckpt_path last``.
"""

import math
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torchmetrics import MeanMetric, MetricCollection

from diffperc.codecs import Codec
from diffperc.diffusion import (
    DiffusionSettings,
    InferenceSettings,
    check_num_steps,
    ensemble,
    sample_ensemble,
    training_target,
)
from diffperc.lit.base import DiffusionModule, EMASettings, settings
from diffperc.lit.checks import check_init_from, check_max_steps, check_record, module_record
from diffperc.models.build import Backbone, Upcycle, build_network
from diffperc.tasks import Task
from diffperc.utils import atomic_write_json


class PerceptionFinetuning(DiffusionModule):
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
        ema: EMA of the weights for validation, test and checkpoints (``diffperc.lit.EMASettings``); None = off.
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
        ema: EMASettings | None = None,
    ):
        super().__init__(
            codec, image_size, optimizer, lr_scheduler, diffusion, ema, noise_seed, activation_checkpointing
        )
        self.save_plain_hyperparameters(ignore=["task", "codec", "optimizer", "lr_scheduler"])
        self.tasks: list[Task] = list(task) if isinstance(task, (list, tuple)) else [task]
        names = [t.name for t in self.tasks]
        if not self.tasks or len(set(names)) != len(names):
            raise ValueError(f"`--model.task` must hold one or more tasks with distinct names, got {names}")
        self.task_index = {name: i for i, name in enumerate(names)}
        if predict_task is not None and predict_task not in self.task_index:
            raise ValueError(f"`--model.predict_task` {predict_task!r} is not one of the model's tasks {names}")
        self.task = self.tasks[self.task_index[predict_task] if predict_task else 0]  # the task predict runs
        self.backbone = settings(Backbone, backbone)
        self.inference = settings(InferenceSettings, inference)
        self.upcycle = settings(Upcycle, upcycle) if upcycle is not None else None
        self.num_images_logged, self.nonfinite = num_images_logged, nonfinite
        check_num_steps(self.inference.num_steps, self.diffusion)
        for t in self.tasks:
            t.check_reducer(self.inference.reducer, "--model.inference.reducer")
        if init_from:
            check_init_from(init_from, self)  # a fine-tuned checkpoint of another task, schedule or codec

        # The DiT over [k condition latents, noisy target] per task (one widened input projection, or one per task),
        # from `init_from` when given, upcycled when asked (models/build.py).
        self.net = build_network(
            self.backbone,
            input_size=image_size // self.codec.downsample,
            in_channels=self.latent_channels,
            num_classes=len(self.tasks),  # label rows = task ids; no class label at fine-tuning time
            task_inputs=[t.num_conditions + 1 for t in self.tasks],
            init_from=init_from,
            upcycle_to=self.upcycle,
        )
        self.sampler = self.make_sampler(self.inference.timestep_spacing, self.inference.clip_sample)
        self.val_metrics = torch.nn.ModuleDict({t.name: t.metrics() for t in self.tasks})
        self.test_metrics = torch.nn.ModuleDict({t.name: t.metrics() for t in self.tasks})
        self.baseline_metrics = torch.nn.ModuleDict({t.name: t.metrics() for t in self.tasks})
        # `val/loss` over every validation sample, and `val/<task>/loss` per task of a generalist (no NaN check: it
        # would read each batch's loss back to the host).
        self.val_loss = MeanMetric(nan_strategy="disable")
        self.val_task_losses = torch.nn.ModuleDict(
            {t.name: MeanMetric(nan_strategy="disable") for t in self.tasks} if len(self.tasks) > 1 else {}
        )
        self.val_visuals: dict[str, torch.Tensor] = {}  # task name -> (N, 3, H, W) in [0, 1]
        self._test_image_shapes: dict[str, tuple[int, int, int]] = {}

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

    def _training_inputs(self, batch: dict, draw: Callable | None = None):
        """Network inputs (x, t, y), the regression target and the (task id, rows) groups of a training batch.

        ``draw(x0, task_id)`` gives the noise and timesteps of one task's rows (``task_id`` None for a single-task
        model); default ``training_noise``."""
        draw = draw or self.training_noise
        groups = self._groups(batch)
        width = max((self.tasks[i].num_conditions + 1) * self.latent_channels for i, _ in groups)
        multi = len(self.tasks) > 1
        inputs, targets, timesteps, task_ids, rows = [], [], [], [], []
        for i, sub in groups:
            task = self.tasks[i]
            cond = self.encode_conditions(sub, task)
            x0 = self.codec.encode(task.encode_target(sub))
            # 1. Noise only the target latent at uniformly sampled timesteps (paper eq. 1), from (seed, batch, task).
            noise, t = draw(x0, i if multi else None)
            x = torch.cat([cond, self.noise_scheduler.add_noise(x0, noise, t)], dim=1)  # [conditions, noisy target]
            inputs.append(F.pad(x, (0, 0, 0, 0, 0, width - x.shape[1])))  # zero channels up to the widest task
            targets.append(training_target(self.noise_scheduler, x0, noise, t))
            timesteps.append(t)
            task_ids.append(self._task_ids(sub, i))
            rows.append((i, x0.shape[0]))
        x, t, y = torch.cat(inputs), torch.cat(timesteps), torch.cat(task_ids)
        return (x, t, y), torch.cat(targets), rows

    def net_inputs(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self._training_inputs(batch)[0]

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        (x, t, y), target, rows = self._training_inputs(batch)
        # 2. One network call for the whole (possibly mixed) batch; regress the configured target (paper eq. 2).
        out = self.net(x, t, y)[:, : self.latent_channels]
        n = out.shape[0]
        loss = F.mse_loss(out.float(), target.float())
        self.log("train/loss", loss, batch_size=n)  # the progress bar shows it at each log (no per-step sync)
        if len(self.tasks) > 1:
            start = 0
            for i, count in rows:
                part = slice(start, start + count)
                start += count
                task_loss = F.mse_loss(out[part].float(), target[part].float())
                self.log(f"train/{self.tasks[i].name}/loss", task_loss, batch_size=count)
        return self.with_aux_loss(loss, n)

    def validation_loss(self, batch: dict, batch_idx: int, task_id: int = 0) -> torch.Tensor | None:
        """``train/loss`` (the MSE of eq. 2, without the MoE balance term) on a validation batch of task ``task_id``.

        With the weights validation runs (EMA ones when the module has an EMA: the callback swapped them in) and noise
        and timesteps from ``validation_noise(x0, noise_seed, batch_idx[, task_id])``: the same draws at every
        validation, so ``val/loss`` moves with the weights only, and the global RNG and the training noise are left
        alone. A subclass that trains another loss overrides this; until it does, None (no ``val/loss``).
        """
        if type(self).training_step is not PerceptionFinetuning.training_step:
            return None  # not the diffusion loss this computes: a `val/loss` beside its train/loss would mislead

        def draw(x0: torch.Tensor, task: int | None) -> tuple[torch.Tensor, torch.Tensor]:
            return self.validation_noise(x0, self.noise_seed, batch_idx, *(() if task is None else (task,)))

        (x, t, y), target, _ = self._training_inputs({self.tasks[task_id].name: batch}, draw)
        out = self.net(x, t, y)[:, : self.latent_channels]
        return F.mse_loss(out.float(), target.float())

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
        self._loaded_step = int(checkpoint.get("global_step", 0))
        # Sharded strategies have wrapped or already loaded the weights: compare the records only.
        sharded = trainer is not None and isinstance(trainer.strategy, (FSDPStrategy, ModelParallelStrategy))
        check_record(trainer.ckpt_path if trainer is not None else "checkpoint", checkpoint, self, weights=not sharded)

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
        loss = self.validation_loss(batch, batch_idx, dataloader_idx)
        if loss is not None:  # averaged over samples, logged at epoch end (no host read per batch)
            self.val_loss.update(loss, weight=pred.shape[0])
            if task.name in self.val_task_losses:
                self.val_task_losses[task.name].update(loss, weight=pred.shape[0])
        task.update_metrics(self.val_metrics[task.name], pred, batch)
        if batch_idx == 0 and self.num_images_logged > 0:  # every task's first batch (one loader per task)
            k = self.num_images_logged
            self.val_visuals[task.name] = task.visualize(pred[:k], {key: v[:k] for key, v in batch.items()})

    def on_validation_epoch_end(self) -> None:
        for task in self.tasks:
            self._log_metrics(self.val_metrics[task.name], "val", task.name)
        losses = [("val/loss", self.val_loss), *((f"val/{name}/loss", m) for name, m in self.val_task_losses.items())]
        for key, metric in losses:
            if metric.update_count:
                self.log(key, metric.compute(), prog_bar=key == "val/loss")  # torchmetrics synced the processes
                metric.reset()

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
        # test_metrics.json holds every number twice. The `metrics` block has the keys the logs and the sweep's result
        # rows use, alike for one task or several: `test/<task>/<metric>`, `baseline/<task>/<metric>` and
        # `compute/test_macs_per_sample` (several tasks: `compute/<task>/test_macs_per_sample`). The flat keys stay
        # for older readers: one task `abs_rel`, `baseline/abs_rel`; several prefixed by the task (`depth/abs_rel`,
        # `baseline/depth/abs_rel`, `depth/compute/test_macs_per_sample`).
        multi = len(self.tasks) > 1
        record: dict = {"task": self.task.name if not multi else [t.name for t in self.tasks]}
        metrics: dict = {}
        for task in self.tasks:
            prefix = f"{task.name}/" if multi else ""
            values = self._log_metrics(self.test_metrics[task.name], "test", task.name)
            record.update({prefix + k: v for k, v in values.items()})
            metrics.update({f"test/{task.name}/{k}": v for k, v in values.items()})
            baseline = self._compute(self.baseline_metrics[task.name])
            record.update({f"baseline/{prefix}{k}": v for k, v in baseline.items()})
            metrics.update({f"baseline/{task.name}/{k}": v for k, v in baseline.items()})
            if task.name in self._test_image_shapes:
                macs = self.test_macs_per_sample(self._test_image_shapes[task.name], task)
                record[f"{prefix}compute/test_macs_per_sample"] = macs
                metrics[f"compute/{prefix}test_macs_per_sample"] = macs
        log_dir = Path(self.trainer.log_dir or self.trainer.default_root_dir)  # a collective under DDP: all ranks ask
        record["inference"] = asdict(self.inference)
        record["global_step"] = self.trained_step
        record["ckpt_path"] = tested_checkpoint(self.trainer.ckpt_path, log_dir)
        record["metrics"] = metrics
        # Logged at the step the tested weights were trained to (TensorBoard x-axis), not at step 0.
        self.log("step", float(self.trained_step))
        bad = [k for k, v in record.items() if isinstance(v, float) and not math.isfinite(v)]
        if bad:  # never written: strict JSON has no NaN, and a NaN score must not pass for a result
            raise FloatingPointError(
                f"Test metric `{bad[0]}` is {record[bad[0]]}"
                + (f" (and {len(bad) - 1} more: {bad[1:4]})" if len(bad) > 1 else "")
                + ": non-finite predictions or empty ground truth; test_metrics.json was not written"
            )
        if self.trainer.is_global_zero:
            atomic_write_json(log_dir / "test_metrics.json", record)
        self.test_results = record

    def on_train_start(self) -> None:
        self._loaded_step = None  # training moves on from a resumed checkpoint's step

    @property
    def trained_step(self) -> int:
        """Optimizer steps behind the current weights: the loaded checkpoint's, else those of this fit."""
        loaded = getattr(self, "_loaded_step", None)
        return loaded if loaded is not None else (self.trainer.global_step if self._trainer is not None else 0)

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

    @classmethod
    def default_callbacks(cls, hparams: dict, progress_bar: bool = True) -> list[dict]:
        # ExpertLoadLogger logs nothing for a dense network: it is listed for every run, as the config shows it.
        mode = hparams.get("nonfinite", "raise")
        return [
            {"class_path": "diffperc.callbacks.PredictionImageLogger"},
            {"class_path": "diffperc.callbacks.PredictionWriter"},
            *super().default_callbacks(hparams, progress_bar),
            {"class_path": "diffperc.callbacks.NonFiniteGuard", "init_args": {"mode": mode}},
            {"class_path": "diffperc.checkpoint_io.RNGStateCheckpoint"},
            {"class_path": "diffperc.callbacks.ExpertLoadLogger"},
        ]


def tested_checkpoint(ckpt_path: str | Path | None, log_dir: Path) -> str | None:
    """How test_metrics.json names the checkpoint it scored: relative to the run folder when inside it (so the record
    survives moving the folder), else absolute; None for weights tested as they were in memory."""
    if not ckpt_path:
        return None
    path = Path(ckpt_path).resolve()
    return path.relative_to(log_dir.resolve()).as_posix() if path.is_relative_to(log_dir.resolve()) else str(path)


class _CodecMACs(torch.nn.Module):
    """Lets ``count_macs`` see a codec's encode or decode as one module call."""

    def __init__(self, codec: Codec):
        super().__init__()
        self.codec = codec

    def forward(self, x: torch.Tensor, mode: str) -> torch.Tensor:
        return self.codec.encode(x) if mode == "encode" else self.codec.decode(x)
