"""Learning-rate schedules referenced from YAML (``lr_scheduler.class_path``)."""

import torch
from torch.optim.lr_scheduler import LRScheduler


class ExponentialDecayLR(LRScheduler):
    """Exponential decay from the base LR to ``final_lr_ratio`` x base over ``total_steps``, then constant.

    Args:
        optimizer: The wrapped optimizer (injected by LightningCLI).
        total_steps: Steps over which the LR decays (the paper's depth recipe: 30000, 1.2e-4 -> 1.2e-6).
        final_lr_ratio: Final LR / base LR (0.01 in the paper's recipes).
        warmup_steps: Linear warm-up steps before the decay starts.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        total_steps: int,
        final_lr_ratio: float = 0.01,
        warmup_steps: int = 0,
        last_epoch: int = -1,
    ):
        if total_steps < 1:
            raise ValueError(f"`--model.lr_scheduler.total_steps` must be >= 1, got {total_steps}")
        if not 0 < final_lr_ratio <= 1:
            raise ValueError(f"`--model.lr_scheduler.final_lr_ratio` must be in (0, 1], got {final_lr_ratio}")
        self.total_steps, self.final_lr_ratio, self.warmup_steps = total_steps, final_lr_ratio, warmup_steps
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        step = self.last_epoch
        warm = min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps else 1.0
        factor = self.final_lr_ratio ** (min(step, self.total_steps) / self.total_steps)
        return [base * warm * factor for base in self.base_lrs]
