"""Power laws y = a * C^b fitted while a run trains: the training loss and every validation number against the
cumulative training MACs C, as the paper's loss and metric curves (Figs. 2-3), without a sweep.

Every fit gets it (a default callback of ``diffperc.lit`` modules); on its own:
``--trainer.callbacks+=diffperc.callbacks.PowerLawMonitor --trainer.callbacks.init_args.min_step 500``.
"""

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn

from diffperc.callbacks.macs import MACsCounter

if TYPE_CHECKING:
    from diffperc.scaling.fit import PowerLawFit

TRAIN_LOSS = "train/loss"
MIN_POINTS = 3  # the fewest points fit_power_law takes (one degree of freedom for the interval)


class PowerLawMonitor(Callback):
    """Records (cumulative training MACs, value) points and fits a power law to each series at every validation.

    Series: ``train/loss`` as the module logged it, read on Lightning's logging interval only (the steps whose
    metrics Lightning reads back anyway: no extra host sync), and, at each validation end, every ``val/...`` number
    logged by that validation (``val/loss``, ``val/<task>/<metric>``). The x of a point is ``MACsCounter``'s total
    after the step it belongs to; without a ``MACsCounter`` among the trainer's callbacks nothing is recorded (one
    warning says so).

    At each validation end (rank 0), every series with >= 3 usable points (finite, positive values past the
    skipped start) is fitted with ``fit_power_law`` and ``laws/<series>/b``, ``.../b_low`` and ``.../b_high`` (the
    95% interval of the exponent) are logged at the step of that validation's metrics; a TensorBoard logger also
    gets the log-log figure ``laws/<series>`` (points, the fitted line, the law in the title; skipped points grey).
    A fit with a non-finite number (e.g. a constant series: R^2 undefined) is not reported.

    At fit end ``train_macs.json`` (written by ``MACsCounter``) gets:

    - ``laws``: ``{series: {"a", "b", "b_low", "b_high", "r2", "n", "x_min", "x_max"}}``, the fits over every
      usable point of the run (``x_min``/``x_max``: the MACs range fitted);
    - ``loss/train``: the mean of the last 10% of the run's logged ``train/loss`` values (at least the last one;
      non-finite ones left out), so it does not hang on one batch;
    - ``loss/val``: the last ``val/loss``, when a validation logged one.

    The points are part of the checkpoint (``state_dict``), so a resumed run fits its whole history.

    Args:
        skip_fraction: Points before this fraction of the run's optimizer steps (``max_steps``, else the trainer's
            estimate) are recorded but left out of the fits: the LR warmup and early transients bend the curve.
            A point after k steps is kept when k >= skip_fraction x total steps; a run with no step limit skips
            nothing.
        min_step: Keep points from this optimizer step on instead (replaces ``skip_fraction``), e.g. the end of
            the LR warmup.
        figures: Draw the log-log figures into TensorBoard.
    """

    def __init__(self, skip_fraction: float = 0.1, min_step: int | None = None, figures: bool = True):
        if not 0.0 <= skip_fraction < 1.0:
            raise ValueError(f"`PowerLawMonitor.skip_fraction` must be in [0, 1), got {skip_fraction}")
        if min_step is not None and min_step < 0:
            raise ValueError(f"`PowerLawMonitor.min_step` must be >= 0 or null, got {min_step}")
        self.skip_fraction, self.min_step, self.figures = skip_fraction, min_step, figures
        self.points: dict[str, list[tuple[int, float, float]]] = {}  # series -> (step, MACs, value), in step order
        self._counter: MACsCounter | None = None
        self._last_step = 0
        self._seen: dict[str, object] = {}  # the values last recorded: Lightning keeps a metric not logged again
        self._total_steps: float = math.inf
        self._warned = False

    # ---------------------------------------------------------------- recording
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._counter = next((cb for cb in trainer.callbacks if isinstance(cb, MACsCounter)), None)
        if self._counter is None:
            if not self._warned:
                rank_zero_warn(
                    "PowerLawMonitor: no MACsCounter among the trainer's callbacks, so no power laws are fitted; "
                    "add `--trainer.callbacks+=diffperc.callbacks.MACsCounter`"
                )
                self._warned = True
            return
        self._counter.add_to_record(self.record)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._last_step = trainer.global_step
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else trainer.estimated_stepping_batches
        self._total_steps = float(total)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if self._counter is None or step == self._last_step:  # no counter, or a micro-batch of gradient accumulation
            return
        self._last_step = step
        # Only on the steps Lightning logs (it reads their metrics back then), and on rank 0, the one that fits.
        if not trainer.is_global_zero or not trainer._logger_connector.should_update_logs:
            return
        value = trainer.callback_metrics.get(TRAIN_LOSS)
        if value is not None and value is not self._seen.get(TRAIN_LOSS):  # not logged this step: no new point
            self._seen[TRAIN_LOSS] = value
            self._add(TRAIN_LOSS, step, float(value))

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._counter is None or trainer.state.fn != TrainerFn.FITTING or trainer.sanity_checking:
            return
        if not trainer.is_global_zero:
            return
        step = trainer.global_step
        for key, value in trainer.callback_metrics.items():
            if key.startswith("val/") and self._seen.get(key) is not value:
                self._seen[key] = value
                self._add(key, step, float(value))
        fits = self.fits()
        metrics = {}
        for series, (fit, _) in fits.items():
            metrics.update(
                {f"laws/{series}/b": fit.b, f"laws/{series}/b_low": fit.b_ci[0], f"laws/{series}/b_high": fit.b_ci[1]}
            )
        log_step = max(step - 1, 0)  # where Lightning logs this validation's metrics (see MACsCounter)
        for logger in trainer.loggers:
            if metrics:
                logger.log_metrics(metrics, step=log_step)
            if self.figures and isinstance(logger, TensorBoardLogger):
                for series, (fit, keep) in fits.items():
                    logger.experiment.add_figure(
                        f"laws/{series}", self._figure(series, fit, keep), log_step, close=True
                    )

    def _add(self, series: str, step: int, value: float) -> None:
        if math.isfinite(value):  # a non-finite value is never a point (nor written anywhere)
            self.points.setdefault(series, []).append((step, float(self._counter.train_macs), value))

    # ------------------------------------------------------------------ fitting
    def first_step(self) -> float:
        """The first optimizer step whose points are fitted (``min_step``, else ``skip_fraction`` x total steps)."""
        if self.min_step is not None:
            return float(self.min_step)
        return self.skip_fraction * self._total_steps if math.isfinite(self._total_steps) else 0.0

    def fits(self) -> dict[str, tuple["PowerLawFit", np.ndarray]]:
        """The power law of every series that has enough usable points, with the mask of the points fitted."""
        from diffperc.scaling.fit import fit_power_law  # scipy: imported at the first fit, not with the callbacks

        first = self.first_step()
        out = {}
        for series, points in self.points.items():
            step, x, y = (np.asarray(column, dtype=np.float64) for column in zip(*points, strict=True))
            keep = (step >= first) & (x > 0) & (y > 0)  # values are finite: `_add` keeps no other
            if keep.sum() < MIN_POINTS or np.unique(x[keep]).size < 2:
                continue
            fit = fit_power_law(x[keep], y[keep])
            if all(math.isfinite(v) for v in (fit.a, fit.b, *fit.b_ci, fit.r2)):
                out[series] = (fit, keep)
        return out

    def record(self) -> dict:
        """What goes into ``train_macs.json`` at fit end (``MACsCounter`` writes it): ``laws``, ``loss/train``,
        ``loss/val``; each only when there is a finite number for it."""
        out: dict = {}
        laws = {}
        for series, (fit, keep) in self.fits().items():
            x = np.asarray([p[1] for p in self.points[series]])[keep]
            laws[series] = {
                "a": fit.a,
                "b": fit.b,
                "b_low": fit.b_ci[0],
                "b_high": fit.b_ci[1],
                "r2": fit.r2,
                "n": fit.n,
                "x_min": float(x.min()),
                "x_max": float(x.max()),
            }
        if laws:
            out["laws"] = laws
        train = [p[2] for p in self.points.get(TRAIN_LOSS, [])]
        if train:
            tail = train[-max(1, math.ceil(0.1 * len(train))) :]
            out["loss/train"] = float(np.mean(tail))
        if self.points.get("val/loss"):
            out["loss/val"] = self.points["val/loss"][-1][2]
        return out

    def _figure(self, series: str, fit: "PowerLawFit", keep: np.ndarray):
        # The Figure + Agg canvas API needs no pyplot state and never opens a window (as diffperc.scaling.plots).
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        x = np.asarray([p[1] for p in self.points[series]])
        y = np.asarray([p[2] for p in self.points[series]])
        fig = Figure(figsize=(4.8, 3.6), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        grid = np.geomspace(x[keep].min(), x[keep].max(), 50)
        ax.plot(grid, fit.predict(grid), color="tab:blue")
        ax.scatter(x[keep], y[keep], color="black", s=10, zorder=3)
        skipped = (x > 0) & (y > 0) & ~keep  # the start of the run, left out of the fit
        ax.scatter(x[skipped], y[skipped], color="0.7", s=10, zorder=2)
        ax.set_xscale("log")
        ax.set_yscale("log")
        shown = (x > 0) & (y > 0)
        _plain_log_ticks(ax.xaxis, x[shown].min(), x[shown].max())
        _plain_log_ticks(ax.yaxis, y[shown].min(), y[shown].max())
        ax.set_xlabel("training MACs C")
        ax.set_ylabel(series)
        ax.set_title(f"{series}: {fit.format('y', 'C')}, 95% b in [{fit.b_ci[0]:.3g}, {fit.b_ci[1]:.3g}]", fontsize=8)
        ax.grid(True, alpha=0.3)
        fig.subplots_adjust(left=0.17, right=0.96, bottom=0.14, top=0.91)  # fixed: tight_layout doubles the cost
        return fig

    # -------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return {"points": {series: [list(p) for p in points] for series, points in self.points.items()}}

    def load_state_dict(self, state_dict: Mapping) -> None:
        self.points = {
            s: [(int(p[0]), float(p[1]), float(p[2])) for p in pts] for s, pts in state_dict["points"].items()
        }


def _plain_log_ticks(axis, lo: float, hi: float) -> None:
    """Plain-text tick labels on a log axis (matplotlib's 10^k labels go through mathtext, which made each figure
    cost ~5x more): decades over more than one decade, else about four round values; no minor ticks."""
    from matplotlib import ticker

    wide = hi > 10 * lo
    axis.set_major_locator(ticker.LogLocator(base=10, numticks=6) if wide else ticker.MaxNLocator(4))
    axis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:.3g}"))
    axis.set_minor_locator(ticker.NullLocator())
