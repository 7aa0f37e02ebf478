import re

import numpy as np
import pytest

from diffperc.scaling.fit import fit_power_law
from diffperc.scaling.plots import ClaimGroup, plot_claim

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_LAW = re.compile(r"^(?P<label>.+): y = (?P<a>\S+) x\^(?P<b>\S+) \[(?P<low>\S+), (?P<high>\S+)\]$")


def _seeded(a: float, b: float, x_values, seeds: int = 3, scatter: float = 0.05, seed: int = 0):
    """``seeds`` values of ``a * x^b`` per x, each times exp(N(0, scatter)) (seeded)."""
    rng = np.random.default_rng(seed)
    x = np.repeat(np.asarray(x_values, dtype=np.float64), seeds)
    return x, a * x**b * np.exp(rng.normal(0.0, scatter, x.size))


def test_plot_claim_legend_gives_each_law_and_its_exponent_interval(tmp_path):
    from matplotlib import image

    # seed 2: a draw whose 95% interval covers the true -0.3 (seed 0's, [-0.3146, -0.3008], is one of the 5% that miss)
    x, y = _seeded(2.0, -0.3, np.geomspace(1e9, 1e13, 5), seed=2)
    x2, y2 = _seeded(3.0, -0.25, np.geomspace(1e9, 1e13, 5), seed=1)
    given = fit_power_law(x2, y2)
    groups = [
        ClaimGroup("paper", x, y),  # fitted by plot_claim on all 15 seed-level points
        ClaimGroup("tuned", x2, y2, fit=given),  # fitted by the caller
        ClaimGroup("one-step control", [3e9, 3e9], [1e-3, 1.2e-3], kind="point"),
        ClaimGroup("dense", [], [2e-3, 2.2e-3], kind="reference"),
    ]
    result = plot_claim(groups, tmp_path / "sub" / "claim.png", "training MACs", "AbsRel", title="claim 1")
    assert result.path == tmp_path / "sub" / "claim.png"
    assert result.path.read_bytes()[:8] == PNG_MAGIC and result.path.stat().st_size > 20_000
    assert image.imread(result.path).shape[:2] == (440, 640)  # 6.4 x 4.4 in at 100 dpi
    assert [p.name for p in result.path.parent.iterdir()] == ["claim.png"]  # no temporary file left
    # The figure's own fit is the fit of every seed-level point; the caller's fit is drawn as given.
    expected = fit_power_law(x, y)
    assert result.fits[0].b == pytest.approx(expected.b, rel=1e-12) and result.fits[1] is given
    assert result.fits[2] is None and result.fits[3] is None
    paper = _LAW.match(result.labels[0])
    assert paper and paper["label"] == "paper"
    # The true exponent -0.3 lies in the printed interval, which is the fit's, to 2 significant digits.
    low, b, high = float(paper["low"]), float(paper["b"]), float(paper["high"])
    assert b == pytest.approx(-0.3, abs=0.01) and low <= -0.3 <= high
    assert (low, b, high) == tuple(float(f"{v:.2g}") for v in (expected.b_ci[0], expected.b, expected.b_ci[1]))
    assert float(paper["a"]) == float(f"{expected.a:.2g}")
    assert result.labels[1] == f"tuned: y = {given.a:.2g} x^{given.b:.2g} [{given.b_ci[0]:.2g}, {given.b_ci[1]:.2g}]"
    assert result.labels[2:] == ("one-step control: 0.0011", "dense: y = 0.0021")  # the means of the seeds


def test_plot_claim_labels_a_narrow_range_with_minor_ticks(tmp_path):
    # x from 2e9 to 5e9 and y within 0.25..0.27: no decade in view on either axis.
    x, y = _seeded(0.4, -0.02, [2e9, 3e9, 4e9, 5e9], scatter=0.01)
    result = plot_claim([ClaimGroup("tuned", x, y)], tmp_path / "narrow.png", "MACs", "AbsRel")
    assert result.xticks == (r"$2\times10^{9}$", r"$3\times10^{9}$", r"$4\times10^{9}$", r"$5\times10^{9}$")
    assert len(result.yticks) >= 2 and all(0.2 < float(t) < 0.3 for t in result.yticks)  # plain 2-3 digit numbers


def test_plot_claim_labels_decades_over_several_decades(tmp_path):
    x, y = _seeded(2.0, -0.3, np.geomspace(1e9, 1e13, 5))
    result = plot_claim([ClaimGroup("paper", x, y)], tmp_path / "wide.png", "MACs", "AbsRel")
    assert result.xticks == tuple(rf"$\mathdefault{{10^{{{k}}}}}$" for k in range(9, 14))  # decades only
    # y spans 2.4e-4..4.6e-3: one decade (1e-3) in view, so the minor ticks carry labels too.
    assert result.yticks[0] == r"$\mathdefault{10^{-3}}$" and len(result.yticks) >= 3


def test_plot_claim_draws_a_group_too_small_to_fit_and_rejects_bad_input(tmp_path):
    result = plot_claim([("two sizes", [1e9, 1e10], [0.3, 0.2])], tmp_path / "two.png", "MACs", "AbsRel")
    assert result.labels == ("two sizes (2 points, not fitted)",) and result.fits == (None,)
    with pytest.raises(ValueError, match=r"group 'bad': x must be positive on a log axis"):
        plot_claim([ClaimGroup("bad", [0.0, 1.0, 2.0], [1.0, 1.0, 1.0])], tmp_path / "bad.png", "x", "y")
    with pytest.raises(ValueError, match=r"group 'g': `kind` must be one of law, point, reference; got 'star'"):
        plot_claim([ClaimGroup("g", [1.0], [1.0], kind="star")], tmp_path / "bad.png", "x", "y")
    assert not (tmp_path / "bad.png").exists()
