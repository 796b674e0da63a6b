"""Statistics a referee accepts (docs/science.md): uncertainty over the independent units, the seeds; noise floors
from resampling the evaluation examples; and verdicts that say "not resolved" when the data do not decide.

* **Member bootstrap.** The pairs of a cell share members (8 seeds give 28 dependent pairs), so a confidence interval
  resamples seeds, never pairs: a replicate draws S seeds with replacement and averages the measure over the pairs of
  distinct drawn seeds (or over the drawn members, for a per-member measure). Members that share a seed share their
  data order (and head, per_seed) in every cell, so one set of draws serves every cell at once, and the difference of
  two cells' replicates is the paired bootstrap of their difference.
* **Noise floor.** A barrier is the maximum of a curve measured on n examples; two models in one basin still show a
  positive one. The barrier pass also evaluates every curve under R bootstrap resamplings of the evaluation examples
  (`train.batch_eval_set`). The centred resampled curve δ_r(α) = L_r(α) − L(α) is the curve's evaluation noise alone;
  the barrier of δ_r is what that noise makes of a truly flat curve, and the pair's floor is its 95 % quantile. A model
  against itself has δ_r constant in α, hence floor 0 and barrier 0.
* **Verdicts** are jaxlmc.decide's (the jackknife over seeds, an equivalence margin, Benjamini–Hochberg); the
  member bootstrap here serves H3's brackets and H4's correlations.
"""
from __future__ import annotations

import numpy as np
import scipy.stats

from jaxlmc import barriers, grid

LEVEL = 0.95
RESAMPLES = 1000  # seed draws behind the report's intervals
MIN_MEMBERS = 3  # fewer usable members than this give no interval: two seeds' one pair cannot be resampled
FORMS = ("", "_lin")  # column suffixes: endpoint-mean and linear-baseline barriers


def barrier(curve_PxA, alphas, form: str = "") -> np.ndarray:
    """The endpoint-mean ("") or linear-baseline ("_lin") barrier of each curve (Frankle et al. 2020; Entezari et al. 2022)."""
    if form == "":
        return barriers.barrier_endpoint_mean(curve_PxA)
    return barriers.barrier_linear(curve_PxA, alphas)


def null_barriers(curves_PxAxR1, alphas, form: str = "") -> np.ndarray:
    """null_PxR: the barrier of each pair's centred resampled curve, one per resampling — what evaluation noise alone
    makes of a flat curve. `curves_PxAxR1[..., 0]` is the curve on the evaluation set itself, `[..., 1:]` its R
    resamplings (the same resamplings for every pair). P × 0 with fewer than 2 resamplings."""
    curves = np.asarray(curves_PxAxR1, np.float64)
    if curves.shape[-1] < 3:
        return np.zeros((curves.shape[0], 0))
    centred = curves[..., 1:] - curves[..., :1]  # P × A × R
    num_pairs, num_alphas, num_resamples = centred.shape
    flat = np.moveaxis(centred, 2, 1).reshape(num_pairs * num_resamples, num_alphas)
    return barrier(flat, alphas, form).reshape(num_pairs, num_resamples)


def noise_floor(curves_PxAxR1, alphas, form: str = "", level: float = LEVEL) -> np.ndarray:
    """floor_P: the `level` quantile, over the R resamplings, of the barrier of each pair's centred resampled curve
    (`null_barriers`)."""
    return floor_of(null_barriers(curves_PxAxR1, alphas, form), level)


def floor_of(null_PxR, level: float = LEVEL) -> np.ndarray:
    """floor_P: the `level` quantile of each pair's null barriers (NaN without resamplings)."""
    null_PxR = np.asarray(null_PxR)
    if not null_PxR.shape[1]:
        return np.full(null_PxR.shape[0], np.nan)
    return np.quantile(null_PxR, level, axis=1)


def seed_draws(num_seeds: int, num_resamples: int, seed: int = 0) -> np.ndarray:
    """draws_RxS: R bootstrap draws of S seed indices with replacement (fixed seed: reports are reproducible)."""
    return np.random.default_rng(seed).integers(0, num_seeds, (num_resamples, num_seeds))


def pair_replicates(matrix_SxS, draws_RxS) -> np.ndarray:
    """The mean of a symmetric pair measure (NaN where a pair is missing) over the pairs of distinct seeds in each
    draw: replicates_R. A draw with no finite pair gives NaN, and every replicate is NaN when fewer than MIN_MEMBERS
    seeds have a finite pair."""
    matrix = np.asarray(matrix_SxS, np.float64)
    if np.isfinite(matrix).any(axis=1).sum() < MIN_MEMBERS:
        return np.full(len(draws_RxS), np.nan)
    sub = matrix[draws_RxS[:, :, None], draws_RxS[:, None, :]]
    keep = (draws_RxS[:, :, None] != draws_RxS[:, None, :]) & np.isfinite(sub)
    count = keep.sum(axis=(1, 2))
    total = np.where(keep, sub, 0.0).sum(axis=(1, 2))
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def member_replicates(values_S, draws_RxS) -> np.ndarray:
    """The mean of a per-member measure (NaN where a member is missing) over each draw: replicates_R (all NaN when
    fewer than MIN_MEMBERS members have a value)."""
    if np.isfinite(np.asarray(values_S, np.float64)).sum() < MIN_MEMBERS:
        return np.full(len(draws_RxS), np.nan)
    sub = np.asarray(values_S, np.float64)[draws_RxS]
    keep = np.isfinite(sub)
    count = keep.sum(axis=1)
    return np.where(count > 0, np.where(keep, sub, 0.0).sum(axis=1) / np.maximum(count, 1), np.nan)


def pair_mean(matrix_SxS) -> float:
    """The plain mean over the finite off-diagonal entries."""
    matrix = np.asarray(matrix_SxS, np.float64)
    keep = ~np.eye(len(matrix), dtype=bool) & np.isfinite(matrix)
    return float(matrix[keep].mean()) if keep.any() else float("nan")


def ci(replicates_R, level: float = LEVEL) -> tuple[float, float]:
    """Percentile interval of the finite replicates (NaN, NaN when fewer than two)."""
    finite = np.asarray(replicates_R, np.float64)
    finite = finite[np.isfinite(finite)]
    if finite.size < 2:
        return float("nan"), float("nan")
    lo, hi = np.quantile(finite, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def symmetric_matrix(num_seeds: int, seed_pairs, values) -> np.ndarray:
    """matrix_SxS with values[k] at (a, b) and (b, a) for seed_pairs[k] = (a, b); NaN elsewhere."""
    matrix = np.full((num_seeds, num_seeds), np.nan)
    for (a, b), v in zip(seed_pairs, values):
        matrix[a, b] = matrix[b, a] = v
    return matrix


# --------------------------------------------------------------------------------------------- per cell, from tables


def cell_seed_pairs(members: list[dict], pair_rows: list[dict], column: str) -> dict[tuple, tuple[list, list]]:
    """{cell: (seed pairs, values)} of a pair measure over the within-cell pairs of pairs.csv."""
    out: dict = {}
    for p in pair_rows:
        if p["same_cell"] and column in p:
            pairs, values = out.setdefault(grid.cell(p), ([], []))
            pairs.append((members[p["i"]]["seed"], members[p["j"]]["seed"]))
            values.append(p[column])
    return out


def pair_cells(members: list[dict], pair_rows: list[dict], column: str, num_seeds: int, draws_RxS):
    """({cell: point mean}, {cell: replicates_R}) of a within-cell pair measure."""
    points, reps = {}, {}
    for key, (pairs, values) in cell_seed_pairs(members, pair_rows, column).items():
        matrix = symmetric_matrix(num_seeds, pairs, values)
        points[key], reps[key] = pair_mean(matrix), pair_replicates(matrix, draws_RxS)
    return points, reps


def member_cells(rows: list[dict], column: str, num_seeds: int, draws_RxS, reduce: str = "mean"):
    """({cell: point}, {cell: replicates_R}) of a per-member measure (rows with a seed: members.csv rows of used
    members, or to_start.csv), reduced by its mean or its standard deviation over the (drawn) members."""
    by_cell: dict = {}
    for r in rows:
        by_cell.setdefault(grid.cell(r), np.full(num_seeds, np.nan))[r["seed"]] = r[column]
    points, reps = {}, {}
    for key, values in by_cell.items():
        finite = values[np.isfinite(values)]
        if reduce == "mean":
            points[key], reps[key] = (float(finite.mean()) if finite.size else np.nan,
                                      member_replicates(values, draws_RxS))
        else:
            sub = values[draws_RxS]
            keep = np.isfinite(sub)
            count = keep.sum(axis=1)
            mean = np.where(keep, sub, 0.0).sum(axis=1) / np.maximum(count, 1)
            var = np.where(keep, (sub - mean[:, None]) ** 2, 0.0).sum(axis=1) / np.maximum(count, 1)
            points[key] = float(finite.std()) if finite.size > 1 else np.nan
            reps[key] = np.where(count > 1, np.sqrt(var), np.nan) if finite.size >= MIN_MEMBERS else \
                np.full(len(draws_RxS), np.nan)
    return points, reps


def spearman_replicates(x_CxR, y_CxR) -> np.ndarray:
    """Spearman's ρ across cells, one per replicate (cells with a NaN in a replicate are left out of it)."""
    out = np.full(x_CxR.shape[1], np.nan)
    for r in range(x_CxR.shape[1]):
        keep = np.isfinite(x_CxR[:, r]) & np.isfinite(y_CxR[:, r])
        if keep.sum() >= 3:
            out[r] = scipy.stats.spearmanr(x_CxR[keep, r], y_CxR[keep, r]).statistic
    return out


def spearman(x_C, y_C) -> float:
    x_C, y_C = np.asarray(x_C, float), np.asarray(y_C, float)
    keep = np.isfinite(x_C) & np.isfinite(y_C)
    return float(scipy.stats.spearmanr(x_C[keep], y_C[keep]).statistic) if keep.sum() >= 3 else float("nan")


# --------------------------------------------------------------------------------------------- the critical rate


def crossing(log_lrs_L, excess_L) -> float:
    """The log-rate at which an excess (barrier − floor) first rises above 0, walking the rates upward, linearly
    interpolated between the last rate at or below 0 and the first above. Rates with no value (NaN: every member
    unfit or diverged) are skipped. −inf when the lowest measured rate is already above 0 (the boundary lies below
    the grid), +inf when no rate is (it lies above the grid, or there is none)."""
    points = [(x, e) for x, e in zip(np.asarray(log_lrs_L, float), np.asarray(excess_L, float)) if np.isfinite(e)]
    if not points:
        return float("nan")
    if points[0][1] > 0:
        return float("-inf")
    for (x0, e0), (x1, e1) in zip(points, points[1:]):
        if e1 > 0 >= e0:
            return float(x0 + (x1 - x0) * (0 - e0) / (e1 - e0))
    return float("inf")


def crossing_replicates(lrs_L, excess_reps_LxR) -> np.ndarray:
    """The crossing (`crossing`, as a log10 rate) of every replicate: crossings_R, NaN where a replicate has no
    value at any rate."""
    log_lrs = np.log10(np.asarray(lrs_L, float))
    order = np.argsort(log_lrs)
    reps = np.asarray(excess_reps_LxR, float)[order]
    return np.array([crossing(log_lrs[order], reps[:, r]) for r in range(reps.shape[1])])


# A crossing is interpolated (to a number with a CI) only between grid rates at most this factor apart; between rates
# further apart the data support a bracket, not a point: the crossing there only encodes the two end values.
BRACKET_FACTOR = 1.5


def bracket(lrs_L, excess_L, excess_reps_LxR, factor: float = BRACKET_FACTOR) -> dict:
    """Where an excess (barrier − floor) first rises above 0, walking the rates upward, as a bracket of grid rates:

        stay_lr        the highest measured rate below the first leaving one (0: even the lowest leaves)
        leave_lr       the first measured rate whose excess is above 0 (+inf: none leaves)
        stay_support   the fraction of member-bootstrap replicates in which stay_lr stays (excess ≤ 0)
        leave_support  the fraction in which leave_lr leaves (> 0)
        critical_lr    the crossing interpolated on the log-rate axis, with its CI (critical_lr_ci_lo/hi), only when
                       leave_lr / stay_lr ≤ `factor`; NaN otherwise (±inf outside the grid as in `critical_rate`)

    Rates without a value (NaN: every member unfit or diverged) are skipped. All NaN when no rate has a value."""
    lrs = np.asarray(lrs_L, float)
    order = np.argsort(lrs)
    lrs, points, reps = lrs[order], np.asarray(excess_L, float)[order], np.asarray(excess_reps_LxR, float)[order]
    measured = np.flatnonzero(np.isfinite(points))
    nan = float("nan")
    out = {"stay_lr": nan, "leave_lr": nan, "stay_support": nan, "leave_support": nan, "critical_lr": nan,
           "critical_lr_ci_lo": nan, "critical_lr_ci_hi": nan}
    if not measured.size:
        return out

    def support(k: int, leaves: bool) -> float:
        finite = reps[k][np.isfinite(reps[k])]
        return float(np.mean(finite > 0 if leaves else finite <= 0)) if finite.size else nan

    leaving = [k for k in measured if points[k] > 0]
    if not leaving:
        stay = measured[-1]
        out.update(stay_lr=float(lrs[stay]), leave_lr=float("inf"), stay_support=support(stay, False))
    else:
        leave = leaving[0]
        below = [k for k in measured if k < leave]
        out.update(leave_lr=float(lrs[leave]), leave_support=support(leave, True), stay_lr=0.0)
        if below:
            out.update(stay_lr=float(lrs[below[-1]]), stay_support=support(below[-1], False))
    if out["stay_lr"] == 0.0 or out["leave_lr"] == float("inf") or out["leave_lr"] / out["stay_lr"] <= factor:
        rate, lo, hi = critical_rate(lrs, points, reps)
        out.update(critical_lr=rate, critical_lr_ci_lo=lo, critical_lr_ci_hi=hi)
    return out


def critical_rate(lrs_L, excess_L, excess_reps_LxR, level: float = LEVEL) -> tuple[float, float, float]:
    """(rate, CI lo, CI hi): the smallest fine-tuning learning rate at which seeds leave the basin — where the mean
    excess of their barrier over its noise floor crosses 0 — interpolated on the log-rate axis, with a member-bootstrap
    CI from the same crossing in every replicate (`excess_reps_LxR`: the rates' replicates from one set of seed draws).
    ±inf marks a boundary outside the grid (below its lowest rate, or above its highest); the CI's quantiles keep
    them, so an interval reaching +inf says the grid does not bound the rate from above."""
    log_lrs = np.log10(np.asarray(lrs_L, float))
    order = np.argsort(log_lrs)
    point = crossing(log_lrs[order], np.asarray(excess_L, float)[order])
    replicates = crossing_replicates(lrs_L, excess_reps_LxR)
    replicates = replicates[~np.isnan(replicates)]
    if replicates.size < 2:
        return 10 ** point, float("nan"), float("nan")
    lo, hi = np.quantile(replicates, [(1 - level) / 2, (1 + level) / 2], method="nearest")
    return float(10 ** point), float(10 ** lo), float(10 ** hi)
