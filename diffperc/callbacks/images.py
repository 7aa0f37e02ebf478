"""Writes the module's validation visuals (input | ground truth | prediction) to TensorBoard."""

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger

from diffperc.data.viz import image_grid


class PredictionImageLogger(Callback):
    """After each validation, logs ``pl_module.val_visuals`` (N, 3, H, W) in [0, 1] as one image grid."""

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        visuals = getattr(pl_module, "val_visuals", None)
        if visuals is None or trainer.sanity_checking or not trainer.is_global_zero:
            return
        grid = image_grid(visuals, columns=1, pad=0)  # rows stacked: (3, N * H, 3 * W)
        name = getattr(getattr(pl_module, "task", None), "name", "pred")
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image(f"val/{name}/predictions", grid, global_step=trainer.global_step)
