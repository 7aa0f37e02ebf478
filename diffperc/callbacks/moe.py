"""Logs how a mixture-of-experts network spreads its tokens over the experts."""

from lightning.pytorch import Callback, LightningModule, Trainer

from diffperc.models import expert_loads


class ExpertLoadLogger(Callback):
    """Every ``trainer.log_every_n_steps``, logs each MoE layer's expert load fractions as scalars
    ``moe/<layer>/expert_<e>`` (the fraction of that step's token assignments routed to expert e) and their max."""

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        if trainer.global_step % max(1, trainer.log_every_n_steps) or not trainer.loggers:
            return
        metrics = {}
        for layer, load in expert_loads(pl_module.net).items():
            for e, fraction in enumerate(load.tolist()):
                metrics[f"moe/{layer}/expert_{e}"] = fraction
            metrics[f"moe/{layer}/max_load"] = float(load.max())
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
