"""Log-log PNG plots of power-law fits: one fit with its points and 95% band, several groups overlaid, and the
paper-style claim figure (per-seed points, per-x means, each group's law, band and exponent interval).

plot_fit(train_macs, val_loss, fit, "out/loss.png", xlabel="training MACs", ylabel="val loss")
plot_claim([ClaimGroup("paper", macs, errors), ClaimGroup("tuned", macs2, errors2)], "out/claim.png", "MACs", "AbsRel")
"""

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from diffperc.scaling.fit import PowerLawFit, fit_power_law
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
    # Readable log ticks: decades labelled as 10^k, and the minor ticks too when fewer than two decades are in view
    # (a log axis with no decade in view would show no label at all).
    ax.autoscale_view()
    _label_axes(ax, xlabel, ylabel, title, positive)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return atomic_write(Path(path), lambda f: fig.savefig(f, format="png"))


@dataclass(frozen=True)
class ClaimGroup:
    """One group of a claim figure (a model size, a recipe arm, a schedule): per-seed points and how to draw them.

    ``kind`` is ``"law"`` (seed points, per-x means, the power law and its band), ``"point"`` (one configuration
    drawn as a star at its mean, e.g. a one-step control model; never fitted) or ``"reference"`` (a horizontal
    dashed line at the mean of ``y``, e.g. a baseline measured once; ``x`` is not used).
    """

    label: str
    x: Sequence[float]
    y: Sequence[float]
    fit: PowerLawFit | None = None  # None: fitted here on every seed-level point (a "law" group with >= 3 points)
    kind: str = "law"
    colour: str | None = None


@dataclass(frozen=True)
class ClaimPlot:
    """What ``plot_claim`` drew: the PNG, the legend labels and fits in group order, and the drawn tick labels."""

    path: Path
    labels: tuple[str, ...]
    fits: tuple[PowerLawFit | None, ...]
    xticks: tuple[str, ...]
    yticks: tuple[str, ...]


_KINDS = ("law", "point", "reference")


def format_law(label: str, fit: PowerLawFit) -> str:
    """The legend text of a fitted group: ``"tuned: y = 0.41 x^-0.019 [-0.028, -0.011]"``, the bracket being the
    exponent's 95% interval (2 significant digits throughout; an offset law reads ``y = e + a x^b``)."""
    law = f"{fit.a:.2g} x^{fit.b:.2g}"
    if fit.offset:
        law = f"{fit.e:.2g} {'-' if fit.a < 0 else '+'} {abs(fit.a):.2g} x^{fit.b:.2g}"
    return f"{label}: y = {law} [{fit.b_ci[0]:.2g}, {fit.b_ci[1]:.2g}]"


def plot_claim(
    groups: Sequence[ClaimGroup], path: str | os.PathLike, xlabel: str, ylabel: str, title: str | None = None
) -> ClaimPlot:
    """Writes one paper-style claim figure (log-log, as the paper's Figs. 2-10) overlaying several groups, atomically.

    Each ``"law"`` group is drawn in one colour: every seed's point small and semi-transparent, the mean at each x
    larger, and the power law (``group.fit``, or ``fit_power_law`` on all its seed-level points when None) as a line
    over the group's x range with its 95% band; the legend gives the law and its exponent's 95% interval (see
    ``format_law``). A ``"point"`` group is a star at its mean (its seeds small around it), a ``"reference"`` group a
    dashed horizontal line at its mean. The y axis is linear when a value to draw is not positive. Log axes label the
    decades as 10^k and, when fewer than two decades are in view, also the minor ticks (2-3 significant digits), so
    no axis is left without a number.

    Args:
        groups: The groups, in legend order; a plain tuple ``(label, x, y[, fit])`` is read as a ``"law"`` group.
        path: Output PNG path.
        xlabel: X axis label.
        ylabel: Y axis label.
        title: Figure title.

    Returns:
        A ``ClaimPlot``: the path, each group's legend label and fit (None where none was drawn), the tick labels.

    Raises:
        ValueError: If a group is empty, its ``x`` and ``y`` differ in length, a value is not finite, an ``x`` is not
            positive or ``kind`` is unknown; the message names the group.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    groups = [g if isinstance(g, ClaimGroup) else ClaimGroup(*g) for g in groups]
    if not groups:
        raise ValueError("`groups` is empty: a claim figure needs at least one group")
    fig = Figure(figsize=(6.4, 4.4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    labels, fits, references, positive = [], [], [], True
    for i, group in enumerate(groups):
        colour = group.colour or f"C{i % 10}"
        x, y = _group_values(group)
        positive &= bool(np.all(y > 0))
        if group.kind == "reference":
            references.append((group, colour, float(y.mean())))  # drawn once the x range is known
            labels.append(f"{group.label}: y = {y.mean():.3g}")
            fits.append(None)
            continue
        if y.size > 1 or group.kind == "law":
            ax.scatter(x, y, color=colour, s=12, alpha=0.35, linewidths=0, zorder=3)
        xs = np.unique(x)
        means = np.array([y[x == v].mean() for v in xs])
        if group.kind == "point":
            ax.scatter(xs, means, color=colour, marker="*", s=170, edgecolors="black", linewidths=0.5, zorder=5)
            labels.append(f"{group.label}: {means.mean():.3g}")
            fits.append(None)
            ax.plot([], [], color=colour, marker="*", markersize=11, linestyle="none", label=labels[-1])
            continue
        ax.scatter(xs, means, color=colour, s=40, edgecolors="white", linewidths=0.6, zorder=4)
        fit = group.fit if group.fit is not None else _fit_or_none(x, y)
        name = f"{group.label} ({x.size} points, not fitted)"
        if fit is not None:
            grid = np.geomspace(x.min(), x.max(), 200)
            curve = fit.predict(grid)
            ax.plot(grid, curve, color=colour, linewidth=1.6, zorder=2)
            if fit.param_cov:  # a hand-made fit has no covariance, hence no band
                low, high = fit.predict_interval(grid)
                ax.fill_between(grid, low, high, color=colour, alpha=0.15, linewidth=0, zorder=1)
                positive &= bool(np.all(low > 0))
            positive &= bool(np.all(curve > 0))
            name = format_law(group.label, fit)
        labels.append(name)
        fits.append(fit)
        ax.plot([], [], color=colour, marker="o", label=name)  # one legend entry: line and marker
    ax.set_xscale("log")
    if positive:
        ax.set_yscale("log")
    ax.autoscale_view()
    for group, colour, level in references:
        ax.axhline(level, color=colour, linestyle="--", linewidth=1.2, zorder=2)
        ax.plot([], [], color=colour, linestyle="--", label=f"{group.label}: y = {level:.3g}")
    # The legend keeps the groups' order although reference lines are drawn last.
    handles, texts = ax.get_legend_handles_labels()
    order = {text: k for k, text in enumerate(labels)}
    pairs = sorted(zip(handles, texts, strict=True), key=lambda p: order.get(p[1], len(order)))
    ax.legend([p[0] for p in pairs], [p[1] for p in pairs], fontsize=7)
    _label_axes(ax, xlabel, ylabel, title, positive)
    ax.grid(True, which="major", alpha=0.35)
    ax.grid(True, which="minor", alpha=0.12)
    fig.tight_layout()
    path = atomic_write(Path(path), lambda f: fig.savefig(f, format="png"))  # savefig draws: tick labels are set
    return ClaimPlot(path, tuple(labels), tuple(fits), _drawn_labels(ax.xaxis), _drawn_labels(ax.yaxis))


def _group_values(group: ClaimGroup) -> tuple[np.ndarray, np.ndarray]:
    if group.kind not in _KINDS:
        raise ValueError(f"group {group.label!r}: `kind` must be one of {', '.join(_KINDS)}; got {group.kind!r}")
    y = np.asarray(group.y, dtype=np.float64).reshape(-1)
    x = np.ones_like(y) if group.kind == "reference" else np.asarray(group.x, dtype=np.float64).reshape(-1)
    if y.size == 0 or x.size != y.size:
        raise ValueError(f"group {group.label!r}: needs as many x as y values, at least one; got {x.size} and {y.size}")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ValueError(f"group {group.label!r}: every x and y value must be finite")
    if np.any(x <= 0):
        raise ValueError(f"group {group.label!r}: x must be positive on a log axis; got {x.min():.3g}")
    return x, y


def _fit_or_none(x: np.ndarray, y: np.ndarray) -> PowerLawFit | None:
    """``fit_power_law`` on every seed-level point, or None where the points cannot give an exponent."""
    if x.size < 3 or np.unique(x).size < 2 or np.any(y <= 0):
        return None
    return fit_power_law(x, y)


def _plain(value: float) -> str:
    """A tick value with 3 significant digits: ``0.35``, ``120``, or ``2.5x10^9`` (mathtext) outside 1e-3..1e4."""
    if value == 0 or 1e-3 <= abs(value) < 1e4:
        return f"{value:.3g}"
    mantissa, exponent = f"{value:.2e}".split("e")
    return rf"${float(mantissa):.3g}\times10^{{{int(exponent)}}}$"


def _inner_ticks(lo: float, hi: float) -> list[float]:
    """Ticks between the decades for a view [lo, hi] with fewer than two decades: 1-9 x 10^k (2, 3, 5 when more
    than five fit), or evenly spaced round numbers when even those give fewer than two ticks."""
    decades = range(math.floor(math.log10(lo)), math.floor(math.log10(hi)) + 1)
    for subs in ((2, 3, 4, 5, 6, 7, 8, 9), (2, 3, 5)):
        ticks = [m * 10.0**k for k in decades for m in subs if lo <= m * 10.0**k <= hi]
        if len(ticks) <= 5:
            break
    majors = [10.0**k for k in decades if lo <= 10.0**k <= hi]
    if len(ticks) + len(majors) < 2:
        from matplotlib import ticker

        linear = ticker.MaxNLocator(nbins=4, steps=[1, 2, 2.5, 5, 10]).tick_values(lo, hi)
        ticks = [float(v) for v in linear if lo <= v <= hi and v not in majors]
    return ticks


def _label_axes(ax, xlabel: str, ylabel: str, title: str | None, log_y: bool) -> None:
    """Tick labels on the log axes (x always, y when ``log_y``), axis labels and the title."""
    _label_log_axis(ax.xaxis, *ax.get_xlim())
    if log_y:
        _label_log_axis(ax.yaxis, *ax.get_ylim())
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)


def _label_log_axis(axis, lo: float, hi: float) -> None:
    """Decades labelled as 10^k; with fewer than two decades in view the minor ticks are labelled too."""
    from matplotlib import ticker

    lo, hi = min(lo, hi), max(lo, hi)
    axis.set_major_locator(ticker.LogLocator(base=10))
    axis.set_major_formatter(ticker.LogFormatterMathtext(base=10))
    in_view = math.floor(math.log10(hi)) - math.ceil(math.log10(lo)) + 1  # decades 10^k inside [lo, hi]
    if in_view >= 2:
        axis.set_minor_locator(ticker.LogLocator(base=10, subs=np.arange(2, 10)))
        axis.set_minor_formatter(ticker.NullFormatter())
        return
    axis.set_minor_locator(ticker.FixedLocator(_inner_ticks(lo, hi)))
    axis.set_minor_formatter(ticker.FuncFormatter(lambda value, _: _plain(value)))


def _drawn_labels(axis) -> tuple[str, ...]:
    """The non-empty tick labels of a drawn axis inside its view, major ticks first."""
    lo, hi = sorted(axis.get_view_interval())
    drawn = [
        (axis.get_majorticklocs(), axis.get_majorticklabels()),
        (axis.get_minorticklocs(), axis.get_minorticklabels()),
    ]
    return tuple(t.get_text() for locs, texts in drawn for v, t in zip(locs, texts) if lo <= v <= hi and t.get_text())
