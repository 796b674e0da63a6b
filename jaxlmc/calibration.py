"""How often a basin verdict is wrong: the false-positive rate and the power of jaxlmc.decide's rule, measured on
synthetic cells whose true barrier is set by hand (docs/science.md, "Calibrating the verdicts").

A synthetic cell has S seeds and the pairs of a design (all pairs, or a ring: each member with its next k), each
evaluated on the same n examples at A points of α, with R bootstrap resamplings of the examples shared by every pair
(as the barrier pass draws them). Example i has a difficulty d_i ~ U(0, 1) shared by all models; member s has its own
perturbation ε_si ~ N(0, σ²) (two members disagree on about 2σ/√π of the examples) and its own error offset
o_s ~ N(0, τ²) (members that differ in accuracy). The model at α between members s and t errs on example i when

    d_i + (1 − α)·ε_si + α·ε_ti < p + (1 − α)·o_s + α·o_t + 4·b_st·α(1 − α),

so its error rises above the linear baseline between the two members' errors by a bump at the midpoint. Its expected
error is exact — E[clip(level − Z, 0, 1)], Z ~ N(0, σ²((1 − α)² + α²)) — and so is each pair's true linear-baseline
barrier (`true_barrier`); the midpoint's smaller noise means a bump of height h raises the error by slightly less
than h where errors reach 0 or 1, so h is chosen (`bump_height`) to make the true barrier of a pair of equally
accurate members b_st (for b_st = 0 the largest h with no barrier: the null at its boundary). The scenarios set b_st:

* `none`: b_st = 0, members equally accurate (τ = 0) — one basin;
* `accuracy`: b_st = 0 with τ > 0 — one basin, members of different accuracy (the endpoint-mean form would see half
  their difference as a barrier);
* `uniform`: b_st = b for every pair;
* `outlier`: b_st = b for the pairs of member 0 only (one member left the basin);
* `two_basins`: the seeds split in halves, b_st = b between the halves.

Each cell is decided by jaxlmc.decide's rule alone (one cell: no multiplicity adjustment). `python -m
jaxlmc.calibration` prints the table quoted in docs/science.md.

A study calibrates its own verdicts (`calibrate_run`, the study's `calibrate` stage → barriers/calibration.json):
the generator's parameters are read off the study's cells — seeds, pair design, test examples, α points and
resamplings as measured; the error level, the members' disagreement (σ = disagreement·√π/2) and their accuracy
spread (τ) per cell — for three of its cells (the median and the largest minimum detectable excess, and the largest
accuracy spread), and every scenario is simulated there.
"""
from __future__ import annotations

import functools
import json
import sys

import numpy as np
import scipy.stats

from jaxlmc import decide, grid, paths, rundir, stats, tasks, train
from jaxlmc.config import Config

SCENARIOS = ("none", "accuracy", "uniform", "outlier", "two_basins")


def design_pairs(seeds: int, design: str = "all") -> list[tuple[int, int]]:
    """The seed pairs of a design: "all" (every pair) or "ring:k" (each seed with its next k seeds, cyclically)."""
    if design == "all":
        return [(s, t) for s in range(seeds) for t in range(s + 1, seeds)]
    k = int(design.split(":")[1])
    return sorted({tuple(sorted((s, (s + d) % seeds))) for s in range(seeds) for d in range(1, k + 1)})


def barrier_pairs(scenario: str, pairs: list[tuple[int, int]], seeds: int) -> np.ndarray:
    """bool_P: the pairs a scenario puts a barrier between."""
    if scenario in ("none", "accuracy"):
        return np.zeros(len(pairs), bool)
    if scenario == "uniform":
        return np.ones(len(pairs), bool)
    if scenario == "outlier":
        return np.array([0 in p for p in pairs])
    if scenario == "two_basins":
        half = seeds // 2
        return np.array([(s < half) != (t < half) for s, t in pairs])
    raise ValueError(f"unknown scenario {scenario!r}: one of {', '.join(SCENARIOS)}")


def expected_error(level_A, sd_A) -> np.ndarray:
    """E[clip(level − Z, 0, 1)] for Z ~ N(0, sd²): the generator's expected error at each α."""
    def ramp(x):  # E[max(0, x − Z)]
        z = x / sd_A
        return x * scipy.stats.norm.cdf(z) + sd_A * scipy.stats.norm.pdf(z)
    return ramp(np.asarray(level_A, np.float64)) - ramp(np.asarray(level_A, np.float64) - 1.0)


def true_barrier(level_A, alpha_A, spread: float) -> float:
    """The true linear-baseline barrier of the generator's pair with error levels `level_A` along α."""
    sd_A = max(spread, 1e-9) * np.sqrt((1 - alpha_A) ** 2 + alpha_A ** 2)
    error_A = expected_error(level_A, sd_A)
    return float(np.max(error_A - ((1 - alpha_A) * error_A[0] + alpha_A * error_A[-1])))


@functools.lru_cache(maxsize=4096)
def bump_height(barrier: float, error: float, spread: float, alphas: int) -> float:
    """The largest bump h (negative: a dip) whose pair of equally accurate members at `error` has a true barrier of
    at most `barrier` — so exactly `barrier` wherever one is possible (errors stay within [0, 1]; with wide noise an
    error near 1 bulges above the line by itself, and 0 needs a dip). Bisection: the barrier grows with h."""
    alpha_A = paths.alpha_grid(alphas)
    shape_A = 4 * alpha_A * (1 - alpha_A)
    true = lambda h: true_barrier(error + h * shape_A, alpha_A, spread)  # noqa: E731
    low, high = -error, max(1.0 - error, 0.0)
    if true(high) <= barrier:
        return high
    if true(low) > barrier:
        return low
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if true(middle) <= barrier else (low, middle)
    return low


def synthetic_cell(scenario: str, barrier: float, rng: np.random.Generator, seeds: int = 8, examples: int = 1000,
                   alphas: int = 25, resamples: int = 100, error: float = 0.3, spread: float = 0.1,
                   accuracy_sd: float = 0.01, design: str = "all") -> dict:
    """One synthetic cell (see the module's docstring): {"pairs", "seeds", "barrier_P", "null_P", "true_b_P"}, the
    pairs' measured linear-baseline barriers and null means (stats.null_barriers' mean), and their true barriers
    (exact expectations, `true_barrier`)."""
    alpha_A = paths.alpha_grid(alphas)
    difficulty_N = rng.uniform(size=examples)
    eps_SxN = spread * rng.normal(size=(seeds, examples))
    offset_S = (accuracy_sd if scenario != "none" else 0.0) * rng.normal(size=seeds)
    counts_RxN = train.resample_counts(examples, resamples, seed=int(rng.integers(2**31)))
    weights_Nx1R = np.concatenate([np.ones((examples, 1)), counts_RxN.T], axis=1) / examples
    pairs = design_pairs(seeds, design)
    heights = [bump_height(float(b), float(error), float(spread), alphas) for b in (0.0, barrier)]
    bumps_P = np.where(barrier_pairs(scenario, pairs, seeds), heights[1], heights[0])
    curves, true_P = [], []
    for (s, t), b in zip(pairs, bumps_P):
        mix_AxN = (1 - alpha_A)[:, None] * eps_SxN[s] + alpha_A[:, None] * eps_SxN[t]
        level_A = error + (1 - alpha_A) * offset_S[s] + alpha_A * offset_S[t] + 4 * b * alpha_A * (1 - alpha_A)
        wrong_AxN = (difficulty_N[None] + mix_AxN < level_A[:, None]).astype(np.float64)
        curves.append(wrong_AxN @ weights_Nx1R)  # A × (1 + R): the set itself, then its resamplings
        true_P.append(true_barrier(level_A, alpha_A, spread))
    curves_PxAx1R = np.stack(curves)
    return {"pairs": pairs, "seeds": seeds, "true_b_P": np.array(true_P),
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
    barrier: the false-positive rate; with one: the power) and "one basin", the mean over cells of their true mean
    barrier, the median minimum detectable excess, and how often the excess's interval covers the cell's true mean
    barrier."""
    rng = np.random.default_rng(seed)
    rows = []
    for b in barriers_B:
        found, mde, covered, true = [], [], [], []
        for _ in range(cells):
            cell = synthetic_cell(scenario, b, rng, **cell_options)
            excess, barrier = estimates(cell)
            found.append(decide.verdict(*decide.p_values(excess, barrier, margin)))
            mde.append(excess.min_detectable())
            lo, hi = excess.interval()
            true.append(cell["true_b_P"].mean())
            covered.append(lo <= true[-1] <= hi)
        rows.append({"scenario": scenario, "barrier": float(b), "true_mean": float(np.mean(true)), "cells": cells,
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


FALSE_POSITIVE_TARGET = 0.05  # "separate" with no barrier, in every no-barrier scenario
DETECTED = 0.8  # a barrier scenario called separate less often than this is a blind spot


def study_scenarios(margin: float) -> list[tuple[str, float]]:
    """(scenario, b) simulated for a study: no barrier with equal and with unequal members, a uniform barrier at half
    the margin (one basin should be called) and at the margin (never one basin), one outlier member, two basins."""
    return [("none", 0.0), ("accuracy", 0.0), ("uniform", margin / 2), ("uniform", margin), ("outlier", 0.1),
            ("two_basins", 1.5 * margin)]


def cell_parameters(members: list[dict], similarity_row: dict, examples: int, alphas: int, resamples: int,
                    design: str) -> dict:
    """The generator's parameters for one of a study's cells (its used members and its similarity.csv row)."""
    accuracy = np.array([m["test_acc"] for m in members if grid.usable(m)], np.float64)
    return {"seeds": int(accuracy.size), "examples": int(examples), "alphas": int(alphas),
            "resamples": int(resamples), "design": design, "error": float(1 - accuracy.mean()),
            "spread": float(similarity_row["disagreement_test"] * np.sqrt(np.pi) / 2),
            "accuracy_sd": float(accuracy.std(ddof=1))}


def representative_cells(summary: list[dict], members: list[dict], measure: str) -> dict[tuple, str]:
    """{cell: why} of up to three cells with at least decide.MIN_SEEDS used members: the median and the largest
    minimum detectable excess of `measure`, and the largest spread of test accuracy over seeds."""
    groups = grid.cell_groups(members)
    used = {c: [members[i] for i in ids if grid.usable(members[i])] for c, ids in groups.items()}
    mde = {grid.cell(r): r.get(f"{measure}_excess_min_detectable", np.nan) for r in summary}
    judged = sorted((c for c in mde if np.isfinite(mde[c]) and len(used.get(c, ())) >= decide.MIN_SEEDS),
                    key=lambda c: mde[c])
    if not judged:
        return {}
    spread = {c: float(np.std([m["test_acc"] for m in used[c]], ddof=1)) for c in judged}
    chosen = {judged[len(judged) // 2]: "median minimum detectable excess"}
    chosen.setdefault(judged[-1], "largest minimum detectable excess")
    chosen.setdefault(max(judged, key=spread.get), "largest accuracy spread over seeds")
    return chosen


def calibrate(cells: dict[tuple, tuple[str, dict]], margin: float, num_cells: int, seed: int = 0) -> dict:
    """Every study scenario at each of `cells` ({cell: (why, cell_parameters)}), `num_cells` synthetic cells each:
    the rows of `rates` per cell, the worst false-positive rate with no barrier against FALSE_POSITIVE_TARGET, the
    worst "one basin" rate at a barrier of the margin, and the barrier scenarios detected less than DETECTED of the
    time (the blind spots)."""
    out = []
    for k, (cell, (why, params)) in enumerate(cells.items()):
        options = {key: params[key] for key in ("seeds", "examples", "alphas", "resamples", "design", "error",
                                                "spread")}
        rows = []
        for scenario, b in study_scenarios(margin):
            sd = params["accuracy_sd"] if scenario != "none" else 0.0
            rows += rates(scenario, [b], num_cells, seed=seed + k, margin=margin, accuracy_sd=sd, **options)
        out.append({"cell": dict(zip(grid.CELL_KEYS, cell)), "why": why, "parameters": params, "scenarios": rows})
    rows = [r for c in out for r in c["scenarios"]]
    no_barrier = [r["separate"] for r in rows if r["barrier"] == 0]
    at_margin = [r["one_basin"] for r in rows if r["scenario"] == "uniform" and r["barrier"] == margin]
    blind = [{"cell": c["cell"], "scenario": r["scenario"], "barrier": r["barrier"], "separate": r["separate"],
              "one_basin": r["one_basin"]} for c in out for r in c["scenarios"]
             if r["scenario"] in ("outlier", "two_basins") and r["separate"] < DETECTED]
    worst = max(no_barrier) if no_barrier else float("nan")
    return {"margin": margin, "synthetic_cells": num_cells, "cells": out,
            "false_positive_max": worst, "false_positive_target": FALSE_POSITIVE_TARGET,
            "false_positive_met": bool(worst <= FALSE_POSITIVE_TARGET),
            "one_basin_at_margin_max": max(at_margin) if at_margin else float("nan"), "blind_spots": blind}


def calibrate_run(cfg: Config, out: str) -> dict:
    """The study's own calibration (see the module's docstring), written to barriers/calibration.json. With
    study.calibration_cells = 0 the file records that it was skipped."""
    run = rundir.RunDir(out)
    members = run.read_csv(rundir.MEMBERS)
    summary = run.read_csv(rundir.BARRIER_SUMMARY)
    pairs = run.read_csv(rundir.PAIRS)
    measure = decide.headline_measure(pairs)
    chosen = representative_cells(summary, members, measure) if measure and cfg.study.calibration_cells else {}
    similarity = {grid.cell(r): r for r in run.read_csv(rundir.SIMILARITY)}
    chosen = {c: why for c, why in chosen.items() if np.isfinite(similarity.get(c, {}).get("disagreement_test",
                                                                                             np.nan))}
    if not chosen:
        result = {"margin": cfg.study.margin, "synthetic_cells": 0, "cells": [], "skipped": True}
        run.write_json(rundir.CALIBRATION, result)
        return result
    examples = len(tasks.load_finetune_task(cfg).test.y)
    design = cfg.barriers.pairs if cfg.barriers.pairs.startswith("ring:") else "all"
    groups = grid.cell_groups(members)
    cells = {c: (why, cell_parameters([members[i] for i in groups[c]], similarity[c], examples, cfg.barriers.alphas,
                                      cfg.barriers.noise_resamples, design)) for c, why in chosen.items()}
    result = calibrate(cells, cfg.study.margin, cfg.study.calibration_cells)
    run.write_json(rundir.CALIBRATION, result)
    return result


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
