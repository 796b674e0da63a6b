"""The trends of a scaling study (jaxlmc.size_axes: one whole study per size): along every series of sizes that
differ in width alone or in depth alone,

* per grid cell, the power law of the seeds' barrier — the headline form, and after weight matching when it was
  measured — with the exponent's interval over each size's own seeds (`barrier_fits`);
* per start and fine-tuning length, the slope of the critical learning rate from its brackets (`critical_slopes`);
* the cost's growth: fine-tuning member-steps/s, the barrier pass's seconds per pair and the parameters per member
  (`cost_fits`, from scaling.csv's rows: one measurement per size, no interval).

jaxlmc.trends fits; docs/science.md, "Scaling trends", explains."""
from __future__ import annotations

import numpy as np

from jaxlmc import decide, grid, rundir, stats, trends
from jaxlmc.size_axes import NUMERIC_AXES, Size, series

COST = ("finetune_member_steps_per_s", "barrier_seconds_per_pair", "params_per_member")


def _matrices(run: rundir.RunDir, column: str) -> dict[tuple, np.ndarray]:
    """{cell: seed-pair matrix} of a pair measure over one study's within-cell pairs."""
    members, pairs = run.read_csv(rundir.MEMBERS), run.read_csv(rundir.PAIRS)
    num_seeds = max(m["seed"] for m in members) + 1
    return {cell: stats.symmetric_matrix(num_seeds, seed_pairs, values)
            for cell, (seed_pairs, values) in stats.cell_seed_pairs(members, pairs, column).items()}


def _where(axis: str, line: list[Size]) -> dict:
    """A trend row's first columns: the axis it runs along, the other axes' values (0 on its own axis)."""
    first = line[0]
    return {"axis": axis, "width": 0 if axis == "width" else first.width,
            "depth": 0 if axis == "depth" else first.depth, "parametrization": first.parametrization,
            "sizes": len(line)}


def barrier_fits(runs: dict[Size, rundir.RunDir]) -> list[dict]:
    """rundir.SCALING_FITS: per series, per cell measured at every size in it, and per barrier (the headline, and its
    `_aligned` form when present), the power law against the size with the exponent's interval over seeds."""
    rows = []
    for axis in NUMERIC_AXES:
        for line in series(list(runs), axis).values():
            first = runs[line[0]].read_csv(rundir.PAIRS)
            headline = decide.headline_measure(first)
            if not headline:
                continue
            straight = headline.removesuffix("_aligned")  # the headline is the aligned form when it was measured
            columns = [straight] + ([f"{straight}_aligned"] if f"{straight}_aligned" in first[0] else [])
            values = [size.value(axis) for size in line]
            for column in columns:
                by_size = [_matrices(runs[size], column) for size in line]
                for cell in [c for c in by_size[0] if all(c in found for found in by_size)]:
                    matrices = [found[cell] for found in by_size]
                    fit = trends.power_law(values, [stats.pair_mean(m) for m in matrices],
                                           trends.seed_matrix_replicates(matrices))
                    rows.append({**_where(axis, line), **dict(zip(grid.CELL_KEYS, cell)), "measure": column,
                                 "replicates": fit.replicates, "exponent": fit.exponent, "exponent_ci_lo": fit.ci_lo,
                                 "exponent_ci_hi": fit.ci_hi, "prefactor": fit.prefactor,
                                 "smallest": stats.pair_mean(matrices[0]), "largest": stats.pair_mean(matrices[-1])})
    return rows


def critical_slopes(runs: dict[Size, rundir.RunDir]) -> list[dict]:
    """rundir.SCALING_CRITICAL: per series, and per start and fine-tuning length bracketed at two or more of its
    sizes, the slopes of the critical learning rate against the size that every bracket allows
    (trends.censored_slope)."""
    keys = [c for c, _ in rundir.CRITICAL.columns]
    rows = []
    for axis in NUMERIC_AXES:
        for line in series(list(runs), axis).values():
            brackets: dict = {}
            for size in line:
                if runs[size].exists(rundir.CRITICAL):
                    for row in runs[size].read_csv(rundir.CRITICAL):
                        brackets.setdefault(tuple(row[k] for k in keys), []).append(
                            (size.value(axis), row["stay_lr"], row["leave_lr"]))
            for key, found in brackets.items():
                values, stay, leave = (np.asarray(v, np.float64) for v in zip(*found))
                if len(set(values.tolist())) < 2 or not np.any(np.isfinite(stay) | np.isfinite(leave)):
                    continue
                try:
                    fit = trends.censored_slope(values, stay, leave)
                except ValueError:  # fewer than two sizes with a bracket end: nothing to fit
                    continue
                rows.append({**_where(axis, line), **dict(zip(keys, key)), "consistent": fit.consistent,
                             "slope_lo": fit.lo, "slope_hi": fit.hi, "slope_central": fit.central})
    return rows


def cost_fits(rows: list[dict]) -> list[dict]:
    """rundir.SCALING_COST: per series, the power law of each cost (COST) against the size, from scaling.csv's rows
    (one value per size: the exponent has no interval)."""
    per_size = {Size(r["width"], r["depth"], r["parametrization"]): r for r in rows}
    out = []
    for axis in NUMERIC_AXES:
        for line in series(list(per_size), axis).values():
            values = [size.value(axis) for size in line]
            for quantity in COST:
                measured = [per_size[size][quantity] for size in line]
                fit = trends.power_law(values, measured, np.zeros((len(line), 0)))
                out.append({**_where(axis, line), "quantity": quantity, "exponent": fit.exponent,
                            "prefactor": fit.prefactor, "smallest": measured[0], "largest": measured[-1]})
    return out
