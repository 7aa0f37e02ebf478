"""Writes ``diffperc predict`` outputs: one set of files per input, named after the input (``<name>`` of a flow pair),
at the input's original size; inputs that could not be read are skipped and listed in ``skipped.txt`` beside them.

Per input: depth ``_depth.png`` (colours), ``_depth16.png``, ``_depth.npy`` and, for ensembles, ``_uncertainty.png``;
flow ``_flow.flo`` (pixels) and ``_flow.png`` (colours); amodal ``_whole.png`` and ``_mask.png`` (0/255).
"""

import time
from pathlib import Path

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from diffperc.predict import restore_size
from diffperc.utils import atomic_write_bytes


class PredictionWriter(BasePredictionWriter):
    """Saves each prediction through its task (``task.save_prediction``), undoing the resize and padding of inputs.

    Files are ``<name>_<suffix>``. The name of an input of ``--data.images`` is its stem (``scene`` for
    ``scene.png``), or its whole file name (``scene.png`` and ``scene.jpg``, so ``scene.png_depth.npy``) when another
    input shares the stem: two inputs never write the same file.

    Each predict writes into a folder of its own outputs only. The default folder, ``<log dir>/predictions``, is
    moved aside to ``predictions.<YYYYmmdd-HHMMSS>`` if an earlier predict left one, so old files (and an old
    ``skipped.txt``) never mix with the new. A folder given as ``output_dir`` is the user's: predict refuses to write
    into it unless it is empty or missing.

    Args:
        output_dir: Where files go; default ``<log dir>/predictions``.
    """

    def __init__(self, output_dir: str | None = None):
        super().__init__(write_interval="batch")
        self.output_dir = output_dir
        self.written: list[Path] = []
        self.skipped: list[str] = []  # one "name: reason" line per input that could not be read

    def _dir(self, trainer: Trainer) -> Path:
        return Path(self.output_dir or Path(trainer.log_dir or trainer.default_root_dir) / "predictions")

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.written, self.skipped = [], []
        error = self._make_room(self._dir(trainer)) if trainer.is_global_zero else None
        error = trainer.strategy.broadcast(error)  # every rank stops, or none; none writes before the move
        if error:
            raise FileExistsError(error)

    def _make_room(self, out: Path) -> str | None:
        """Moves an earlier predict's default folder aside; returns why ``out`` can't be written to, if it can't."""
        if not out.is_dir() or not any(out.iterdir()):
            return None
        if self.output_dir:
            return (f"`output_dir` {out} is not empty: predict writes only into an empty or new folder, so its files "
                    "never mix with others; empty it or give another `--trainer.callbacks.output_dir`")
        stamp = time.strftime("%Y%m%d-%H%M%S")
        aside = out.with_name(f"{out.name}.{stamp}")
        for i in range(1, 1000):  # two predicts within one second
            if not aside.exists():
                break
            aside = out.with_name(f"{out.name}.{stamp}-{i}")
        out.rename(aside)
        rank_zero_info(f"Moved the earlier predictions in {out} to {aside}")
        return None

    def write_on_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        prediction: dict,
        batch_indices,
        batch: dict,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        out_dir = self._dir(trainer)
        pred, unc = prediction["pred"], prediction["uncertainty"]
        names = batch.get("name") or [f"{batch_idx:06d}_{i}" for i in range(pred.shape[0])]
        errors = batch.get("error") or [""] * len(names)
        for i, name in enumerate(names):
            if errors[i]:  # an unreadable input (ImageFolder's placeholder): report it, write nothing for it
                self.skipped.append(f"{name}: {errors[i]}")
                rank_zero_warn(errors[i])
                continue
            p = pred[i : i + 1]
            u = unc[i : i + 1] if unc is not None else None
            if "orig_size" in batch:  # undo padding, then resizing, to the input's original size (as the pipeline)
                p, u = restore_size(pl_module.task, p, u, batch["resized_size"][i], batch["orig_size"][i])
            # `.name`, not `.stem`: a name is whole (`scene.png` when `scene.jpg` is an input too), and `.stem` would
            # cut `frame.001` and `frame.002` to one `frame`, so the second input's files would overwrite the first's.
            stem = Path(name).name
            self.written += pl_module.task.save_prediction(p[0], None if u is None else u[0], out_dir, stem)

    def on_predict_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.written:
            rank_zero_info(f"Wrote {len(self.written)} files to {self._dir(trainer)}")
        if self.skipped:
            report = atomic_write_bytes(self._dir(trainer) / "skipped.txt", ("\n".join(self.skipped) + "\n").encode())
            rank_zero_warn(f"Skipped {len(self.skipped)} unreadable input(s), listed in {report}")
        counts = torch.tensor([float(len(self.written)), float(len(self.skipped))], device=pl_module.device)
        if trainer.world_size > 1:  # over every process, so all stop or none does
            counts = trainer.strategy.reduce(counts, reduce_op="sum")
        written, skipped = (int(c) for c in counts.tolist())
        if skipped and not written:
            raise ValueError(
                f"None of the {skipped} input(s) could be read, so nothing was predicted: see skipped.txt in "
                f"{self._dir(trainer)}"
            )
