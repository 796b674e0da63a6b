"""The trends of a width series (`study.widths`: one whole study per width, in width<W>/): per grid cell, the power
law of the seeds' barrier against width — the headline form, and after weight matching when it was measured — with
the exponent's interval over each width's own seeds; per start and fine-tuning length, the slope of the critical
learning rate against width from its brackets (jaxlmc.trends; docs/science.md, "Scaling trends")."""
from __future__ import annotations

import numpy as np

from jaxlmc import decide, grid, rundir, stats, trends


def _matrices(run: rundir.RunDir, column: str) -> dict[tuple, np.ndarray]:
    """{cell: seed-pair matrix} of a pair measure over one study's within-cell pairs."""
    members, pairs = run.read_csv(rundir.MEMBERS), run.read_csv(rundir.PAIRS)
    num_seeds = max(m["seed"] for m in members) + 1
    return {cell: stats.symmetric_matrix(num_seeds, seed_pairs, values)
            for cell, (seed_pairs, values) in stats.cell_seed_pairs(members, pairs, column).items()}


def barrier_fits(runs: dict[int, rundir.RunDir]) -> list[dict]:
    """rundir.SCALING_FITS: per cell measured at every width, and per barrier (the headline, and its `_aligned`
    form when present), the power law against width with the exponent's interval over seeds."""
    widths = sorted(runs)
    first = runs[widths[0]].read_csv(rundir.PAIRS)
    headline = decide.headline_measure(first)
    if not headline:
        return []
    columns = [headline] + ([f"{headline}_aligned"] if first and f"{headline}_aligned" in first[0] else [])
    rows = []
    for column in columns:
        by_width = {w: _matrices(runs[w], column) for w in widths}
        for cell in [c for c in by_width[widths[0]] if all(c in by_width[w] for w in widths)]:
            matrices = [by_width[w][cell] for w in widths]
            fit = trends.power_law(widths, [stats.pair_mean(m) for m in matrices],
                                   trends.seed_matrix_replicates(matrices))
            rows.append({**dict(zip(grid.CELL_KEYS, cell)), "measure": column, "widths": len(widths),
                         "replicates": fit.replicates, "exponent": fit.exponent, "exponent_ci_lo": fit.ci_lo,
                         "exponent_ci_hi": fit.ci_hi, "prefactor": fit.prefactor,
                         "smallest": stats.pair_mean(matrices[0]), "largest": stats.pair_mean(matrices[-1])})
    return rows


def critical_slopes(runs: dict[int, rundir.RunDir]) -> list[dict]:
    """rundir.SCALING_CRITICAL: per start and fine-tuning length bracketed at two or more widths, the slopes of the
    critical learning rate against width that every width's bracket allows (trends.censored_slope)."""
    keys = [c for c, _ in rundir.CRITICAL.columns]
    brackets: dict = {}
    for width in sorted(runs):
        if runs[width].exists(rundir.CRITICAL):
            for row in runs[width].read_csv(rundir.CRITICAL):
                brackets.setdefault(tuple(row[k] for k in keys), []).append((width, row["stay_lr"], row["leave_lr"]))
    rows = []
    for key, found in brackets.items():
        widths, stay, leave = (np.asarray(v, np.float64) for v in zip(*found))
        if len(set(widths.tolist())) < 2 or not np.any(np.isfinite(stay) | np.isfinite(leave)):
            continue
        try:
            fit = trends.censored_slope(widths, stay, leave)
        except ValueError:  # fewer than two widths with a bracket end: nothing to fit
            continue
        rows.append({**dict(zip(keys, key)), "widths": len(widths), "consistent": fit.consistent,
                     "slope_lo": fit.lo, "slope_hi": fit.hi, "slope_central": fit.central})
    return rows
