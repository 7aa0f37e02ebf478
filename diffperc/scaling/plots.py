"""Log-log PNG plots of a power-law fit: the points, the fitted law and its 95% band.

plot_fit(train_macs, val_loss, fit, "out/loss.png", xlabel="training MACs", ylabel="val loss")
"""

import os
from pathlib import Path

import numpy as np

from diffperc.scaling.fit import PowerLawFit
from diffperc.utils import atomic_write


def plot_fit(
    x, y, fit: PowerLawFit, path: str | os.PathLike, xlabel: str, ylabel: str, title: str | None = None
) -> Path:
    """Writes a log-log PNG of the points ``(x, y)``, the law ``fit`` and its 95% band, atomically, to ``path``.

    The y axis is linear instead of logarithmic when a value to draw is not positive (possible with an offset law).

    Args:
        x: Abscissae of the measured points (positive).
        y: Ordinates of the measured points.
        fit: The fitted law, e.g. from ``fit_power_law(x, y)``.
        path: Output PNG path.
        xlabel: X axis label.
        ylabel: Y axis label.
        title: Figure title; defaults to the law, e.g. ``L(C) = 0.23 * C^-0.0098``.

    Returns:
        ``path`` as a ``Path``.
    """
    # imported here so that `import diffperc.scaling` (for fitting only) does not pay for matplotlib; the Figure +
    # Agg canvas API needs no pyplot global state and never opens a window
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    grid = np.geomspace(x.min(), x.max(), 200)
    curve = fit.predict(grid)
    low, high = fit.predict_interval(grid)

    fig = Figure(figsize=(5.0, 3.75), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.fill_between(grid, low, high, color="tab:blue", alpha=0.2, linewidth=0, label="95% band")
    ax.plot(grid, curve, color="tab:blue", label=fit.format())
    ax.scatter(x, y, color="black", s=14, zorder=3, label=f"data (n={x.size})")
    ax.set_xscale("log")
    if np.all(y > 0) and np.all(curve > 0):
        ax.set_yscale("log")  # band values <= 0 are clipped by the log scale
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title if title is not None else fit.format(), fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()

    path = Path(path)
    return atomic_write(path, lambda f: fig.savefig(f, format="png"))
