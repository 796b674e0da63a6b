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
import os

import numpy as np

from jaxlmc import decide, figures, figures_trends, grid, noreturn, rundir, stats, verdicts
from jaxlmc.config import ConfigError
from jaxlmc.grid import step_label
from jaxlmc.measures import PAIR_MEASURES

__all__ = ["build_summary", "figure_html", "headline", "render", "step_label", "table_html"]


def build_summary(run: rundir.RunDir) -> list[dict]:
    """One row per grid cell: barriers (between seeds and to the start), geometry, soups and similarity."""
    soups = {grid.cell(r): r for r in run.read_csv(rundir.SOUPS)}
    similarity = {grid.cell(r): r for r in run.read_csv(rundir.SIMILARITY)}
    merged = {grid.cell(r): r for r in run.read_csv(rundir.MERGES)} if run.exists(rundir.MERGES) else {}
    sharp = {}
    for r in run.read_csv(rundir.SHARPNESS) if run.exists(rundir.SHARPNESS) else []:
        if grid.usable(r) and np.isfinite(r["sharpness"]):
            sharp.setdefault(grid.cell(r), []).append(r["sharpness"])
    rows = []
    for b in run.read_csv(rundir.BARRIER_SUMMARY):
        key = grid.cell(b)
        row = dict(zip(grid.CELL_KEYS, key))
        row.update({k: b.get(k) for k in ("members", "members_used", "pairs", "diverged", "unfit", "verdict",
                                           "start_verdict", "margin", "mc_moved", "start_mc_moved") if k in b})
        for k, v in b.items():
            if k.endswith(("_mean", "_std", "_ci_lo", "_ci_hi", "_min_detectable")) and (
                    "barrier" in k or k.startswith(("dist", "upd", "start_dist"))):
                row[k] = v
        for source in (soups.get(key, {}), similarity.get(key, {}), merged.get(key, {})):
            row.update({k: v for k, v in source.items() if k not in grid.CELL_KEYS and k not in row})
        row["sharpness_median"] = float(np.median(sharp[key])) if key in sharp else np.nan
        rows.append(row)
    return rows


def draw_figures(run: rundir.RunDir, summary: list[dict], members: list[dict]) -> list[tuple[str, str]]:
    """Draw every figure into figures/; returns (file name, one-line caption) pairs."""
    head = figure_head(summary)
    cells = figures.Cells([r for r in summary if head is None or r["head"] == head])
    curves = run.read_npz(rundir.CURVES)
    similarity = run.read_npz(rundir.SIMILARITY_ARRAYS)
    drawn = {
        "phase_diagram.png": figures.phase_diagram(cells),
        "sources.png": figures.sources(summary),
        "barrier_vs_pretraining.png": figures.barrier_vs_pretraining(cells),
        "aligned_barrier.png": figures.aligned_barrier(cells),
        "interpolation_curves.png": figures.interpolation_curves(cells, run.read_csv(rundir.PAIRS), curves),
        "basins.png": figures.basins(cells, members, run.read_csv(rundir.SIMILARITY), similarity),
        "soup_gain.png": figures.soup_gain(cells),
        "ood_spread.png": figures.ood_spread(cells),
    }
    if run.exists(rundir.SHARPNESS) and run.read_csv(rundir.SHARPNESS):
        drawn["sharpness.png"] = figures_trends.sharpness(
            [r for r in run.read_csv(rundir.SHARPNESS) if head is None or r["head"] == head],
            run.read_csv(rundir.START_SHARPNESS))
    if run.exists(rundir.LAYERWISE_SUMMARY):
        layer_rows = [r for r in run.read_csv(rundir.LAYERWISE_SUMMARY) if head is None or r["head"] == head]
        drawn["layerwise.png"] = figures_trends.layerwise(layer_rows)
    if run.exists(rundir.FINETUNE_CURVES):
        drawn["training_curves.png"] = figures_trends.training_curves(
            [m for m in members if head is None or m["head"] == head], run.read_npz(rundir.FINETUNE_CURVES))
    critical = run.read_csv(rundir.CRITICAL)
    if len({r["lr"] for r in members}) > 1 and critical:
        steps = [r for r in run.read_csv(rundir.STEP_SUMMARY) if head is None or r["head"] == head]
        first = {k: critical[0][k] for k in noreturn.START_KEYS if k not in ("pretrain_step", "head")}
        shown = [r for r in critical if (head is None or r["head"] == head) and all(r[k] == v for k, v in first.items())]
        drawn = {"critical_rate.png": figures_trends.critical_rate(shown),
                 "barrier_vs_finetune_steps.png": figures_trends.barrier_vs_finetune_steps(steps), **drawn}
    out = []
    for name, result in drawn.items():
        if result is not None:  # a figure with nothing to show (no alignment, no basin structure) is left out
            fig, caption = result
            run.write_figure(name, figures.png(fig))
            out.append((name, caption))
    return out


# --------------------------------------------------------------------------------------------- the page


def _unusable(round_row: dict) -> str:
    """How many of a round's members diverged or are unfit, when any did (those rates bracket the trainability edge;
    every one of them: the round adds members but no pairs)."""
    count, total = round_row.get("unusable") or 0, round_row["members"]
    if not count:
        return ""
    return f"{'all' if count == total else count} diverged or unfit{' — no pairs' if count == total else ''}, "


def _refinement(run: rundir.RunDir) -> str:
    """What the refinement rounds (jaxlmc.refine) added to the grid's rates, and why."""
    rounds = run.read_csv(rundir.REFINE_ROUNDS) if run.exists(rundir.REFINE_ROUNDS) else []
    if not rounds:
        return ""
    items = "".join(f"<li>round {r['round']}: rates {html.escape(r['lrs'])} ({r['members']} members, "
                    f"{_unusable(r)}{r['seconds']:.0f} s) — {html.escape(r['reasons'])}</li>" for r in rounds)
    return ("<p>The brackets above include the refinement rounds' rates: each round added, for every start, the "
            f"log-midpoint of every bracket wider than ×{stats.BRACKET_FACTOR:g} (<code>refine/rounds.csv</code>):"
            f"</p><ul>{items}</ul>")


def headline(run: rundir.RunDir) -> list[tuple[str, list[str]]]:
    """The answers a researcher looks for first: the study's hypotheses (docs/science.md) one by one (jaxlmc.verdicts)."""
    return verdicts.answer(run)


# The head policy the figures show when the grid varies it: the first of these present (data order alone first).
FIGURE_HEADS = ("shared", "probe", "zero", "per_seed")


def figure_head(summary: list[dict]) -> str | None:
    heads = {r.get("head") for r in summary}
    return next((h for h in FIGURE_HEADS if h in heads), None) if len(heads) > 1 else None


def summary_table(summary: list[dict] = ()) -> list[tuple[str, str]]:
    """The report's summary columns (key, header): the headline barrier the verdicts use (jaxlmc.decide) with its
    excess, interval, minimum detectable excess and verdict, then the endpoint-mean form, every registered pair
    measure's barrier, the barrier to the start with its verdict, and the cell's accuracies."""
    head = decide.headline_measure(summary and [{k[:-len("_mean")]: 0 for k in summary[0] if k.endswith("_mean")}])
    head = head or "error_barrier_test_lin"
    endpoint = head.replace("_lin", "")
    return [("pretrain_step", "pretrain"), ("lr", "LR"), ("head", "head"), ("members_used", "n"),
            ("unfit", "unfit"), ("diverged", "div"),
            (f"{head}_mean", "barrier"), (f"{head}_excess_mean", "excess"), (f"{head}_excess_ci_lo", "CI lo"),
            (f"{head}_excess_ci_hi", "CI hi"), (f"{head}_ci_hi", "barrier CI hi"),
            (f"{head}_excess_min_detectable", "detectable"), ("verdict", "verdict"),
            (f"{endpoint}_mean", "endpoint-mean"),
            *[(f"error_barrier_test{m.suffix}_mean", m.label) for m in PAIR_MEASURES.values()
              if m.suffix not in ("", "_aligned")],
            ("loss_barrier_test_mean", "loss barrier"), ("error_barrier_ood_mean", "OOD err barrier"),
            ("start_error_barrier_test_lin_mean", "to start"), ("start_error_barrier_test_lin_excess_mean", "excess"),
            ("start_verdict", "verdict"),
            ("basins", "basins"), ("best_test_acc", "best"), ("uniform_test_acc", "uniform soup"),
            ("greedy_test_acc", "greedy soup"), ("ensemble_test_acc", "ensemble"), ("ood_acc_std", "OOD std"),
            ("disagreement_test", "disagree"), ("cka_mean", "CKA"), ("sharpness_median", "sharpness")]


MERGE_TABLE = [("pretrain_step", "pretrain"), ("lr", "LR"), ("head", "head"), ("members_used", "n"),
               ("update_cos", "update cos"), ("best_test_acc", "best member"), ("uniform_test_acc", "uniform soup"),
               ("task_arithmetic_scale", "TA λ"), ("task_arithmetic_test_acc", "task arithmetic"),
               ("ties_density", "TIES density"), ("ties_scale", "TIES λ"), ("ties_test_acc", "TIES"),
               ("model_stock_t", "Model Stock t"), ("model_stock_test_acc", "Model Stock"),
               ("task_arithmetic_ood_acc", "TA OOD"), ("ties_ood_acc", "TIES OOD"),
               ("model_stock_ood_acc", "Model Stock OOD")]


CRITICAL_TABLE = [("pretrain_step", "pretrain"), ("head", "head"), ("finetune_step", "FT steps"),
                  ("stay_lr", "stays at"), ("stay_p", "adj. p"), ("leave_lr", "leaves from"),
                  ("leave_p", "adj. p"), ("rates_unresolved", "not resolved"), ("seeds_leave_lr", "seeds leave from"),
                  ("start_leave_lr", "start left from"), ("train_leave_lr", "train set: leave from"),
                  ("highest_trained_lr", "highest trained"), ("failing_lr", "fails from"),
                  ("probe_test_acc", "probe acc"), ("best_test_acc", "best acc"),
                  ("members_used", "n"), ("unfit", "unfit"), ("diverged", "div")]


def _fmt(key, value) -> str:
    if value is None:
        return "–"
    if key == "pretrain_step":
        return step_label(int(value))
    if isinstance(value, float):
        if key.endswith("_lr") and np.isinf(value):
            return "none" if value > 0 else "below grid"
        if key.endswith("_lr") and value == 0:
            return "below grid"
        if not np.isfinite(value):
            return "–"
        return f"{value:.3g}" if key.endswith("_lr") else f"{value:g}" if key == "lr" else f"{value:.3f}" if abs(value) < 100 else f"{value:.0f}"
    return html.escape(str(value))


def table_html(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for _, h in columns)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(k, r.get(k, ''))}</td>" for k, _ in columns) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def figure_html(run: rundir.RunDir, name: str, caption: str) -> str:
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
    if not os.path.isdir(run.root):
        raise ConfigError(f"{out} {'is not a directory' if os.path.lexists(run.root) else 'does not exist'}: "
                          "give the run directory of a finished `jaxlmc study`")
    needed = [rundir.CONFIG, rundir.MEMBERS] + [name for stage in stages[:-1] for name in stage.writes]
    missing = [getattr(name, "path", name) for name in needed if not run.exists(name)]
    if missing:
        raise ConfigError(f"{out} lacks {', '.join(missing)}: run `jaxlmc study` on it first")
    provenance = run.read_json(rundir.CONFIG)
    members = run.read_csv(rundir.MEMBERS)
    summary = build_summary(run)
    run.write_csv(rundir.SUMMARY, summary)
    run.write_csv(rundir.CRITICAL, noreturn.analyse(run)[0])
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
        "<h2>Answer</h2><p>Every interval is 95 % over seeds (the independent units; pairs share members): Student-t "
        "over the leave-one-seed-out jackknife for the basin verdicts, H1/H2 and H3, the member bootstrap for H4; "
        "a difference is stated only when its (adjusted) test rejects. How to read each number and figure: "
        "<code>docs/science.md</code> in the jaxlmc repository.</p>"
        + "".join(f"<h3>{html.escape(q)}</h3><ul>" + "".join(f"<li>{html.escape(s)}</li>" for s in lines) + "</ul>"
                  for q, lines in headline(run))
        + (f"<p>The figures show the <code>{html.escape(figure_head(summary))}</code>-head cells (the grid's "
           "other head policies are in the table and in sources.png).</p>" if figure_head(summary) else ""),
        "<h2>Figures</h2>",
    ]
    parts += [figure_html(run, name, caption) for name, caption in drawn]
    parts += ["<h2>Per cell</h2><p>Test error barriers, linear-baseline form (after weight matching when measured), "
              "between seeds and to the probed start (the starting body with a linear-probe head): the mean barrier, "
              "its excess over the noise's null mean with the excess's 95 % interval over seeds, the barrier's upper "
              "end (one basin when below the margin), the excess the cell could detect at 80 % power, and the verdict "
              "(jaxlmc.decide; p-values of all cells adjusted together). The endpoint-mean form is shown beside it. "
              "Members left out as unfit or diverged are counted; accuracies on the test set; every column in "
              "<code>summary.csv</code>.</p>",
              table_html(summary, summary_table(summary))]
    if any("task_arithmetic_test_acc" in r for r in summary):
        parts += ["<h2>Merges</h2><p>Per cell, beside the best member and the uniform soup: task arithmetic (Ilharco "
                  "et al. 2023), TIES-Merging (Yadav et al. 2023) and Model Stock (Jang et al. 2024) of the cell's "
                  "used members, each relative to the members' start, with its hyperparameters chosen on the "
                  "validation split alone; test and OOD accuracy. <em>update cos</em>: the mean cosine between the "
                  "members' fine-tuning updates, Model Stock's same-basin diagnostic. Every column in "
                  "<code>merges.csv</code>.</p>", table_html(summary, MERGE_TABLE)]
    critical = run.read_csv(rundir.CRITICAL)
    if critical and len({m["lr"] for m in members}) > 1:
        parts += ["<h2>Critical learning rate</h2><p>Per start and fine-tuning length, each rate judged by the rule "
                  "of the cell verdicts (jaxlmc.decide): it leaves when the seeds are shown separate from each other "
                  "or from their probed start, stays when both are shown within the margin, else is not resolved "
                  "(p-values of every rate adjusted together). The bracket: the highest rate shown to stay below the "
                  "lowest shown to leave (\"none\": no rate is shown to leave; \"–\": none below is shown to stay), "
                  "each with its adjusted p-value, and the rates not resolved; the same from each barrier alone and "
                  "on the training set; the highest rate that trains and the lowest from which at least half the "
                  "members fail (diverge or do not fit); the start's probed and best fine-tuned test accuracy "
                  "(transfer); members left out as diverged or unfit are counted. Brackets wider than "
                  f"×{stats.BRACKET_FACTOR:g} are refined when the study asks. Every column in "
                  "<code>critical.csv</code>.</p>",
                  table_html(critical, CRITICAL_TABLE), _refinement(run)]
    if pretrain_rows:
        parts += ["<h2>Pretraining checkpoints</h2>",
                  table_html(pretrain_rows, [("step", "step"), ("train_loss", "train loss"), ("train_acc", "train acc"),
                                         ("test_loss", "test loss"), ("test_acc", "test acc")])]
        if run.exists(rundir.BASELINES):
            parts += ["<p>A language model must beat these: unigram and bigram models counted on the pretraining "
                      "task's training split (add-one smoothed), per-token test loss (nats) and accuracy.</p>",
                      table_html(run.read_csv(rundir.BASELINES), [("model", "baseline"), ("test_loss", "test loss"),
                                                              ("test_acc", "test acc")])]
    parts += ["<h2>Provenance</h2><p>The run directory's config (training sections; <code>config.json</code>), "
              "library versions and devices, then the settings each measuring stage ran with "
              "(<code>stages/*.json</code>).</p><pre>" + html.escape(json.dumps(provenance, indent=2)) + "</pre><pre>"
              + html.escape(json.dumps(stage_settings, indent=2)) + "</pre>",
              "</body></html>"]
    return run.write_text(rundir.REPORT, "\n".join(parts))
