"""The report's figures: each a function from the study's results (already read from the run directory) to a
matplotlib figure and its one-line caption. Nothing here reads or writes files; jaxlmc.report saves them.

The figures show the study's two main axes, the pretraining checkpoint × the fine-tuning LR; the cells of any other
grid axis (weight decay, schedule, dropout, …) are averaged, and the captions say so.
"""
from __future__ import annotations

import dataclasses
import io

import matplotlib

matplotlib.use("Agg")  # files only, never a window; before pyplot is imported
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from jaxlmc import grid  # noqa: E402

MAIN_AXES = ("pretrain_step", "lr")


def step_label(step: int) -> str:
    return "scratch" if step < 0 else str(step)


@dataclasses.dataclass
class Cells:
    """The summary rows (one per grid cell) laid out over the pretraining checkpoints × LRs."""

    summary: list[dict]

    def __post_init__(self):
        self.steps = sorted({r["pretrain_step"] for r in self.summary})
        self.lrs = sorted({r["lr"] for r in self.summary})
        self.lr_colors = plt.get_cmap("viridis")(np.linspace(0.1, 0.85, max(len(self.lrs), 1)))
        self.step_colors = plt.get_cmap("plasma")(np.linspace(0.05, 0.85, max(len(self.steps), 1)))
        averaged = grid.varied_names(self.summary, besides=MAIN_AXES)
        self.avg_note = f" (averaged over {' and '.join(averaged)})" if averaged else ""
        self.has_ood = any(np.isfinite(r.get("error_barrier_ood_mean", np.nan)) for r in self.summary)

    def mean(self, step, lr, key) -> float:
        """The mean of `key` over the cells at (step, lr) where it is finite (NaN if none is)."""
        values = [r[key] for r in self.summary if r["pretrain_step"] == step and r["lr"] == lr
                  and np.isfinite(r.get(key, np.nan))]
        return float(np.mean(values)) if values else np.nan

    def step_axis(self, ax):
        ax.set_xticks(range(len(self.steps)), [step_label(s) for s in self.steps])
        ax.set_xlabel("pretraining steps of the starting checkpoint")

    def lines_per_lr(self, ax, series):
        """One line per (LR, series) over the pretraining steps: series = [(summary key, style, label)]."""
        for lr, color in zip(self.lrs, self.lr_colors):
            for key, style, label in series:
                ax.plot(range(len(self.steps)), [self.mean(s, lr, key) for s in self.steps], style, color=color,
                        label=f"{label}, LR {lr:g}")


def phase_diagram(c: Cells):
    grid_LxS = np.array([[c.mean(s, lr, "error_barrier_test_mean") for s in c.steps] for lr in c.lrs])
    fig, ax = plt.subplots(figsize=(1.3 * len(c.steps) + 2.5, 0.8 * len(c.lrs) + 2))
    image = ax.imshow(grid_LxS, cmap="magma_r", aspect="auto", vmin=0)
    for a in range(len(c.lrs)):
        for b in range(len(c.steps)):
            if np.isfinite(grid_LxS[a, b]):
                ax.text(b, a, f"{grid_LxS[a, b]:.3f}", ha="center", va="center",
                        color="white" if grid_LxS[a, b] > 0.6 * np.nanmax(grid_LxS) else "black", fontsize=9)
    ax.set_yticks(range(len(c.lrs)), [f"{lr:g}" for lr in c.lrs])
    ax.set_ylabel("fine-tuning learning rate")
    c.step_axis(ax)
    fig.colorbar(image, ax=ax, label="mean test error barrier")
    ax.set_title("Phase diagram: barrier between fine-tuning seeds")
    return fig, ("Mean test error barrier (endpoint-mean form) between seeds of each cell, over pretraining steps × "
                 f"fine-tuning LR{c.avg_note}: dark = seeds in different basins, light = one basin.")


def barrier_vs_pretraining(c: Cells):
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, metric, label in ((axes[0], "error", "test error barrier"), (axes[1], "loss", "test loss barrier")):
        for lr, color in zip(c.lrs, c.lr_colors):
            mean, lo, hi = ([c.mean(s, lr, f"{metric}_barrier_test_{stat}") for s in c.steps]
                            for stat in ("mean", "ci_lo", "ci_hi"))
            ax.plot(range(len(c.steps)), mean, "o-", color=color, label=f"LR {lr:g}")
            ax.fill_between(range(len(c.steps)), lo, hi, color=color, alpha=0.25)
        ax.axhline(0, color="gray", lw=0.8)
        c.step_axis(ax)
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
        if metric == "error":
            c.lines_per_lr(ax, [("error_barrier_test_floor_mean", ":", "noise floor")])
    return fig, ("Barrier between seeds vs pretraining, one line per fine-tuning LR; bands are 95% bootstrap "
                 "confidence intervals over seeds (the independent units); dotted: the noise floor, the barrier "
                 f"evaluation noise alone would show{c.avg_note}.")


def sources(summary: list[dict]):
    """The seeds' barrier per head policy (which sources of randomness vary with the seed), one panel per LR; None
    when the grid has one head policy."""
    heads = list(dict.fromkeys(r["head"] for r in summary))
    if len(heads) < 2:
        return None
    # The measure the verdicts use (after weight matching when measured); cells with fewer than 3 used members have
    # no interval and are left out.
    aligned = any(np.isfinite(r.get("error_barrier_test_aligned_mean", np.nan)) for r in summary)
    measure = "error_barrier_test_aligned" if aligned else "error_barrier_test"
    cells = {h: Cells([r for r in summary if r["head"] == h and (r.get("members_used") or 0) >= 3]) for h in heads}
    lrs = sorted({r["lr"] for r in summary})
    steps = sorted({r["pretrain_step"] for r in summary})
    fig, axes = plt.subplots(1, len(lrs), figsize=(4.2 * len(lrs), 3.6), squeeze=False, sharey=True)
    colors = plt.get_cmap("tab10")(np.arange(len(heads)))
    for ax, lr in zip(axes[0], lrs):
        for head, color in zip(heads, colors):
            mean, lo, hi = ([cells[head].mean(s, lr, f"{measure}_{stat}") for s in steps]
                            for stat in ("mean", "ci_lo", "ci_hi"))
            ax.plot(range(len(steps)), mean, "o-", color=color, label=f"{head} head")
            ax.fill_between(range(len(steps)), lo, hi, color=color, alpha=0.2)
            ax.plot(range(len(steps)), [cells[head].mean(s, lr, f"{measure}_floor_mean") for s in steps], ":",
                    color=color)
        if not any(np.isfinite(cells[h].mean(s, lr, f"{measure}_mean")) for h in heads for s in steps):
            ax.text(0.5, 0.5, "no cell with ≥ 3 used members\n(the others unfit or diverged)", ha="center",
                    va="center", transform=ax.transAxes, color="gray")
        ax.axhline(0, color="gray", lw=0.8)
        ax.set_xticks(range(len(steps)), [step_label(s) for s in steps])
        ax.set_xlabel("pretraining steps")
        ax.set_title(f"LR {lr:g}")
    axes[0][0].set_ylabel("test error barrier between seeds" + (" (aligned)" if aligned else ""))
    axes[0][0].legend(fontsize=8)
    return fig, ("Sources of randomness: the seeds' barrier" + (" after weight matching" if aligned else "") +
                 " when each seed draws its own head (per_seed: head "
                 "initialisation and data order vary) and when every seed starts from the same head (shared, zero, "
                 "probe: only the data order varies); bands: 95% CIs over seeds; dotted: noise floors. The gap between "
                 "per_seed and shared is the head initialisation's part of the path dependence.")


def aligned_barrier(c: Cells):
    """Naive vs aligned (weight or activation matching) barrier, and after REPAIR when measured; None when the barrier
    stage neither aligned nor repaired the pairs."""
    has = {k: any(np.isfinite(r.get(f"error_barrier_test_{k}_mean", np.nan)) for r in c.summary)
           for k in ("aligned", "repair", "curve")}
    if not any(has.values()):
        return None
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    c.lines_per_lr(ax, [("error_barrier_test_mean", "o-", "naive")]
                   + ([("error_barrier_test_aligned_mean", "s--", "aligned")] if has["aligned"] else [])
                   + ([("error_barrier_test_repair_mean", "^:", "REPAIR")] if has["repair"] else [])
                   + ([("error_barrier_test_curve_mean", "d-.", "Bezier curve")] if has["curve"] else []))
    ax.axhline(0, color="gray", lw=0.8)
    c.step_axis(ax)
    ax.set_ylabel("mean test error barrier")
    ax.legend(fontsize=7, ncol=2)
    return fig, ("Barrier between seeds before (solid) and after (dashed) alignment (Git Re-Basin's weight or "
                 "activation matching, barriers.align): where alignment removes the barrier, the seeds share a basin "
                 "up to a relabelling of hidden units, as from-scratch controls can."
                 + (" Dotted: after REPAIR renormalises the interpolated networks (on the aligned pairs when aligned): "
                    "what remains once variance collapse is removed." if has["repair"] else "")
                 + (" Dash-dotted: along each pair's trained quadratic Bezier curve (Garipov et al. 2018): a barrier "
                    "the straight line shows and a curve avoids is a bent valley, not a separate basin."
                    if has["curve"] else ""))


def interpolation_curves(c: Cells, pairs: list[dict], curves: dict):
    """The median-barrier pair of each cell: `pairs` are barriers/pairs.csv's rows, `curves` its curves.npz."""
    fig, axes = plt.subplots(1, len(c.lrs), figsize=(4.2 * len(c.lrs), 3.6), squeeze=False)
    shown = {grid.cell(r) for r in c.summary}
    for ax, lr in zip(axes[0], c.lrs):
        for s, color in zip(c.steps, c.step_colors):
            cell_pairs = [(k, p) for k, p in enumerate(pairs) if p["same_cell"] and p["pretrain_step"] == s
                          and p["lr"] == lr and grid.cell(p) in shown]
            if not cell_pairs:
                continue
            order = sorted(cell_pairs, key=lambda kp: kp[1]["error_barrier_test"])
            k, p = order[len(order) // 2]
            ax.plot(curves["alphas"], curves["error_test"][k], color=color,
                    label=f"{step_label(s)} (#{p['i']}–#{p['j']})")
        ax.set_title(f"LR {lr:g}")
        ax.set_xlabel("α")
        ax.set_ylabel("test error")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, title="pretraining", title_fontsize=7)
    return fig, ("Test error along the line between two seeds, for the pair with the median barrier of each cell "
                 "(members' numbers in the legend); a bump in the middle is a barrier.")


def _most_structured_cell(sim_rows: list[dict], sim: dict) -> int | None:
    """The fine-tuning cell (scratch only if no other) with shared basins and several of them, then the highest
    barriers."""
    candidates = [g for g, r in enumerate(sim_rows) if f"cell{g}_barrier" in sim]
    pretrained = [g for g in candidates if sim_rows[g]["pretrain_step"] >= 0]
    candidates = pretrained or candidates  # the question is about fine-tunes; scratch is the control

    def structure(g):
        r = sim_rows[g]
        return (r["basins"] > 1 and r["largest_basin_fraction"] > 1 / r["members_used"], r["basins"],
                np.nanmean(sim[f"cell{g}_barrier"]))

    return max(candidates, key=structure) if candidates else None


def basins(c: Cells, members: list[dict], sim_rows: list[dict], sim: dict):
    """The barrier matrix of the cell with the most basin structure, ordered by basin, beside each member's OOD (or
    test) accuracy; None when no cell has one."""
    g = _most_structured_cell(sim_rows, sim)
    if g is None:
        return None
    row = sim_rows[g]
    ids, labels, barrier = sim[f"cell{g}_members"], sim[f"cell{g}_basin"], sim[f"cell{g}_barrier"]
    order = np.lexsort((ids, labels))
    acc_key = "ood_acc" if c.has_ood else "test_acc"
    acc = np.array([members[int(i)][acc_key] for i in ids])[order]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(9, 4.2), gridspec_kw={"width_ratios": [3, 1.3]})
    image = ax.imshow(barrier[np.ix_(order, order)], cmap="magma_r", vmin=0)
    names = [f"#{int(ids[o])} b{int(labels[o])}" for o in order]
    ax.set_xticks(range(len(order)), names, rotation=90, fontsize=7)
    ax.set_yticks(range(len(order)), names, fontsize=7)
    fig.colorbar(image, ax=ax, label="test error barrier")
    ax.set_title(f"pretrain {step_label(row['pretrain_step'])}, LR {row['lr']:g}: {int(row['basins'])} basins "
                 f"({row['basin_sizes']})", fontsize=9)
    bx.barh(range(len(order)), acc, color=plt.get_cmap("tab10")(labels[order] % 10))
    bx.set_yticks(range(len(order)), names, fontsize=7)
    bx.invert_yaxis()
    bx.set_xlabel("OOD accuracy" if c.has_ood else "test accuracy")
    lo, hi = float(np.nanmin(acc)), float(np.nanmax(acc))
    bx.set_xlim(max(0.0, lo - 0.05), min(1.0, hi + 0.05) if hi > lo else hi + 0.05)
    return fig, ("Barrier matrix of a fine-tuning cell with several basins (shared ones preferred), members ordered "
                 "by basin (b0 = the largest), beside each member's " + ("OOD" if c.has_ood else "test")
                 + " accuracy coloured by basin.")


def soup_gain(c: Cells):
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    c.lines_per_lr(ax, [(f"{kind}_gain", style, kind) for kind, style in (("uniform", "o-"), ("greedy", "s--"),
                                                                           ("ensemble", "^:"))])
    ax.axhline(0, color="gray", lw=0.8)
    c.step_axis(ax)
    ax.set_ylabel("test accuracy − best member's")
    ax.legend(fontsize=7, ncol=2)
    return fig, ("Test accuracy of the uniform soup, greedy soup (chosen on validation data) and logit ensemble minus "
                 "that of the best member (chosen on validation data): soups work where seeds share a basin.")


def ood_spread(c: Cells):
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    c.lines_per_lr(ax, [("ood_acc_std", "o-", "OOD")] * c.has_ood + [("test_acc_std", "s:", "test")])
    c.step_axis(ax)
    ax.set_ylabel("std of accuracy across seeds")
    ax.legend(fontsize=7)
    return fig, ("Spread (std across seeds) of OOD accuracy (solid) and test accuracy (dotted) in each cell: "
                 "path-dependent fine-tunes generalise differently out of distribution.")


def scaling(rows: list[dict]):
    """Barrier between seeds and fine-tuning throughput against model width (rows of rundir.SCALING)."""
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 3.8))
    cells = sorted({(r["pretrain_step"], r["lr"]) for r in rows})
    colors = plt.get_cmap("viridis")(np.linspace(0.05, 0.9, max(len(cells), 1)))
    for (step, lr), color in zip(cells, colors):
        mine = [r for r in rows if (r["pretrain_step"], r["lr"]) == (step, lr)]
        ax.plot([r["width"] for r in mine], [r["error_barrier_test_mean"] for r in mine], "o-", color=color,
                label=f"{step_label(step)}, LR {lr:g}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("model width")
    ax.set_ylabel("mean test error barrier between seeds")
    ax.legend(fontsize=6, ncol=2, title="pretraining, LR", title_fontsize=6)
    by_width = {r["width"]: r["finetune_member_steps_per_s"] for r in rows}
    bx.plot(list(by_width), list(by_width.values()), "s-")
    bx.set_xscale("log", base=2)
    bx.set_xlabel("model width")
    bx.set_ylabel("fine-tuning member-steps/s (stage wall time)")
    return fig, ("Left: mean test error barrier between seeds (endpoint-mean form) against model width, one line per "
                 "cell (pretraining checkpoint, LR). Right: fine-tuning throughput of each width's study, member-steps "
                 "per second of the whole stage (compilation and evaluation included).")


def barrier_vs_finetune_steps(step_summary: list[dict]):
    """Seeds' and to-start barrier excess against the fine-tuning steps, a panel per pretraining checkpoint and a line
    per LR (rows of rundir.STEP_SUMMARY, one head policy)."""
    steps = sorted({r["pretrain_step"] for r in step_summary})
    lengths = sorted({r["finetune_step"] for r in step_summary})
    if len(lengths) < 2:
        return None
    lrs = sorted({r["lr"] for r in step_summary})
    colors = plt.get_cmap("viridis")(np.linspace(0.05, 0.9, len(lrs)))
    cols = min(4, len(steps))
    rows = -(-len(steps) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.8 * rows), sharey=True, squeeze=False)

    def mean(step, lr, length, key):
        values = [r.get(key, np.nan) for r in step_summary
                  if (r["pretrain_step"], r["lr"], r["finetune_step"]) == (step, lr, length)]
        values = [v for v in values if np.isfinite(v)]
        return float(np.mean(values)) if values else np.nan

    for ax, step in zip(axes.flat, steps):
        for lr, color in zip(lrs, colors):
            for key, style in (("error_barrier_test_excess_mean", "o-"),
                               ("start_error_barrier_test_excess_mean", "s--")):
                ax.plot(lengths, [mean(step, lr, n, key) for n in lengths], style, color=color, ms=3, lw=1,
                        label=f"LR {lr:g}" if style == "o-" else None)
        ax.axhline(0, color="gray", lw=0.8)
        ax.set_xscale("log")
        ax.set_title(f"pretrained {step_label(step)}", fontsize=9)
        ax.set_xlabel("fine-tuning steps", fontsize=8)
    for ax in axes[:, 0]:
        ax.set_ylabel("test error barrier − floor", fontsize=8)
    for ax in list(axes.flat)[len(steps):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6, ncol=2)
    return fig, ("Barrier above its noise floor (test error, endpoint-mean; mean over a cell's usable members) against "
                 "the number of fine-tuning steps, one panel per pretraining checkpoint and one colour per LR. Solid: "
                 "between seeds; dashed: each member to its probed start. Above 0: beyond what evaluation noise "
                 "explains.")


def critical_rate(rows: list[dict]):
    """The critical learning rate against the pretraining checkpoint, one line per fine-tuning length, with the rate
    at which training fails as a dashed reference (rows of rundir.CRITICAL, one combination of the other axes)."""
    steps = sorted({r["pretrain_step"] for r in rows})
    lengths = sorted({r["finetune_step"] for r in rows})
    low, high = min(r["lowest_lr"] for r in rows), max(r["highest_lr"] for r in rows)
    floor_y, top_y = low / 2, high * 2  # where "below the grid" and "no rate leaves" are drawn
    colors = plt.get_cmap("plasma")(np.linspace(0.05, 0.8, len(lengths)))
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    x = np.arange(len(steps))
    for length, color in zip(lengths, colors):
        mine = {r["pretrain_step"]: r for r in rows if r["finetune_step"] == length}
        at = [mine.get(s, {}) for s in steps]
        stay = np.array([r.get("stay_lr", np.nan) for r in at])
        leave = np.array([r.get("leave_lr", np.nan) for r in at])
        crossing = np.array([r.get("critical_lr", np.nan) for r in at])
        xs = x + (list(lengths).index(length) - (len(lengths) - 1) / 2) * 0.08
        inside = (stay > 0) & np.isfinite(leave)  # a bracket between two grid rates: drawn as a bar
        ax.vlines(xs[inside], stay[inside], leave[inside], color=color, lw=5, alpha=0.6,
                  label=f"{length} fine-tuning steps")
        narrow = inside & np.isfinite(crossing) & (crossing > 0)  # interpolated only inside a narrow bracket
        ax.plot(xs[narrow], crossing[narrow], "o", color="k", ms=3)
        ax.plot(xs[leave == np.inf], np.clip(stay[leave == np.inf], floor_y, top_y), "^", color=color, ms=8)
        ax.plot(xs[stay == 0], np.clip(leave[stay == 0], floor_y, top_y), "v", color=color, ms=8)
        failing = np.array([r.get("failing_lr", np.nan) for r in at])
        ax.plot(xs, np.where(np.isfinite(failing), failing, np.nan), ":", color=color, lw=1.5)
    ax.axhspan(low, high, color="gray", alpha=0.08, lw=0)
    ax.set_yscale("log")
    ax.set_ylim(floor_y / 1.5, top_y * 1.5)
    ax.set_xticks(x, [step_label(s) for s in steps])
    ax.set_xlabel("pretraining steps of the starting checkpoint")
    ax.set_ylabel("fine-tuning learning rate")
    ax.plot([], [], ":", color="k", label="training fails (≥ half diverged or unfit)")
    ax.legend(fontsize=7)
    return fig, ("Critical learning rate against the pretraining checkpoint, one colour per fine-tuning length: each "
                 "bar spans the bracket of grid rates within which seeds leave the basin (from the highest rate that "
                 "stays to the lowest that leaves: the seeds' test error barrier, or their linear-baseline barrier to "
                 "the start, above its noise floor); a black dot marks the interpolated crossing where the bracket "
                 "is narrow enough to place one. Upward triangles: no rate that trains leaves (drawn at the highest "
                 "rate that stays); downward ones: even the lowest rate leaves. Dotted: the rate from which training "
                 "fails. Shaded: the grid's rates.")


def sharpness(members: list[dict], starts: list[dict]):
    """Sharpness (rows of rundir.SHARPNESS and rundir.START_SHARPNESS): the top Hessian eigenvalue of each member's
    training loss against its pretraining checkpoint, one line per learning rate (median over the used members,
    band: their interquartile range), and each start's (black)."""
    used = [r for r in members if not r["diverged"] and not r["unfit"] and np.isfinite(r["sharpness"])]
    if not used:
        return None
    steps = sorted({r["pretrain_step"] for r in used} | {r["pretrain_step"] for r in starts})
    lrs = sorted({r["lr"] for r in used})
    colors = plt.get_cmap("viridis")(np.linspace(0.1, 0.85, max(len(lrs), 1)))
    fig, ax = plt.subplots(figsize=(7, 4))
    x = np.arange(len(steps))
    for lr, color in zip(lrs, colors):
        values = [[r["sharpness"] for r in used if r["lr"] == lr and r["pretrain_step"] == s] for s in steps]
        q = np.array([np.percentile(v, [25, 50, 75]) if v else [np.nan] * 3 for v in values])
        ax.plot(x, q[:, 1], "o-", color=color, label=f"LR {lr:g}: members")
        ax.fill_between(x, q[:, 0], q[:, 2], color=color, alpha=0.15, lw=0)
    start_x = [steps.index(r["pretrain_step"]) for r in starts if np.isfinite(r["sharpness"])]
    ax.plot(start_x, [r["sharpness"] for r in starts if np.isfinite(r["sharpness"])], "ks", label="start (probe head)")
    if any(r["sharpness"] <= 0 for r in used) or any(r["sharpness"] <= 0 for r in starts):
        ax.set_yscale("symlog")
    else:
        ax.set_yscale("log")
    ax.set_xticks(x, [step_label(s) for s in steps])
    ax.set_xlabel("pretraining steps of the starting checkpoint")
    ax.set_ylabel("top Hessian eigenvalue of the training loss")
    ax.legend(fontsize=7)
    return fig, ("Sharpness: the top eigenvalue of the training loss's Hessian (power iteration on Hessian-vector "
                 "products, all members at once) of each fine-tuned member against its pretraining checkpoint, "
                 "median and interquartile range per learning rate, and of each start (black squares; the starting "
                 "body with the probe head). Diverged and unfit members are left out.")


def layerwise(rows: list[dict]):
    """Layer-wise barriers (rows of rundir.LAYERWISE_SUMMARY): the test error barrier when only one layer group is
    interpolated, against the layer, one panel per pretraining checkpoint, one line per learning rate (aligned when
    the run aligned, other axes averaged in the caption's note)."""
    if not rows:
        return None
    key = ("error_barrier_test_aligned" if any(np.isfinite(r.get("error_barrier_test_aligned_mean", np.nan))
                                               for r in rows) else "error_barrier_test")
    layers = [name for _, name in sorted({(r["layer_index"], r["layer"]) for r in rows})]
    steps = sorted({r["pretrain_step"] for r in rows})
    lrs = sorted({r["lr"] for r in rows})
    colors = plt.get_cmap("viridis")(np.linspace(0.1, 0.85, max(len(lrs), 1)))
    fig, axes = plt.subplots(1, len(steps), figsize=(min(3.2 * len(steps), 14), 3.6), sharey=True, squeeze=False)
    x = np.arange(len(layers))
    for ax, step in zip(axes[0], steps):
        for lr, color in zip(lrs, colors):
            mine = [r for r in rows if r["pretrain_step"] == step and r["lr"] == lr]
            if not mine:
                continue
            mean = np.array([np.nanmean([r[f"{key}_mean"] for r in mine if r["layer"] == name] or [np.nan])
                             for name in layers])
            lo = np.array([np.nanmean([r[f"{key}_ci_lo"] for r in mine if r["layer"] == name] or [np.nan])
                           for name in layers])
            hi = np.array([np.nanmean([r[f"{key}_ci_hi"] for r in mine if r["layer"] == name] or [np.nan])
                           for name in layers])
            ax.plot(x, mean, "o-", color=color, label=f"LR {lr:g}")
            ax.fill_between(x, lo, hi, color=color, alpha=0.15, lw=0)
        ax.axhline(0, color="gray", lw=0.8)
        ax.set_xticks(x, layers, rotation=45, ha="right", fontsize=7)
        ax.set_title(f"pretrain {step_label(step)}", fontsize=9)
    axes[0][0].set_ylabel("test error barrier, one layer interpolated")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    averaged = grid.varied_names(rows, besides=MAIN_AXES + ("layer", "layer_index"))
    note = f" (averaged over {' and '.join(averaged)})" if averaged else ""
    return fig, ("Layer-wise barriers (Adilova et al. 2024): the test error barrier between seeds when only one "
                 "layer group is interpolated and the rest stay at member i" + (" (after weight matching)" if
                                                                                 key.endswith("aligned") else "")
                 + f", per layer, one panel per pretraining checkpoint{note}; bands: 95 % bootstrap CIs over seeds. "
                 "A layer whose barrier approaches the whole network's is where the basins differ.")


def training_curves(members: list[dict], curves: dict):
    """Training curves (rundir.FINETUNE_CURVES, rows of members.csv): every member's mean training-batch loss per
    chunk against the fine-tuning step, one panel per pretraining checkpoint, one colour per learning rate: the
    median over the cell's used members and their range (band); diverged members (red, × where their loss stopped
    being finite) and unfit ones (dotted) drawn one by one."""
    step_K, loss_KxM = np.asarray(curves["step_K"]), np.asarray(curves["loss_KxM"])
    if len(step_K) == 0 or not members or max(m["member"] for m in members) >= loss_KxM.shape[1]:
        return None
    steps = sorted({m["pretrain_step"] for m in members})
    lrs = sorted({m["lr"] for m in members})
    colors = plt.get_cmap("viridis")(np.linspace(0.1, 0.85, max(len(lrs), 1)))
    fig, axes = plt.subplots(1, len(steps), figsize=(min(3.4 * len(steps), 14), 3.6), sharey=True, squeeze=False)
    for ax, start in zip(axes[0], steps):
        for lr, color in zip(lrs, colors):
            mine = [m for m in members if m["pretrain_step"] == start and m["lr"] == lr]
            used = [m["member"] for m in mine if grid.usable(m)]
            if used:
                with np.errstate(all="ignore"):
                    ax.plot(step_K, np.nanmedian(loss_KxM[:, used], axis=1), color=color, label=f"LR {lr:g}")
                    ax.fill_between(step_K, np.nanmin(loss_KxM[:, used], axis=1),
                                    np.nanmax(loss_KxM[:, used], axis=1), color=color, alpha=0.2, lw=0)
            labelled = set()
            for m in mine:
                curve = loss_KxM[:, m["member"]]
                kind = "diverged" if m["diverged"] else "unfit" if m["unfit"] else None
                label = f"LR {lr:g}, {kind}" if kind and kind not in labelled else None
                labelled.add(kind)
                if kind == "diverged":
                    ax.plot(step_K, curve, "--", color="tab:red", lw=0.8, label=label)
                    finite = np.flatnonzero(np.isfinite(curve))
                    if len(finite):
                        ax.plot(step_K[finite[-1]], curve[finite[-1]], "x", color="tab:red")
                elif kind == "unfit":
                    ax.plot(step_K, curve, ":", color=color, lw=0.8, label=label)
        ax.set_yscale("log")
        ax.set_xlabel("fine-tuning step")
        ax.set_title(f"pretrain {step_label(start)}", fontsize=9)
    axes[0][0].set_ylabel("training-batch loss (chunk mean)")
    handles = {h.get_label(): h for ax in axes[0] for h in ax.get_lines() if not h.get_label().startswith("_")}
    axes[0][0].legend(list(handles.values()), list(handles), fontsize=7)
    averaged = grid.varied_names(members, besides=MAIN_AXES + ("member", "seed"))
    note = f"; members of every {' and '.join(averaged)} pooled" if averaged else ""
    diverged = sum(m["diverged"] for m in members)
    unfit = sum(m["unfit"] for m in members)
    return fig, ("Training curves: each member's mean training-batch loss over each chunk of steps, per pretraining "
                 "checkpoint and learning rate: median (line) and range (band) of the members that neither diverged "
                 f"nor failed to fit{note}. Diverged members ({diverged}) are red dashes ending in ×, unfit ones "
                 f"({unfit}) dotted.")


def png(fig) -> bytes:
    """The figure as PNG bytes; the figure is closed."""
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()
