"""The point-of-no-return analysis (docs/science.md, hypothesis 3): how much pretraining leaves fine-tuning unable to
leave the basin, whatever its learning rate — and whether the design could have seen it leave.

Read from the barrier stage's tables at every kept fine-tuning step (rundir.BY_STEP). A *start* is a pretraining
checkpoint with every other cell axis but the rate (head policy, weight decay, …); per start and fine-tuning length,
over the rates whose cell has at least stats.MIN_MEMBERS usable members (unfit and diverged members never count):

* **Seeds** leave each other at a rate when the mean excess of their test error barrier (endpoint-mean form: are they
  linearly connected as they are?) over its noise floor is above 0. **The start** is left when the mean excess of
  each member's barrier to its probed start, in the *linear-baseline* form, is above 0: the endpoint-mean form of a
  member against a much worse start is mostly half their accuracy difference, not a bump.
* **Left the basin**: either of the two is above 0 (the statistic is their maximum, per bootstrap replicate too), so
  a rate *stays* only when seeds stay together and with their start. Both are also reported on their own, and the
  same on the training set beside the test set.
* **Critical rate**: a bracket of grid rates [stay_lr, leave_lr] with the bootstrap support of each end
  (stats.bracket); interpolated to a number with a CI only inside a bracket at most stats.BRACKET_FACTOR wide.
* **Failing rate**: the lowest rate from which on every rate has at least half its members diverged or unfit; with
  the highest rate that trains it brackets the edge of trainability.
* **Transfer**: each start's probed accuracy (the frozen body with its linear probe) and its best fine-tuned accuracy
  (the rate with the highest mean test accuracy over usable members), against the controls' (scratch, step 0).
* **Point of no return**: named only where the design could have detected leaving (`_detectable`): the first
  checkpoint from which on every rate that trains stays, *and* at it (a) a rate within the bracket factor of the
  failing rate trains and stays, (b) an earlier start (scratch or step 0) leaves at or below that rate, and (c) the
  checkpoint's best fine-tuned accuracy exceeds the control's (member-bootstrap CI above 0). Otherwise the verdict
  says which condition failed.
"""
from __future__ import annotations

import numpy as np

from jaxlmc import grid, rundir, stats
from jaxlmc.figures import step_label

START_KEYS = tuple(k for k in grid.CELL_KEYS if k != "lr")  # what a start is: the cell but its rate
SEEDS_MEASURE = "error_barrier_{split}"  # between seeds: endpoint-mean form, with its _floor column
START_MEASURE = "error_barrier_{split}_lin"  # to the start: linear-baseline form, with its _floor column
BRACKETS = ("", "seeds_", "start_", "train_")  # column prefixes: combined test, seeds only, start only, combined train


def has_steps(run: rundir.RunDir) -> bool:
    return all(run.exists(t) for t in rundir.BY_STEP)


def _excess(rows: list[dict], column: str) -> list[dict]:
    return [{**r, "excess": r.get(column, np.nan) - r.get(f"{column}_floor", np.nan)} for r in rows]


def _start(cell: tuple) -> tuple:
    return tuple(v for k, v in zip(grid.CELL_KEYS, cell) if k != "lr")


def analyse(run: rundir.RunDir) -> tuple[list[dict], dict]:
    """`analyse_tables` of a run directory's barriers/by_step/ tables, with its refinement rounds' (jaxlmc.refine)."""
    return analyse_tables(*run.step_tables())


def analyse_tables(members: list[dict], pairs: list[dict], to_start: list[dict]) -> tuple[list[dict], dict]:
    """(rows, replicates): one CRITICAL row per start × fine-tuning length, and the bootstrap pieces the verdicts
    need: {(start, step): {"crossings": log10 crossings_R of the combined statistic (±inf outside the grid),
    "best_acc": replicates_R of the best fine-tuned mean test accuracy}}. The tables are the by-step members, pairs
    and to-start rows (each with a finetune_step)."""
    num_seeds = max(m["seed"] for m in members) + 1
    draws = stats.seed_draws(num_seeds, stats.RESAMPLES)
    rows, replicates = [], {}
    for step in sorted({m["finetune_step"] for m in members}):
        at = sorted((m for m in members if m["finetune_step"] == step), key=lambda m: m["member"])
        used = {m["member"] for m in at if grid.usable(m)}
        step_pairs = [p for p in pairs if p["finetune_step"] == step and p["i"] in used and p["j"] in used]
        step_starts = [s for s in to_start if s["finetune_step"] == step and s["member"] in used]
        measures = {}
        for split in ("test", "train"):
            measures[f"seeds_{split}"] = stats.pair_cells(at, _excess(step_pairs, SEEDS_MEASURE.format(split=split)),
                                                          "excess", num_seeds, draws)
            measures[f"start_{split}"] = stats.member_cells(_excess(step_starts, START_MEASURE.format(split=split)),
                                                            "excess", num_seeds, draws)
        accuracy = stats.member_cells([m for m in at if m["member"] in used], "test_acc", num_seeds, draws)
        probe = {}
        for s in step_starts:
            probe.setdefault(_start(grid.cell(s)), []).append(1 - s.get("start_error_test", np.nan))
        groups = grid.cell_groups(at)
        for key in dict.fromkeys(_start(c) for c in groups):
            cells = sorted((c for c in groups if _start(c) == key), key=lambda c: c[grid.CELL_KEYS.index("lr")])
            lrs = np.array([c[grid.CELL_KEYS.index("lr")] for c in cells])
            usable = np.array([sum(m in used for m in groups[c]) for c in cells])
            total = np.array([len(groups[c]) for c in cells])
            enough = usable >= stats.MIN_MEMBERS
            row = {**dict(zip(START_KEYS, key)), "finetune_step": step}
            for prefix, parts in (("", ("seeds_test", "start_test")), ("seeds_", ("seeds_test",)),
                                  ("start_", ("start_test",)), ("train_", ("seeds_train", "start_train"))):
                points_L, reps_LxR = _statistic([measures[p] for p in parts], cells, enough, len(draws))
                found = stats.bracket(lrs, points_L, reps_LxR)
                row.update({f"{prefix}{k}": v for k, v in found.items()
                            if prefix == "" or k in ("stay_lr", "leave_lr", "critical_lr")})
                if prefix == "":
                    crossings = stats.crossing_replicates(lrs, reps_LxR)
            # Training fails from the lowest rate above which every rate fails (at least half its members diverged
            # or unfit): the upper edge of trainability. Too small a rate can be unfit too (too few steps to fit);
            # that is not where training stops working.
            fails = usable < total / 2
            failing = lrs[[bool(fails[k:].all()) for k in range(len(lrs))]]
            trains_below = lrs[lrs < failing.min()] if failing.size else lrs[:0]
            trained = lrs[enough]
            best_points = [accuracy[0].get(c, np.nan) if e else np.nan for c, e in zip(cells, enough)]
            best = int(np.nanargmax(best_points)) if np.isfinite(best_points).any() else None
            replicates[(key, step)] = {
                "crossings": crossings,
                "best_acc": (accuracy[1][cells[best]] if best is not None else np.full(len(draws), np.nan))}
            row.update({
                "failing_lr": float(failing.min()) if failing.size else np.inf,
                # the trainability bracket's lower end: the highest rate below failing_lr (NaN: none fails, or all)
                "trains_lr": float(trains_below.max()) if trains_below.size else np.nan,
                "highest_trained_lr": float(trained.max()) if trained.size else np.nan,
                "probe_test_acc": float(np.nanmean(probe[key])) if key in probe else np.nan,
                "best_test_acc": float(best_points[best]) if best is not None else np.nan,
                "best_lr": float(lrs[best]) if best is not None else np.nan,
                "lowest_lr": float(lrs.min()), "highest_lr": float(lrs.max()), "rates": float(len(lrs)),
                "members": float(total.sum()), "members_used": float(usable.sum()),
                "diverged": float(sum(at[m]["diverged"] for c in cells for m in groups[c])),
                "unfit": float(sum(bool(at[m].get("unfit")) for c in cells for m in groups[c])),
            })
            rows.append(row)
    return rows, replicates


def _statistic(measures: list[tuple], cells: list[tuple], enough: np.ndarray,
               num_draws: int) -> tuple[np.ndarray, np.ndarray]:
    """(points_L, replicates_LxR): per rate, the maximum of the given (points, replicates) measures — above 0 when
    any of them is — NaN where a rate has too few usable members or a measure has no value."""
    points, reps = [], []
    for cell, ok in zip(cells, enough):
        nan_reps = np.full(num_draws, np.nan)
        p = [m[0].get(cell, np.nan) for m in measures]
        r = [m[1].get(cell, nan_reps) for m in measures]
        points.append(float(np.max(p)) if ok else np.nan)  # NaN when any is missing
        reps.append(np.max(np.stack(r), axis=0) if ok else nan_reps)
    return np.array(points), np.stack(reps)


def start_label(step: int) -> str:
    return step_label(step) if step < 0 else f"step {step_label(step)}"


def _rate(value: float) -> str:
    return "below the grid" if value == 0 else "none" if value == np.inf else "–" if np.isnan(value) else f"{value:.3g}"


def bracket_pair(row: dict, prefix: str = "") -> str:
    """'[stay, leave]' of a bracket, compactly."""
    return f"[{_rate(row[f'{prefix}stay_lr'])}, {_rate(row[f'{prefix}leave_lr'])}]"


def bracket_text(row: dict, prefix: str = "") -> str:
    """A bracket in words: 'leaves from 0.1, stays at 0.05' (with supports for the combined one), or the crossing."""
    stay, leave = row.get(f"{prefix}stay_lr", np.nan), row.get(f"{prefix}leave_lr", np.nan)
    if np.isnan(stay) and np.isnan(leave):
        return "no rate with enough usable members"
    if leave == np.inf:
        text = f"stays up to {_rate(stay)}"
        return text + (f" ({row['stay_support']:.0%} of replicates)" if prefix == "" and
                       np.isfinite(row.get("stay_support", np.nan)) else "")
    if stay == 0:
        text = f"leaves already at the lowest rate {_rate(leave)}"
        return text + (f" ({row['leave_support']:.0%})" if prefix == "" and
                       np.isfinite(row.get("leave_support", np.nan)) else "")
    text = f"between {_rate(stay)} and {_rate(leave)}"
    if prefix == "" and np.isfinite(row.get("stay_support", np.nan)):
        text += f" (stays at {_rate(stay)} in {row['stay_support']:.0%} of replicates, leaves at {_rate(leave)} in " \
                f"{row['leave_support']:.0%})"
    crossing = row.get(f"{prefix}critical_lr", np.nan)
    if np.isfinite(crossing) and crossing > 0:
        text += f", ≈ {crossing:.3g}" + (f" (95 % CI {_rate(row['critical_lr_ci_lo'])} – "
                                        f"{_rate(row['critical_lr_ci_hi'])})" if prefix == "" else "")
    return text


def verdicts(rows: list[dict], replicates: dict) -> list[str]:
    """Per other-axes combination and fine-tuning length (longest first): the critical-rate brackets over the
    checkpoints, seeds and start on their own, the train set beside the test set, transfer against the controls,
    and a verdict — a point of no return only where the design could detect leaving, else which condition failed."""
    lines = []
    others = list(dict.fromkeys(tuple(r[k] for k in START_KEYS if k != "pretrain_step") for r in rows))
    varied = [k for k in START_KEYS if k != "pretrain_step" and len({r[k] for r in rows}) > 1]
    for step in sorted({r["finetune_step"] for r in rows}, reverse=True):
        for other in others:
            where = dict(zip([k for k in START_KEYS if k != "pretrain_step"], other))
            mine = [r for r in rows if r["finetune_step"] == step and all(r[k] == v for k, v in where.items())]
            chosen = sorted((r for r in mine if r["pretrain_step"] >= 0), key=lambda r: r["pretrain_step"])
            if not chosen:
                continue
            scratch = [r for r in mine if r["pretrain_step"] < 0]
            label = f"{step} fine-tuning steps" + "".join(f", {k} {where[k]}" for k in varied)
            reps = {r["pretrain_step"]: replicates[(_key(r), step)] for r in mine}
            lines.append(_one_length(label, chosen, scratch[0] if scratch else None, reps))
    return lines


def _key(row: dict) -> tuple:
    return tuple(row[k] for k in START_KEYS)


def _first_staying(stays) -> int:
    """The first index from which on every entry is True (len when the last is False)."""
    index = len(stays)
    while index > 0 and stays[index - 1]:
        index -= 1
    return index


def _stays(row: dict) -> bool:
    """Every rate that trains stays (seeds together and with their start)."""
    return row["leave_lr"] == np.inf and np.isfinite(row["highest_trained_lr"])


def _one_length(label: str, chosen: list[dict], scratch: dict | None, reps: dict) -> str:
    curve = "; ".join(f"step {step_label(r['pretrain_step'])}: {bracket_text(r)}, fails from {_rate(r['failing_lr'])}"
                      for r in chosen)
    text = f"{label}: seeds leave the basin (from each other or their start) — {curve}. "
    text += _separately(chosen) + _transfer(chosen, scratch)
    steps = [r["pretrain_step"] for r in chosen]
    stays = np.array([_stays(r) for r in chosen])
    point = _first_staying(stays)
    control = scratch or (chosen[0] if steps[0] == 0 else None)
    if point < len(chosen):
        missing = _detectable(chosen[point], control, reps)
        if missing:
            return text + (f"From step {steps[point]} on no rate that trains leaves, but the design cannot detect a "
                           f"point of no return there: {'; '.join(missing)}.")
        stays_RxC = np.stack([np.isposinf(reps[s]["crossings"]) for s in steps], axis=1)
        first = [_first_staying(s) for s in stays_RxC]
        lo, hi = np.quantile(first, [(1 - stats.LEVEL) / 2, (1 + stats.LEVEL) / 2], method="nearest")
        where = f"step {steps[lo]}" + (f" – step {steps[hi]}" if hi < len(chosen) else " – beyond the last checkpoint")
        return text + (f"Point of no return: from step {steps[point]} on (95 % CI {where}) every rate that trains (up "
                       f"to {_rate(chosen[point]['highest_trained_lr'])}, within ×{stats.BRACKET_FACTOR:g} of the rate "
                       f"{_rate(chosen[point]['failing_lr'])} where training fails) stays, while the control leaves at "
                       "that rate and pretraining transfers to the task.")
    return text + _trend(chosen)


def _separately(chosen: list[dict]) -> str:
    """Seeds and start on their own, and the train set beside the test set where they disagree."""
    parts = [f"step {step_label(r['pretrain_step'])}: seeds vs each other: {bracket_text(r, 'seeds_')}; vs their "
             f"start: {bracket_text(r, 'start_')}" for r in chosen]
    text = "On their own — " + " | ".join(parts) + ". "
    disagree = [r for r in chosen if (r["leave_lr"], r["stay_lr"]) != (r["train_leave_lr"], r["train_stay_lr"])]
    if disagree:
        text += "On the training set the bracket differs: " + "; ".join(
            f"step {step_label(r['pretrain_step'])} {bracket_text(r, 'train_')}" for r in disagree) + ". "
    return text


def _transfer(chosen: list[dict], scratch: dict | None) -> str:
    items = [f"step {step_label(r['pretrain_step'])} {r['probe_test_acc']:.3f} / {r['best_test_acc']:.3f}"
             for r in chosen]
    if scratch:
        items.insert(0, f"scratch {scratch['probe_test_acc']:.3f} / {scratch['best_test_acc']:.3f}")
    return "Test accuracy, probed start / best fine-tuned: " + "; ".join(items) + ". "


def _detectable(row: dict, control: dict | None, reps: dict) -> list[str]:
    """The conditions for a detectable point of no return at checkpoint `row` that fail (empty: all hold)."""
    missing = []
    trained, failing = row["highest_trained_lr"], row["failing_lr"]
    if failing == np.inf:
        missing.append(f"no rate in the grid fails to train (the highest with enough usable members: "
                       f"{_rate(trained)}), so the grid does not reach the edge of trainability")
    elif failing / trained > stats.BRACKET_FACTOR:
        missing.append(f"the highest rate that trains ({_rate(trained)}) is ×{failing / trained:.3g} below the rate "
                       f"where training fails ({_rate(failing)}), more than ×{stats.BRACKET_FACTOR:g}: refine the grid "
                       "there")
    if control is None:
        missing.append("no control (scratch or step 0) to show that this rate makes an earlier start leave")
        return missing
    name = "scratch" if control["pretrain_step"] < 0 else "step 0"
    if not control["leave_lr"] <= trained:
        missing.append(f"the control ({name}) does not leave at or below {_rate(trained)} either")
    diff = reps[row["pretrain_step"]]["best_acc"] - reps[control["pretrain_step"]]["best_acc"]
    lo, hi = stats.ci(diff)
    if not (np.isfinite(lo) and lo > 0):
        missing.append(f"pretraining does not measurably transfer: best fine-tuned test accuracy "
                       f"{row['best_test_acc']:.3f} against {control['best_test_acc']:.3f} for {name} (difference "
                       f"95 % CI [{lo:+.3f}, {hi:+.3f}])")
    return missing


def _trend(chosen: list[dict]) -> str:
    """Does the critical rate move with pretraining? Only as far as the brackets tell: it rises from one checkpoint
    to a later one when their brackets do not overlap (the later one stays where the earlier one leaves)."""
    inside = [r for r in chosen if 0 < r["leave_lr"] < np.inf]
    last = chosen[-1]
    tail = (f"At the last checkpoint (step {step_label(last['pretrain_step'])}) seeds leave "
            + (f"between {_rate(last['stay_lr'])} and {_rate(last['leave_lr'])}" if 0 < last["leave_lr"] < np.inf
               else f"at {_rate(last['leave_lr'])}")
            + (", while every rate in the grid trains" if last["failing_lr"] == np.inf else
               f", below the rate {_rate(last['failing_lr'])} where training fails")
            + ": no point of no return within the grid.")
    if len(inside) < 2:
        return "Too few checkpoints with a bracket inside the grid to tell a trend (not resolved). " + tail
    first, final = inside[0], inside[-1]
    a, b = step_label(first["pretrain_step"]), step_label(final["pretrain_step"])
    if final["stay_lr"] >= first["leave_lr"]:
        word = f"rises from step {a} to step {b} (brackets [{_rate(first['stay_lr'])}, {_rate(first['leave_lr'])}] → " \
               f"[{_rate(final['stay_lr'])}, {_rate(final['leave_lr'])}] do not overlap)"
    elif final["leave_lr"] <= first["stay_lr"]:
        word = f"falls from step {a} to step {b} (brackets [{_rate(first['stay_lr'])}, {_rate(first['leave_lr'])}] → " \
               f"[{_rate(final['stay_lr'])}, {_rate(final['leave_lr'])}] do not overlap)"
    else:
        word = f"does not move resolvably from step {a} to step {b}: their brackets overlap at this grid's resolution"
    return f"The critical rate {word}. " + tail
