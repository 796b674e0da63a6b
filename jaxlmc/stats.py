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

from jaxlmc import decide, grid

LEVEL = 0.95
RESAMPLES = 1000  # seed draws behind the report's intervals
MIN_MEMBERS = 3  # fewer usable members than this give no interval: two seeds' one pair cannot be resampled
FORMS = ("", "_lin")  # column suffixes: endpoint-mean and linear-baseline barriers


def barrier_endpoint_mean(curve_PxA):
    curve = np.asarray(curve_PxA)
    return curve.max(axis=1) - 0.5 * (curve[:, 0] + curve[:, -1])


def barrier_linear(curve_PxA, alphas):
    curve = np.asarray(curve_PxA)
    alphas = np.asarray(alphas)[None]
    baseline = (1.0 - alphas) * curve[:, :1] + alphas * curve[:, -1:]
    return (curve - baseline).max(axis=1)


def midpoint(curve_PxA, alphas):
    """The curve at α = ½ (linearly interpolated between grid points when ½ is not on the grid)."""
    return np.array([np.interp(0.5, alphas, row) for row in np.asarray(curve_PxA)])


def barrier(curve_PxA, alphas, form: str = "") -> np.ndarray:
    """The endpoint-mean ("") or linear-baseline ("_lin") barrier of each curve (Frankle et al. 2020; Entezari et al. 2022)."""
    if form == "":
        return barrier_endpoint_mean(curve_PxA)
    return barrier_linear(curve_PxA, alphas)


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


def seed_estimate(seeds: list, values, num_seeds: int, paired: bool) -> decide.Estimate:
    """The decision rule's estimate (jaxlmc.decide: the jackknife over seeds) of the mean of `values`, measured per
    pair of seeds (`paired`: seeds[k] = (a, b), a pair measure) or per seed (seeds[k] = s, a member measure)."""
    if paired:
        return decide.of_pairs(symmetric_matrix(num_seeds, seeds, values))
    per_seed = np.full(num_seeds, np.nan)
    per_seed[list(seeds)] = values
    return decide.of_members(per_seed)


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


# A bracket of grid rates wider than this factor is refined (jaxlmc.refine), and a point of no return needs a rate that
# trains within it of the rate where training fails (jaxlmc.noreturn): the grid must resolve the boundary that finely.
BRACKET_FACTOR = 1.5
