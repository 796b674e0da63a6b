"""The study's report: `summary.csv` (one row per grid cell), `figures/*.png`, and `report.html`, a self-contained
page (figures embedded as data URIs, no scripts, no network) that opens offline in any browser.

Everything here is read from the files the earlier stages wrote; `jaxlmc report RUN_DIR` re-renders it.
"""
from __future__ import annotations

import base64
import csv
import html
import json
import os

import numpy as np

from jaxlmc.config import ConfigError

CELL_KEYS = ("pretrain_step", "lr", "weight_decay", "schedule")
NEEDED = ["config.json", "members.csv", "barriers/summary.csv", "barriers/pairs.csv", "barriers/curves.npz",
          "soups.csv", "similarity.csv", "similarity.npz", "basins.csv"]


def _read_csv(path: str) -> list[dict]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        for key, value in row.items():
            if key in ("schedule", "greedy_members", "basin_sizes", "diverged", "same_cell"):
                continue
            try:
                row[key] = float(value) if value != "" else float("nan")
            except ValueError:
                pass
        for key in ("pretrain_step", "member", "i", "j", "seed", "basin", "step", "basins", "members", "members_used",
                    "pairs", "best_member", "greedy_size"):
            if key in row and isinstance(row[key], float) and np.isfinite(row[key]):
                row[key] = int(row[key])
    return rows


def step_label(step: int) -> str:
    return "scratch" if step < 0 else str(step)


def _cell(row: dict) -> tuple:
    return tuple(row[k] for k in CELL_KEYS)


def build_summary(out: str) -> list[dict]:
    """One row per grid cell: barriers (between seeds and to the start), geometry, soups and similarity."""
    barrier_rows = _read_csv(os.path.join(out, "barriers", "summary.csv"))
    soups = {_cell(r): r for r in _read_csv(os.path.join(out, "soups.csv"))}
    similarity = {_cell(r): r for r in _read_csv(os.path.join(out, "similarity.csv"))}
    rows = []
    for b in barrier_rows:
        key = _cell(b)
        row = {k: b[k] for k in CELL_KEYS}
        row.update({"members": b["members"], "members_used": b["members_used"], "pairs": b["pairs"]})
        for k, v in b.items():
            if k.endswith(("_mean", "_std", "_ci_lo", "_ci_hi")) and ("barrier" in k or k.startswith(("dist", "upd",
                                                                                                          "start_dist"))):
                row[k] = v
        for source in (soups.get(key, {}), similarity.get(key, {})):
            row.update({k: v for k, v in source.items() if k not in CELL_KEYS and k not in row})
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------- figures


def _figures(out: str, summary: list[dict], members: list[dict]) -> list[tuple[str, str]]:
    """Draw every figure into out/figures/; returns (file name, one-line caption) pairs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory = os.path.join(out, "figures")
    os.makedirs(directory, exist_ok=True)
    steps = sorted({r["pretrain_step"] for r in summary})
    lrs = sorted({r["lr"] for r in summary})
    colors = plt.get_cmap("viridis")(np.linspace(0.1, 0.85, max(len(lrs), 1)))
    step_colors = plt.get_cmap("plasma")(np.linspace(0.05, 0.85, max(len(steps), 1)))
    has_ood = any(np.isfinite(r.get("error_barrier_ood_mean", np.nan)) for r in summary)
    several = len({(r["weight_decay"], r["schedule"]) for r in summary}) > 1
    avg_note = " (averaged over weight decays and schedules)" if several else ""
    figures = []

    def mean_over(rows, key):
        values = [r[key] for r in rows if np.isfinite(r.get(key, np.nan))]
        return float(np.mean(values)) if values else np.nan

    def by(step, lr):
        return [r for r in summary if r["pretrain_step"] == step and r["lr"] == lr]

    def save(fig, name, caption):
        fig.tight_layout()
        fig.savefig(os.path.join(directory, name), dpi=110)
        plt.close(fig)
        figures.append((name, caption))

    def lines_per_lr(ax, series):
        """One line per (LR, series) over the pretraining steps: series = [(summary key, style, label)]."""
        for lr, color in zip(lrs, colors):
            for key, style, label in series:
                ax.plot(range(len(steps)), [mean_over(by(s, lr), key) for s in steps], style, color=color,
                        label=f"{label}, LR {lr:g}")

    def step_axis(ax):
        ax.set_xticks(range(len(steps)), [step_label(s) for s in steps])
        ax.set_xlabel("pretraining steps of the starting checkpoint")

    # 1. Phase diagram.
    grid = np.array([[mean_over(by(s, lr), "error_barrier_test_mean") for s in steps] for lr in lrs])
    fig, ax = plt.subplots(figsize=(1.3 * len(steps) + 2.5, 0.8 * len(lrs) + 2))
    image = ax.imshow(grid, cmap="magma_r", aspect="auto", vmin=0)
    for a in range(len(lrs)):
        for b in range(len(steps)):
            if np.isfinite(grid[a, b]):
                ax.text(b, a, f"{grid[a, b]:.3f}", ha="center", va="center",
                        color="white" if grid[a, b] > 0.6 * np.nanmax(grid) else "black", fontsize=9)
    ax.set_yticks(range(len(lrs)), [f"{lr:g}" for lr in lrs])
    ax.set_ylabel("fine-tuning learning rate")
    step_axis(ax)
    fig.colorbar(image, ax=ax, label="mean test error barrier")
    ax.set_title("Phase diagram: barrier between fine-tuning seeds")
    save(fig, "phase_diagram.png", "Mean test error barrier (endpoint-mean form) between seeds of each cell, over "
         f"pretraining steps × fine-tuning LR{avg_note}: dark = seeds in different basins, light = one basin.")

    # 2. Barrier vs pretraining steps, per LR, with bootstrap CI bands.
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, metric, label in ((axes[0], "error", "test error barrier"), (axes[1], "loss", "test loss barrier")):
        for lr, color in zip(lrs, colors):
            mean = [mean_over(by(s, lr), f"{metric}_barrier_test_mean") for s in steps]
            lo = [mean_over(by(s, lr), f"{metric}_barrier_test_ci_lo") for s in steps]
            hi = [mean_over(by(s, lr), f"{metric}_barrier_test_ci_hi") for s in steps]
            ax.plot(range(len(steps)), mean, "o-", color=color, label=f"LR {lr:g}")
            ax.fill_between(range(len(steps)), lo, hi, color=color, alpha=0.25)
        ax.axhline(0, color="gray", lw=0.8)
        step_axis(ax)
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    save(fig, "barrier_vs_pretraining.png", "Barrier between seeds vs pretraining, one line per fine-tuning LR; "
         f"bands are 95% bootstrap confidence intervals over pairs{avg_note}.")

    # 2b. Naive vs aligned (weight matching) barrier, when the barrier stage aligned the pairs.
    if any(np.isfinite(r.get("error_barrier_test_aligned_mean", np.nan)) for r in summary):
        fig, ax = plt.subplots(figsize=(6.4, 3.8))
        lines_per_lr(ax, [("error_barrier_test_mean", "o-", "naive"),
                          ("error_barrier_test_aligned_mean", "s--", "aligned")])
        ax.axhline(0, color="gray", lw=0.8)
        step_axis(ax)
        ax.set_ylabel("mean test error barrier")
        ax.legend(fontsize=7, ncol=2)
        save(fig, "aligned_barrier.png", "Barrier between seeds before (solid) and after (dashed) weight matching "
             "(Git Re-Basin): where alignment removes the barrier, the seeds share a basin up to a relabelling of "
             "hidden units, as from-scratch controls can.")

    # 3. Interpolation curves of representative pairs: the median-barrier pair of each cell.
    curves = np.load(os.path.join(out, "barriers", "curves.npz"))
    pairs = _read_csv(os.path.join(out, "barriers", "pairs.csv"))
    alphas = curves["alphas"]
    fig, axes = plt.subplots(1, len(lrs), figsize=(4.2 * len(lrs), 3.6), squeeze=False)
    for ax, lr in zip(axes[0], lrs):
        for s, color in zip(steps, step_colors):
            cell_pairs = [(k, p) for k, p in enumerate(pairs) if p["same_cell"] == "True" and p["pretrain_step"] == s
                          and p["lr"] == lr]
            if not cell_pairs:
                continue
            order = sorted(cell_pairs, key=lambda kp: kp[1]["error_barrier_test"])
            k, p = order[len(order) // 2]
            ax.plot(alphas, curves["error_test"][k], color=color, label=f"{step_label(s)} (#{p['i']}–#{p['j']})")
        ax.set_title(f"LR {lr:g}")
        ax.set_xlabel("α")
        ax.set_ylabel("test error")
        ax.legend(fontsize=7, title="pretraining", title_fontsize=7)
    save(fig, "interpolation_curves.png", "Test error along the line between two seeds, for the pair with the median "
         "barrier of each cell (members' numbers in the legend); a bump in the middle is a barrier.")

    # 4. Barrier heatmap of the cell with the most basins, ordered by basin, beside each member's OOD accuracy.
    sim = np.load(os.path.join(out, "similarity.npz"))
    sim_rows = _read_csv(os.path.join(out, "similarity.csv"))
    candidates = [g for g, r in enumerate(sim_rows) if f"cell{g}_barrier" in sim]
    pretrained = [g for g in candidates if sim_rows[g]["pretrain_step"] >= 0]
    candidates = pretrained or candidates  # the question is about fine-tunes; scratch is the control

    def structure(g):  # prefer cells with shared basins and several of them, then higher barriers
        r = sim_rows[g]
        return (r["basins"] > 1 and r["largest_basin_fraction"] > 1 / r["members_used"], r["basins"],
                np.nanmean(sim[f"cell{g}_barrier"]))

    if candidates:
        g = max(candidates, key=structure)
        row = sim_rows[g]
        ids, labels, barrier = sim[f"cell{g}_members"], sim[f"cell{g}_basin"], sim[f"cell{g}_barrier"]
        order = np.lexsort((ids, labels))
        acc_key = "ood_acc" if has_ood else "test_acc"
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
        bx.set_xlabel("OOD accuracy" if has_ood else "test accuracy")
        lo, hi = float(np.nanmin(acc)), float(np.nanmax(acc))
        bx.set_xlim(max(0.0, lo - 0.05), min(1.0, hi + 0.05) if hi > lo else hi + 0.05)
        save(fig, "basins.png", "Barrier matrix of a fine-tuning cell with several basins (shared ones preferred), "
             "members ordered by basin (b0 = the largest), beside each member's " + ("OOD" if has_ood else "test")
             + " accuracy coloured by basin.")

    # 5. Soup gain over the best member.
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    lines_per_lr(ax, [(f"{kind}_gain", style, kind) for kind, style in (("uniform", "o-"), ("greedy", "s--"),
                                                                         ("ensemble", "^:"))])
    ax.axhline(0, color="gray", lw=0.8)
    step_axis(ax)
    ax.set_ylabel("test accuracy − best member's")
    ax.legend(fontsize=7, ncol=2)
    save(fig, "soup_gain.png", "Test accuracy of the uniform soup, greedy soup (chosen on validation data) and logit "
         "ensemble minus that of the best member (chosen on validation data): soups work where seeds share a basin.")

    # 6. OOD spread across seeds.
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    lines_per_lr(ax, [("ood_acc_std", "o-", "OOD")] * has_ood + [("test_acc_std", "s:", "test")])
    step_axis(ax)
    ax.set_ylabel("std of accuracy across seeds")
    ax.legend(fontsize=7)
    save(fig, "ood_spread.png", "Spread (std across seeds) of OOD accuracy (solid) and test accuracy (dotted) in each "
         "cell: path-dependent fine-tunes generalise differently out of distribution.")
    return figures


# --------------------------------------------------------------------------------------------- the page


def headline(summary: list[dict]) -> list[str]:
    """Sentences computed from the summary: the answer a researcher looks for first."""
    lines = []
    threshold = summary[0].get("basin_threshold", float("nan")) if summary else float("nan")
    steps = sorted({r["pretrain_step"] for r in summary if r["pretrain_step"] >= 0})
    for lr in sorted({r["lr"] for r in summary}):
        def at(step):
            values = [r["error_barrier_test_mean"] for r in summary if r["lr"] == lr and r["pretrain_step"] == step]
            return float(np.mean(values)) if values else np.nan

        if len(steps) >= 2:
            first, last = at(steps[0]), at(steps[-1])
            trend = "falls" if last < first else "rises" if last > first else "stays"
            text = (f"At fine-tuning LR {lr:g} the mean test error barrier between seeds {trend} from {first:.3f} "
                    f"(checkpoint at step {steps[0]}) to {last:.3f} (step {steps[-1]})")
            scratch = at(-1)
            if np.isfinite(scratch):
                text += f"; from scratch it is {scratch:.3f}"
            lines.append(text + ".")
    aligned = [r for r in summary if np.isfinite(r.get("error_barrier_test_aligned_mean", np.nan))]
    for label, rows in (("the scratch cells", [r for r in aligned if r["pretrain_step"] < 0]),
                        ("the fine-tuning cells", [r for r in aligned if r["pretrain_step"] >= 0])):
        if rows:
            naive = np.mean([r["error_barrier_test_mean"] for r in rows])
            after = np.mean([r["error_barrier_test_aligned_mean"] for r in rows])
            lines.append(f"After weight matching, the mean test error barrier over {label} goes from {naive:.3f} to "
                         f"{after:.3f}.")
    one_basin = [r for r in summary if r.get("basins") == 1]
    lines.append(f"{len(one_basin)} of {len(summary)} cells have all their seeds in one basin (average-linkage "
                 f"clusters of the test error barrier cut at {threshold:g}).")
    gains = [r["uniform_gain"] for r in summary if np.isfinite(r.get("uniform_gain", np.nan))]
    if gains:
        lines.append(f"The uniform soup beats the best member in {sum(g > 0 for g in gains)} of {len(gains)} cells.")
    return lines


SUMMARY_TABLE = [("pretrain_step", "pretrain"), ("lr", "LR"), ("members_used", "n"),
                 ("error_barrier_test_mean", "err barrier"), ("loss_barrier_test_mean", "loss barrier"),
                 ("error_barrier_ood_mean", "OOD err barrier"), ("error_barrier_test_aligned_mean", "aligned"), ("start_error_barrier_test_lin_mean", "to start (lin)"),
                 ("basins", "basins"), ("best_test_acc", "best"), ("uniform_test_acc", "uniform soup"),
                 ("greedy_test_acc", "greedy soup"), ("ensemble_test_acc", "ensemble"), ("ood_acc_std", "OOD std"),
                 ("disagreement_test", "disagree"), ("cka_mean", "CKA")]


def _fmt(key, value) -> str:
    if key == "pretrain_step":
        return step_label(int(value))
    if isinstance(value, float):
        if not np.isfinite(value):
            return "–"
        return f"{value:g}" if key == "lr" else f"{value:.3f}" if abs(value) < 100 else f"{value:.0f}"
    return html.escape(str(value))


def _table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for _, h in columns)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(k, r.get(k, ''))}</td>" for k, _ in columns) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render(out: str) -> str:
    """Write out/summary.csv, out/figures/*.png and out/report.html; returns the report's path."""
    missing = [name for name in NEEDED if not os.path.exists(os.path.join(out, name))]
    if missing:
        raise ConfigError(f"{out} lacks {', '.join(missing)}: run `jaxlmc study` on it first")
    with open(os.path.join(out, "config.json")) as f:
        provenance = json.load(f)
    members = _read_csv(os.path.join(out, "members.csv"))
    summary = build_summary(out)
    from jaxlmc import api

    columns = list(dict.fromkeys(k for r in summary for k in r))
    api._write_csv(os.path.join(out, "summary.csv"), summary, columns)
    figures = _figures(out, summary, members)

    timings, stage_settings = [], {}
    for name in ("pretrain", "finetune", "barriers", "soups", "similarity"):
        try:
            with open(os.path.join(out, "stages", f"{name}.json")) as f:
                marker = json.load(f)
            timings.append(f"{name} {marker['seconds']:.0f} s")
            stage_settings[name] = marker["settings"]
        except (OSError, ValueError, KeyError):
            pass
    pretrain_rows = _read_csv(os.path.join(out, "pretrain", "checkpoints.csv")) \
        if os.path.exists(os.path.join(out, "pretrain", "checkpoints.csv")) else []
    cfg = provenance["config"]
    d, f_ = cfg["data"], cfg["finetune"]
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>jaxlmc study report</title>",
        "<style>body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
        "figure{margin:1.5em 0}img{max-width:100%;border:1px solid #ddd}figcaption{color:#444;font-size:0.95em}"
        "table{border-collapse:collapse;font-size:0.85em}td,th{border:1px solid #ccc;padding:2px 6px;"
        "text-align:right}th{background:#f3f3f3}pre{background:#f7f7f7;padding:1em;overflow:auto;font-size:0.8em}"
        "</style></head><body>",
        "<h1>Is fine-tuning path dependent?</h1>",
        f"<p>{len(members)} members: pretrained on <code>{html.escape(d['pretrain_task'])}</code>, fine-tuned on "
        f"<code>{html.escape(d['finetune_task'])}</code> (labels <code>{html.escape(d['finetune_labels'])}</code>)"
        + (f", OOD <code>{html.escape(d['ood_task'])}</code>" if d["ood_task"] else "")
        + f"; {f_['seeds']} seeds per cell, {f_['steps']} fine-tuning steps. Stage times: "
        + html.escape(", ".join(timings) or "not recorded") + ".</p>",
        "<h2>Answer</h2><ul>" + "".join(f"<li>{html.escape(s)}</li>" for s in headline(summary)) + "</ul>",
        "<h2>Figures</h2>",
    ]
    for name, caption in figures:
        with open(os.path.join(out, "figures", name), "rb") as fh:
            data = base64.b64encode(fh.read()).decode("ascii")
        parts.append(f"<figure><img src='data:image/png;base64,{data}' alt='{html.escape(caption)}'>"
                     f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    parts += ["<h2>Per cell</h2><p>Barriers: endpoint-mean form between seeds, linear-baseline form to the starting "
              "point; accuracies on the test set; every column in <code>summary.csv</code>.</p>",
              _table(summary, SUMMARY_TABLE)]
    if pretrain_rows:
        parts += ["<h2>Pretraining checkpoints</h2>",
                  _table(pretrain_rows, [("step", "step"), ("train_acc", "train acc"), ("test_acc", "test acc"),
                                         ("test_loss", "test loss")])]
    parts += ["<h2>Provenance</h2><p>The run directory's config (training sections; <code>config.json</code>), "
              "library versions and devices, then the settings each measuring stage ran with "
              "(<code>stages/*.json</code>).</p><pre>" + html.escape(json.dumps(provenance, indent=2)) + "</pre><pre>"
              + html.escape(json.dumps(stage_settings, indent=2)) + "</pre>",
              "</body></html>"]
    path = os.path.join(out, "report.html")
    api.write_atomic(path, "\n".join(parts))
    return path


# --------------------------------------------------------------------------------------------- scaling trends


def render_scaling(out: str, widths: list[int]) -> str:
    """out/scaling.csv (one row per width × cell), out/figures/scaling.png and out/scaling.html from the studies in
    out/width<W>/: the barrier between seeds and the fine-tuning throughput against model width."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from jaxlmc import api

    rows = []
    for width in widths:
        directory = os.path.join(out, f"width{width}")
        with open(os.path.join(directory, "stages", "finetune.json")) as f:
            seconds = json.load(f)["seconds"]
        with open(os.path.join(directory, "config.json")) as f:
            finetune_cfg = json.load(f)["config"]["finetune"]
        members = _read_csv(os.path.join(directory, "members.csv"))
        throughput = len(members) * finetune_cfg["steps"] / seconds
        for row in build_summary(directory):
            rows.append({"width": width, **{k: row[k] for k in CELL_KEYS},
                         "error_barrier_test_mean": row["error_barrier_test_mean"],
                         "error_barrier_test_ci_lo": row["error_barrier_test_ci_lo"],
                         "error_barrier_test_ci_hi": row["error_barrier_test_ci_hi"],
                         "loss_barrier_test_mean": row["loss_barrier_test_mean"],
                         "best_test_acc": row.get("best_test_acc", np.nan),
                         "finetune_member_steps_per_s": throughput})
    api._write_csv(os.path.join(out, "scaling.csv"), rows, list(rows[0]))
    os.makedirs(os.path.join(out, "figures"), exist_ok=True)
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
    fig.tight_layout()
    fig.savefig(os.path.join(out, "figures", "scaling.png"), dpi=110)
    plt.close(fig)
    with open(os.path.join(out, "figures", "scaling.png"), "rb") as fh:
        data = base64.b64encode(fh.read()).decode("ascii")
    caption = ("Left: mean test error barrier between seeds (endpoint-mean form) against model width, one line per "
               "cell (pretraining checkpoint, LR). Right: fine-tuning throughput of each width's study, member-steps "
               "per second of the whole stage (compilation and evaluation included).")
    links = "".join(f"<li><a href='width{w}/report.html'>width {w}</a></li>" for w in widths)
    page = ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>jaxlmc scaling trend</title>"
            "<style>body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
            "img{max-width:100%;border:1px solid #ddd}</style></head><body><h1>Barriers and throughput against "
            f"model width</h1><figure><img src='data:image/png;base64,{data}' alt='{html.escape(caption)}'>"
            f"<figcaption>{html.escape(caption)}</figcaption></figure><p>Each width's full report:</p><ul>{links}"
            "</ul></body></html>")
    path = os.path.join(out, "scaling.html")
    api.write_atomic(path, page)
    return path
