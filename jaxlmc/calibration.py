"""How often the "same basin?" decision is wrong: its false-positive rate and its power against known barriers,
measured on synthetic cells whose true barrier is set by hand (docs/science.md, "Calibrating the cell decision").

A synthetic cell has S seeds and their S(S−1)/2 pairs, each evaluated on the same n examples at A points of α, with
R bootstrap resamplings of the examples shared by every pair (as the barrier pass draws them). Example i has a
difficulty d_i ~ U(0, 1) shared by all models, and each member s its own perturbation ε_si ~ N(0, σ²); the model at
α between members s and t errs on example i when

    d_i + (1 − α)·ε_si + α·ε_ti < p + 4b·α(1 − α),

so the expected error is about p at both ends and p + b at the midpoint: a true endpoint-mean barrier b (b = 0: one
basin). The measured curve is the error on the n examples; the decision rules then see what they see in a real run:

* `floor`: the cell's mean of (barrier − the pair's own noise floor, its 95 % null quantile) — the earlier rule;
* `calibrated`: the cell's mean barrier minus the 95 % quantile of the *mean* over the cell's pairs of their null
  barriers (stats.cell_threshold) — the rule the verdicts use.

Each gives "separate basins" when the member-bootstrap CI of its excess lies above 0, "one basin" when it lies at or
below 0, else "not resolved" (stats.basin_verdict). `python -m jaxlmc.calibration` prints the table quoted in
docs/science.md.
"""
from __future__ import annotations

import json
import sys

import numpy as np

from jaxlmc import barriers, stats, train

RULES = ("floor", "calibrated")


def synthetic_cell(barrier: float, rng: np.random.Generator, seeds: int = 8, examples: int = 1000, alphas: int = 25,
                   resamples: int = 100, error: float = 0.3, spread: float = 0.1) -> dict:
    """One synthetic cell (see the module's docstring): {"pairs": [(s, t)], "barrier_P", "floor_P", "null_PxR"}."""
    alpha_A = barriers.alpha_grid(alphas)
    difficulty_N = rng.uniform(size=examples)
    eps_SxN = spread * rng.normal(size=(seeds, examples))
    counts_RxN = train.resample_counts(examples, resamples, seed=int(rng.integers(2**31)))
    weights_Nx1R = np.concatenate([np.ones((examples, 1)), counts_RxN.T], axis=1) / examples
    pairs = [(s, t) for s in range(seeds) for t in range(s + 1, seeds)]
    curves = []
    for s, t in pairs:
        mix_AxN = (1 - alpha_A)[:, None] * eps_SxN[s] + alpha_A[:, None] * eps_SxN[t]
        bump_A = 4 * barrier * alpha_A * (1 - alpha_A)
        wrong_AxN = (difficulty_N[None] + mix_AxN < error + bump_A[:, None]).astype(np.float64)
        curves.append(wrong_AxN @ weights_Nx1R)  # A × (1 + R): the set itself, then its resamplings
    curves_PxAx1R = np.stack(curves)
    return {"pairs": pairs, "seeds": seeds,
            "barrier_P": stats.barrier(curves_PxAx1R[..., 0], alpha_A),
            "floor_P": stats.noise_floor(curves_PxAx1R, alpha_A),
            "null_PxR": stats.null_barriers(curves_PxAx1R, alpha_A)}


def decisions(cell: dict, draws_RxS) -> dict[str, str]:
    """Each rule's verdict on one synthetic cell."""
    threshold = stats.cell_threshold(cell["null_PxR"])
    excess = {"floor": cell["barrier_P"] - cell["floor_P"], "calibrated": cell["barrier_P"] - threshold}
    out = {}
    for rule, values in excess.items():
        matrix = stats.symmetric_matrix(cell["seeds"], cell["pairs"], values)
        out[rule] = stats.basin_verdict(*stats.ci(stats.pair_replicates(matrix, draws_RxS)))
    return out


def rates(barriers_B, cells: int = 100, seed: int = 0, **cell_options) -> list[dict]:
    """Per true barrier, the share of `cells` synthetic cells each rule calls "separate basins" (at b = 0 its false-
    positive rate; above, its power) and "one basin"."""
    rng = np.random.default_rng(seed)
    seeds = cell_options.get("seeds", 8)
    draws = stats.seed_draws(seeds, 400, seed)
    rows = []
    for b in barriers_B:
        found = [decisions(synthetic_cell(b, rng, **cell_options), draws) for _ in range(cells)]
        row = {"barrier": float(b), "cells": cells}
        for rule in RULES:
            row[f"{rule}_separate"] = float(np.mean([f[rule] == "separate basins" for f in found]))
            row[f"{rule}_one"] = float(np.mean([f[rule] == "one basin" for f in found]))
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    rows = rates([0.0, 0.005, 0.01, 0.015, 0.02, 0.03], cells=int((argv or sys.argv[1:] or ["200"])[0]))
    print("true barrier | separate: floor rule, calibrated | one basin: floor rule, calibrated")
    for r in rows:
        print(f"{r['barrier']:.3f} | {r['floor_separate']:.2f}, {r['calibrated_separate']:.2f} | "
              f"{r['floor_one']:.2f}, {r['calibrated_one']:.2f}")
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
