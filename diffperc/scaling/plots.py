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


def plot_groups(series, path: str | os.PathLike, xlabel: str, ylabel: str, title: str | None = None) -> Path:
    """Writes one log-log PNG overlaying several groups, as the paper's scaling figures do: each group's points, its
    fitted law (solid) and 95% band in one colour, the law's equation in the legend.

    Args:
        series: ``(label, x, y, fit)`` per group; ``fit`` may be None (points only: too few to fit).
        path: Output PNG path.
        xlabel: X axis label.
        ylabel: Y axis label.
        title: Figure title.

    Returns:
        ``path`` as a ``Path``.
    """
    from matplotlib import ticker
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.0, 4.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    colours = [f"C{i % 10}" for i in range(len(series))]
    positive = True
    for (label, x, y, fit), colour in zip(series, colours):
        x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
        ax.scatter(x, y, color=colour, s=16, zorder=3)
        name = label
        if fit is not None:
            grid = np.geomspace(x.min(), x.max(), 200)
            curve = fit.predict(grid)
            low, high = fit.predict_interval(grid)
            ax.fill_between(grid, low, high, color=colour, alpha=0.15, linewidth=0)
            ax.plot(grid, curve, color=colour)
            positive &= bool(np.all(curve > 0))
            name = f"{label}: {fit.format()}"
        positive &= bool(np.all(y > 0))
        ax.plot([], [], color=colour, marker="o", label=name)  # one legend entry per group
    ax.set_xscale("log")
    if positive:
        ax.set_yscale("log")
    # Readable log ticks: decades labelled as 10^k, minor ticks unlabelled; a y range inside one decade keeps plain
    # numbers (a log axis with no decade in view would show no label at all).
    ax.xaxis.set_major_locator(ticker.LogLocator(base=10))
    ax.xaxis.set_major_formatter(ticker.LogFormatterMathtext(base=10))
    if positive:
        ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%.3g"))
        ax.yaxis.set_minor_formatter(ticker.FormatStrFormatter("%.3g"))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return atomic_write(Path(path), lambda f: fig.savefig(f, format="png"))
