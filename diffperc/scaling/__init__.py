"""Scaling laws: power-law fits with confidence intervals, their plots, sweeps (expansion, launchers), sweep reports
and compute-optimal planning."""

from diffperc.scaling.fit import PowerLawFit, fit_power_law
from diffperc.scaling.laws import Plan, plan
from diffperc.scaling.plots import plot_fit
from diffperc.scaling.report import write_report
from diffperc.scaling.sweep import Sweep, expand, load_sweep, run_local

__all__ = [
    "Plan",
    "PowerLawFit",
    "Sweep",
    "expand",
    "fit_power_law",
    "load_sweep",
    "plan",
    "plot_fit",
    "run_local",
    "write_report",
]
