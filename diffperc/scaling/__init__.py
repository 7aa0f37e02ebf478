"""Scaling laws: power-law fits with confidence intervals, their plots and sweep reports."""

from diffperc.scaling.fit import PowerLawFit, fit_power_law
from diffperc.scaling.plots import plot_fit
from diffperc.scaling.report import write_report

__all__ = ["PowerLawFit", "fit_power_law", "plot_fit", "write_report"]
