"""Pair curves on plain arrays: every requested pair of members (and, optionally, every member to a reference point)
interpolated and evaluated in one compiled pass (jaxlmc.paths), under every pair measure a call names
(jaxlmc.measures: after weight or activation matching, jaxlmc.permute; REPAIR, jaxlmc.repair; Bezier curves,
jaxlmc.curves; one's own); the rows of barriers/pairs.csv and to_start.csv; and the per-cell summary with its
intervals and verdicts. Nothing here reads a config or a run directory: `jaxlmc.pair_barriers` (jaxlmc.library) is
its client, and the barrier stage (jaxlmc.barrier_stage) calls that.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxlmc import decide, loop, memory, models, paths, permute, shard, spec_check, stats
from jaxlmc.measures import PAIR_MEASURES, BezierSettings, chosen
from jaxlmc.settings import DEFAULT_ALPHAS

ALIGN_METHODS = ("weights", "activations")


@dataclasses.dataclass
class PairCurves:
    """The compiled pass's output: the member pairs' curves under every measure computed (`measures`, by measure name,
    the straight line "straight" first: jaxlmc.measures) and each member's line to its reference (`to_start`, when
    asked); {split: (loss_PxAxR1, err_PxAxR1)} each, the last axis holding the curve on the evaluation set itself and
    then on each of its resamplings."""

    alphas: np.ndarray
    measures: dict
    to_start: dict
    dist_P: np.ndarray
    cos_P: np.ndarray
    dist_K: np.ndarray
    chunk: int
    splits: list[str]
    seconds: float
    align_seconds: float
    perms: list | None = None  # the permutations of each member pair (with alignment)
    measure_seconds: dict = dataclasses.field(default_factory=dict)  # {name: seconds} of the measures beyond the line

    @property
    def pairs(self) -> dict:
        """The straight line's curves."""
        return self.measures["straight"]


def _probe_examples(eval_sets: dict, count: int = 4):
    """A few examples of the first evaluation set (its first batch's first rows)."""
    return next(iter(eval_sets.values()))[0][0][:count]


def pair_curves(model: models.Model, params_K: dict, pairs: list[tuple[int, int]], eval_sets: dict, *,
                num_alphas: int = DEFAULT_ALPHAS, start_K: dict | None = None, reference_K: dict | None = None,
                chunk_pairs: int = 0, memory_fraction: float = 0.5, align: str | None = None, align_x=None,
                repair_x=None, bezier: BezierSettings | None = None, measures: Sequence[str] = (), status=None,
                progress: loop.Progress | None = None) -> PairCurves:
    """The curves of `pairs` (indices into the member axis of `params_K`) on `eval_sets` (`eval_sets`), and of each
    member to its `reference_K` (None: no to-start curves), in one compiled pass sharded over the devices.

    `start_K` is where each member started (the updates θ − start give update_cos; None: NaN). `align`: "weights"
    (weight matching) or "activations" (activation matching on `align_x`), then the "aligned" measure; `repair_x`:
    the "repair" measure (REPAIR every interior point on those examples, on the pairs as compared: aligned when
    aligning); `bezier`: the "curve" measure (a Bezier curve trained per pair); `measures`: further registered pair
    measures by name (jaxlmc.measures). `chunk_pairs` 0: the largest chunk whose scratch memory fits
    `memory_fraction` of the free memory. `progress` shows the pairs evaluated (the straight line, aligned and
    repaired passes together) as a bar named "barriers" whose steps are pairs (num_members 0: jaxlmc.loop.Progress).
    """
    if align not in (None, *ALIGN_METHODS):
        raise ValueError(f"align: {align!r} is not one of {ALIGN_METHODS} (or None)")
    if align == "activations" and align_x is None:
        raise ValueError('align="activations" needs examples to correlate the units on (align_x)')
    names = [*(["aligned"] if align else []), *(["repair"] if repair_x is not None else []),
             *(["curve"] if bezier is not None else []), *measures]
    options = {"line": True, "tick": None, "repair_x": repair_x, "bezier": bezier}
    computed = chosen(names, options, aligned=align is not None)
    num_members = jax.tree.leaves(params_K)[0].shape[0]
    bad = [p for p in pairs if not all(0 <= m < num_members for m in p)]
    if bad:
        raise IndexError(f"pair {bad[0]}: member out of range (there are {num_members} members)")
    with_start = reference_K is not None
    both = jax.tree.map(lambda a, s: jnp.concatenate([a, s]), params_K, reference_K) if with_start else params_K
    start_pairs = [(k, num_members + k) for k in range(num_members)] if with_start else []
    pairs_Px2 = jnp.asarray(list(pairs) + start_pairs, jnp.int32).reshape(-1, 2)
    alphas = paths.alpha_grid(num_alphas)
    resampled = next(iter(eval_sets.values()))
    with_resamples = (lambda a: a) if len(resampled) > 3 else (lambda a: a[..., None])
    chunk = chunk_pairs or paths.auto_chunk_pairs(model, both, eval_sets, alphas, max(len(pairs_Px2), 1),
                                                     memory.memory_budget(memory_fraction))
    if status:
        status(f"{len(pairs)} member pairs + {len(start_pairs)} to-start pairs × {len(alphas)} α × "
               f"{len(eval_sets)} sets (chunks of {chunk} pairs)")
    if align and pairs:  # a spec that is not a symmetry of the network would "align" pairs into other functions
        spec_check.check_spec(model, jax.tree.map(lambda a: a[0], params_K), _probe_examples(eval_sets))
    mesh = shard.device_mesh()
    evaluated = len(pairs_Px2) + len(pairs) * sum("tick" in m.options or "line" in m.options for m in computed)
    host = lambda tree: jax.tree.map(lambda a: with_resamples(shard.to_host(a)), tree)  # noqa: E731
    with (progress or loop.silent)("barriers", evaluated, 0, 0) as bar:
        # Once per pair, from inside the compiled pass; none without a bar (no host callback in the program then).
        tick = (lambda: bar.advance(1, None)) if progress else None
        line_fn = paths.make_path_eval(model, paths.straight(), alphas, chunk, mesh, tick)
        start_time = time.perf_counter()
        lines = host(line_fn(*shard.replicate((both, pairs_Px2, eval_sets), mesh))) if len(pairs_Px2) else {}
        seconds = time.perf_counter() - start_time  # includes compilation: what the researcher waits for
        member_pairs_Px2 = pairs_Px2[:len(pairs)]
        if pairs:
            geometry_start = params_K if start_K is None else start_K
            dist_P, cos_P = map(np.asarray, paths.pair_geometry(params_K, geometry_start, member_pairs_Px2))
            if start_K is None:
                cos_P = np.full_like(cos_P, np.nan)
        else:
            dist_P = cos_P = np.zeros((0,), np.float32)
        align_seconds, perms = 0.0, None
        if align and pairs:
            start_time = time.perf_counter()
            if align == "activations":
                perms = permute.match_activations(model, params_K, pairs, align_x)
            else:
                perms = permute.match_pairs(model, params_K, pairs)
            align_seconds = time.perf_counter() - start_time
        num_pairs = len(pairs)
        by_measure = {"straight": {s: (c[0][:num_pairs], c[1][:num_pairs]) for s, c in lines.items()}}
        measure_seconds = {}
        options = {**options, "line": line_fn, "tick": tick}
        for measure in computed[1:]:
            if not pairs:
                by_measure[measure.name] = {}
                continue
            start_time = time.perf_counter()
            args = shard.replicate((params_K, member_pairs_Px2, eval_sets,
                                    None if perms is None else [jnp.asarray(p) for p in perms]), mesh)
            by_measure[measure.name] = host(measure.compute(model, *args[:3], alphas, chunk, mesh, args[3],
                                                            **{k: options[k] for k in measure.options}))
            measure_seconds[measure.name] = time.perf_counter() - start_time
    dist_K = np.asarray(jax.vmap(models.tree_l2)(params_K, reference_K)) if with_start else np.zeros((0,))
    return PairCurves(
        alphas=alphas, measures=by_measure,
        to_start={s: (c[0][num_pairs:], c[1][num_pairs:]) for s, c in lines.items()} if with_start else {},
        dist_P=dist_P, cos_P=cos_P, dist_K=dist_K, chunk=chunk, splits=list(eval_sets),
        seconds=seconds, align_seconds=align_seconds, perms=perms, measure_seconds=measure_seconds)


def curve_columns(curves: dict, alphas: np.ndarray, suffix: str = "") -> dict[str, np.ndarray]:
    """Per-pair barrier columns from {split: (loss_PxAxR1, err_PxAxR1)} (the last axis: the evaluation set itself,
    then its resamplings): both barrier forms, each with its noise floor (jaxlmc.stats), and the midpoint."""
    columns = {}
    for split, (loss, err) in curves.items():
        for metric, curve in (("loss", loss), ("error", err)):
            for form in stats.FORMS:
                name = f"{metric}_barrier_{split}{form}{suffix}"
                columns[name] = stats.barrier(curve[..., 0], alphas, form)
                if curve.shape[-1] > 2:
                    null_PxR = stats.null_barriers(curve, alphas, form)
                    columns[f"{name}_floor"] = stats.floor_of(null_PxR)
                    columns[f"{name}_null"] = null_PxR.mean(axis=1)
                    columns[f"{name}_null_se"] = null_PxR.std(axis=1, ddof=1) / np.sqrt(null_PxR.shape[1])
            columns[f"{metric}_mid_{split}{suffix}"] = stats.midpoint(curve[..., 0], alphas)
    return columns


def pair_columns(curves: PairCurves) -> dict[str, np.ndarray]:
    """Every per-pair column of barriers/pairs.csv that the curves hold: each comparison's barriers, floors and
    midpoints, the distance and the cosine of the updates."""
    columns = {}
    for name, by_set in curves.measures.items():
        columns.update(curve_columns(by_set, curves.alphas, PAIR_MEASURES.lookup(name).suffix))
    columns["dist"], columns["update_cos"] = curves.dist_P, curves.cos_P
    return columns


def barrier_rows(table: list[dict], pairs: list[tuple[int, int]], used: list[int], curves: PairCurves,
                 cell_keys: tuple[str, ...], pair_keys: tuple[str, ...] = ("seed_i", "seed_j")):
    """(pair_rows, start_rows), the rows of barriers/pairs.csv and barriers/to_start.csv: one per member pair of
    `pairs` (indices into `table`; its members i and j, their cell — `cell_keys` — and whether they share it, each
    column of `pair_keys`, "<key>_i" or "<key>_j" being member i's or j's value of <key>, then `pair_columns`), and,
    when the curves hold them, one per member of `used` to its start (the line's columns, the start on its own —
    α = 1 — and the distance)."""
    columns = pair_columns(curves)
    cell = lambda row: {k: row[k] for k in cell_keys}  # noqa: E731
    pair_rows = []
    for p, (i, j) in enumerate(pairs):
        mi, mj = table[i], table[j]
        row = {"i": i, "j": j, **cell(mi), "same_cell": cell(mi) == cell(mj)}
        row.update({key: (mi if key.endswith("_i") else mj)[key[:-2]] for key in pair_keys})
        row.update({k: float(v[p]) for k, v in columns.items()})
        pair_rows.append(row)
    if not curves.to_start:
        return pair_rows, []
    start_columns = curve_columns(curves.to_start, curves.alphas)
    for split, (loss, err) in curves.to_start.items():  # the start (α = 1) on its own
        start_columns[f"start_loss_{split}"], start_columns[f"start_error_{split}"] = loss[:, -1, 0], err[:, -1, 0]
    start_rows = []
    for k, m in enumerate(used):
        row = {"member": m, **cell(table[m]), "seed": table[m]["seed"]}
        row.update({key: float(v[k]) for key, v in start_columns.items()})
        row["dist"] = float(curves.dist_K[k])
        start_rows.append(row)
    return pair_rows, start_rows


def _measures(rows: list[dict]) -> list[str]:
    return [k for k in (rows or [{}])[0] if k.startswith(("loss_", "error_"))
            and not k.endswith(("_floor", "_null", "_null_se"))]


def _estimate(rows: list[dict], values: np.ndarray, is_pair: bool, members: list[dict], num_seeds: int):
    seeds = [(members[p["i"]]["seed"], members[p["j"]]["seed"]) if is_pair else p["seed"] for p in rows]
    return stats.seed_estimate(seeds, values, num_seeds, paired=is_pair)


def _measure_columns(label: str, values: dict, estimate) -> dict:
    """`label`'s summary columns: mean, std, interval (and SE) of the barrier, its floor, and its excess over its
    null mean (with the minimum detectable excess)."""
    row = {}
    for name, v in values.items():
        column = label + {"floor": "_floor", "excess": "_excess"}.get(name, "")
        finite = v[np.isfinite(v)]
        est = estimate(v)
        row[f"{column}_mean"] = finite.mean() if finite.size else np.nan
        row[f"{column}_std"] = finite.std() if finite.size else np.nan
        row[f"{column}_ci_lo"], row[f"{column}_ci_hi"] = est.interval()
        if name != "floor" and "excess" in values:
            row[f"{column}_se"] = est.se
        if name == "excess":
            row[f"{column}_min_detectable"] = est.min_detectable()
    return row


def cell_summary(members: list[dict], pair_rows: list[dict], start_rows: list[dict], num_seeds: int,
                 cell_keys: tuple[str, ...], margin: float = decide.MARGIN) -> list[dict]:
    """One row per cell (the members' values of `cell_keys`, in first-seen order): for every pair measure
    (within-cell pairs) and every to-start measure (the cell's used members), its mean, std over pairs (members) and
    95 % interval over seeds (jaxlmc.decide: Student-t over the leave-one-seed-out jackknife; pairs share members,
    so seeds are the units); for every barrier with a noise floor, the mean floor, and the excess (the barrier minus
    its null mean) with its interval and minimum detectable value. Each cell's verdict (`verdict`, to the start
    `start_verdict`) on the headline barrier (`decide.headline_measure`) by jaxlmc.decide's rule at `margin`, the
    p-values of every cell adjusted together. Members are rows with "member", "seed" (0 .. num_seeds − 1), "diverged" and
    optionally "unfit"; pair rows have "i", "j", "same_cell" and the cell keys of member i."""
    cell = lambda row: tuple(row[k] for k in cell_keys)  # noqa: E731
    groups: dict = {}
    for m in members:
        groups.setdefault(cell(m), []).append(m["member"])
    headlines = {"": decide.headline_measure(pair_rows), "start_": decide.headline_measure(start_rows)}
    out, tests, shifts = [], {}, {}
    for key, member_ids in groups.items():
        row = dict(zip(cell_keys, key))
        cell_members = [members[m] for m in member_ids]
        within = [p for p in pair_rows if p["same_cell"] and cell(p) == key]
        starts = [s for s in start_rows if s["member"] in member_ids]
        row.update({"members": len(member_ids), "members_used": len(starts), "pairs": len(within),
                    "diverged": sum(m["diverged"] for m in cell_members),
                    "unfit": sum(bool(m.get("unfit")) for m in cell_members)})
        for prefix, rows in (("", within), ("start_", starts)):
            estimate = lambda v, rows=rows, prefix=prefix: _estimate(rows, v, not prefix, members, num_seeds)  # noqa
            for measure in _measures(pair_rows if not prefix else start_rows) + (["dist", "update_cos"] if not prefix
                                                                                 else ["dist"]):
                if not rows or measure not in rows[0]:
                    continue
                values = {"": np.array([r[measure] for r in rows], np.float64)}
                for extra in ("floor", "null"):
                    if f"{measure}_{extra}" in rows[0]:
                        values[extra] = np.array([r[f"{measure}_{extra}"] for r in rows], np.float64)
                if "null" in values:
                    values["excess"] = values[""] - values.pop("null")
                row.update(_measure_columns(f"{prefix}{measure}", values, estimate))
                if measure == headlines[prefix] and "excess" in values:
                    tests[(len(out), prefix)] = (estimate(values["excess"]), estimate(values[""]))
                    if f"{measure}_null_se" in rows[0]:  # the resamplings are shared: their errors add up
                        shifts[(len(out), prefix)] = float(np.mean([r[f"{measure}_null_se"] for r in rows]))
        out.append(row)
    for (k, prefix), decision in decide.decide_all(tests, margin, shifts=shifts).items():
        out[k].update({f"{prefix}{name}": v for name, v in decision.items()})
    for prefix in {prefix for _, prefix in tests}:  # (a cell with too few members: no test, not resolved)
        for row in out:
            row["margin"] = margin
            row.setdefault(f"{prefix}verdict", "not resolved")
            row.setdefault(f"{prefix}p_separate", np.nan)
            row.setdefault(f"{prefix}p_one_basin", np.nan)
            row.setdefault(f"{prefix}mc_moved", 0.0)
    return out
