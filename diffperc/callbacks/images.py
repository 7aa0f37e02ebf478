"""Writes the module's validation visuals (input | ground truth | prediction) to TensorBoard."""

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger

from diffperc.data.viz import image_grid


class PredictionImageLogger(Callback):
    """After each validation, logs ``pl_module.val_visuals`` ({task name: (N, 3, H, W) in [0, 1]}) as one image grid
    per task, ``val/<task>/predictions``."""

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        visuals = getattr(pl_module, "val_visuals", None) or {}
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        for name, images in visuals.items():
            grid = image_grid(images, columns=1, pad=0)  # rows stacked: (3, N * H, 3 * W)
            for logger in trainer.loggers:
                if isinstance(logger, TensorBoardLogger):
                    logger.experiment.add_image(f"val/{name}/predictions", grid, global_step=trainer.global_step)
