"""The one-step end-to-end control for depth: the fine-tuning recipe's DiT and conditioning, trained as a
deterministic one-pass predictor with an affine-invariant loss instead of as a denoiser (E2E-FT, Garcia et al. 2024,
"Fine-Tuning Image-Conditional Diffusion Models is Easier than You Think", https://arxiv.org/abs/2409.11355).

To run: ``diffperc fit --config configs/quickstart/depth.yaml --config configs/quickstart/depth_e2e.yaml`` then
``diffperc test`` with the same two configs and ``--ckpt_path last``.
"""

import torch

from diffperc.codecs import PixelCodec
from diffperc.diffusion import InferenceSettings
from diffperc.lit.base import settings
from diffperc.lit.checks import module_record
from diffperc.lit.finetuning import PerceptionFinetuning
from diffperc.tasks import DepthTask, Task

#: Written into the checkpoint's ``diffperc`` record, so a diffusion checkpoint is not resumed or tested as this model.
OBJECTIVE = "one_step_affine_invariant"


def affine_invariant_l1(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean absolute error of ``pred`` after per-image least-squares scale-and-shift alignment to ``target``.

    Per image: s, t minimise sum_valid (s * pred + t - target)^2 in closed form (s = cov / var, t = mean target -
    s * mean pred, as ``metrics.functional.align_scale_shift``), then |s * pred + t - target| is averaged over the
    valid pixels; the loss is the mean over the images that have valid pixels (each image weighs the same, as in the
    test metrics). Gradients flow through s and t. An image whose prediction has no variance on its valid pixels gets
    s = 0 (its aligned prediction is the mean target) through a branch with no gradient, so it never yields NaN.

    Args:
        pred: Predictions (N, 1, H, W).
        target: Ground truth (N, 1, H, W) in the task's coding.
        valid: Valid pixels (N, 1, H, W), bool.

    Returns:
        The loss, a scalar (zero, still attached to ``pred``, if no image has a valid pixel).
    """
    p, g = pred.reshape(pred.shape[0], -1).float(), target.reshape(target.shape[0], -1).float()
    m = valid.reshape(valid.shape[0], -1).to(p.dtype)
    # 1. Masked means and centred values.
    n = m.sum(1)
    count = n.clamp(min=1)
    p_mean, g_mean = (p * m).sum(1) / count, (g * m).sum(1) / count
    pc, gc = (p - p_mean[:, None]) * m, (g - g_mean[:, None]) * m
    # 2. Least-squares scale and shift. A constant prediction (a variance at float32 round-off of its mean square)
    # takes s = 0; the safe denominator keeps the unused branch finite, so its zero gradient stays zero.
    var, cov = (pc * pc).sum(1), (pc * gc).sum(1)
    ok = var > 1e-10 * (p * p * m).sum(1)
    scale = torch.where(ok, cov / torch.where(ok, var, torch.ones_like(var)), torch.zeros_like(var))
    shift = g_mean - scale * p_mean
    # 3. Mean absolute error of the aligned prediction over valid pixels, per image, then over images.
    err = (scale[:, None] * p + shift[:, None] - g).abs() * m
    scored = n > 0
    per_image = err.sum(1) / count
    return (per_image * scored).sum() / scored.sum().clamp(min=1)


class OneStepFinetuning(PerceptionFinetuning):
    """Fine-tunes a DiT for depth as one deterministic network pass, trained end to end with an affine-invariant loss.

    What differs from ``PerceptionFinetuning`` (everything else, network, conditioning and the test protocol, is its):

    1. Input: the [image condition, target] channels the diffusion model sees, with the target channels all zeros
       (the expected value of the noise) and the timestep fixed at t = T - 1 (the scheduler's last training timestep),
       in training and at inference alike.
    2. Output: the clean-sample estimate the configured prediction type defines at x_t = 0:
       x0 = sqrt(abar) x_t - sqrt(1 - abar) v = -sqrt(1 - abar) v for ``v_prediction`` (E2E-FT's choice) and x0 = the
       output for ``sample``. So a diffusion checkpoint given as ``init_from`` starts from its own one-step estimate
       (E2E-FT's starting point). ``epsilon`` is refused: x0 = -sqrt((1 - abar) / abar) eps multiplies the output by
       157 (linear betas) to 20291 (cosine) at t = T - 1.
    3. Loss: the estimate, decoded by the codec and the task (``DepthTask.decode``), against the depth target coding
       the diffusion model regresses (``DepthTask.encode_target``, per-image quantiles to [-1, 1]) on the task's valid
       pixels, after per-image least-squares scale and shift: mean absolute error (``affine_invariant_l1``).
    4. Inference (validation, test, predict): that one pass per image, nothing sampled. Its prediction is defined up
       to a per-image scale and shift, so it is mapped affinely onto [-1, 1] per image (min to -1, max to +1): the
       range the task's outputs and files expect, without clipping, which leaves the aligned test metrics unchanged.
       A deterministic model gains nothing from more steps or an ensemble (every member would be the same
       prediction), so ``inference.num_steps`` and ``inference.ensemble_size`` must be 1 (refused otherwise) and
       ``compute/test_macs_per_sample`` counts one network forward (plus the codec, free in pixel space).

    Only the depth task and the pixel codec are supported (refused otherwise): ``VAECodec.decode`` runs without
    gradient, so the loss could not reach the network through it. From scratch, the DiT's zero-initialised output
    projection (adaLN-Zero) is re-initialised Xavier-uniform like its other linear layers: at a constant prediction an
    affine-invariant loss has zero gradient, so a zero output would never move.

    Args:
        task: The depth task (``diffperc.tasks.DepthTask``).
        inference: Must keep ``num_steps`` and ``ensemble_size`` at 1 (None: so); the other fields are unused.
        **kwargs: ``PerceptionFinetuning``'s other arguments (codec, backbone, image_size, init_from, optimizer, ...).
    """

    #: What the checkpoints record (``diffperc.objective``); a diffusion module has none and refuses them.
    objective = OBJECTIVE

    def __init__(self, task: Task, inference: InferenceSettings | None = None, **kwargs):
        inference = settings(InferenceSettings, inference, default=InferenceSettings(num_steps=1, ensemble_size=1))
        _check_one_pass(inference, "--model.init_args.inference")
        if not isinstance(task, DepthTask):
            raise ValueError(
                f"`--model.init_args.task` {type(task).__name__}: OneStepFinetuning trains depth only "
                "(diffperc.tasks.DepthTask); use diffperc.lit.PerceptionFinetuning for other tasks"
            )
        codec = kwargs.get("codec")
        if codec is not None and not isinstance(codec, PixelCodec):
            raise ValueError(
                f"`--model.init_args.codec` {type(codec).__name__}: OneStepFinetuning trains through the decoder and "
                "only diffperc.codecs.PixelCodec decodes with gradients; use the pixel codec"
            )
        super().__init__(task=task, inference=inference, **kwargs)
        kind = self.diffusion.prediction_type
        if kind == "epsilon":
            raise ValueError(
                "`--model.init_args.diffusion.prediction_type` epsilon: the clean estimate of a zero input at "
                "t = T - 1 multiplies the output by sqrt((1 - abar) / abar) (157 for linear betas); use v_prediction "
                "or sample"
            )
        # 1. The fixed timestep and the x0 coefficient there (x_t = 0 leaves only the output's term).
        self.timestep = self.noise_scheduler.config.num_train_timesteps - 1
        abar = float(self.noise_scheduler.alphas_cumprod[self.timestep].double())
        self.x0_coefficient = -((1.0 - abar) ** 0.5) if kind == "v_prediction" else 1.0
        # 2. From scratch the output projection is all zeros: give it weights, else the loss has no gradient.
        out = self.net.final_layer.linear
        if not kwargs.get("init_from") and not out.weight.detach().any():
            torch.nn.init.xavier_uniform_(out.weight)

    # ------------------------------------------------------------------ the pass
    def one_step_inputs(self, cond: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The network inputs (x, t, y): [conditions, zero target latent] at t = T - 1."""
        zeros = cond.new_zeros(cond.shape[0], self.latent_channels, *cond.shape[2:])  # (N, C, h, w): E[noise]
        t = torch.full((cond.shape[0],), self.timestep, dtype=torch.long, device=cond.device)
        return torch.cat([cond, zeros], dim=1), t, y

    def one_step(self, cond: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Clean target latents (N, C, h, w) from one network pass."""
        out = self.net(*self.one_step_inputs(cond, y))[:, : self.latent_channels]  # sigma channels, if any, dropped
        return self.x0_coefficient * out

    def _depth_batch(self, batch: dict) -> dict:
        return self._groups(batch)[0][1]  # a mixed batch `{"depth": batch}` holds the one task

    def net_inputs(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        batch = self._depth_batch(batch)
        return self.one_step_inputs(self.encode_conditions(batch), self._task_ids(batch))

    # ------------------------------------------------------------------ training
    def one_step_loss(self, batch: dict) -> torch.Tensor:
        """The affine-invariant L1 of one pass's decoded depth against the task's target coding, on the pixels the
        task scores."""
        latents = self.one_step(self.encode_conditions(batch), self._task_ids(batch))  # the inputs of `net_inputs`
        pred = self.task.decode(self.codec.decode(latents), batch)  # (N, 1, H, W)
        target = self.task.decode(self.task.encode_target(batch), batch)  # what the diffusion model regresses
        return affine_invariant_l1(pred, target, self.task._valid(batch))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        batch = self._depth_batch(batch)
        loss, n = self.one_step_loss(batch), batch["image"].shape[0]
        self.log("train/loss", loss, batch_size=n)
        return self.with_aux_loss(loss, n)

    def validation_loss(self, batch: dict, batch_idx: int, task_id: int = 0) -> torch.Tensor:
        """``train/loss`` on a validation batch (logged as ``val/loss``): nothing is drawn, so no seed is needed."""
        return self.one_step_loss(self._depth_batch(batch))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["diffperc"] = {**module_record(self), "objective": OBJECTIVE}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # `--ckpt_path` (resume, test): a denoiser's weights fit this network but were never trained for it.
        # (`init_from` may load a diffusion checkpoint: that is E2E-FT's starting point.)
        objective = (checkpoint.get("diffperc") or {}).get("objective")
        if objective != OBJECTIVE:
            path = self._trainer.ckpt_path if self._trainer is not None else "checkpoint"
            raise ValueError(
                f"{path}: checkpoint was trained as {objective or 'a diffusion model'}, not by OneStepFinetuning; "
                "test it with its own config, or start from it with `--model.init_args.init_from`"
            )
        super().on_load_checkpoint(checkpoint)

    # ----------------------------------------------------------------- inference
    @torch.no_grad()
    def predict_batch(self, batch: dict, settings: InferenceSettings | None = None, task_id: int | None = None):
        """One network pass per image, decoded and mapped affinely onto [-1, 1]: returns (prediction, None)."""
        if settings is not None:
            _check_one_pass(settings, "inference")
        task_id = self.tasks.index(self.task) if task_id is None else task_id
        latents = self.one_step(self.encode_conditions(batch), self._task_ids(batch, task_id))
        pred = self.task.decode(self.codec.decode(latents), batch)  # (N, 1, H, W)
        return _to_unit_range(pred), None


def _check_one_pass(inference: InferenceSettings, flag: str) -> None:
    for key in ("num_steps", "ensemble_size"):
        if getattr(inference, key) != 1:
            raise ValueError(
                f"`{flag}.{key}` {getattr(inference, key)}: OneStepFinetuning is deterministic (one pass at t = T - 1 "
                "from a zero target), so more steps or members repeat the same prediction; set it to 1"
            )


def _to_unit_range(pred: torch.Tensor) -> torch.Tensor:
    """Each image mapped affinely so its minimum is -1 and its maximum +1 (a constant image becomes 0)."""
    flat = pred.flatten(1).float()
    lo, hi = flat.min(1).values, flat.max(1).values
    span = hi - lo
    unit = (flat - lo[:, None]) / torch.where(span > 0, span, torch.ones_like(span))[:, None] * 2 - 1
    unit = torch.where(span[:, None] > 0, unit, torch.zeros_like(unit))
    return unit.view_as(pred).to(pred.dtype)
