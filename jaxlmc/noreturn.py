"""The point-of-no-return analysis (BRIEF §1, hypothesis 3): how much pretraining leaves fine-tuning unable to leave
the basin, whatever its learning rate?

Read from the barrier stage's tables at every kept fine-tuning step (rundir.BY_STEP). A *start* is a pretraining
checkpoint with every other cell axis but the rate (head policy, weight decay, …); per start and fine-tuning length:

* **Left the basin** at a rate: the seeds' test error barrier (naive, endpoint-mean: the question is whether they stay
  linearly connected as they are) *and* the barrier to the probed start both exceed their noise floors on average —
  the statistic is min(mean seeds' excess, mean to-start excess) over the rate's usable members, so either staying
  below its floor counts as staying. A rate with fewer than stats.MIN_MEMBERS usable members has no value and is
  skipped: unfit and diverged members are never counted as leaving.
* **Critical rate**: where that statistic first crosses 0, walking the rates upward, interpolated on the log-rate
  axis (stats.crossing); its 95 % CI is the same crossing in each member-bootstrap replicate (one set of seed draws
  for every rate, start and length). +inf: no rate that trains leaves; −inf (0 in the table): even the lowest leaves.
* **Failing rate**: the lowest rate from which on every rate has at least half its members diverged or unfit: where
  training stops working as the rate grows, the reference the critical rate is read against. (A rate too small to fit
  in few steps is unfit too, but that is not where training stops working.)
* **Point of no return**: the first checkpoint from which on every checkpoint's critical rate is +inf — every rate
  that trains at all stays in the basin. Its CI is over the same replicates (the first such checkpoint in each).
"""
from __future__ import annotations

import numpy as np

from jaxlmc import grid, rundir, stats
from jaxlmc.figures import step_label

START_KEYS = tuple(k for k in grid.CELL_KEYS if k != "lr")  # what a start is: the cell but its rate
MEASURE = "error_barrier_test"  # naive test error barrier, endpoint-mean form; with its _floor column


def has_steps(run: rundir.RunDir) -> bool:
    return all(run.exists(t) for t in rundir.BY_STEP)


def _excess(rows: list[dict], column: str) -> list[dict]:
    return [{**r, "excess": r[column] - r.get(f"{column}_floor", np.nan)} for r in rows]


def _start(cell: tuple) -> tuple:
    return tuple(v for k, v in zip(grid.CELL_KEYS, cell) if k != "lr")


def analyse(run: rundir.RunDir) -> tuple[list[dict], dict]:
    """`analyse_tables` of a run directory's barriers/by_step/ tables."""
    return analyse_tables(run.read_csv(rundir.STEP_MEMBERS), run.read_csv(rundir.STEP_PAIRS),
                          run.read_csv(rundir.STEP_TO_START))


def analyse_tables(members: list[dict], pairs: list[dict], to_start: list[dict]) -> tuple[list[dict], dict]:
    """(rows, replicates): one CRITICAL row per start × fine-tuning length, and {(start, step): crossings_R} (log10
    rates; ±inf outside the grid, NaN without any value) for the point of no return's interval. The tables are the
    by-step members, pairs and to-start rows (each with a finetune_step)."""
    num_seeds = max(m["seed"] for m in members) + 1
    draws = stats.seed_draws(num_seeds, stats.RESAMPLES)
    rows, replicates = [], {}
    for step in sorted({m["finetune_step"] for m in members}):
        at = sorted((m for m in members if m["finetune_step"] == step), key=lambda m: m["member"])
        used = {m["member"] for m in at if grid.usable(m)}  # unfit or diverged members never count as leaving
        seeds = stats.pair_cells(at, _excess([p for p in pairs if p["finetune_step"] == step and p["i"] in used
                                              and p["j"] in used], MEASURE), "excess", num_seeds, draws)
        start = stats.member_cells(_excess([s for s in to_start if s["finetune_step"] == step and s["member"] in used],
                                           MEASURE), "excess", num_seeds, draws)
        groups = grid.cell_groups(at)
        for key in dict.fromkeys(_start(c) for c in groups):
            cells = sorted((c for c in groups if _start(c) == key), key=lambda c: c[grid.CELL_KEYS.index("lr")])
            lrs = np.array([c[grid.CELL_KEYS.index("lr")] for c in cells])
            usable = np.array([sum(m in used for m in groups[c]) for c in cells])
            total = np.array([len(groups[c]) for c in cells])

            values = [_combined(seeds, start, c, len(draws)) for c in cells]
            excess_L = np.array([v[0] for v in values])
            reps_LxR = np.stack([v[1] for v in values])
            rate, lo, hi = stats.critical_rate(lrs, excess_L, reps_LxR)
            replicates[(key, step)] = stats.crossing_replicates(lrs, reps_LxR)
            # Training fails from the lowest rate above which every rate fails (at least half its members diverged
            # or unfit): the upper edge of trainability. Too small a rate can be unfit too (too few steps to fit);
            # that is not where training stops working.
            fails = usable < total / 2
            failing = lrs[[bool(fails[k:].all()) for k in range(len(lrs))]]
            trained = lrs[usable >= stats.MIN_MEMBERS]
            rows.append({
                **dict(zip(START_KEYS, key)), "finetune_step": step,
                "critical_lr": rate, "critical_lr_ci_lo": lo, "critical_lr_ci_hi": hi,
                "seeds_critical_lr": _crossing_rate(lrs, [seeds[0].get(c, np.nan) if u >= stats.MIN_MEMBERS
                                                          else np.nan for c, u in zip(cells, usable)]),
                "start_critical_lr": _crossing_rate(lrs, [start[0].get(c, np.nan) if u >= stats.MIN_MEMBERS
                                                          else np.nan for c, u in zip(cells, usable)]),
                "failing_lr": float(failing.min()) if failing.size else np.inf,
                "highest_trained_lr": float(trained.max()) if trained.size else np.nan,
                "lowest_lr": float(lrs.min()), "highest_lr": float(lrs.max()), "rates": float(len(lrs)),
                "members": float(total.sum()), "members_used": float(usable.sum()),
                "diverged": float(sum(at[m]["diverged"] for c in cells for m in groups[c])),
                "unfit": float(sum(bool(at[m].get("unfit")) for c in cells for m in groups[c])),
            })
    return rows, replicates


def _combined(seeds: tuple, start: tuple, cell: tuple, num_draws: int) -> tuple[float, np.ndarray]:
    """(point, replicates_R) of min(seeds' excess, to-start excess) in a cell; NaN point without any replicate."""
    point = float(np.minimum(seeds[0].get(cell, np.nan), start[0].get(cell, np.nan)))  # NaN when either is missing
    reps = np.minimum(seeds[1].get(cell, np.full(num_draws, np.nan)), start[1].get(cell, np.full(num_draws, np.nan)))
    return (point, reps) if np.isfinite(reps).any() else (np.nan, reps)


def _crossing_rate(lrs, points) -> float:
    return float(10 ** stats.crossing(np.log10(lrs), points))


def _first_staying(stays: np.ndarray) -> int:
    """The first index from which on every entry is True (len when the last is False)."""
    index = len(stays)
    while index > 0 and stays[index - 1]:
        index -= 1
    return index


def _rate(value: float) -> str:
    return "below the grid" if value == 0 else "none" if value == np.inf else f"{value:.3g}"


def _interval(lo: float, hi: float) -> str:
    if np.isnan(lo) or np.isnan(hi):
        return "no CI"
    return f"95 % CI {_rate(lo)} – {_rate(hi)}"


def verdicts(rows: list[dict], replicates: dict) -> list[str]:
    """Per other-axes combination and fine-tuning length (longest first): the critical-rate curve over the pretrained
    checkpoints, then whether it keeps rising, saturates, or meets the failing rate — a point of no return, named with
    its CI, or "not resolved"."""
    lines = []
    others = list(dict.fromkeys(tuple(r[k] for k in START_KEYS if k != "pretrain_step") for r in rows))
    varied = [k for k in START_KEYS if k != "pretrain_step" and len({r[k] for r in rows}) > 1]
    for step in sorted({r["finetune_step"] for r in rows}, reverse=True):
        for other in others:
            where = dict(zip([k for k in START_KEYS if k != "pretrain_step"], other))
            chosen = sorted((r for r in rows if r["finetune_step"] == step and r["pretrain_step"] >= 0
                             and all(r[k] == v for k, v in where.items())), key=lambda r: r["pretrain_step"])
            if not chosen:
                continue
            label = f"{step} fine-tuning steps" + "".join(f", {k} {where[k]}" for k in varied)
            line = _one_length(label, chosen, [replicates[(_key(r), step)] for r in chosen])
            scratch = [r for r in rows if r["finetune_step"] == step and r["pretrain_step"] < 0
                       and all(r[k] == v for k, v in where.items())]
            if scratch:  # the positive control: seeds from their own initialisations must register as leaving
                r = scratch[0]
                line += (f" Control (scratch: every seed its own initialisation): critical LR {_rate(r['critical_lr'])} "
                         f"({_interval(r['critical_lr_ci_lo'], r['critical_lr_ci_hi'])})" +
                         (" — the detector sees separate basins where they must be." if r["critical_lr"] == 0 else
                          " — separate initialisations do not register as leaving at every rate: read the verdict "
                          "with care."))
            lines.append(line)
    return lines


def _key(row: dict) -> tuple:
    return tuple(row[k] for k in START_KEYS)


def _one_length(label: str, chosen: list[dict], reps: list[np.ndarray]) -> str:
    curve = "; ".join(f"step {step_label(r['pretrain_step'])} {_rate(r['critical_lr'])} "
                      f"({_interval(r['critical_lr_ci_lo'], r['critical_lr_ci_hi'])}, fails from "
                      f"{_rate(r['failing_lr'])})" for r in chosen)
    text = f"{label}: critical LR by checkpoint: {curve}. "
    steps = [r["pretrain_step"] for r in chosen]
    stays = np.array([r["critical_lr"] == np.inf and np.isfinite(r["highest_trained_lr"]) for r in chosen])
    stays_RxC = np.stack([np.isposinf(x) for x in reps], axis=1)
    point = _first_staying(stays)
    if point < len(chosen):
        per_replicate = np.array([_first_staying(s) for s in stays_RxC])
        lo, hi = np.quantile(per_replicate, [(1 - stats.LEVEL) / 2, (1 + stats.LEVEL) / 2], method="nearest")
        where = f"step {steps[point]} (95 % CI: step {steps[lo]} – " + (
            f"step {steps[hi]})" if hi < len(chosen) else "beyond the last checkpoint)")
        if hi < len(chosen) and point == 0:
            return text + (f"Every checkpoint, the first (step {steps[0]}) included, stays in the basin at every rate "
                           "that trains: fine-tuning never leaves, so the grid places no point of no return — it lies "
                           f"at or before step {steps[0]}" + (" (the random initialisation: stable from the start, as "
                                                              "Frankle et al. 2020 found for small MNIST networks)"
                                                              if steps[0] == 0 else "") + ".")
        if hi < len(chosen):
            return text + (f"Point of no return: from {where} on, every rate that trains at all (up to "
                           f"{_rate(chosen[-1]['highest_trained_lr'])}) stays in the basin" +
                           (f"; but the CI reaches the first checkpoint (step {steps[0]}), so the grid cannot tell it "
                            "from no pretraining at all." if lo == 0 else "."))
        return text + (f"From {where} on, no rate that trains leaves the basin in this run, but in the bootstrap the "
                       "boundary may lie past the last checkpoint: the point of no return is not resolved.")
    finite = [i for i, r in enumerate(chosen) if 0 < r["critical_lr"] < np.inf]
    last = chosen[-1]
    if 0 < last["critical_lr"] < np.inf:
        tail = (f"At the last checkpoint (step {steps[-1]}) seeds still leave the basin from LR "
                f"{_rate(last['critical_lr'])}, " + ("while every rate in the grid trains" if last["failing_lr"] == np.inf
                                                     else f"below the rate {_rate(last['failing_lr'])} from which "
                                                     "training fails") + ": no point of no return within the grid")
    else:
        tail = f"At the last checkpoint (step {steps[-1]}) the critical LR is {_rate(last['critical_lr'])}"
    if len(finite) < 2:
        return text + tail + "; too few checkpoints with a critical rate inside the grid to tell a trend (not resolved)."
    first, final = finite[0], finite[-1]
    rise, rise_lo, rise_hi = _log_change(chosen, reps, first, final)
    word = {1: "rises", -1: "falls", 0: "changes by an amount not resolved"}[stats.sign(rise_lo, rise_hi)]
    trend = (f"From step {steps[first]} to step {steps[final]} the critical LR {word} (×{10 ** rise:.3g}, 95 % CI "
             f"×{10 ** rise_lo:.3g} – ×{10 ** rise_hi:.3g})")
    if stats.sign(rise_lo, rise_hi) == 1 and final > first + 1:
        last_rise, last_lo, last_hi = _log_change(chosen, reps, final - 1, final)
        if stats.sign(last_lo, last_hi) == 1:
            trend += f" and keeps rising to the last one (×{10 ** last_rise:.3g} from step {steps[final - 1]})"
        else:
            trend += (f" and saturates: from step {steps[final - 1]} to step {steps[final]} its change is not "
                      f"resolved (×{10 ** last_lo:.3g} – ×{10 ** last_hi:.3g})")
    return text + trend + ". " + tail + "."


def _log_change(chosen, reps, a: int, b: int) -> tuple[float, float, float]:
    """log10 change of the critical rate from checkpoint a to b: point and member-bootstrap CI (replicates whose
    crossing lies outside the grid at either end are kept as ±inf; undefined differences are dropped)."""
    with np.errstate(divide="ignore", invalid="ignore"):  # a crossing below the grid (0) is a change of ±inf
        point = np.log10(chosen[b]["critical_lr"]) - np.log10(chosen[a]["critical_lr"])
        diff = reps[b] - reps[a]
    diff = diff[~np.isnan(diff)]
    if diff.size < 2:
        return point, np.nan, np.nan
    lo, hi = np.quantile(diff, [(1 - stats.LEVEL) / 2, (1 + stats.LEVEL) / 2], method="nearest")
    return point, float(lo), float(hi)
