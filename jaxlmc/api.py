"""The importable API: what the `jaxlmc` command does, as functions a script, a notebook or a test calls directly.

    pretrain(cfg, out)            pretraining checkpoints                         (jaxlmc.pretraining)
    finetune(cfg, out)            the member grid, in one compiled program        (jaxlmc.finetuning)
    barriers_of_run(cfg, out)     barriers between members and to their starts    (jaxlmc.barrier_stage)
    soups_of_run(cfg, out)        soups, ensembles, best and mean member          (jaxlmc.soups)
    similarity_of_run(cfg, out)   accuracy spread, disagreement, CKA, basins      (jaxlmc.similarity)
    study(cfg, out)               all of the above, resumable, and the report     (jaxlmc.study)
    render_report(out)            the report of a finished study                  (jaxlmc.report)
    compare_runs(a, b)            which verdicts two studies (a replicate) share  (jaxlmc.verdicts)
    config_differences(a, b)      the settings two studies differ in, beyond their seeds
    plan_run(out, target)         the designs that reach a minimum detectable barrier, from a pilot (jaxlmc.planner)
    verdicts(run)                 the report's answers, hypothesis by hypothesis (jaxlmc.verdicts)

`out` is a run directory (jaxlmc.rundir owns its layout); a config comes from jaxlmc.config.load, and a run
directory's own from RunDir(out).config(). Training functions take an optional `progress` (jaxlmc.loop.Progress).
"""
from __future__ import annotations

import numpy as np

from jaxlmc import report, rundir
from jaxlmc import decide as _decide
from jaxlmc import planner as _planner
from jaxlmc import verdicts as _verdicts
from jaxlmc.config import ConfigError
from jaxlmc.finetuning import finetune, load_member, start_params
from jaxlmc.barrier_stage import barriers_of_run, load_run
from jaxlmc.pretraining import pretrain
from jaxlmc.rundir import RunDir
from jaxlmc.similarity import similarity_of_run
from jaxlmc.soups import soups_of_run
from jaxlmc.study import STAGES, study
from jaxlmc.tasks import Task, load_finetune_task, load_pretrain_task

__all__ = ["STAGES", "RunDir", "Task", "barriers_of_run", "finetune", "load_finetune_task", "load_member",
           "load_pretrain_task", "load_run", "pretrain", "render_report", "compare_runs", "config_differences",
           "verdicts",
           "similarity_of_run", "soups_of_run",
           "start_params", "study"]


def render_report(out: str) -> str:
    """Re-render report.html, figures/ and summary.csv of a finished study; returns the report's path."""
    return report.render(out, list(STAGES.values()))


def compare_runs(a: str, b: str) -> list[dict]:
    """The verdicts of two finished studies side by side (verdicts.compare): one row per verdict either states, with
    "agree". A replicate (the same config, another finetune.seed_offset and pretrain.seed) tells which verdicts are
    stable enough to be headlines."""
    for out in (a, b):
        run = RunDir(out)
        if not run.exists(rundir.SUMMARY):
            raise ConfigError(f"{out} holds no finished study (no summary.csv): run `jaxlmc study` on it first")
    return _verdicts.compare(RunDir(a), RunDir(b))


def plan_run(out: str, target: float, quantile: float = 0.5) -> tuple[dict, list[dict]]:
    """A design planner on a finished (pilot) study (jaxlmc.planner): ({"cells", "seeds", "pairs", "measured",
    "predicted"}: the pilot's design with the `quantile` over cells of its measured and predicted minimum detectable
    excess), and every candidate design with its predicted minimum detectable excess and cost, those reaching
    `target` first."""
    run = RunDir(out)
    if not run.exists(rundir.PAIRS):
        raise ConfigError(f"{out} has no barriers/pairs.csv: run `jaxlmc study` or `jaxlmc barriers` on it first")
    if not 0 < target < 1 or not 0 < quantile <= 1:
        raise ConfigError(f"plan: --mde must lie in (0, 1) and --quantile in (0, 1], got {target} and {quantile}")
    cfg = run.config([])
    members, pairs = run.read_csv(rundir.MEMBERS), run.read_csv(rundir.PAIRS)
    try:
        found = _planner.run_components(members, pairs)
    except ValueError as err:
        raise ConfigError(f"{out}: {err}") from None
    if not found:
        raise ConfigError(f"{out}: no cell has more within-cell pairs than seeds: its variance components cannot be "
                          "separated")
    summary = run.read_csv(rundir.BARRIER_SUMMARY)
    measure = _decide.headline_measure(pairs)
    measured = [r.get(f"{measure}_excess_min_detectable", float("nan")) for r in summary]
    seeds = cfg.finetune.seeds
    degree = max(2 * len([p for p in pairs if p["same_cell"]]) // (len(found) * seeds), 1)
    pilot = {"cells": len(found), "seeds": seeds, "pairs": cfg.barriers.pairs,
             "measured": float(np.nanquantile(measured, quantile)),
             "predicted": float(np.quantile([c.min_detectable(seeds, degree) for c in found.values()], quantile))}
    return pilot, _planner.plan(found, target, cfg.finetune.steps, cfg.barriers.alphas, quantile)


# What a replicate changes (its seed stream) and where its data lie: not differences between two studies' designs.
_REPLICATE_KEYS = {("finetune", "seed_offset"), ("pretrain", "seed"), ("data", "data_dir")}


def config_differences(a: str, b: str) -> list[str]:
    """The settings ("section.key") in which two run directories' configs differ, beyond what a replicate changes
    (finetune.seed_offset, pretrain.seed) and where the data lie: a comparison of verdicts across them compares
    designs, not seeds."""
    configs = [RunDir(out).read_json(rundir.CONFIG)["config"] for out in (a, b)]
    keys = sorted({(s, k) for c in configs for s, section in c.items() if isinstance(section, dict) for k in section})
    return [f"{s}.{k}" for s, k in keys if (s, k) not in _REPLICATE_KEYS
            and configs[0].get(s, {}).get(k) != configs[1].get(s, {}).get(k)]


def verdicts(run: RunDir) -> list[tuple[str, list[str]]]:
    """The report's answers for a finished study: (question, sentences) per hypothesis it can speak to."""
    return _verdicts.answer(run)
