"""The report's figures along a second axis — model width, fine-tuning length, learning rate (the critical rate),
training time, layers — and sharpness: each a function from results already read to a matplotlib figure and its
one-line caption (jaxlmc.figures holds the per-cell ones and the shared helpers).
"""
from __future__ import annotations

import numpy as np

from jaxlmc import grid
from jaxlmc.figures import MAIN_AXES, colormap, subplots
from jaxlmc.grid import step_label


def scaling(rows: list[dict]):
    """Per size axis varied (a row of panels each: width, depth), per start (a panel each), the barrier between seeds
    against the size, a colour per LR, solid under the standard parametrisation and dashed under µP; the last panel
    of a row, the fine-tuning throughput (rows of rundir.SCALING, one head policy)."""
    axes_varied = [a for a in ("width", "depth") if len({r[a] for r in rows}) > 1] or ["width"]
    head = sorted({r["head"] for r in rows})[0]
    starts = sorted({r["pretrain_step"] for r in rows})
    lrs = sorted({r["lr"] for r in rows})
    colors = dict(zip(lrs, colormap("viridis")(np.linspace(0.05, 0.9, max(len(lrs), 1)))))
    fig, panels = subplots(len(axes_varied), len(starts) + 1, figsize=(3.0 * (len(starts) + 1), 2.9 * len(axes_varied)),
                           squeeze=False)
    for row_panels, axis in zip(panels, axes_varied):
        other = "depth" if axis == "width" else "width"
        lines: dict = {}
        for r in rows:
            lines.setdefault((r[other], r["parametrization"]), []).append(r)
        series = {key: mine for key, mine in sorted(lines.items()) if len({r[axis] for r in mine}) >= 2}
        for ax, start in zip(row_panels, starts):
            for (fixed, parametrization), mine in series.items():
                for lr in lrs:
                    line = sorted((r for r in mine if (r["pretrain_step"], r["lr"], r["head"]) == (start, lr, head)),
                                  key=lambda r: r[axis])
                    ax.plot([r[axis] for r in line], [r["error_barrier_test_mean"] for r in line],
                            "o--" if parametrization == "mup" else "o-", color=colors[lr], ms=2.5, lw=1,
                            label=f"LR {lr:g}" if parametrization != "mup" else None)
            ax.set_title(step_label(start) if start < 0 else f"pretrain step {step_label(start)}", fontsize=8)
        speed = row_panels[-1]
        for (fixed, parametrization), mine in series.items():
            by_size = {r[axis]: r["finetune_member_steps_per_s"] for r in mine}
            speed.plot(sorted(by_size), [by_size[k] for k in sorted(by_size)],
                       "s--" if parametrization == "mup" else "s-", ms=3, label=parametrization)
        speed.set_title("fine-tuning member-steps/s", fontsize=8)
        for ax in row_panels:
            ax.set_xscale("log", base=2)
            ax.set_xlabel(f"model {axis} ({other} {', '.join(sorted({str(k[0]) for k in series}))})", fontsize=8)
        row_panels[0].set_ylabel("test error barrier between seeds", fontsize=8)
        row_panels[0].legend(fontsize=6)
        speed.legend(fontsize=6)
    return fig, ("The seeds' test error barrier (endpoint-mean form; head " + head + ") against model size, one panel "
                 "per start (scratch: every seed its own random body) and one colour per LR; solid: standard "
                 "parametrisation, dashed: µP. Last panel of each row: fine-tuning throughput of each size's study, "
                 "member-steps per second of the whole stage (compilation and evaluation included).")


def barrier_vs_finetune_steps(step_summary: list[dict]):
    """Seeds' and to-start barrier excess against the fine-tuning steps, a panel per pretraining checkpoint and a line
    per LR (rows of rundir.STEP_SUMMARY, one head policy)."""
    steps = sorted({r["pretrain_step"] for r in step_summary})
    lengths = sorted({r["finetune_step"] for r in step_summary})
    if len(lengths) < 2:
        return None
    lrs = sorted({r["lr"] for r in step_summary})
    colors = colormap("viridis")(np.linspace(0.05, 0.9, len(lrs)))
    cols = min(4, len(steps))
    rows = -(-len(steps) // cols)
    fig, axes = subplots(rows, cols, figsize=(3.2 * cols, 2.8 * rows), sharey=True, squeeze=False)

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
    colors = colormap("plasma")(np.linspace(0.05, 0.8, len(lengths)))
    fig, ax = subplots(figsize=(7.5, 4.2))
    x = np.arange(len(steps))
    for length, color in zip(lengths, colors):
        mine = {r["pretrain_step"]: r for r in rows if r["finetune_step"] == length}
        at = [mine.get(s, {}) for s in steps]
        stay = np.array([r.get("stay_lr", np.nan) for r in at])
        leave = np.array([r.get("leave_lr", np.nan) for r in at])
        xs = x + (list(lengths).index(length) - (len(lengths) - 1) / 2) * 0.08
        inside = (stay > 0) & np.isfinite(leave)  # a bracket between two grid rates: drawn as a bar
        ax.vlines(xs[inside], stay[inside], leave[inside], color=color, lw=5, alpha=0.6,
                  label=f"{length} fine-tuning steps")
        open_below = np.isnan(stay) & np.isfinite(leave)  # leaves from here; no lower rate shown to stay
        ax.plot(xs[open_below], leave[open_below], "x", color=color, ms=7)
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
                 "bar spans the bracket of grid rates within which seeds leave the basin (from the highest rate shown "
                 "to stay — seeds within the margin of each other and of their start — to the lowest shown to leave "
                 "— separate from either; the rule of the cell verdicts). Upward triangles: no rate is shown to leave "
                 "(drawn at the highest shown to stay); downward ones: even the lowest rate leaves; crosses: leaves "
                 "from there, no lower rate shown to stay. Dotted: the rate from which training fails. Shaded: the "
                 "grid's rates.")


def sharpness(members: list[dict], starts: list[dict]):
    """Sharpness (rows of rundir.SHARPNESS and rundir.START_SHARPNESS): the top Hessian eigenvalue of each member's
    training loss against its pretraining checkpoint, one line per learning rate (median over the used members,
    band: their interquartile range), and each start's (black)."""
    used = [r for r in members if not r["diverged"] and not r["unfit"] and np.isfinite(r["sharpness"])]
    if not used:
        return None
    steps = sorted({r["pretrain_step"] for r in used} | {r["pretrain_step"] for r in starts})
    lrs = sorted({r["lr"] for r in used})
    colors = colormap("viridis")(np.linspace(0.1, 0.85, max(len(lrs), 1)))
    fig, ax = subplots(figsize=(7, 4))
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
    colors = colormap("viridis")(np.linspace(0.1, 0.85, max(len(lrs), 1)))
    fig, axes = subplots(1, len(steps), figsize=(min(3.2 * len(steps), 14), 3.6), sharey=True, squeeze=False)
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
    colors = colormap("viridis")(np.linspace(0.1, 0.85, max(len(lrs), 1)))
    fig, axes = subplots(1, len(steps), figsize=(min(3.4 * len(steps), 14), 3.6), sharey=True, squeeze=False)
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
