"""Logs how a mixture-of-experts network spreads its tokens over the experts."""

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from diffperc.models import expert_loads


class ExpertLoadLogger(Callback):
    """Every ``trainer.log_every_n_steps``, logs each MoE layer's expert load fractions as scalars
    ``moe/<layer>/expert_<e>`` (the fraction of that step's token assignments routed to expert e) and their max."""

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        if trainer.global_step % max(1, trainer.log_every_n_steps) or not trainer.loggers:
            return
        loads = expert_loads(pl_module.net)
        if not loads:
            return
        metrics = {}
        # One read from the device for every layer (a read per layer would stall the host once per layer).
        for layer, fractions in zip(loads, torch.stack(list(loads.values())).tolist()):
            for e, fraction in enumerate(fractions):
                metrics[f"moe/{layer}/expert_{e}"] = fraction
            metrics[f"moe/{layer}/max_load"] = max(fractions)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
