"""The report's answers to the study's hypotheses (docs/science.md), one by one, as computed sentences. Every basin
verdict and H1/H2 trend follows one rule (jaxlmc.decide): the linear-baseline test error barrier (after weight
matching when the barrier stage measured it), debiased by its null mean (the excess), with a Student-t interval over
the leave-one-seed-out jackknife; "one basin" only below the study's margin; p-values adjusted together
(Benjamini–Hochberg). A difference is stated only when its adjusted test rejects; otherwise the sentence says it is
not resolved. Everything is read from the run directory's tables. H4 and the sources paragraph keep the member
bootstrap (their statistics are rank correlations and averages of differences).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from jaxlmc import decide, grid, noreturn, rundir, stats
from jaxlmc.grid import step_label


@dataclasses.dataclass
class Measured:
    """Per-cell point values and member-bootstrap replicates (one shared set of seed draws) of the measures H4 uses,
    the jackknife estimates of the headline excess (jaxlmc.decide) the trends use, and the barrier summary's rows
    (with each cell's verdicts)."""

    cells: list[tuple]
    varied: set[str]  # the cell axes the grid varies (for wording)
    barrier: str  # the seeds' barrier column (the headline, jaxlmc.decide.headline_measure)
    values: dict  # {measure: ({cell: point}, {cell: replicates_R})}
    excess: dict  # {cell: decide.Estimate} of the seeds' headline excess
    summary: dict  # {cell: barriers/summary.csv row}

    def at(self, measure: str, **where) -> list[tuple]:
        """The cells whose keys match `where` (e.g. lr=1e-2, head="shared") and that have an interval: a finite point
        value and at least stats.MIN_MEMBERS usable members."""
        points, reps = self.values[measure]
        index = {k: i for i, k in enumerate(grid.CELL_KEYS)}
        return [c for c in self.cells if all(c[index[k]] == v for k, v in where.items())
                and np.isfinite(points.get(c, np.nan)) and np.isfinite(reps.get(c, [np.nan])).any()]

    def where(self, cell: tuple, skip: tuple[str, ...] = ()) -> str:
        return describe(cell, self.varied, skip)

    def point(self, measure: str, cell: tuple) -> float:
        return self.values[measure][0].get(cell, np.nan)

    def judged(self, **where) -> list[tuple]:
        """The cells matching `where` whose headline excess has an interval (at least decide.MIN_SEEDS seeds)."""
        index = {k: i for i, k in enumerate(grid.CELL_KEYS)}
        return [c for c in self.cells if all(c[index[k]] == v for k, v in where.items())
                and c in self.excess and np.isfinite(self.excess[c].se)]


def cell_estimates(members: list[dict], pair_rows: list[dict], column: str, num_seeds: int) -> dict:
    """{cell: decide.Estimate} of the within-cell mean excess (`column` minus its `_null` column)."""
    if not pair_rows or f"{column}_null" not in pair_rows[0]:
        return {}
    rows = [{**r, "excess": r[column] - r[f"{column}_null"]} for r in pair_rows]
    return {cell: stats.seed_estimate(pairs, values, num_seeds, paired=True)
            for cell, (pairs, values) in stats.cell_seed_pairs(members, rows, "excess").items()}


def measure_run(run: rundir.RunDir) -> Measured:
    members = run.read_csv(rundir.MEMBERS)
    pairs = run.read_csv(rundir.PAIRS)
    num_seeds = max(m["seed"] for m in members) + 1
    draws = stats.seed_draws(num_seeds, stats.RESAMPLES)
    barrier = decide.basin_measure(pairs)
    used = [m for m in members if grid.usable(m)]
    values = {
        "barrier": stats.pair_cells(members, pairs, barrier, num_seeds, draws),
        "test_acc": stats.member_cells(used, "test_acc", num_seeds, draws),
        "ood_spread": stats.member_cells(used, "ood_acc", num_seeds, draws, reduce="std"),
    }
    summary = {grid.cell(r): r for r in run.read_csv(rundir.BARRIER_SUMMARY)}
    return Measured(list(grid.cell_groups(members)), varied_axes(members), barrier, values,
                    cell_estimates(members, pairs, barrier, num_seeds), summary)


def _ci(lo: float, hi: float) -> str:
    return f"[{lo:+.3f}, {hi:+.3f}]"


def describe(cell: tuple, varied: set[str], skip: tuple[str, ...] = ()) -> str:
    """A cell's coordinates in words (the axes in `varied`), its checkpoint as 'step S' or 'scratch'."""
    parts = []
    for k, v in zip(grid.CELL_KEYS, cell):
        if k in skip or k not in varied:
            continue
        parts.append(step_label(v) if k == "pretrain_step" and v < 0 else f"step {v}" if k == "pretrain_step"
                     else f"LR {v:g}" if k == "lr" else f"{v} heads" if k == "head" else f"{k} {v:g}"
                     if isinstance(v, float) else f"{k} {v}")
    return ", ".join(parts)


def varied_axes(members: list[dict]) -> set[str]:
    """The cell axes worth naming: checkpoint, LR, and any other the grid varies."""
    return {"pretrain_step", "lr"} | {a.column for a in grid.shown(members, cells_only=True)}


def _others(m: Measured, besides: tuple[str, ...]) -> list[dict]:
    """Every combination of the cell axes other than `besides` that the run has."""
    index = [i for i, k in enumerate(grid.CELL_KEYS) if k not in besides]
    seen = dict.fromkeys(tuple(c[i] for i in index) for c in m.cells)
    return [{grid.CELL_KEYS[i]: v for i, v in zip(index, combo)} for combo in seen]


def _ends(m: Measured, axis: str) -> list[tuple[tuple, tuple]]:
    """(first, last) cells with an interval along `axis`, per combination of the other cell axes: H1's first and last
    checkpoint (the scratch row is not a checkpoint), H2's lowest and highest rate."""
    ends = []
    for where in _others(m, (axis,)):
        cells = [c for c in m.judged(**where) if axis != "pretrain_step" or c[0] >= 0]
        if len(cells) >= 2:
            ends.append((cells[0], cells[-1]))
    return ends


def trends(m: Measured) -> dict[tuple, tuple[str, decide.Estimate, float]]:
    """{(axis, first, last): (word, difference, adjusted p)} for H1 (along the checkpoints) and H2 (along the
    rates): the paired jackknife difference of the headline excess, last − first, its two-sided p-values adjusted
    together (Benjamini–Hochberg) across every trend the study states."""
    keys = [(axis, a, b) for axis in ("pretrain_step", "lr") for a, b in _ends(m, axis)]
    diffs = [m.excess[b].minus(m.excess[a]) for _, a, b in keys]
    adjusted = decide.adjust([d.p_two_sided() for d in diffs])
    alpha = 1 - decide.LEVEL
    return {k: ("not resolved" if not adjusted[i] < alpha else "rises" if d.point > 0 else "falls", d, adjusted[i])
            for i, (k, d) in enumerate(zip(keys, diffs))}


def _trend_lines(m: Measured, axis: str) -> list[str]:
    lines = []
    for (along, first, last), (word, d, p) in trends(m).items():
        if along != axis:
            continue
        lo, hi = d.interval()
        at = (lambda c: f"step {c[0]}") if axis == "pretrain_step" else (lambda c: f"LR {c[1]:g}")
        lines.append(f"{m.where(first, (axis,))}: excess {m.excess[first].point:+.3f} at {at(first)} → "
                     f"{m.excess[last].point:+.3f} at {at(last)} (barrier {m.point('barrier', first):.3f} → "
                     f"{m.point('barrier', last):.3f}): {word} ({d.point:+.3f}, 95 % CI {_ci(lo, hi)}, "
                     f"adjusted p {p:.2g}"
                     + (f"; the design detects a change of ±{d.min_detectable():.3f} at 80 % power"
                        if word == "not resolved" else "") + ").")
    return lines


def pretraining(m: Measured) -> list[str]:
    """H1: does the seeds' barrier fall with pretraining (first vs last checkpoint), per LR and every other axis?"""
    return _trend_lines(m, "pretrain_step")


def learning_rate(m: Measured) -> list[str]:
    """H2: does the seeds' barrier rise with the fine-tuning LR (lowest vs highest LR with usable members)?"""
    return _trend_lines(m, "lr")


def _basin_verdicts(m: Measured, prefix: str) -> dict[tuple, str]:
    """{cell: "one basin" | "separate basins" | "not resolved"} from barriers/summary.csv (jaxlmc.decide), for the
    cells with an interval."""
    column = f"{prefix}verdict"
    measure = f"{prefix}{m.barrier if not prefix else 'error_barrier_test_lin'}_excess_se"
    return {c: r[column] for c, r in m.summary.items() if column in r and np.isfinite(r.get(measure, np.nan))}


def basins(m: Measured, prefix: str, label: str) -> list[str]:
    """Per cell, the verdict of jaxlmc.decide's rule; counted, then listed, with the median minimum detectable
    excess of the unresolved cells."""
    judged = _basin_verdicts(m, prefix)
    if not judged:
        return [f"{label}: no cell has a verdict (barriers measured before verdicts existed: rerun `jaxlmc barriers`)."]
    verdicts: dict[str, list[tuple]] = {v: [] for v in decide.VERDICTS}
    for c, verdict in judged.items():
        verdicts[verdict].append(c)
    measure = m.barrier if not prefix else "start_error_barrier_test_lin"
    mde = [m.summary[c].get(f"{measure}_excess_min_detectable", np.nan) for c in verdicts["not resolved"]]
    margin = m.summary[next(iter(judged))].get("margin", decide.MARGIN)
    too_few = len(m.cells) - len(judged)
    lines = [f"{label}: of {len(judged)} cells with at least {decide.MIN_SEEDS} usable seeds ({too_few} have "
             "fewer), " + ", ".join(f"{len(v)} {k}" for k, v in verdicts.items())
             + f" (one basin: the barrier's 95 % interval below the margin {margin:g}; separate: the excess over the "
             "noise's null mean above 0; p-values of every cell adjusted together, Benjamini–Hochberg)"
             + (f"; the unresolved cells could detect an excess of {np.nanmedian(mde):.3f} (median, 80 % power)"
                if verdicts["not resolved"] and np.isfinite(mde).any() else "") + "."]
    for verdict in ("one basin", "separate basins"):
        if verdicts[verdict]:
            lines.append(f"{verdict.capitalize()}: " + "; ".join(m.where(c) for c in verdicts[verdict]) + ".")
    return lines


def sources(m: Measured) -> list[str]:
    """How much of the seeds' barrier is the head's initialisation and how much the data order: per_seed − shared
    excess, per (checkpoint, LR, …) and on average over them (jackknife over the seeds they share)."""
    heads = {c[grid.CELL_KEYS.index("head")] for c in m.cells}
    if not {"per_seed", "shared"} <= heads:
        return []
    h = grid.CELL_KEYS.index("head")
    shared_cells = set(m.judged(head="shared"))
    pairs = [(c, c[:h] + ("shared",) + c[h + 1:]) for c in m.judged(head="per_seed")]
    pairs = [(a, b) for a, b in pairs if b in shared_cells]
    if not pairs:
        return []
    each = [m.excess[a].minus(m.excess[b]) for a, b in pairs]
    mean = decide.mean_of(each)
    lo, hi = mean.interval()
    shared = float(np.mean([m.excess[b].point for _, b in pairs]))
    adjusted = decide.adjust([d.p_above(0.0) for d in each])
    resolved = int(np.sum(adjusted < (1 - decide.LEVEL) / 2))
    return [f"With one shared head (only the data order differs between seeds) the seeds' excess averages "
            f"{shared:+.3f} over {len(pairs)} cells; a new random head per seed adds {mean.point:+.3f} on average "
            f"(95 % CI {_ci(lo, hi)}): "
            + ("the head's initialisation is a resolved part of the path dependence" if lo > 0 else
               "per-seed heads give smaller barriers" if hi < 0 else "its contribution is not resolved")
            + f"; the difference is resolved above 0 in {resolved} of {len(pairs)} cells (adjusted together)."]


def moves_together(m: Measured, soups: list[dict], sim_rows: list[dict]) -> list[str]:
    """H4: across cells, Spearman's ρ of the seeds' barrier with OOD accuracy spread (member-bootstrap CI), test
    accuracy, and (point values only: they are not recomputed per resample) uniform soup gain and CKA."""
    cells = m.at("barrier")
    if len(cells) < 3:
        return []
    bar_pts, bar_reps = m.values["barrier"]
    lines = []
    x = np.array([bar_reps[c] for c in cells])
    for measure, label in (("ood_spread", "the spread (std) of OOD accuracy over seeds"),
                           ("test_acc", "mean test accuracy")):
        pts, reps = m.values[measure]
        if not all(c in reps for c in cells):
            continue
        rho = stats.spearman([bar_pts[c] for c in cells], [pts[c] for c in cells])
        lo, hi = stats.ci(stats.spearman_replicates(x, np.array([reps[c] for c in cells])))
        lines.append(f"Across {len(cells)} cells the seeds' barrier has Spearman ρ = {rho:+.2f} (95 % CI "
                     f"[{lo:+.2f}, {hi:+.2f}]) with {label}.")
    for rows, column, label in ((soups, "uniform_gain", "the uniform soup's gain over the best member"),
                                (sim_rows, "cka_mean", "the mean CKA between seeds")):
        by_cell = {grid.cell(r): r.get(column, np.nan) for r in rows}
        rho = stats.spearman([bar_pts[c] for c in cells], [by_cell.get(c, np.nan) for c in cells])
        if np.isfinite(rho):
            lines.append(f"With {label}: ρ = {rho:+.2f} (point estimate; cells share seeds, so no p-value is "
                         "claimed).")
    return lines


# The relative failure rule the report compares its verdicts with (a member below this fraction of the best train
# accuracy reached from the same start also counts as failed).
RELATIVE_FRACTION = 0.8


def failures(members: list[dict], starts: list[dict] = ()) -> list[str]:
    """Diverged and unfit members (failed: left out, counted), and the fitted members that ended below their probed
    start's test accuracy (they lost what pretraining gave; counted here, not as failed, used by no verdict)."""
    diverged = [m for m in members if m["diverged"]]
    unfit = [m for m in members if m.get("unfit")]
    if not diverged and not unfit:
        lines = [f"All {len(members)} members fitted their training data; none diverged."]
    else:
        by_cell: dict = {}
        for m in diverged + unfit:
            by_cell.setdefault(grid.cell(m), 0)
            by_cell[grid.cell(m)] += 1
        worst = sorted(by_cell.items(), key=lambda kv: -kv[1])[:6]
        lines = [f"{len(diverged)} members diverged and {len(unfit)} did not train (unfit: train accuracy not above "
                 "chance by the fit margin); both are left out of barriers, soups and basins and counted here, never "
                 "as a basin of their own. Most affected: "
                 + "; ".join(f"{describe(c, varied_axes(members))} ({n})" for c, n in worst) + "."]
    start_acc = {s["member"]: 1 - s["start_error_test"] for s in starts if np.isfinite(s.get("start_error_test", np.nan))}
    lost = [m for m in members if grid.usable(m) and m["member"] in start_acc and m["test_acc"] < start_acc[m["member"]]]
    if lost:
        by_cell = {}
        for m in lost:
            by_cell[grid.cell(m)] = by_cell.get(grid.cell(m), 0) + 1
        worst = sorted(by_cell.items(), key=lambda kv: -kv[1])[:6]
        lines.append(f"{len(lost)} members trained but ended below their probed start's test accuracy: they lost what "
                     "pretraining gave; they are not failed fits (their barriers count like any other's). Most at: "
                     + "; ".join(f"{describe(c, varied_axes(members))} ({n})" for c, n in worst) + ".")
    return lines


def relative_unfit(members: list[dict], fraction: float = RELATIVE_FRACTION) -> list[dict]:
    """The members with the relative failure rule added: also unfit below `fraction` of the best train accuracy any
    non-diverged member reached from the same start (pretraining checkpoint and head) at the same fine-tuning step."""
    best: dict = {}
    key = lambda m: (m.get("finetune_step"), m["pretrain_step"], m["head"])  # noqa: E731
    for m in members:
        if not m["diverged"] and np.isfinite(m["train_acc"]):
            best[key(m)] = max(best.get(key(m), -np.inf), m["train_acc"])
    return [{**m, "unfit": bool(m.get("unfit") or (not m["diverged"] and m["train_acc"] < fraction * best[key(m)]))}
            for m in members]


def sensitivity(run: rundir.RunDir, rows: list[dict]) -> list[str]:
    """How the failure rule moves the verdicts: the members and the critical-rate brackets with the relative rule
    added, against the run's own."""
    members = run.read_csv(rundir.MEMBERS)
    stricter = relative_unfit(members)
    more = sum(b["unfit"] and not a.get("unfit") for a, b in zip(members, stricter))
    text = (f"Sensitivity to the failure rule: adding the relative rule (train accuracy below {RELATIVE_FRACTION:g} of "
            f"the best from the same start) would leave out {more} more member{'s' if more != 1 else ''}")
    if rows and noreturn.has_steps(run):
        step_members, step_pairs, step_starts = run.step_tables()
        margin = rows[0].get("margin", decide.MARGIN)
        alt, _ = noreturn.analyse_tables(relative_unfit(step_members), step_pairs, step_starts, margin)
        moved = [(a, b) for a, b in zip(rows, alt) if noreturn.bracket_pair(a) != noreturn.bracket_pair(b)]
        text += (f"; the critical-rate brackets change at {len(moved)} of {len(rows)} starts and lengths"
                 + (": " + "; ".join(f"{noreturn.start_label(a['pretrain_step'])} at {a['finetune_step']} steps "
                                      f"{noreturn.bracket_pair(a)} → {noreturn.bracket_pair(b)}"
                                      for a, b in moved[:4]) if moved else ""))
    return [text + "."]


_SCENARIO_WORDS = {"none": "no barrier", "accuracy": "no barrier, members of unequal accuracy",
                   "uniform": "a barrier of {b:g} between every pair", "outlier": "one member {b:g} away from the rest",
                   "two_basins": "two basins {b:g} apart"}


def calibration(run: rundir.RunDir) -> list[str]:
    """How often this study's verdicts would be wrong, simulated with its own cells (barriers/calibration.json)."""
    if not run.exists(rundir.CALIBRATION):
        return []
    found = run.read_json(rundir.CALIBRATION)
    if found.get("skipped"):
        return ["Not calibrated (study.calibration_cells = 0, or no cell with enough seeds)."]
    lines = [f"Simulated with the parameters of {len(found['cells'])} of this study's cells, "
             f"{found['synthetic_cells']} synthetic cells per scenario, each judged alone by the cell rule (the "
             "study adjusts its p-values together, so its false positives are at most these and its power at most "
             "these): 'separate' with no "
             f"barrier in at most {found['false_positive_max']:.0%} of cells (target ≤ "
             f"{found['false_positive_target']:.0%}: {'met' if found['false_positive_met'] else 'MISSED'}); 'one "
             f"basin' at a barrier of the margin {found['margin']:g} in at most "
             f"{found['one_basin_at_margin_max']:.0%}."]
    varied = varied_axes(run.read_csv(rundir.MEMBERS))
    for c in found["cells"]:
        p = c["parameters"]
        where = describe(grid.cell(c["cell"]), varied)
        rates = "; ".join(f"{_SCENARIO_WORDS[r['scenario']].format(b=r['barrier'])}: separate {r['separate']:.0%}, "
                          f"one basin {r['one_basin']:.0%}" for r in c["scenarios"])
        lines.append(f"{where} ({c['why']}: {p['seeds']} seeds, {p['design']} pairs, {p['examples']} test examples, "
                     f"error {p['error']:.2f}, disagreement σ {p['spread']:.3f}, accuracy SD {p['accuracy_sd']:.3f}): "
                     f"{rates}.")
    if found["blind_spots"]:
        lines.append("Blind spots (a real barrier called separate in fewer than 80 % of cells): " + "; ".join(
            f"{_SCENARIO_WORDS[b['scenario']].format(b=b['barrier'])} at {describe(grid.cell(b['cell']), varied)} "
            f"(separate {b['separate']:.0%}, one basin {b['one_basin']:.0%})" for b in found["blind_spots"]) + ".")
    return lines


def answer(run: rundir.RunDir) -> list[tuple[str, list[str]]]:
    """(question, sentences) for each hypothesis the run can speak to."""
    m = measure_run(run)
    members = run.read_csv(rundir.MEMBERS)
    soups = run.read_csv(rundir.SOUPS) if run.exists(rundir.SOUPS) else []
    sim_rows = run.read_csv(rundir.SIMILARITY) if run.exists(rundir.SIMILARITY) else []
    name = "aligned test error barrier" if m.barrier.endswith("_aligned") else "test error barrier"
    critical, critical_rows = [], []
    if noreturn.has_steps(run) and len({mem["lr"] for mem in members}) > 1:
        critical_rows, details = noreturn.analyse(run)
        critical = noreturn.verdicts(critical_rows, details)
    sections = [
        ("H3 — is there a point of no return? The critical learning rate (a rate leaves the basin when the seeds are "
         "shown separate from each other or from their start, stays when both are shown within the margin; the rule "
         "of the cell verdicts) by pretraining checkpoint, as brackets of grid rates", critical),
        ("Failed fits", failures(members, run.read_csv(rundir.TO_START)) + sensitivity(run, critical_rows)),
        (f"H1 — does the seeds' barrier ({name}) fall with pretraining? (first vs last checkpoint)", pretraining(m)),
        ("H2 — does it rise with the fine-tuning learning rate? (lowest vs highest rate with usable members)",
         learning_rate(m)),
        ("Sources of randomness — head initialisation vs data order", sources(m)),
        ("Same basin? Seeds against each other, and each member against its start", [
            *basins(m, "", f"Between seeds ({name})"),
            *basins(m, "start_", "To the start (pretrained body + linear-probe head, linear-baseline test error "
                                       "barrier)")]),
        ("H4 — do OOD spread, accuracy, soups and similarity move with the barrier?", moves_together(m, soups,
                                                                                                     sim_rows)),
        ("How often would these verdicts be wrong? Calibration on this study's own cells", calibration(run)),
    ]
    return [(q, lines) for q, lines in sections if lines]


def decisions(run: rundir.RunDir) -> dict[str, str]:
    """Every verdict the report states, as {what: decision}, to compare a study with its replicate: H1 and H2 per
    combination of the other axes (rises / falls / not resolved), one basin / separate basins / not resolved per cell
    between seeds and to the start, and H3's critical-rate and trainability brackets per start and length."""
    m = measure_run(run)
    out = {}
    for (axis, first, _), (word, *_) in trends(m).items():
        out[f"{'H1' if axis == 'pretrain_step' else 'H2'} {m.where(first, (axis,))}"] = word
    for prefix, label in (("", "seeds"), ("start_", "start")):
        out.update({f"basin ({label}) {m.where(c)}": v for c, v in _basin_verdicts(m, prefix).items()})
    if noreturn.has_steps(run) and len({r["lr"] for r in run.read_csv(rundir.MEMBERS)}) > 1:
        for row in noreturn.analyse(run)[0]:
            where = f"{noreturn.start_label(row['pretrain_step'])}, {row['head']} heads, {row['finetune_step']} steps"
            out[f"H3 stays → leaves, {where}"] = noreturn.bracket_pair(row)
            out[f"H3 trains → fails, {where}"] = noreturn.bracket_pair({"stay_lr": row["trains_lr"],
                                                                         "leave_lr": row["failing_lr"]})
    return out


def compare(a: rundir.RunDir, b: rundir.RunDir) -> list[dict]:
    """One row per verdict either run states: {"verdict", "a", "b", "agree"} ("–" where a run does not state it)."""
    da, db = decisions(a), decisions(b)
    return [{"verdict": k, "a": da.get(k, "–"), "b": db.get(k, "–"), "agree": da.get(k) == db.get(k)}
            for k in dict.fromkeys([*da, *db])]
