"""The study's report: `summary.csv` (one row per grid cell), `figures/*.png` (jaxlmc.figures), and `report.html`, a
self-contained page (figures embedded as data URIs, no scripts, no network) that opens offline in any browser.

Everything here is read from the files the earlier stages wrote (through jaxlmc.rundir); `jaxlmc report RUN_DIR`
re-renders it. The stages come in as data (jaxlmc.study.STAGES): which files they write and the order of their
markers; this module never lists them itself.
"""
from __future__ import annotations

import base64
import html
import json

import numpy as np

from jaxlmc import figures, grid, rundir
from jaxlmc.config import ConfigError
from jaxlmc.figures import step_label

__all__ = ["build_summary", "headline", "render", "render_scaling", "step_label"]


def build_summary(run: rundir.RunDir) -> list[dict]:
    """One row per grid cell: barriers (between seeds and to the start), geometry, soups and similarity."""
    soups = {grid.cell(r): r for r in run.read_csv(rundir.SOUPS)}
    similarity = {grid.cell(r): r for r in run.read_csv(rundir.SIMILARITY)}
    rows = []
    for b in run.read_csv(rundir.BARRIER_SUMMARY):
        key = grid.cell(b)
        row = dict(zip(grid.CELL_KEYS, key))
        row.update({"members": b["members"], "members_used": b["members_used"], "pairs": b["pairs"]})
        for k, v in b.items():
            if k.endswith(("_mean", "_std", "_ci_lo", "_ci_hi")) and ("barrier" in k or k.startswith(("dist", "upd",
                                                                                                          "start_dist"))):
                row[k] = v
        for source in (soups.get(key, {}), similarity.get(key, {})):
            row.update({k: v for k, v in source.items() if k not in grid.CELL_KEYS and k not in row})
        rows.append(row)
    return rows


def draw_figures(run: rundir.RunDir, summary: list[dict], members: list[dict]) -> list[tuple[str, str]]:
    """Draw every figure into figures/; returns (file name, one-line caption) pairs."""
    cells = figures.Cells(summary)
    curves = run.read_npz(rundir.CURVES)
    similarity = run.read_npz(rundir.SIMILARITY_ARRAYS)
    drawn = {
        "phase_diagram.png": figures.phase_diagram(cells),
        "barrier_vs_pretraining.png": figures.barrier_vs_pretraining(cells),
        "aligned_barrier.png": figures.aligned_barrier(cells),
        "interpolation_curves.png": figures.interpolation_curves(cells, run.read_csv(rundir.PAIRS), curves),
        "basins.png": figures.basins(cells, members, run.read_csv(rundir.SIMILARITY), similarity),
        "soup_gain.png": figures.soup_gain(cells),
        "ood_spread.png": figures.ood_spread(cells),
    }
    out = []
    for name, result in drawn.items():
        if result is not None:  # a figure with nothing to show (no alignment, no basin structure) is left out
            fig, caption = result
            run.write_figure(name, figures.png(fig))
            out.append((name, caption))
    return out


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
    if value is None:
        return "–"
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


def _figure_html(run: rundir.RunDir, name: str, caption: str) -> str:
    data = base64.b64encode(run.read_figure(name)).decode("ascii")
    return (f"<figure><img src='data:image/png;base64,{data}' alt='{html.escape(caption)}'>"
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _stage_records(run: rundir.RunDir, stages) -> tuple[list[str], dict]:
    """(timings, settings) of the measuring stages' markers, in stage order."""
    timings, settings = [], {}
    for stage in stages:
        marker = run.read_marker(stage.name)
        if marker and "seconds" in marker and "settings" in marker:
            timings.append(f"{stage.name} {marker['seconds']:.0f} s")
            settings[stage.name] = marker["settings"]
    return timings, settings


def render(out: str, stages) -> str:
    """Write summary.csv, figures/*.png and report.html for a study whose `stages` (jaxlmc.study.STAGES, the report
    stage last) have run; returns the report's path."""
    run = rundir.RunDir(out)
    needed = [rundir.CONFIG, rundir.MEMBERS] + [name for stage in stages[:-1] for name in stage.writes]
    missing = [getattr(name, "path", name) for name in needed if not run.exists(name)]
    if missing:
        raise ConfigError(f"{out} lacks {', '.join(missing)}: run `jaxlmc study` on it first")
    provenance = run.read_json(rundir.CONFIG)
    members = run.read_csv(rundir.MEMBERS)
    summary = build_summary(run)
    run.write_csv(rundir.SUMMARY, summary)
    drawn = draw_figures(run, summary, members)
    timings, stage_settings = _stage_records(run, stages[:-1])
    pretrain_rows = run.read_csv(rundir.PRETRAIN) if run.exists(rundir.PRETRAIN) else []
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
    parts += [_figure_html(run, name, caption) for name, caption in drawn]
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
    return run.write_text(rundir.REPORT, "\n".join(parts))


# --------------------------------------------------------------------------------------------- scaling trends


def render_scaling(out: str, widths: list[int]) -> str:
    """scaling.csv (one row per width × cell), figures/scaling.png and scaling.html from the studies in
    width<W>/: the barrier between seeds and the fine-tuning throughput against model width."""
    run = rundir.RunDir(out)
    rows = []
    for width in widths:
        one = run.width(width)
        seconds = one.read_marker("finetune")["seconds"]
        steps = one.read_json(rundir.CONFIG)["config"]["finetune"]["steps"]
        throughput = len(one.read_csv(rundir.MEMBERS)) * steps / seconds
        for row in build_summary(one):
            rows.append({"width": width, **dict(zip(grid.CELL_KEYS, grid.cell(row))),
                         **{k: row[k] for k in ("error_barrier_test_mean", "error_barrier_test_ci_lo",
                                                "error_barrier_test_ci_hi", "loss_barrier_test_mean")},
                         "best_test_acc": row.get("best_test_acc", np.nan),
                         "finetune_member_steps_per_s": throughput})
    run.write_csv(rundir.SCALING, rows)
    fig, caption = figures.scaling(rows)
    run.write_figure("scaling.png", figures.png(fig))
    links = "".join(f"<li><a href='width{w}/report.html'>width {w}</a></li>" for w in widths)
    page = ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>jaxlmc scaling trend</title>"
            "<style>body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
            "img{max-width:100%;border:1px solid #ddd}</style></head><body><h1>Barriers and throughput against "
            f"model width</h1>{_figure_html(run, 'scaling.png', caption)}<p>Each width's full report:</p><ul>{links}"
            "</ul></body></html>")
    return run.write_text(rundir.SCALING_PAGE, page)
