"""How often a basin verdict is wrong: the false-positive rate and the power of jaxlmc.decide's rule, measured on
synthetic cells whose true barrier is set by hand (docs/science.md, "Calibrating the verdicts").

A synthetic cell has S seeds and the pairs of a design (all pairs, or a ring: each member with its next k), each
evaluated on the same n examples at A points of α, with R bootstrap resamplings of the examples shared by every pair
(as the barrier pass draws them). Example i has a difficulty d_i ~ U(0, 1) shared by all models; member s has its own
perturbation ε_si ~ N(0, σ²) (two members disagree on about 2σ/√π of the examples) and its own error offset
o_s ~ N(0, τ²) (members that differ in accuracy). The model at α between members s and t errs on example i when

    d_i + (1 − α)·ε_si + α·ε_ti < p + (1 − α)·o_s + α·o_t + 4·b_st·α(1 − α),

so its expected error is the linear baseline between the two members' errors plus a bump of height b_st at the
midpoint: a true linear-baseline barrier b_st. The scenarios set b_st:

* `none`: b_st = 0, members equally accurate (τ = 0) — one basin;
* `accuracy`: b_st = 0 with τ > 0 — one basin, members of different accuracy (the endpoint-mean form would see half
  their difference as a barrier);
* `uniform`: b_st = b for every pair;
* `outlier`: b_st = b for the pairs of member 0 only (one member left the basin);
* `two_basins`: the seeds split in halves, b_st = b between the halves.

Each cell is decided by jaxlmc.decide's rule alone (one cell: no multiplicity adjustment). `python -m
jaxlmc.calibration` prints the table quoted in docs/science.md.
"""
from __future__ import annotations

import json
import sys

import numpy as np

from jaxlmc import barriers, decide, stats, train

SCENARIOS = ("none", "accuracy", "uniform", "outlier", "two_basins")


def design_pairs(seeds: int, design: str = "all") -> list[tuple[int, int]]:
    """The seed pairs of a design: "all" (every pair) or "ring:k" (each seed with its next k seeds, cyclically)."""
    if design == "all":
        return [(s, t) for s in range(seeds) for t in range(s + 1, seeds)]
    k = int(design.split(":")[1])
    return sorted({tuple(sorted((s, (s + d) % seeds))) for s in range(seeds) for d in range(1, k + 1)})


def pair_bumps(scenario: str, barrier: float, pairs: list[tuple[int, int]], seeds: int) -> np.ndarray:
    """b_P: each pair's true linear-baseline barrier in a scenario."""
    if scenario in ("none", "accuracy"):
        return np.zeros(len(pairs))
    if scenario == "uniform":
        return np.full(len(pairs), barrier)
    if scenario == "outlier":
        return np.array([barrier if 0 in p else 0.0 for p in pairs])
    if scenario == "two_basins":
        half = seeds // 2
        return np.array([barrier if (s < half) != (t < half) else 0.0 for s, t in pairs])
    raise ValueError(f"unknown scenario {scenario!r}: one of {', '.join(SCENARIOS)}")


def synthetic_cell(scenario: str, barrier: float, rng: np.random.Generator, seeds: int = 8, examples: int = 1000,
                   alphas: int = 25, resamples: int = 100, error: float = 0.3, spread: float = 0.1,
                   accuracy_sd: float = 0.01, design: str = "all") -> dict:
    """One synthetic cell (see the module's docstring): {"pairs", "seeds", "barrier_P", "null_P", "true_b_P"}, the
    pairs' measured linear-baseline barriers and null means (stats.null_barriers' mean), and their true barriers."""
    alpha_A = barriers.alpha_grid(alphas)
    difficulty_N = rng.uniform(size=examples)
    eps_SxN = spread * rng.normal(size=(seeds, examples))
    offset_S = (accuracy_sd if scenario != "none" else 0.0) * rng.normal(size=seeds)
    counts_RxN = train.resample_counts(examples, resamples, seed=int(rng.integers(2**31)))
    weights_Nx1R = np.concatenate([np.ones((examples, 1)), counts_RxN.T], axis=1) / examples
    pairs = design_pairs(seeds, design)
    bumps_P = pair_bumps(scenario, barrier, pairs, seeds)
    curves = []
    for (s, t), b in zip(pairs, bumps_P):
        mix_AxN = (1 - alpha_A)[:, None] * eps_SxN[s] + alpha_A[:, None] * eps_SxN[t]
        level_A = error + (1 - alpha_A) * offset_S[s] + alpha_A * offset_S[t] + 4 * b * alpha_A * (1 - alpha_A)
        wrong_AxN = (difficulty_N[None] + mix_AxN < level_A[:, None]).astype(np.float64)
        curves.append(wrong_AxN @ weights_Nx1R)  # A × (1 + R): the set itself, then its resamplings
    curves_PxAx1R = np.stack(curves)
    return {"pairs": pairs, "seeds": seeds, "true_b_P": bumps_P,
            "barrier_P": stats.barrier(curves_PxAx1R[..., 0], alpha_A, "_lin"),
            "null_P": stats.null_barriers(curves_PxAx1R, alpha_A, "_lin").mean(axis=1)}


def estimates(cell: dict) -> tuple[decide.Estimate, decide.Estimate]:
    """(excess, barrier) of one synthetic cell, as jaxlmc.interpolation.cell_summary forms them."""
    matrix = lambda v: stats.symmetric_matrix(cell["seeds"], cell["pairs"], v)  # noqa: E731
    return (decide.of_pairs(matrix(cell["barrier_P"] - cell["null_P"])), decide.of_pairs(matrix(cell["barrier_P"])))


def verdict(cell: dict, margin: float = decide.MARGIN) -> str:
    """jaxlmc.decide's verdict on one synthetic cell."""
    return decide.verdict(*decide.p_values(*estimates(cell), margin))


def rates(scenario: str, barriers_B, cells: int = 100, seed: int = 0, margin: float = decide.MARGIN,
          **cell_options) -> list[dict]:
    """Per true barrier, the share of `cells` synthetic cells of a scenario called "separate basins" (with no true
    barrier: the false-positive rate; with one: the power) and "one basin", the median minimum detectable excess, and
    how often the excess's interval covers the cell's true mean barrier minus nothing (none/accuracy: 0)."""
    rng = np.random.default_rng(seed)
    rows = []
    for b in barriers_B:
        found, mde, covered = [], [], []
        for _ in range(cells):
            cell = synthetic_cell(scenario, b, rng, **cell_options)
            excess, barrier = estimates(cell)
            found.append(decide.verdict(*decide.p_values(excess, barrier, margin)))
            mde.append(excess.min_detectable())
            lo, hi = excess.interval()
            covered.append(lo <= cell["true_b_P"].mean() <= hi)
        rows.append({"scenario": scenario, "barrier": float(b), "true_mean": float(np.mean(
            pair_bumps(scenario, b, design_pairs(cell_options.get("seeds", 8), cell_options.get("design", "all")),
                       cell_options.get("seeds", 8)))), "cells": cells,
            "separate": float(np.mean([f == "separate basins" for f in found])),
            "one_basin": float(np.mean([f == "one basin" for f in found])),
            "min_detectable": float(np.median(mde)), "coverage": float(np.mean(covered))})
    return rows


def coverage(seeds: int, cells: int = 400, member_sd: float = 1.0, pair_sd: float = 0.5, design: str = "all",
             seed: int = 0) -> dict:
    """How often a 95 % interval over seeds covers a cell's true mean, for pair values μ + u_s + u_t + e_st (member
    effects u ~ N(0, member_sd²), pair noise e ~ N(0, pair_sd²)): the jackknife t interval (jaxlmc.decide) against
    the percentile member bootstrap (jaxlmc.stats)."""
    rng = np.random.default_rng(seed)
    draws = stats.seed_draws(seeds, 1000, seed)
    pairs = design_pairs(seeds, design)
    jack = boot = 0
    for _ in range(cells):
        u = rng.normal(0, member_sd, seeds)
        matrix = stats.symmetric_matrix(seeds, pairs, [u[s] + u[t] + rng.normal(0, pair_sd) for s, t in pairs])
        lo, hi = decide.of_pairs(matrix).interval()
        jack += lo <= 0 <= hi
        lo, hi = stats.ci(stats.pair_replicates(matrix, draws))
        boot += lo <= 0 <= hi
    return {"seeds": seeds, "design": design, "member_sd": member_sd, "pair_sd": pair_sd, "cells": cells,
            "jackknife_t": jack / cells, "percentile_bootstrap": boot / cells}


def main(argv: list[str] | None = None) -> int:
    cells = int((argv or sys.argv[1:] or ["200"])[0])
    covered = [coverage(s, 2 * cells, m, e, d) for s, d in ((8, "all"), (16, "all"), (16, "ring:2"))
               for m, e in ((1.0, 0.5), (1.0, 1.0), (0.3, 1.0))]
    print("seeds | design | member SD | pair SD | jackknife t | percentile bootstrap")
    for r in covered:
        print(f"{r['seeds']} | {r['design']} | {r['member_sd']:g} | {r['pair_sd']:g} | {r['jackknife_t']:.3f} | "
              f"{r['percentile_bootstrap']:.3f}")
    rows = [*rates("none", [0.0], cells), *rates("accuracy", [0.0], cells, accuracy_sd=0.02),
            *rates("uniform", [0.005, 0.01, 0.02, 0.025, 0.03], cells), *rates("outlier", [0.05, 0.1], cells),
            *rates("two_basins", [0.03, 0.05], cells)]
    print("scenario | b | true cell mean | separate | one basin | min detectable | coverage")
    for r in rows:
        print(f"{r['scenario']} | {r['barrier']:.3f} | {r['true_mean']:.4f} | {r['separate']:.2f} | "
              f"{r['one_basin']:.2f} | {r['min_detectable']:.4f} | {r['coverage']:.2f}")
    print(json.dumps({"coverage": covered, "verdicts": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
