"""Trends across model sizes (docs/science.md, "Scaling trends"): a power law of a measure against size with a
bootstrap interval over seeds for its exponent, and the trend of the critical learning rate from its brackets
treated as intervals (interval-censored: a bracket says only that the critical rate lies between the highest rate
shown to stay and the lowest shown to leave, so no midpoint is ever fitted).

Each size is its own study: its seeds are its own units, independent of every other size's. So the bootstrap draws
seeds within each size separately (`pair_replicates` of each size's seed-pair matrix with its own draws), refits the
line on every joint replicate, and reads the exponent's interval off the refitted slopes.
"""
from __future__ import annotations

import dataclasses

import numpy as np
from scipy.optimize import linprog

from jaxlmc import stats


MIN_FITTED = 0.95  # the share of bootstrap draws that must be fittable for the exponent to get an interval


@dataclasses.dataclass(frozen=True)
class PowerLaw:
    """value ≈ prefactor · size ** exponent, fitted by least squares on log–log axes; `ci_lo`, `ci_hi`: the
    exponent's percentile interval over the bootstrap replicates (NaN when fewer than two replicates fit)."""

    exponent: float
    prefactor: float
    ci_lo: float
    ci_hi: float
    replicates: int  # bootstrap replicates whose values were all positive and finite (those fitted)

    def excludes_zero(self) -> bool:
        return bool(self.ci_lo > 0 or self.ci_hi < 0)


def _slope_intercept(log_x: np.ndarray, log_y_RxK: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares lines through each row of log_y_RxK against log_x: (slope_R, intercept_R)."""
    x = log_x - log_x.mean()
    slope = (log_y_RxK - log_y_RxK.mean(axis=1, keepdims=True)) @ x / (x @ x)
    return slope, log_y_RxK.mean(axis=1) - slope * log_x.mean()


def power_law(sizes_K, point_K, replicates_KxR, level: float = stats.LEVEL) -> PowerLaw:
    """The power law of a positive measure against size: `point_K` its estimate at each size, `replicates_KxR` its
    bootstrap replicates (each size's drawn independently: `seed_matrix_replicates`). The exponent's interval is the
    `level` percentile interval of the slopes refitted on the replicates; a replicate with a value that is not
    positive and finite at some size (a log cannot be taken) cannot be refitted, `replicates` counts those that can,
    and below MIN_FITTED of them the interval is NaN (leaving the others out would bias it)."""
    sizes, point = np.asarray(sizes_K, np.float64), np.asarray(point_K, np.float64)
    if sizes.ndim != 1 or len(sizes) < 2 or len(set(sizes.tolist())) < 2 or np.any(sizes <= 0):
        raise ValueError(f"power_law: at least two distinct positive sizes are needed, got {sizes_K!r}")
    replicates = np.asarray(replicates_KxR, np.float64).reshape(len(sizes), -1)
    if not np.all(np.isfinite(point) & (point > 0)):
        return PowerLaw(np.nan, np.nan, np.nan, np.nan, 0)
    slope, intercept = _slope_intercept(np.log(sizes), np.log(point)[None])
    fits = np.all(np.isfinite(replicates) & (replicates > 0), axis=0)
    slopes_R = _slope_intercept(np.log(sizes), np.log(replicates[:, fits].T))[0] if fits.any() else np.zeros(0)
    # Dropping the draws that cannot be fitted (a mean barrier of 0 at some size: common where seeds share a basin)
    # would bias the interval, so it is given only when nearly every draw fits.
    lo, hi = stats.ci(slopes_R, level) if fits.size and fits.mean() >= MIN_FITTED else (np.nan, np.nan)
    return PowerLaw(float(slope[0]), float(np.exp(intercept[0])), lo, hi, int(fits.sum()))


def seed_matrix_replicates(matrices_KxSxS: list, resamples: int = stats.RESAMPLES) -> np.ndarray:
    """replicates_KxR of a within-cell pair measure at each size, from each size's seed-pair matrix
    (stats.symmetric_matrix): the mean over the pairs of distinct seeds drawn with replacement, with draws of its
    own per size (sizes are independent studies)."""
    out = []
    for k, matrix in enumerate(matrices_KxSxS):
        draws = stats.seed_draws(len(matrix), resamples, seed=k)
        out.append(stats.pair_replicates(matrix, draws))
    return np.asarray(out)


@dataclasses.dataclass(frozen=True)
class CensoredSlope:
    """The slopes b of log(critical rate) = a + b·log(size) that pass through every size's bracket: all of them lie
    in [lo, hi] (±inf where the brackets do not bound it), `central` is the one that stays furthest inside the
    brackets. `consistent` is False when no straight line passes through every bracket (then all are NaN)."""

    lo: float
    hi: float
    central: float
    consistent: bool

    def excludes_zero(self) -> bool:
        return bool(self.consistent and (self.lo > 0 or self.hi < 0))


def censored_slope(sizes_K, stay_K, leave_K) -> CensoredSlope:
    """The slope of the critical rate against size, on log–log axes, from brackets: at size k the critical rate lies
    above `stay_K[k]` (the highest rate shown to stay; NaN or 0: none shown) and at or below `leave_K[k]` (the lowest
    shown to leave; NaN or inf: none shown). A size with neither end shown says nothing and is left out. The set of
    slopes consistent with every bracket is an interval (a linear programme in intercept and slope); its ends are the
    slope's interval, and `central` maximises the smallest log-distance of the line to a bracket's ends."""
    x = np.log(np.asarray(sizes_K, np.float64))
    lo = np.log(np.where(np.isfinite(stay_K) & (np.asarray(stay_K, np.float64) > 0), stay_K, np.nan))
    hi = np.log(np.where(np.isfinite(leave_K), leave_K, np.nan))
    known = np.isfinite(lo) | np.isfinite(hi)
    x, lo, hi = x[known], lo[known], hi[known]
    if len(set(x.tolist())) < 2:
        raise ValueError("censored_slope: brackets at two or more distinct sizes are needed")
    # Constraints on (a, b, t): lo_k + t ≤ a + b·x_k ≤ hi_k − t, written A @ (a, b, t) ≤ c.
    rows, bounds = [], []
    for xk, lk, hk in zip(x, lo, hi):
        if np.isfinite(lk):
            rows.append([-1.0, -xk, 1.0])
            bounds.append(-lk)
        if np.isfinite(hk):
            rows.append([1.0, xk, 1.0])
            bounds.append(hk)
    A, c = np.asarray(rows), np.asarray(bounds)
    free = [(None, None), (None, None)]

    def solve(objective, t_bounds):
        return linprog(objective, A_ub=A, b_ub=c, bounds=free + [t_bounds], method="highs")

    feasible = solve([0.0, 0.0, 0.0], (0.0, 0.0))
    if feasible.status == 2:
        return CensoredSlope(np.nan, np.nan, np.nan, False)
    ends = []
    for sign in (1.0, -1.0):
        result = solve([0.0, sign, 0.0], (0.0, 0.0))
        ends.append(sign * result.fun if result.status == 0 else -sign * np.inf)
    central = solve([0.0, 0.0, -1.0], (0.0, None))
    b = float(central.x[1]) if central.status == 0 else (float(np.mean(ends)) if np.all(np.isfinite(ends)) else np.nan)
    return CensoredSlope(float(ends[0]), float(ends[1]), b, True)
