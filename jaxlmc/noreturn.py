"""The point-of-no-return analysis (docs/science.md, hypothesis 3): how much pretraining leaves fine-tuning unable to
leave the basin, whatever its learning rate — and whether the design could have seen it leave.

Read from the barrier stage's tables at every kept fine-tuning step (rundir.BY_STEP). A *start* is a pretraining
checkpoint with every other cell axis but the rate (head policy, weight decay, …); per start, fine-tuning length and
rate whose cell has at least decide.MIN_SEEDS usable members (unfit and diverged members never count), jaxlmc.decide's
one rule judges two things, each a basin verdict like a cell's:

* **Seeds**: the seeds' headline barrier (linear-baseline test error barrier, aligned when measured) — one basin
  (below the study's margin), separate (the excess over the null mean above 0) or not resolved.
* **The start**: each member's linear-baseline barrier to its probed start, judged the same way.
* **A rate** *leaves* when either is separate, *stays* when both are one basin, and is otherwise not resolved. The
  p-values of every rate's tests in the study are adjusted together (Benjamini–Hochberg), the training set's apart.
* **Critical rate**: a bracket of grid rates [stay_lr, leave_lr]: the lowest rate shown to leave and the highest rate
  below it shown to stay, with their adjusted p-values (stay_p, leave_p) and the number of rates the data did not
  decide (rates_unresolved). stay_lr is 0 when the lowest measured rate already leaves and NaN when no rate below the
  first leaving one is shown to stay; leave_lr is +inf when no rate is shown to leave.
* **Failing rate**: the lowest rate from which on every rate has at least half its members diverged or unfit; with
  the highest rate that trains it brackets the edge of trainability.
* **Transfer**: each start's probed accuracy (the frozen body with its linear probe) and its best fine-tuned accuracy
  (the rate with the highest mean test accuracy over usable members), against the controls' (scratch, step 0).
* **Point of no return**: named only where the design could have detected leaving (`_detectable`): the first
  checkpoint from which on every rate that trains is shown to stay, *and* at it (a) a rate within the bracket factor of
  the failing rate trains and stays, (b) an earlier start (scratch or step 0) leaves at or below that rate, and (c) the
  checkpoint's best fine-tuned accuracy exceeds the control's (paired jackknife interval over seeds above 0).
  Otherwise the verdict says which condition failed.
"""
from __future__ import annotations

import numpy as np

from jaxlmc import decide, grid, rundir, stats
from jaxlmc.grid import step_label

START_KEYS = tuple(k for k in grid.CELL_KEYS if k != "lr")  # what a start is: the cell but its rate
PARTS = ("seeds", "start")  # what a rate can leave: the other seeds, the start
# Column prefixes of critical.csv's brackets: combined test, seeds only, start only, combined on the train set.
BRACKETS = ("", "seeds_", "start_", "train_")
WORDS = {"one basin": "stays", "separate basins": "leaves", "not resolved": "not resolved"}


def has_steps(run: rundir.RunDir) -> bool:
    return all(run.exists(t) for t in rundir.BY_STEP)


def _start(cell: tuple) -> tuple:
    return tuple(v for k, v in zip(grid.CELL_KEYS, cell) if k != "lr")


def analyse(run: rundir.RunDir) -> tuple[list[dict], dict]:
    """`analyse_tables` of a run directory's barriers/by_step/ tables, with its refinement rounds' (jaxlmc.refine),
    at the margin the barrier stage judged the cells with."""
    summary = run.read_csv(rundir.BARRIER_SUMMARY) if run.exists(rundir.BARRIER_SUMMARY) else []
    margin = summary[0].get("margin", decide.MARGIN) if summary else decide.MARGIN
    return analyse_tables(*run.step_tables(), margin=margin if np.isfinite(margin) else decide.MARGIN)


def _estimates(at: list[dict], pairs: list[dict], starts: list[dict], split: str,
               num_seeds: int) -> dict[tuple, tuple[decide.Estimate, decide.Estimate, float]]:
    """{(part, cell): (excess, barrier, the null mean's mean Monte-Carlo SE)} of the seeds' and the to-start headline
    barrier on `split`."""
    out = {}
    for part, rows in (("seeds", pairs), ("start", starts)):
        column = decide.headline_measure(rows, split)
        if not column or f"{column}_null" not in rows[0]:
            continue
        by_cell: dict = {}
        for r in rows:
            seeds = (at[r["i"]]["seed"], at[r["j"]]["seed"]) if part == "seeds" else r["seed"]
            by_cell.setdefault(grid.cell(r), []).append((seeds, r[column], r[f"{column}_null"],
                                                          r.get(f"{column}_null_se", 0.0)))
        for cell, found in by_cell.items():
            seeds, barrier, null, se = (list(v) for v in zip(*found))
            estimate = lambda v: stats.seed_estimate(seeds, v, num_seeds, paired=part == "seeds")  # noqa: E731
            out[(part, cell)] = (estimate(np.subtract(barrier, null)), estimate(barrier), float(np.mean(se)))
    return out


def _combined(decisions: list[dict]) -> tuple[str, float, float]:
    """(verdict, p of staying, p of leaving) of a rate from its parts' decisions (jaxlmc.decide.decide_all): leaves
    when any part is separate, stays when every part is one basin, else not resolved; NaN p-values where a part has
    no test (too few seeds)."""
    if not decisions:
        return "not resolved", np.nan, np.nan
    words = [WORDS[d["verdict"]] for d in decisions]
    p_stay = max(d["p_one_basin"] for d in decisions)
    p_leave = min(d["p_separate"] for d in decisions)
    word = "leaves" if "leaves" in words else "stays" if all(w == "stays" for w in words) else "not resolved"
    return word, p_stay, p_leave


def bracket(lrs_L, verdicts_L, p_stay_L=None, p_leave_L=None) -> dict:
    """Where seeds leave the basin, walking the measured rates upward, from per-rate verdicts ("stays", "leaves",
    "not resolved"; None: the rate has no value):

        leave_lr          the lowest rate shown to leave (+inf: none)
        stay_lr           the highest rate below it shown to stay (0: the lowest measured rate leaves; NaN: no rate
                          below it is shown to stay)
        stay_p, leave_p   their adjusted p-values (when given)
        rates_staying, rates_leaving, rates_unresolved   how many measured rates the data put where

    All NaN (counts 0) when no rate has a value."""
    lrs = np.asarray(lrs_L, float)
    order = np.argsort(lrs)
    measured = [k for k in order if verdicts_L[k] is not None]
    nan = float("nan")
    pick = lambda p, k: float(p[k]) if p is not None and k is not None else nan  # noqa: E731
    words = [verdicts_L[k] for k in measured]
    out = {"stay_lr": nan, "leave_lr": nan, "stay_p": nan, "leave_p": nan, "rates_staying": float(words.count("stays")),
           "rates_leaving": float(words.count("leaves")), "rates_unresolved": float(words.count("not resolved"))}
    if not measured:
        return out
    leave = next((k for k in measured if verdicts_L[k] == "leaves"), None)
    below = measured[:measured.index(leave)] if leave is not None else measured
    stay = next((k for k in reversed(below) if verdicts_L[k] == "stays"), None)
    out.update(leave_lr=float(lrs[leave]) if leave is not None else float("inf"), leave_p=pick(p_leave_L, leave),
               stay_lr=float(lrs[stay]) if stay is not None else 0.0 if leave is not None and not below else nan,
               stay_p=pick(p_stay_L, stay))
    return out


def analyse_tables(members: list[dict], pairs: list[dict], to_start: list[dict],
                   margin: float = decide.MARGIN) -> tuple[list[dict], dict]:
    """(rows, details): one CRITICAL row per start × fine-tuning length, and what the verdicts need beyond it:
    {(start, step): {"rates": [(lr, verdict)], "best_acc": decide.Estimate of the best rate's mean test accuracy}}.
    The tables are the by-step members, pairs and to-start rows (each with a finetune_step); `margin` is the
    equivalence margin of "stays" (jaxlmc.decide)."""
    num_seeds = max(m["seed"] for m in members) + 1
    tests: dict = {"test": {}, "train": {}}
    shifts: dict = {"test": {}, "train": {}}
    per_step = {}
    for step in sorted({m["finetune_step"] for m in members}):
        at = sorted((m for m in members if m["finetune_step"] == step), key=lambda m: m["member"])
        used = {m["member"] for m in at if grid.usable(m)}
        step_pairs = [p for p in pairs if p["finetune_step"] == step and p["i"] in used and p["j"] in used
                      and p["same_cell"]]
        step_starts = [s for s in to_start if s["finetune_step"] == step and s["member"] in used]
        groups = grid.cell_groups(at)
        enough = {c for c, ids in groups.items() if sum(m in used for m in ids) >= decide.MIN_SEEDS}
        for split in tests:
            for (part, cell), (excess, barrier, se) in _estimates(at, step_pairs, step_starts, split,
                                                                    num_seeds).items():
                if cell in enough:
                    tests[split][(step, cell, part)] = (excess, barrier)
                    shifts[split][(step, cell, part)] = se
        per_step[step] = (at, used, step_starts, groups, enough)
    decided = {split: decide.decide_all(t, margin, shifts=shifts[split]) for split, t in tests.items()}
    rows, details = [], {}
    for step, (at, used, step_starts, groups, enough) in per_step.items():
        accuracy_S: dict = {}
        for m in at:
            if m["member"] in used:
                accuracy_S.setdefault(grid.cell(m), np.full(num_seeds, np.nan))[m["seed"]] = m["test_acc"]
        probe: dict = {}
        for s in step_starts:
            probe.setdefault(_start(grid.cell(s)), []).append(1 - s.get("start_error_test", np.nan))
        for key in dict.fromkeys(_start(c) for c in groups):
            cells = sorted((c for c in groups if _start(c) == key), key=lambda c: c[grid.CELL_KEYS.index("lr")])
            lrs = np.array([c[grid.CELL_KEYS.index("lr")] for c in cells])
            usable = np.array([sum(m in used for m in groups[c]) for c in cells])
            total = np.array([len(groups[c]) for c in cells])
            row = {**dict(zip(START_KEYS, key)), "finetune_step": step}
            for prefix, split, parts in (("", "test", PARTS), ("seeds_", "test", ("seeds",)),
                                         ("start_", "test", ("start",)), ("train_", "train", PARTS)):
                judged = [_combined([decided[split][(step, c, p)] for p in parts if (step, c, p) in decided[split]])
                          if c in enough else None for c in cells]
                words = [j[0] if j else None for j in judged]
                found = bracket(lrs, words, [j[1] if j else np.nan for j in judged],
                                [j[2] if j else np.nan for j in judged])
                row.update(found if prefix == "" else {f"{prefix}{k}": found[k] for k in ("stay_lr", "leave_lr")})
                if prefix == "":
                    rates = [(float(lr), w) for lr, w in zip(lrs, words) if w is not None]
            # Training fails from the lowest rate above which every rate fails (at least half its members diverged
            # or unfit): the upper edge of trainability. Too small a rate can be unfit too (too few steps to fit);
            # that is not where training stops working.
            fails = usable < total / 2
            failing = lrs[[bool(fails[k:].all()) for k in range(len(lrs))]]
            trains_below = lrs[lrs < failing.min()] if failing.size else lrs[:0]
            trained = lrs[[c in enough for c in cells]]
            best_points = [float(np.nanmean(accuracy_S[c])) if c in enough else np.nan for c in cells]
            best = int(np.nanargmax(best_points)) if np.isfinite(best_points).any() else None
            details[(key, step)] = {
                "rates": rates,
                "best_acc": decide.of_members(accuracy_S[cells[best]] if best is not None
                                              else np.full(num_seeds, np.nan))}
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
                "margin": float(margin),
            })
            rows.append(row)
    return rows, details


def start_label(step: int) -> str:
    return step_label(step) if step < 0 else f"step {step_label(step)}"


def _rate(value: float) -> str:
    return "below the grid" if value == 0 else "none" if value == np.inf else "–" if np.isnan(value) else f"{value:.3g}"


def bracket_pair(row: dict, prefix: str = "") -> str:
    """'[stay, leave]' of a bracket, compactly."""
    return f"[{_rate(row[f'{prefix}stay_lr'])}, {_rate(row[f'{prefix}leave_lr'])}]"


def _p(value: float) -> str:
    return f"adjusted p {value:.2g}" if np.isfinite(value) else "no test"


def bracket_text(row: dict, prefix: str = "") -> str:
    """A bracket in words: 'between 0.05 and 0.1 (stays at 0.05: adjusted p …; leaves at 0.1: …)', with the rates
    the data did not decide for the combined one."""
    stay, leave = row.get(f"{prefix}stay_lr", np.nan), row.get(f"{prefix}leave_lr", np.nan)
    combined = prefix == ""
    unresolved = row.get("rates_unresolved", 0) if combined else 0
    tail = f"; {unresolved:.0f} rate{'s' if unresolved != 1 else ''} not resolved" if unresolved else ""
    if np.isnan(leave):
        return "no rate with enough usable members"
    if leave == np.inf:
        if np.isnan(stay):
            return "no rate shown to stay or to leave" + tail
        return f"stays up to {_rate(stay)}" + (f" ({_p(row['stay_p'])})" if combined else "") + tail
    at = f" ({_p(row['leave_p'])})" if combined else ""
    if stay == 0:
        return f"leaves already at the lowest rate {_rate(leave)}{at}" + tail
    if np.isnan(stay):
        return f"leaves from {_rate(leave)}{at}, no lower rate shown to stay" + tail
    return (f"between {_rate(stay)} and {_rate(leave)}" + (f" (stays at {_rate(stay)}: {_p(row['stay_p'])}; leaves "
                                                         f"at {_rate(leave)}: {_p(row['leave_p'])})" if combined
                                                         else "") + tail)


def verdicts(rows: list[dict], details: dict) -> list[str]:
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
            found = {r["pretrain_step"]: details[(_key(r), step)] for r in mine}
            lines.append(_one_length(label, chosen, scratch[0] if scratch else None, found))
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
    """Every rate that trains is shown to stay (seeds together and with their start, within the margin)."""
    return row["rates_staying"] > 0 and row["rates_leaving"] == 0 and row["rates_unresolved"] == 0


def _one_length(label: str, chosen: list[dict], scratch: dict | None, found: dict) -> str:
    curve = "; ".join(f"step {step_label(r['pretrain_step'])}: {bracket_text(r)}, fails from {_rate(r['failing_lr'])}"
                      for r in chosen)
    text = (f"{label}: seeds leave the basin (from each other or their start; stay: both within the margin "
            f"{chosen[0].get('margin', decide.MARGIN):g}) — {curve}. ")
    text += _separately(chosen) + _transfer(chosen, scratch)
    steps = [r["pretrain_step"] for r in chosen]
    stays = np.array([_stays(r) for r in chosen])
    point = _first_staying(stays)
    control = scratch or (chosen[0] if steps[0] == 0 else None)
    if point < len(chosen):
        missing = _detectable(chosen[point], control, found)
        if missing:
            return text + (f"From step {steps[point]} on every rate that trains is shown to stay, but the design "
                           f"cannot detect a point of no return there: {'; '.join(missing)}.")
        return text + (f"Point of no return: from step {steps[point]} on every rate that trains (up to "
                       f"{_rate(chosen[point]['highest_trained_lr'])}, within ×{stats.BRACKET_FACTOR:g} of the rate "
                       f"{_rate(chosen[point]['failing_lr'])} where training fails) is shown to stay, while the "
                       "control leaves at that rate and pretraining transfers to the task.")
    return text + _trend(chosen)


def _separately(chosen: list[dict]) -> str:
    """Seeds and start on their own, and the train set beside the test set where they disagree."""
    parts = [f"step {step_label(r['pretrain_step'])}: seeds vs each other: {bracket_text(r, 'seeds_')}; vs their "
             f"start: {bracket_text(r, 'start_')}" for r in chosen]
    text = "On their own — " + " | ".join(parts) + ". "
    disagree = [r for r in chosen if bracket_pair(r) != bracket_pair(r, "train_")]
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


def _detectable(row: dict, control: dict | None, found: dict) -> list[str]:
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
    diff = found[row["pretrain_step"]]["best_acc"].minus(found[control["pretrain_step"]]["best_acc"])
    lo, hi = diff.interval()
    if not (np.isfinite(lo) and lo > 0):
        missing.append(f"pretraining does not measurably transfer: best fine-tuned test accuracy "
                       f"{row['best_test_acc']:.3f} against {control['best_test_acc']:.3f} for {name} (difference "
                       f"95 % CI [{lo:+.3f}, {hi:+.3f}])")
    return missing


def _trend(chosen: list[dict]) -> str:
    """Does the critical rate move with pretraining? Only as far as the brackets tell: it rises from one checkpoint
    to a later one when their brackets do not overlap (the later one stays where the earlier one leaves)."""
    inside = [r for r in chosen if 0 < r["leave_lr"] < np.inf and np.isfinite(r["stay_lr"])]
    last = chosen[-1]
    tail = (f"At the last checkpoint (step {step_label(last['pretrain_step'])}) the bracket is "
            f"{bracket_pair(last)}"
            + (", while every rate in the grid trains" if last["failing_lr"] == np.inf else
               f", training fails from {_rate(last['failing_lr'])}")
            + ": no point of no return is shown within the grid.")
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
