"""The one decision rule behind every basin verdict (docs/science.md, "Deciding a basin").

* **Estimate.** A cell's barrier is the mean, over its within-cell pairs (or its members, to the start), of the
  linear-baseline test error barrier. Its **excess** is the same mean of each barrier minus its pair's null mean: the
  mean, over bootstrap resamplings of the evaluation examples, of the barrier that evaluation noise alone makes of a
  flat curve (jaxlmc.stats.null_barriers). The excess is the debiased barrier: about 0 in expectation when the
  members are in one basin, whatever the test set's size.
* **Interval.** Seeds are the independent units (pairs share members). The interval is Student-t over the
  leave-one-seed-out jackknife: θ₍ᵢ₎ is the estimate without seed i (its pairs dropped), SE² = (n−1)/n Σ(θ₍ᵢ₎ − θ̄)²,
  df = n − 1. It works for any pair design (all pairs, a ring) and, unlike the percentile bootstrap over 8 seeds, it
  covers (measured in docs/science.md); it is deterministic, so no Monte-Carlo error moves a verdict.
* **Verdict.** "one basin" only as an equivalence claim, when the barrier itself — not debiased, which only makes the
  claim harder — is below the margin δ (one-sided test at (1 − level)/2: the interval's upper end below δ);
  otherwise "separate basins" when the excess is above 0 (the interval's lower end above 0); otherwise "not
  resolved". Each comes with
  its minimum detectable excess at 80 % power: (t₁₋ₐ + t_power)·SE.
* **Multiplicity.** The one-sided p-values of every verdict a study states (two per cell: separate, one basin) are
  adjusted together by Benjamini–Hochberg (false discovery rate at (1 − level)/2): a cell map is many discoveries
  read together, and the share of wrong ones is what a reader needs bounded (Holm's family-wise bound would leave
  most cells of a 60-cell map unresolved at the seed counts a study affords).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import scipy.stats

from jaxlmc.settings import DEFAULT_MARGIN

LEVEL = 0.95
POWER = 0.80
MARGIN = DEFAULT_MARGIN  # δ (jaxlmc.settings)
MIN_SEEDS = 3  # fewer seeds with a value give no interval
VERDICTS = ("one basin", "separate basins", "not resolved")


def headline_measure(rows: list[dict], split: str | None = None) -> str | None:
    """The barrier column a verdict is read from: the linear-baseline error barrier on `split` (default: "test", or
    the first error split when there is none), after weight matching when it was measured; None without one."""
    columns = (rows or [{}])[0]
    splits = [k[len("error_barrier_"):-len("_lin")] for k in columns
              if k.startswith("error_barrier_") and k.endswith("_lin")]
    if not splits or (split is not None and split not in splits):
        return None
    split = split or ("test" if "test" in splits else splits[0])
    aligned = f"error_barrier_{split}_lin_aligned"
    return aligned if aligned in columns else f"error_barrier_{split}_lin"


@dataclasses.dataclass(frozen=True)
class Estimate:
    """A mean over seeds' pairs (or members) with its leave-one-seed-out values: jack_S (NaN for a seed without a
    value, which is then not a unit)."""

    point: float
    jack_S: np.ndarray

    @property
    def seeds(self) -> int:
        return int(np.isfinite(self.jack_S).sum())

    @property
    def df(self) -> int:
        return self.seeds - 1

    @property
    def se(self) -> float:
        jack = self.jack_S[np.isfinite(self.jack_S)]
        if jack.size < MIN_SEEDS or not np.isfinite(self.point):
            return float("nan")
        return float(np.sqrt((jack.size - 1) / jack.size * np.sum((jack - jack.mean()) ** 2)))

    def interval(self, level: float = LEVEL) -> tuple[float, float]:
        half = scipy.stats.t.ppf((1 + level) / 2, self.df) * self.se if self.seeds >= MIN_SEEDS else np.nan
        return float(self.point - half), float(self.point + half)

    def min_detectable(self, level: float = LEVEL, power: float = POWER) -> float:
        """The true value this design finds above 0 with probability `power` (one-sided test at (1 − level)/2)."""
        if self.seeds < MIN_SEEDS:
            return float("nan")
        return float((scipy.stats.t.ppf((1 + level) / 2, self.df) + scipy.stats.t.ppf(power, self.df)) * self.se)

    def p_above(self, bound: float) -> float:
        """One-sided p-value against "the true value is at most `bound`"."""
        return _p((self.point - bound), self.se, self.df)

    def p_below(self, bound: float) -> float:
        """One-sided p-value against "the true value is at least `bound`"."""
        return _p((bound - self.point), self.se, self.df)

    def p_two_sided(self) -> float:
        """Two-sided p-value against "the true value is 0"."""
        return min(1.0, 2 * min(self.p_above(0.0), self.p_below(0.0)))

    def minus(self, other: Estimate) -> Estimate:
        """The paired difference self − other over the seeds both have (the same seeds in two cells)."""
        return Estimate(self.point - other.point, self.jack_S - other.jack_S)


def _p(distance: float, se: float, df: int) -> float:
    if not (np.isfinite(distance) and np.isfinite(se)) or df < MIN_SEEDS - 1:
        return float("nan")
    if se == 0:
        return 0.0 if distance > 0 else 1.0
    return float(scipy.stats.t.sf(distance / se, df))


def of_pairs(matrix_SxS) -> Estimate:
    """The mean of a symmetric pair measure over its finite off-diagonal entries (NaN: no pair), with each seed's
    leave-one-out mean (the pairs of the other seeds)."""
    matrix = np.array(matrix_SxS, np.float64)
    np.fill_diagonal(matrix, np.nan)
    finite = np.isfinite(matrix)
    total, count = np.where(finite, matrix, 0.0).sum(), finite.sum()
    point = total / count if count else np.nan
    row_total, row_count = np.where(finite, matrix, 0.0).sum(axis=1), finite.sum(axis=1)
    left = count - 2 * row_count  # each pair counted twice in the full matrix
    jack = np.where((row_count > 0) & (left > 0), (total - 2 * row_total) / np.maximum(left, 1), np.nan)
    return Estimate(float(point), jack)


def of_members(values_S) -> Estimate:
    """The mean of a per-member measure (NaN: no member) with each seed's leave-one-out mean."""
    values = np.asarray(values_S, np.float64)
    finite = np.isfinite(values)
    n, total = finite.sum(), np.where(finite, values, 0.0).sum()
    jack = np.where(finite & (n > 1), (total - np.where(finite, values, 0.0)) / max(n - 1, 1), np.nan)
    return Estimate(float(total / n) if n else float("nan"), jack)


def mean_of(estimates: list[Estimate]) -> Estimate:
    """The mean of several estimates over the same seeds (e.g. over cells), with its own jackknife values."""
    return Estimate(float(np.mean([e.point for e in estimates])), np.mean([e.jack_S for e in estimates], axis=0))


def p_values(excess: Estimate, barrier: Estimate, margin: float = MARGIN) -> tuple[float, float]:
    """(p separate, p one basin): the excess above 0; the barrier below the margin."""
    return excess.p_above(0.0), barrier.p_below(margin)


def adjust(p_values_N) -> np.ndarray:
    """Benjamini–Hochberg adjusted p-values (NaN entries stay NaN and do not count)."""
    p = np.asarray(p_values_N, np.float64)
    out = np.full(p.shape, np.nan)
    keep = np.isfinite(p)
    if keep.any():
        out[keep] = scipy.stats.false_discovery_control(p[keep], method="bh")
    return out


def verdict(p_separate: float, p_one_basin: float, level: float = LEVEL) -> str:
    """The verdict from (adjusted) one-sided p-values at (1 − level)/2. A barrier shown below the margin is one basin
    even when its excess is also shown above 0: a barrier smaller than the margin is, by the margin's definition, one
    that does not matter."""
    alpha = (1 - level) / 2
    if np.isfinite(p_one_basin) and p_one_basin < alpha:
        return "one basin"
    if np.isfinite(p_separate) and p_separate < alpha:
        return "separate basins"
    return "not resolved"


def decide_all(tests: dict, margin: float = MARGIN, level: float = LEVEL, shifts: dict | None = None) -> dict:
    """{key: (excess, barrier)} → {key: {"verdict", "p_separate", "p_one_basin", "mc_moved"}} with the p-values of
    every key's two tests adjusted together (Benjamini–Hochberg). `shifts` ({key: the Monte-Carlo standard error of
    its null mean}): the verdicts are decided again with every excess one standard error lower and one higher — all
    together, since the evaluation examples' resamplings are shared — and a key whose verdict either shift moves is
    not resolved (`mc_moved` 1): no verdict rests on the resamplings' luck."""
    keys = list(tests)

    def decided(sign: float) -> tuple[np.ndarray, list[str]]:
        moved = {k: (_shifted(tests[k][0], sign * (shifts or {}).get(k, 0.0)), tests[k][1]) for k in keys}
        raw = np.array([p_values(*moved[k], margin) for k in keys], np.float64).reshape(len(keys), 2)
        adjusted = adjust(raw.ravel()).reshape(raw.shape)
        return adjusted, [verdict(*adjusted[i], level) for i in range(len(keys))]

    adjusted, words = decided(0.0)
    stable = np.ones(len(keys), bool)
    if shifts:
        for sign in (-1.0, 1.0):
            stable &= np.array([a == b for a, b in zip(words, decided(sign)[1])], bool)
    return {k: {"verdict": words[i] if stable[i] else "not resolved", "p_separate": float(adjusted[i, 0]),
                "p_one_basin": float(adjusted[i, 1]), "mc_moved": float(not stable[i])} for i, k in enumerate(keys)}


def _shifted(estimate: Estimate, by: float) -> Estimate:
    return Estimate(estimate.point + by, estimate.jack_S + by)


def basin_measure(pair_rows: list[dict]) -> str:
    """The barrier basins are cut on: the headline (headline_measure), or in tables without a linear-baseline form
    the test error barrier, after weight matching when it was measured."""
    aligned = "error_barrier_test_aligned"
    return headline_measure(pair_rows) or (aligned if pair_rows and aligned in pair_rows[0] else "error_barrier_test")

