import numpy as np
import pytest
from scipy import stats

from diffperc.scaling import PowerLawFit, fit_power_law

PAPER_C = np.geomspace(1e15, 1e19, 10)  # the paper's pretraining compute range, 10 log-spaced points


@pytest.mark.parametrize(
    ("a", "b", "x"),
    [
        (0.23, -0.0098, PAPER_C),  # the paper's L(C) = 0.23 * C^-0.0098
        (3.0, -0.5, np.geomspace(1.0, 1e4, 10)),
        (1e-6, 0.75, np.geomspace(1e3, 1e9, 7)),
    ],
)
def test_fit_power_law_recovers_noiseless_law(a, b, x):
    fit = fit_power_law(x, a * x**b)
    assert fit.a == pytest.approx(a, rel=1e-9)
    assert fit.b == pytest.approx(b, rel=1e-9)
    assert fit.e is None and fit.e_ci is None
    assert fit.n == x.size and not fit.offset
    assert fit.r2 == pytest.approx(1.0, abs=1e-12)
    # no residual -> the intervals collapse onto the estimate
    assert fit.b_ci == pytest.approx((b, b), rel=1e-9)
    assert fit.a_ci == pytest.approx((a, a), rel=1e-9)


def test_fit_power_law_str_matches_paper_notation():
    fit = fit_power_law(PAPER_C, 0.23 * PAPER_C**-0.0098)
    assert str(fit) == "L(C) = 0.23 * C^-0.0098"
    x = np.geomspace(1.0, 1e4, 8)
    assert str(fit_power_law(x, 0.1 + 2 * x**-0.5, offset=True)) == "L(C) = 0.1 + 2 * C^-0.5"
    assert fit_power_law(x, 0.9 - 0.5 * x**-0.3, offset=True).format("A", "N") == "A(N) = 0.9 - 0.5 * N^-0.3"


# Tolerances for 20 log-spaced points over 4 decades with 1% multiplicative noise (sigma = 0.01 in log y):
# S_uu = sum((log x - mean)^2) = 156.3, so se(b) = 0.01 / sqrt(156.3) = 8.0e-4, and the curve at the geometric-mean
# x has se 0.01 / sqrt(20) = 2.2e-3 in log y. se(log a) = 0.01 * sqrt(1/20 + mean(log x)^2 / S_uu) is 0.031 over
# 1e15..1e19 (a is an extrapolation 15+ decades down to x = 1) and 0.0043 over 1..1e4. We allow 5 se each, so a
# correct fitter fails with probability < 1e-5 per seed while a biased one (e.g. fitting in linear space, or a
# lost centring) is caught.
@pytest.mark.parametrize(
    ("a", "b", "x", "tol_log_a"),
    [(0.23, -0.0098, np.geomspace(1e15, 1e19, 20), 5 * 0.031), (3.0, -0.5, np.geomspace(1.0, 1e4, 20), 5 * 0.0043)],
)
def test_fit_power_law_noisy_within_tolerance_and_ci(a, b, x, tol_log_a):
    rng = np.random.default_rng(1234)
    y = a * x**b * np.exp(0.01 * rng.standard_normal(x.size))
    fit = fit_power_law(x, y)
    assert abs(fit.b - b) < 5 * 8.0e-4
    assert abs(np.log(fit.a / a)) < tol_log_a
    x_mid = np.exp(np.log(x).mean())
    assert abs(np.log(fit.predict(x_mid) / (a * x_mid**b))) < 5 * 2.2e-3
    assert fit.b_ci[0] < b < fit.b_ci[1]
    assert fit.a_ci[0] < a < fit.a_ci[1]
    assert 0.0 < fit.r2 < 1.0


def test_fit_power_law_matches_scipy_linregress_on_logs():
    rng = np.random.default_rng(7)
    x = np.geomspace(1e12, 1e16, 9)
    y = 0.5 * x**-0.05 * np.exp(0.02 * rng.standard_normal(x.size))
    fit = fit_power_law(x, y)
    ref = stats.linregress(np.log(x), np.log(y))
    t = stats.t.ppf(0.975, x.size - 2)
    assert fit.b == pytest.approx(ref.slope, rel=1e-9)
    assert fit.a == pytest.approx(np.exp(ref.intercept), rel=1e-9)
    assert fit.b_ci == pytest.approx((ref.slope - t * ref.stderr, ref.slope + t * ref.stderr), rel=1e-9)
    a_ci = (np.exp(ref.intercept - t * ref.intercept_stderr), np.exp(ref.intercept + t * ref.intercept_stderr))
    assert fit.a_ci == pytest.approx(a_ci, rel=1e-9)
    assert fit.r2 == pytest.approx(ref.rvalue**2, rel=1e-9)


def test_fit_power_law_ci_coverage_is_95_percent():
    # 400 seeded replicates; binomial sd of the coverage is sqrt(0.95 * 0.05 / 400) = 0.011, so [0.91, 0.99] is
    # about +-3.5 sd. A normal instead of a Student-t quantile with 3 dof (n = 5) would cover only ~0.85.
    x = np.geomspace(1.0, 1e3, 5)
    rng = np.random.default_rng(0)
    hits = 0
    for _ in range(400):
        fit = fit_power_law(x, 2.0 * x**-0.3 * np.exp(0.05 * rng.standard_normal(x.size)))
        hits += fit.b_ci[0] < -0.3 < fit.b_ci[1]
    assert 0.91 <= hits / 400 <= 0.99


@pytest.mark.parametrize(
    ("e", "a", "b", "x"),
    [
        (0.1, 2.0, -0.5, np.geomspace(1.0, 1e4, 12)),
        (1.5, 1e8, -0.5, np.geomspace(1e15, 1e19, 12)),  # needs the internal x / x_ref scaling
        (-1.0, 2.0, -0.5, np.geomspace(1.0, 1e4, 12)),  # negative y is allowed with an offset
        (0.9, -0.5, -0.3, np.geomspace(1.0, 1e4, 12)),  # rising towards e from below (accuracy-like)
    ],
)
def test_fit_power_law_offset_recovers_noiseless_law(e, a, b, x):
    fit = fit_power_law(x, e + a * x**b, offset=True)
    assert fit.offset and fit.n == x.size
    assert fit.e == pytest.approx(e, rel=1e-4)
    assert fit.a == pytest.approx(a, rel=1e-4)
    assert fit.b == pytest.approx(b, rel=1e-4)
    assert fit.r2 == pytest.approx(1.0, abs=1e-9)


def test_fit_power_law_offset_noisy_truth_inside_ci():
    rng = np.random.default_rng(3)
    x = np.geomspace(1.0, 1e4, 20)
    y = (0.1 + 2 * x**-0.5) * np.exp(0.01 * rng.standard_normal(x.size))
    fit = fit_power_law(x, y, offset=True)
    assert fit.e_ci[0] < 0.1 < fit.e_ci[1]
    assert fit.a_ci[0] < 2.0 < fit.a_ci[1]
    assert fit.b_ci[0] < -0.5 < fit.b_ci[1]
    assert 0.99 < fit.r2 < 1.0


@pytest.mark.parametrize(
    ("x", "y", "offset", "name"),
    [
        ([1.0, 0.0, 3.0], [1.0, 2.0, 3.0], False, "`x`"),
        ([1.0, -2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0], True, "`x`"),
        ([1.0, np.nan, 3.0], [1.0, 2.0, 3.0], False, "`x`"),
        ([1.0, 2.0, 3.0], [1.0, -2.0, 3.0], False, "`y`"),
        ([1.0, 2.0, 3.0], [1.0, 0.0, 3.0], False, "`y`"),
        ([1.0, 2.0, 3.0, 4.0], [1.0, np.inf, 3.0, 4.0], True, "`y`"),
        ([1.0, 2.0], [1.0, 2.0], False, "at least 3 points"),
        ([1.0, 2.0, 3.0], [1.0, 2.0, 3.0], True, "at least 4 points"),
        ([1.0, 2.0, 3.0], [1.0, 2.0], False, "same length"),
        ([2.0, 2.0, 2.0], [1.0, 2.0, 3.0], False, "`x` needs at least two distinct"),
        (["a", "b", "c"], [1.0, 2.0, 3.0], False, "`x`"),
        ([1.0, 2.0, 3.0, 4.0], [5.0, 5.0, 5.0, 5.0], True, "`y` is constant"),
    ],
)
def test_fit_power_law_rejects_bad_input_naming_argument(x, y, offset, name):
    with pytest.raises(ValueError, match=name):
        fit_power_law(x, y, offset=offset)


def test_fit_power_law_offset_accepts_non_positive_y():
    x = np.geomspace(1.0, 1e4, 6)
    fit = fit_power_law(x, -0.5 + x**-0.5, offset=True)  # y crosses zero
    assert fit.e == pytest.approx(-0.5, rel=1e-4)


def test_power_law_fit_predict_equals_formula():
    fit = PowerLawFit(
        a=0.23, b=-0.0098, e=None, r2=1.0, a_ci=(0.2, 0.3), b_ci=(-0.01, -0.009), e_ci=None, n=10, offset=False
    )
    x = np.array([[1e15, 3e17], [1e19, 1.0]])
    out = fit.predict(x)
    assert isinstance(out, np.ndarray) and out.shape == (2, 2) and out.dtype == np.float64
    np.testing.assert_array_equal(out, 0.23 * x**-0.0098)
    with_e = PowerLawFit(
        a=2.0, b=-0.5, e=0.1, r2=1.0, a_ci=(2.0, 2.0), b_ci=(-0.5, -0.5), e_ci=(0.1, 0.1), n=5, offset=True
    )
    np.testing.assert_allclose(with_e.predict([1.0, 4.0, 100.0]), [2.1, 1.1, 0.3], rtol=1e-15)
    with pytest.raises(ValueError, match="`param_cov`"):
        with_e.predict_interval([1.0])


def test_power_law_fit_predict_interval_delta_method():
    rng = np.random.default_rng(5)
    x = np.geomspace(1e15, 1e19, 12)
    y = 0.23 * x**-0.0098 * np.exp(0.01 * rng.standard_normal(x.size))
    fit = fit_power_law(x, y)
    # at the geometric mean of x the log-space band half-width is t * s / sqrt(n) (intercept error only)
    u, v = np.log(x), np.log(y)
    resid = v - (np.log(fit.a) + fit.b * u)
    s = np.sqrt(resid @ resid / (x.size - 2))
    half = stats.t.ppf(0.975, x.size - 2) * s / np.sqrt(x.size)
    x_mid = np.exp(u.mean())
    low, high = fit.predict_interval(np.array([x_mid]))
    np.testing.assert_allclose(np.log(high / fit.predict(x_mid)), [half], rtol=1e-9)
    np.testing.assert_allclose(np.log(fit.predict(x_mid) / low), [half], rtol=1e-9)
    # the band widens away from the centre of the data
    low, high = fit.predict_interval(np.array([1e13, x_mid, 1e21]))
    width = np.log(high / low)
    assert width[1] < width[0] and width[1] < width[2]


def test_power_law_fit_predict_interval_offset_brackets_curve():
    rng = np.random.default_rng(11)
    x = np.geomspace(1.0, 1e4, 15)
    fit = fit_power_law(x, 0.1 + 2 * x**-0.5 + 0.002 * rng.standard_normal(x.size), offset=True)
    grid = np.geomspace(1.0, 1e4, 50)
    low, high = fit.predict_interval(grid)
    y = fit.predict(grid)
    assert low.shape == (50,) and np.all(low < y) and np.all(y < high)
    # noiseless data -> zero-width band
    exact = fit_power_law(x, 0.1 + 2 * x**-0.5, offset=True)
    low, high = exact.predict_interval(grid)
    np.testing.assert_allclose(high - low, 0.0, atol=1e-6)
