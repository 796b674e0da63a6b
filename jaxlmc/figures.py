"""The report's figures: each a function from the study's results (already read from the run directory) to a
matplotlib figure and its one-line caption. Nothing here reads or writes files; jaxlmc.report saves them.

The figures show the study's two main axes, the pretraining checkpoint × the fine-tuning LR; the cells of any other
grid axis (weight decay, schedule, dropout, …) are averaged, and the captions say so.
"""
from __future__ import annotations

import dataclasses
import io

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from jaxlmc import grid
from jaxlmc.grid import step_label
from jaxlmc.measures import PAIR_MEASURES

MAIN_AXES = ("pretrain_step", "lr")


def subplots(*grid_shape: int, figsize: tuple[float, float], **kwargs):
    """(figure, axes) like pyplot's, as a bare `Figure`: no pyplot, no backend chosen, no window — PNG bytes come
    from `png`, drawn by matplotlib's Agg renderer for that one call."""
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(*grid_shape, **kwargs)


def colormap(name: str):
    return matplotlib.colormaps[name]



@dataclasses.dataclass
class Cells:
    """The summary rows (one per grid cell) laid out over the pretraining checkpoints × LRs."""

    summary: list[dict]

    def __post_init__(self):
        self.steps = sorted({r["pretrain_step"] for r in self.summary})
        self.lrs = sorted({r["lr"] for r in self.summary})
        self.lr_colors = colormap("viridis")(np.linspace(0.1, 0.85, max(len(self.lrs), 1)))
        self.step_colors = colormap("plasma")(np.linspace(0.05, 0.85, max(len(self.steps), 1)))
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
    fig, ax = subplots(figsize=(1.3 * len(c.steps) + 2.5, 0.8 * len(c.lrs) + 2))
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
    fig, axes = subplots(1, 2, figsize=(10, 3.8))
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
    fig, axes = subplots(1, len(lrs), figsize=(4.2 * len(lrs), 3.6), squeeze=False, sharey=True)
    colors = colormap("tab10")(np.arange(len(heads)))
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
    """The naive barrier beside every other registered pair measure (jaxlmc.measures: aligned, REPAIR, Bezier curve,
    one's own) the barrier stage measured; None when it measured none."""
    others = [m for m in PAIR_MEASURES.values() if m.suffix and any(
        np.isfinite(r.get(f"error_barrier_test{m.suffix}_mean", np.nan)) for r in c.summary)]
    if not others:
        return None
    fig, ax = subplots(figsize=(6.4, 3.8))
    c.lines_per_lr(ax, [("error_barrier_test_mean", "o-", "naive")]
                   + [(f"error_barrier_test{m.suffix}_mean", m.style, m.label) for m in others])
    ax.axhline(0, color="gray", lw=0.8)
    c.step_axis(ax)
    ax.set_ylabel("mean test error barrier")
    ax.legend(fontsize=7, ncol=2)
    return fig, " ".join(["Barrier between seeds along the straight line (solid) and compared otherwise."]
                         + [m.caption for m in others if m.caption])


def interpolation_curves(c: Cells, pairs: list[dict], curves: dict):
    """The median-barrier pair of each cell: `pairs` are barriers/pairs.csv's rows, `curves` its curves.npz."""
    fig, axes = subplots(1, len(c.lrs), figsize=(4.2 * len(c.lrs), 3.6), squeeze=False)
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
    fig, (ax, bx) = subplots(1, 2, figsize=(9, 4.2), gridspec_kw={"width_ratios": [3, 1.3]})
    image = ax.imshow(barrier[np.ix_(order, order)], cmap="magma_r", vmin=0)
    names = [f"#{int(ids[o])} b{int(labels[o])}" for o in order]
    ax.set_xticks(range(len(order)), names, rotation=90, fontsize=7)
    ax.set_yticks(range(len(order)), names, fontsize=7)
    fig.colorbar(image, ax=ax, label="barrier excess (test error; blank: pair not measured)")
    ax.set_title(f"pretrain {step_label(row['pretrain_step'])}, LR {row['lr']:g}: {int(row['basins'])} basins "
                 f"({row['basin_sizes']})", fontsize=9)
    bx.barh(range(len(order)), acc, color=colormap("tab10")(labels[order] % 10))
    bx.set_yticks(range(len(order)), names, fontsize=7)
    bx.invert_yaxis()
    bx.set_xlabel("OOD accuracy" if c.has_ood else "test accuracy")
    lo, hi = float(np.nanmin(acc)), float(np.nanmax(acc))
    bx.set_xlim(max(0.0, lo - 0.05), min(1.0, hi + 0.05) if hi > lo else hi + 0.05)
    return fig, ("Barrier excess matrix (headline barrier minus its null mean) of a fine-tuning cell with several "
                 f"basins (clusters cut at the margin {row['basin_threshold']:g}; shared ones preferred), members "
                 "ordered by basin (b0 = the largest), beside each member's " + ("OOD" if c.has_ood else "test")
                 + " accuracy coloured by basin. Basins describe the cell; its verdict is in the per-cell table.")


def soup_gain(c: Cells):
    fig, ax = subplots(figsize=(6.4, 3.8))
    c.lines_per_lr(ax, [(f"{kind}_gain", style, kind) for kind, style in (("uniform", "o-"), ("greedy", "s--"),
                                                                           ("ensemble", "^:"))])
    ax.axhline(0, color="gray", lw=0.8)
    c.step_axis(ax)
    ax.set_ylabel("test accuracy − best member's")
    ax.legend(fontsize=7, ncol=2)
    return fig, ("Test accuracy of the uniform soup, greedy soup (chosen on validation data) and logit ensemble minus "
                 "that of the best member (chosen on validation data): soups work where seeds share a basin.")


def ood_spread(c: Cells):
    fig, ax = subplots(figsize=(6.4, 3.8))
    c.lines_per_lr(ax, [("ood_acc_std", "o-", "OOD")] * c.has_ood + [("test_acc_std", "s:", "test")])
    c.step_axis(ax)
    ax.set_ylabel("std of accuracy across seeds")
    ax.legend(fontsize=7)
    return fig, ("Spread (std across seeds) of OOD accuracy (solid) and test accuracy (dotted) in each cell: "
                 "path-dependent fine-tunes generalise differently out of distribution.")


def png(fig) -> bytes:
    """The figure as PNG bytes."""
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()
