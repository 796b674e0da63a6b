"""Refining the learning-rate grid where its brackets are too wide to say where a boundary lies.

A bracket — the highest rate that stays and the lowest that leaves (stats.bracket; for the combined statistic, seeds
and start judged separately, and the train-set barriers), or the highest rate that trains and the lowest from which
every rate fails (the trainability edge) — wider than stats.BRACKET_FACTOR says only that the boundary lies somewhere
inside it. Each round adds the log-midpoint of every such bracket at the last fine-tuning step. The new rates are
trained for every start (every pretraining checkpoint, the scratch row, every head policy and seed: the grid of the
new rates, in one compiled program) in the round's own run directory, refine/round<k>/, measured like the grid, and
their members join the grid's in the critical-rate analysis (rundir.RunDir.step_tables). Bisection halves a bracket's
log-width each round: a decade comes within ×1.5 in three rounds.

A finished round has its marker; a killed one resumes from its fine-tuning checkpoints. A round whose rates no longer
follow from the rounds before (the grid was measured again) is removed with every round after it and run afresh.
"""
from __future__ import annotations

import dataclasses
import math
import time

import numpy as np

from jaxlmc import barrier_stage, finetuning, loop, noreturn, rundir, stats
from jaxlmc.config import Config

# The brackets refined: (column prefix in critical.csv, its short name): the combined statistic, the seeds' and the
# start's barriers alone, and the combined statistic on the training set.
BRACKETS = (("", "combined"), ("seeds_", "seeds"), ("start_", "start"), ("train_", "train"))


def midpoint(low: float, high: float) -> float:
    """The geometric mean of two rates, to three significant digits (a rate one can write in a config)."""
    return float(f"{math.sqrt(low * high):.3g}")


def wide(low: float, high: float, factor: float) -> bool:
    return bool(np.isfinite(low) and np.isfinite(high) and 0 < low < high and high / low > factor)


def proposals(critical_rows: list[dict], factor: float = stats.BRACKET_FACTOR) -> dict[float, list[str]]:
    """{new rate: [why, …]}: the log-midpoint of every bracket wider than `factor` in `critical_rows` (critical.csv's
    rows; only those at the last fine-tuning step count), over every start; a reason reads "step 0 shared: 0.001 →
    0.01 (combined, seeds)", naming the brackets with those ends ("trainability": trains → fails)."""
    if not critical_rows:
        return {}
    last = max(r["finetune_step"] for r in critical_rows)
    found: dict[float, dict[tuple, list[str]]] = {}
    for row in (r for r in critical_rows if r["finetune_step"] == last):
        start = f"{noreturn.start_label(row['pretrain_step'])} {row['head']}"
        ends = [(row[f"{prefix}stay_lr"], row[f"{prefix}leave_lr"], name) for prefix, name in BRACKETS]
        ends.append((row["trains_lr"], row["failing_lr"], "trainability"))
        for low, high, name in ends:
            if wide(low, high, factor):
                found.setdefault(midpoint(low, high), {}).setdefault((start, low, high), []).append(name)
    return {lr: [f"{start}: {low:g} → {high:g} ({', '.join(names)})" for (start, low, high), names in why.items()]
            for lr, why in sorted(found.items())}


def round_config(cfg: Config, lrs: list[float]) -> Config:
    """The config of a refinement round: the study's, at the new rates only, its pairs within cells (a pair file
    numbers the grid's members), without refinement or size axes of its own."""
    return dataclasses.replace(
        cfg, finetune=dataclasses.replace(cfg.finetune, lrs=list(lrs)),
        barriers=dataclasses.replace(cfg.barriers, pairs="within"),
        study=dataclasses.replace(cfg.study, refine_rounds=0, widths=[], depths=[], parametrizations=[]))


def refine_run(cfg: Config, out: str, progress: loop.Progress | None = None) -> list[dict]:
    """Run up to study.refine_rounds refinement rounds on the finished grid in `out` (its barriers measured); write
    refine/rounds.csv, one row per round that added rates. Returns those rows."""
    run = rundir.RunDir(out)
    run.remove_rounds_from(cfg.study.refine_rounds + 1)
    done: list[dict] = []
    for k in range(1, cfg.study.refine_rounds + 1):
        tables = run.step_tables(upto=k - 1)
        critical, _ = noreturn.analyse_tables(*tables)
        known = {m["lr"] for m in tables[0]}
        wanted = {lr: why for lr, why in proposals(critical).items() if lr not in known}
        if not wanted:
            run.remove_rounds_from(k)
            break
        lrs = sorted(wanted)
        one = run.refine_round(k)
        marker = one.read_marker(rundir.REFINE)
        if marker is None and one.exists(rundir.CONFIG):
            if one.read_json(rundir.CONFIG)["config"]["finetune"]["lrs"] != lrs:
                run.remove_rounds_from(k)
        elif marker is not None and marker["lrs"] != lrs:
            run.remove_rounds_from(k)
            marker = None
        if marker is None:
            marker = _train_round(cfg, run, one, lrs, wanted, progress)
        done.append({"round": k, "lrs": " ".join(f"{lr:g}" for lr in lrs), "reasons": "; ".join(
            f"{lr:g}: {', '.join(why)}" for lr, why in wanted.items()), "members": marker["members"],
                     "unusable": marker.get("unusable", 0), "seconds": marker["seconds"]})
    run.write_csv(rundir.REFINE_ROUNDS, done)
    return done


def _train_round(cfg: Config, run: rundir.RunDir, one: rundir.RunDir, lrs: list[float], wanted: dict,
                 progress: loop.Progress | None) -> dict:
    """Fine-tune and measure one round's members; write its marker last. Returns the marker."""
    started = time.perf_counter()
    one_cfg = round_config(cfg, lrs)
    run.share_pretraining(one)
    rows = finetuning.finetune(one_cfg, one.root, progress=progress)
    # (rates at which nothing trains are data: they bracket the trainability edge)
    barrier_stage.barriers_of_run(one_cfg, one.root, allow_unusable=True, progress=progress)
    marker = {"lrs": lrs, "reasons": {f"{lr:g}": why for lr, why in wanted.items()}, "members": len(rows),
              "unusable": sum(bool(r["diverged"] or r.get("unfit")) for r in rows),
              "seconds": time.perf_counter() - started}
    one.write_marker(rundir.REFINE, marker)
    return marker


def rounds_complete(cfg: Config, out: str) -> bool:
    """Every round refine/rounds.csv lists still has its marker (none was removed since)."""
    run = rundir.RunDir(out)
    listed = run.read_csv(rundir.REFINE_ROUNDS) if run.exists(rundir.REFINE_ROUNDS) else []
    return len(run.refined_rounds()) >= len(listed)
