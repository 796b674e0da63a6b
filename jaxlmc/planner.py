"""A design planner: from a finished (pilot) study's barriers, the seeds × pair design × test examples that reach a
target minimum detectable excess, and what each design costs (docs/science.md, "Planning a design").

Per cell, the pair values of the headline barrier's excess (jaxlmc.decide) are modelled as x_st = μ + u_s + u_t + e_st:
a member effect u (variance σ_m²) shared by every pair of a seed, and a pair residual e (variance σ_p²). The
jackknife's SE² is a quadratic form in the pair values whose matrix Q depends on the design alone, so its expectation
is exact: E[SE²] = σ_m²·tr(Q·B·Bᵀ) + σ_p²·tr(Q), B the pairs × seeds incidence matrix. The residual variance of an
additive fit to the pilot's pairs gives σ_p², its observed SE² then σ_m²; the evaluation-noise part of σ_p² (σ_eval²,
from each pair's null spread, (floor − null mean)/1.645 as for a normal) shrinks in proportion to the test set, the
rest (σ_t², the pairs' own differences) does not. Evaluation noise that a member's pairs share (its own endpoints) is
counted in σ_m² and not shrunk: the prediction for more examples errs on the conservative side, for fewer on the
optimistic one (measured: a 12-seed rerun on half the test set, 16 % above its prediction per cell, docs/science.md).
A prediction is of the SE (and minimum detectable excess) the rule will report, not of the estimate's true spread:
the jackknife over-states both for pair noise (by 2(S−1)/(S−2)) and, in ring designs, for member effects.
"""
from __future__ import annotations

import dataclasses
import functools

import numpy as np
import scipy.stats

from jaxlmc import decide, grid, pair_sets, stats

Z_NULL = scipy.stats.norm.ppf(0.95)  # the floor is the null's 95 % quantile


def design_pairs(seeds: int, degree: int) -> list[tuple[int, int]]:
    """The seed pairs of a design with `degree` pairs per seed: a ring (degree/2 next seeds), or all pairs when
    degree ≥ seeds − 1."""
    if degree >= seeds - 1:
        return pair_sets.pairs_all(range(seeds))
    return pair_sets.pairs_ring({0: list(range(seeds))}, degree // 2)


def jackknife_coefficients(seeds: int, pairs: list[tuple[int, int]]) -> tuple[float, float]:
    """(a_m, a_p): E[jackknife SE²] = a_m·σ_m² + a_p·σ_p² for a cell of `seeds` seeds and these pairs."""
    num_pairs = len(pairs)
    incidence_PxS = np.zeros((num_pairs, seeds))
    for k, (a, b) in enumerate(pairs):
        incidence_PxS[k, a] = incidence_PxS[k, b] = 1.0
    leave_SxP = np.zeros((seeds, num_pairs))  # each seed's leave-one-out mean as weights on the pairs
    for s in range(seeds):
        kept = incidence_PxS[:, s] == 0
        leave_SxP[s, kept] = 1.0 / kept.sum()
    centred = leave_SxP - leave_SxP.mean(axis=0)
    form_PxP = (seeds - 1) / seeds * centred.T @ centred
    return float(np.trace(form_PxP @ incidence_PxS @ incidence_PxS.T)), float(np.trace(form_PxP))


@functools.lru_cache(maxsize=None)
def _design_coefficients(seeds: int, degree: int) -> tuple[float, float]:
    return jackknife_coefficients(seeds, design_pairs(seeds, degree))


@dataclasses.dataclass(frozen=True)
class Components:
    """One cell's variance components of its mean excess: member effect, pair residual beyond evaluation noise, and
    evaluation noise per pair at the pilot's test set."""

    member: float  # σ_m²
    pair: float  # σ_t²
    evaluation: float  # σ_eval²

    def se(self, seeds: int, degree: int, examples_factor: float = 1.0) -> float:
        """The expected jackknife standard error of the cell's mean excess with `seeds` seeds each in `degree`
        pairs (a ring; all pairs from seeds − 1), on `examples_factor` times the pilot's test examples."""
        a_m, a_p = _design_coefficients(seeds, min(degree, seeds - 1))
        return float(np.sqrt(a_m * self.member + a_p * (self.pair + self.evaluation / examples_factor)))

    def min_detectable(self, seeds: int, degree: int, examples_factor: float = 1.0) -> float:
        t = scipy.stats.t.ppf((1 + decide.LEVEL) / 2, seeds - 1) + scipy.stats.t.ppf(decide.POWER, seeds - 1)
        return float(t * self.se(seeds, degree, examples_factor))


def components(seed_pairs: list[tuple[int, int]], excess_P, evaluation_sd_P, num_seeds: int) -> Components | None:
    """A cell's components from its pairs: (seed a, seed b), the pair's excess and its evaluation-noise SD. None when
    the pairs cannot separate member effects from residuals (no more pairs than seeds, or fewer than
    decide.MIN_SEEDS seeds)."""
    excess = np.asarray(excess_P, np.float64)
    keep = np.isfinite(excess)
    pairs = [p for p, k in zip(seed_pairs, keep) if k]
    excess = excess[keep]
    seeds = sorted({s for p in pairs for s in p})
    if len(seeds) < decide.MIN_SEEDS or len(pairs) <= len(seeds):
        return None
    index = {s: k for k, s in enumerate(seeds)}
    design = np.zeros((len(pairs), len(seeds) + 1))
    design[:, -1] = 1.0
    for row, (a, b) in enumerate(pairs):
        design[row, index[a]] += 1.0
        design[row, index[b]] += 1.0
    fitted, *_ = np.linalg.lstsq(design, excess, rcond=None)
    residual = excess - design @ fitted
    pair_var = float(residual @ residual / (len(pairs) - len(seeds)))
    se = decide.of_pairs(stats.symmetric_matrix(num_seeds, pairs, excess)).se
    a_m, a_p = jackknife_coefficients(len(seeds), [(index[a], index[b]) for a, b in pairs])
    member_var = max(0.0, (se ** 2 - a_p * pair_var) / a_m)
    evaluation = float(np.nanmean(np.square(np.asarray(evaluation_sd_P, np.float64)[keep])))
    evaluation = min(evaluation, pair_var) if np.isfinite(evaluation) else 0.0
    return Components(member_var, pair_var - evaluation, evaluation)


def run_components(members: list[dict], pair_rows: list[dict]) -> dict[tuple, Components]:
    """{cell: Components} of a finished study's within-cell pairs (barriers/pairs.csv) on its headline barrier."""
    measure = decide.headline_measure(pair_rows)
    if measure is None or f"{measure}_null" not in pair_rows[0]:
        raise ValueError("the barriers have no null means (measured before verdicts existed): rerun the barrier stage")
    num_seeds = max(m["seed"] for m in members) + 1
    by_cell: dict = {}
    for p in pair_rows:
        if p["same_cell"]:
            pairs, excess, noise = by_cell.setdefault(grid.cell(p), ([], [], []))
            pairs.append((members[p["i"]]["seed"], members[p["j"]]["seed"]))
            excess.append(p[measure] - p[f"{measure}_null"])
            noise.append((p[f"{measure}_floor"] - p[f"{measure}_null"]) / Z_NULL)
    found = {c: components(*v, num_seeds) for c, v in by_cell.items()}
    return {c: comp for c, comp in found.items() if comp is not None}


DESIGN_SEEDS = (8, 12, 16, 24, 32, 48, 64)
DESIGN_DEGREES = (2, 4, 8)  # pairs per member: ring:1, ring:2, ring:4
DESIGN_EXAMPLES = (1.0, 2.0, 4.0)


def plan(found: dict[tuple, Components], target: float, steps: int, alphas: int, quantile: float = 0.5) -> list[dict]:
    """Every candidate design (seeds × pairs per member × test examples) with the `quantile` over cells of its
    predicted minimum detectable excess and its cost per cell — member-steps, and pair-α evaluations × the test set's
    size relative to the pilot's (the barrier pass's work, each member also against its start) —: those that reach
    `target` first, fewest member-steps then fewest evaluations first, then the rest by their detectable excess."""
    rows = []
    for seeds in DESIGN_SEEDS:
        for degree in DESIGN_DEGREES:
            degree_used = min(degree, seeds - 1)
            for factor in DESIGN_EXAMPLES:
                mde = np.quantile([c.min_detectable(seeds, degree, factor) for c in found.values()], quantile)
                pairs = seeds * degree_used // 2
                design = f"ring:{degree_used // 2}" if degree_used < seeds - 1 else "within"
                rows.append({"seeds": seeds, "pairs": design, "test_examples": f"×{factor:g}",
                             "min_detectable": float(mde), "member_steps": seeds * steps,
                             "evaluations": (pairs + seeds) * (alphas - 2) * factor, "reaches": bool(mde <= target)})
    reach = sorted((r for r in rows if r["reaches"]), key=lambda r: (r["member_steps"], r["evaluations"]))
    rest = sorted((r for r in rows if not r["reaches"]), key=lambda r: r["min_detectable"])
    return reach + rest
