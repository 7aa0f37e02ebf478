"""Power-law fits L(C) = a * C^b and L(C) = e + a * C^b with 95% confidence intervals.

from diffperc.scaling import fit_power_law
fit = fit_power_law(train_macs, val_loss)   # print(fit) -> "L(C) = 0.23 * C^-0.0098"
"""

import warnings
from dataclasses import dataclass

import numpy as np
from scipy import optimize, stats

_LEVEL = 0.95  # every interval in this module is a two-sided 95% interval


@dataclass(frozen=True)
class PowerLawFit:
    """A fitted power law ``y = a * x^b`` (or ``y = e + a * x^b``) with 95% confidence intervals.

    ``r2`` is computed in log space (on ``log y``) for the pure power law, where the fit is made, and in linear
    space for the offset law. ``param_cov``, ``log_x_ref`` and ``dof`` describe the internal parametrisation
    used by ``predict_interval``: for ``offset=False`` the parameters are ``(alpha, b)`` of
    ``log y = alpha + b * (log x - log_x_ref)``; for ``offset=True`` they are ``(e, A, b)`` of
    ``y = e + A * (x / x_ref)^b``, with ``x_ref = exp(log_x_ref)`` the geometric mean of the fitted x. These three
    are filled in by ``fit_power_law``; a hand-made ``PowerLawFit`` can ``predict`` but not ``predict_interval``.
    """

    a: float
    b: float
    e: float | None
    r2: float
    a_ci: tuple[float, float]
    b_ci: tuple[float, float]
    e_ci: tuple[float, float] | None
    n: int
    offset: bool
    param_cov: tuple[tuple[float, ...], ...] = ()
    log_x_ref: float = 0.0
    dof: int = 0

    def predict(self, x) -> np.ndarray:
        """Evaluates the law at ``x`` (array-like, positive) and returns a float64 array of the same shape."""
        x = np.asarray(x, dtype=np.float64)
        y = self.a * np.power(x, self.b)
        return y + self.e if self.offset else y

    def predict_interval(self, x) -> tuple[np.ndarray, np.ndarray]:
        """Returns ``(low, high)``, a pointwise 95% confidence band for the fitted curve at ``x``, by the delta method.

        The band covers the curve itself (parameter uncertainty), not new observations. For ``offset=False`` it is
        made in log space (``exp(log y_hat +- t * se)``, so it stays positive and is exact for OLS on the logs);
        for ``offset=True`` it is made in linear space from the ``curve_fit`` covariance. ``t`` is the Student-t
        quantile with ``n - num_params`` degrees of freedom.
        """
        if not self.param_cov:
            raise ValueError("`param_cov` is empty: predict_interval needs a PowerLawFit made by fit_power_law")
        x = np.asarray(x, dtype=np.float64)
        cov = np.asarray(self.param_cov, dtype=np.float64)
        t = stats.t.ppf(0.5 + _LEVEL / 2, self.dof)
        s = np.log(x) - self.log_x_ref  # centred log x keeps the gradient O(1) even for x ~ 1e19
        if not self.offset:
            # 1. gradient of log y wrt (alpha, b) is (1, s); alpha and b are uncorrelated because s is centred
            var = cov[0, 0] + 2 * s * cov[0, 1] + s**2 * cov[1, 1]
            half = t * np.sqrt(np.maximum(var, 0.0))
            log_y = np.log(self.a) + self.b * np.log(x)
            return np.exp(log_y - half), np.exp(log_y + half)
        # 2. gradient of y wrt (e, A, b) is (1, p, A * s * p) with p = (x / x_ref)^b
        big_a = self.a * np.exp(self.b * self.log_x_ref)
        p = np.exp(self.b * s)
        grad = np.stack([np.ones_like(s), p, big_a * s * p], axis=-1)  # (..., 3)
        var = np.einsum("...i,ij,...j->...", grad, cov, grad)
        half = t * np.sqrt(np.maximum(var, 0.0))
        y = self.predict(x)
        return y - half, y + half

    def format(self, y_name: str = "L", x_name: str = "C") -> str:
        """Returns the law as text, e.g. ``L(C) = 0.23 * C^-0.0098`` or ``L(C) = 0.1 + 2 * C^-0.5`` (4 digits)."""
        law = f"{self.a:.4g} * {x_name}^{self.b:.4g}"
        if self.offset:
            sign = "-" if self.a < 0 else "+"
            law = f"{self.e:.4g} {sign} {abs(self.a):.4g} * {x_name}^{self.b:.4g}"
        return f"{y_name}({x_name}) = {law}"

    def __str__(self) -> str:
        return self.format()


def fit_power_law(x, y, offset: bool = False) -> PowerLawFit:
    """Fits ``y = a * x^b`` (``offset=False``) or ``y = e + a * x^b`` (``offset=True``) and returns a ``PowerLawFit``.

    Without offset the fit is ordinary least squares of ``log y`` on centred ``log x`` in float64 (closed form), so
    tiny exponents over huge x (``b = -0.0098`` over ``x = 1e15..1e19``) keep full precision; the intervals use
    the Student-t on the OLS standard errors (``a_ci`` is the exponentiated log-space interval). With offset the
    fit is ``scipy.optimize.curve_fit`` on linear residuals of ``y = e + A * (x / x_ref)^b``, ``x_ref`` the
    geometric mean of x, so ``A`` stays O(y) instead of underflowing; the intervals are Student-t on the
    ``curve_fit`` standard errors (delta method for ``a = A * x_ref^-b``).

    Args:
        x: Positive, finite abscissae (e.g. cumulative training MACs), at least 3 (4 with ``offset``).
        y: Ordinates (e.g. a validation metric): positive and finite without offset, finite with offset.
        offset: Also fit an irreducible term ``e``.

    Raises:
        ValueError: If ``x`` or ``y`` is invalid or there are too few points; the message names the argument.
        RuntimeError: If ``curve_fit`` does not converge (``offset=True`` only).
    """
    x, y = _validate(x, y, offset)
    return _fit_offset(x, y) if offset else _fit_pure(x, y)


def _validate(x, y, offset: bool) -> tuple[np.ndarray, np.ndarray]:
    try:
        x = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"`x` must be an array of numbers: {err}") from err
    try:
        y = np.asarray(y, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"`y` must be an array of numbers: {err}") from err
    for name, arr in (("x", x), ("y", y)):
        if arr.ndim != 1:
            raise ValueError(f"`{name}` must be one-dimensional; got shape {arr.shape}")
    if x.shape != y.shape:
        raise ValueError(f"`x` and `y` must have the same length; got {x.size} and {y.size}")
    min_points = 4 if offset else 3
    if x.size < min_points:
        raise ValueError(f"`x` and `y` need at least {min_points} points with offset={offset}; got {x.size}")
    # x must be positive even with an offset: x^b is not real for x <= 0 and non-integer b
    checks = [("x", x, True), ("y", y, not offset)]
    for name, arr, positive in checks:
        bad = ~np.isfinite(arr) | (arr <= 0) if positive else ~np.isfinite(arr)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            need = "positive and finite" if positive else "finite"
            raise ValueError(f"`{name}` must be {need} (offset={offset}); `{name}[{i}]` = {arr[i]!r}")
    if np.ptp(np.log(x)) == 0:
        raise ValueError("`x` needs at least two distinct values to fit an exponent")
    if offset and np.ptp(y) == 0:
        raise ValueError("`y` is constant, so e, a and b of y = e + a * x^b cannot be told apart (offset=True)")
    return x, y


def _t_interval(value: float, se: float, t: float) -> tuple[float, float]:
    return (float(value - t * se), float(value + t * se))


def _fit_pure(x: np.ndarray, y: np.ndarray) -> PowerLawFit:
    # 1. OLS of v = log y on centred u = log x: v = alpha + b * (u - u_ref)
    u, v = np.log(x), np.log(y)
    n = u.size
    u_ref = float(u.mean())
    uc, vc = u - u_ref, v - v.mean()
    s_uu = float(uc @ uc)
    b = float(uc @ vc) / s_uu
    alpha = float(v.mean())
    log_a = alpha - b * u_ref
    # 2. residual variance and standard errors (textbook simple-regression formulas)
    resid = vc - b * uc
    ssr = float(resid @ resid)
    sst = float(vc @ vc)
    dof = n - 2
    s2 = ssr / dof
    var_alpha, var_b = s2 / n, s2 / s_uu
    se_log_a = np.sqrt(var_alpha + u_ref**2 * var_b)  # cov(alpha, b) = 0 since uc sums to zero
    t = stats.t.ppf(0.5 + _LEVEL / 2, dof)
    # 3. R^2 is undefined when y is constant (nothing to explain)
    r2 = 1.0 - ssr / sst if sst > 0 else float("nan")
    lo, hi = _t_interval(log_a, se_log_a, t)
    return PowerLawFit(
        a=float(np.exp(log_a)),
        b=b,
        e=None,
        r2=r2,
        a_ci=(float(np.exp(lo)), float(np.exp(hi))),
        b_ci=_t_interval(b, np.sqrt(var_b), t),
        e_ci=None,
        n=n,
        offset=False,
        param_cov=((var_alpha, 0.0), (0.0, var_b)),
        log_x_ref=u_ref,
        dof=dof,
    )


def _offset_model(s: np.ndarray, e: float, big_a: float, b: float) -> np.ndarray:
    return e + big_a * np.exp(b * s)


def _offset_jac(s: np.ndarray, e: float, big_a: float, b: float) -> np.ndarray:
    p = np.exp(b * s)
    return np.stack([np.ones_like(s), p, big_a * s * p], axis=1)  # (n, 3)


def _offset_guess(s: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """Log-linear fits of ``|y - e|`` for trial offsets on both sides of y; returns the best ``(e, A, b)``."""
    span = float(np.ptp(y))  # > 0: constant y was rejected by _validate
    best, best_ssr = None, np.inf
    # e below min(y) with A > 0 (decreasing loss or increasing cost); e above max(y) with A < 0 (rising accuracy)
    for sign, edge in ((1.0, float(y.min())), (-1.0, float(y.max()))):
        for q in np.geomspace(1e-4, 1e2, 61):
            e = edge - sign * span * q
            slope, log_amp = np.polyfit(s, np.log(sign * (y - e)), 1)
            big_a = sign * float(np.exp(log_amp))
            ssr = float(np.sum((_offset_model(s, e, big_a, slope) - y) ** 2))
            if ssr < best_ssr:
                best, best_ssr = (e, big_a, float(slope)), ssr
    return best


def _fit_offset(x: np.ndarray, y: np.ndarray) -> PowerLawFit:
    # 1. work in s = log(x / x_ref) so A = a * x_ref^b is O(y) even when a would be 1e-40
    log_x_ref = float(np.log(x).mean())
    s = np.log(x) - log_x_ref
    n = x.size
    p0 = _offset_guess(s, y)
    with warnings.catch_warnings():
        # a singular covariance (e.g. x^b nearly constant over x) comes back as inf intervals instead of a warning
        warnings.simplefilter("ignore", optimize.OptimizeWarning)
        params, cov = optimize.curve_fit(
            _offset_model, s, y, p0=p0, jac=_offset_jac, method="lm", xtol=1e-10, ftol=1e-10, maxfev=20000
        )
    e, big_a, b = (float(p) for p in params)
    # 2. back to the user's units: a = A * x_ref^-b, its variance by the delta method
    a = big_a * float(np.exp(-b * log_x_ref))
    grad_a = np.array([0.0, np.exp(-b * log_x_ref), -log_x_ref * a])
    var_a = float(grad_a @ cov @ grad_a)
    dof = n - 3
    t = stats.t.ppf(0.5 + _LEVEL / 2, dof)
    se = np.sqrt(np.maximum(np.diag(cov), 0.0))
    resid = y - _offset_model(s, e, big_a, b)
    ssr, sst = float(resid @ resid), float(np.sum((y - y.mean()) ** 2))
    return PowerLawFit(
        a=a,
        b=b,
        e=e,
        r2=1.0 - ssr / sst if sst > 0 else float("nan"),
        a_ci=_t_interval(a, np.sqrt(max(var_a, 0.0)), t),
        b_ci=_t_interval(b, se[2], t),
        e_ci=_t_interval(e, se[0], t),
        n=n,
        offset=True,
        param_cov=tuple(tuple(float(c) for c in row) for row in cov),
        log_x_ref=log_x_ref,
        dof=dof,
    )
