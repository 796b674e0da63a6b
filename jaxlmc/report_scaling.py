"""A scaling study's report (jaxlmc.size_axes): scaling.csv — per size and cell, the seeds' barrier with its
interval, the weight-matched barrier, the critical-rate bracket of the cell's start, best and probed accuracy and the
cost (fine-tuning member-steps/s, the barrier pass per pair, parameters per member) — the trends fitted across
sizes (jaxlmc.scaling: scaling_fits.csv, scaling_critical.csv, scaling_cost.csv), figures/scaling.png and
scaling.html, all read from each size's own run directory."""
from __future__ import annotations

import numpy as np

from jaxlmc import figures, figures_trends, grid, rundir, scaling
from jaxlmc.report import build_summary, figure_html, table_html
from jaxlmc.size_axes import Size

_PER_CELL = ("error_barrier_test_mean", "error_barrier_test_ci_lo", "error_barrier_test_ci_hi",
             "error_barrier_test_lin_mean", "error_barrier_test_lin_aligned_mean", "loss_barrier_test_mean",
             "best_test_acc")


def _critical(run: rundir.RunDir, steps: int) -> dict[tuple, dict]:
    """{(pretrain_step, head): its rundir.CRITICAL row} at the last fine-tuning step (the bracket, the probed start's
    accuracy), when the study bracketed rates."""
    if not run.exists(rundir.CRITICAL):
        return {}
    return {(r["pretrain_step"], r["head"]): r for r in run.read_csv(rundir.CRITICAL) if r["finetune_step"] == steps}


def size_rows(size: Size, run: rundir.RunDir, params_per_member: int) -> list[dict]:
    """rundir.SCALING's rows of one size."""
    steps = run.read_json(rundir.CONFIG)["config"]["finetune"]["steps"]
    members = len(run.read_csv(rundir.MEMBERS))
    throughput = members * steps / run.read_marker("finetune")["seconds"]
    pairs = max(len(run.read_csv(rundir.PAIRS)), 1)
    per_pair = run.read_marker("barriers")["seconds"] / pairs
    critical = _critical(run, steps)
    rows = []
    for row in build_summary(run):
        start = critical.get((row["pretrain_step"], row["head"]), {})
        rows.append({"width": size.width, "depth": size.depth, "parametrization": size.parametrization,
                     **dict(zip(grid.CELL_KEYS, grid.cell(row))), **{k: row.get(k, np.nan) for k in _PER_CELL},
                     "probe_test_acc": start.get("probe_test_acc", np.nan),
                     "critical_stay_lr": start.get("stay_lr", np.nan),
                     "critical_leave_lr": start.get("leave_lr", np.nan),
                     "finetune_member_steps_per_s": throughput,
                     "barrier_seconds_per_pair": per_pair, "params_per_member": float(params_per_member)})
    return rows


def render_scaling(out: str, sizes: dict[Size, str], params_per_member: dict[Size, int]) -> str:
    """Write the scaling study's tables, figure and page from the studies in out/<directory> (`sizes`: each size's
    directory name). Returns the page's path."""
    run = rundir.RunDir(out)
    runs = {size: run.size(name) for size, name in sizes.items()}
    rows = [row for size in sizes for row in size_rows(size, runs[size], params_per_member[size])]
    fits, slopes, cost = scaling.barrier_fits(runs), scaling.critical_slopes(runs), scaling.cost_fits(rows)
    run.write_csv(rundir.SCALING, rows)
    run.write_csv(rundir.SCALING_FITS, fits)
    run.write_csv(rundir.SCALING_CRITICAL, slopes)
    run.write_csv(rundir.SCALING_COST, cost)
    fig, caption = figures_trends.scaling(rows)
    run.write_figure("scaling.png", figures.png(fig))
    series = [("axis", "along"), ("width", "width"), ("depth", "depth"), ("parametrization", "parametrization")]
    links = "".join(f"<li><a href='{name}/report.html'>{name}</a></li>" for name in sizes.values())
    trends_html = (
        "<h2>Trends</h2><p>Each series varies one axis (width or depth; 0 marks the axis it runs along). The seeds' "
        "barrier per cell: barrier ≈ prefactor · size<sup>exponent</sup>, the exponent's 95 % interval over each "
        "size's own seeds (docs/science.md, “Scaling trends”).</p>"
        + table_html(fits, [*series, ("pretrain_step", "pretrain"), ("lr", "LR"), ("head", "head"),
                            ("measure", "barrier"), ("smallest", "at the smallest"), ("largest", "at the largest"),
                            ("exponent", "exponent"), ("exponent_ci_lo", "CI lo"), ("exponent_ci_hi", "CI hi")])
        + "<p>The critical learning rate's slope against size (log–log), the slopes every size's bracket allows:</p>"
        + table_html(slopes, [*series, ("pretrain_step", "pretrain"), ("head", "head"),
                              ("finetune_step", "fine-tuning steps"), ("sizes", "sizes"),
                              ("consistent", "one line fits"), ("slope_lo", "slope from"), ("slope_hi", "to"),
                              ("slope_central", "central")])
        + "<p>The cost's growth (one measurement per size, no interval):</p>"
        + table_html(cost, [*series, ("quantity", "quantity"), ("smallest", "at the smallest"),
                            ("largest", "at the largest"), ("exponent", "exponent")]))
    page = ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>jaxlmc scaling trend</title>"
            "<style>body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
            "img{max-width:100%;border:1px solid #ddd}</style></head><body><h1>Barriers and cost against "
            f"model size</h1>{figure_html(run, 'scaling.png', caption)}{trends_html}<p>Each size's full report:"
            f"</p><ul>{links}</ul></body></html>")
    return run.write_text(rundir.SCALING_PAGE, page)
