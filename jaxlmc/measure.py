"""Barriers of a finished fine-tuning run: interpolation barriers between members and from each member to its
starting point, in one compiled pass (jaxlmc.barriers), written under barriers/ (see jaxlmc.rundir for the files).

`load_run` reads a finished run (members, task, model, final parameters); soups (jaxlmc.soups) and similarity
(jaxlmc.similarity) measure the same finished runs.
"""
from __future__ import annotations

import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxlmc import barriers, finetuning, grid, layerwise, memory, models, permute, rundir, shard, stats, tasks
from jaxlmc.config import Config, ConfigError
from jaxlmc.curves import make_curve_eval, make_train_bends


@dataclasses.dataclass
class FinishedRun:
    members: list[dict]
    task: tasks.Task
    model: models.Model
    params_M: dict  # the final parameters of every member (device arrays)

    @property
    def used(self) -> list[int]:
        """The members that enter barriers, soups and basins: neither diverged nor unfit (grid.usable)."""
        return [m["member"] for m in self.members if grid.usable(m)]

    def used_groups(self) -> tuple[list[tuple], np.ndarray]:
        """The cells and idx_GxK of their used members (padded with -1)."""
        groups = {key: [m for m in ids if grid.usable(self.members[m])]
                  for key, ids in grid.cell_groups(self.members).items()}
        width = max([len(v) for v in groups.values()] + [1])
        idx = np.full((len(groups), width), -1, np.int64)
        for g, ids in enumerate(groups.values()):
            idx[g, :len(ids)] = ids
        return list(groups), idx


def load_run(cfg: Config, out: str) -> FinishedRun:
    """A finished fine-tuning run: members.csv, the fine-tuning task, the model and the final parameters."""
    run = rundir.RunDir(out)
    members = run.members()
    task = tasks.load_finetune_task(cfg)
    with run.checkpoints(rundir.CHECKPOINTS, read_only=True) as manager:
        latest = manager.latest_step()
    if latest != cfg.finetune.steps:
        raise ConfigError(f"{out}: the latest fine-tuning checkpoint is at step {latest}, not finetune.steps = "
                          f"{cfg.finetune.steps}; finish the run with `jaxlmc finetune` first")
    model = models.build(cfg.model, task.input_shape, task.train.num_classes, task.per_token)
    params_M = jax.tree.map(jnp.asarray, run.restore_params(rundir.CHECKPOINTS, latest))
    return FinishedRun(members, task, model, params_M)


def select_pairs(spec: str, members: list[dict]) -> tuple[list[tuple[int, int]], int]:
    """The requested pairs among used members, and how many requested pairs were left out (a member diverged or
    unfit)."""
    if spec == "all":
        requested = barriers.pairs_all(range(len(members)))
    elif spec == "within":
        requested = barriers.pairs_within(grid.cell_groups(members))
    elif not os.path.isfile(spec):
        raise ConfigError(f'barriers.pairs: {spec!r} is neither "within", "all" nor an existing pair file')
    else:
        try:
            requested = barriers.read_pairs(spec, len(members))
        except ValueError as err:
            raise ConfigError(f"barriers.pairs: {err}") from None
    kept = [p for p in requested if grid.usable(members[p[0]]) and grid.usable(members[p[1]])]
    return kept, len(requested) - len(kept)


def _curve_columns(curves: dict, alphas: np.ndarray, suffix: str = "") -> dict[str, np.ndarray]:
    """Per-pair barrier columns from {split: (loss_PxAxR1, err_PxAxR1)} (the last axis: the evaluation set itself,
    then its resamplings): both barrier forms, each with its noise floor (jaxlmc.stats), and the midpoint."""
    columns = {}
    for split, (loss, err) in curves.items():
        for metric, curve in (("loss", loss), ("error", err)):
            for form in stats.FORMS:
                name = f"{metric}_barrier_{split}{form}{suffix}"
                columns[name] = stats.barrier(curve[..., 0], alphas, form)
                if curve.shape[-1] > 2:
                    columns[f"{name}_floor"] = stats.noise_floor(curve, alphas, form)
            columns[f"{metric}_mid_{split}{suffix}"] = barriers.midpoint(curve[..., 0], alphas)
    return columns


def _measures(rows: list[dict]) -> list[str]:
    return [k for k in (rows or [{}])[0] if k.startswith(("loss_", "error_")) and not k.endswith("_floor")]


def _summary(members: list[dict], pair_rows: list[dict], start_rows: list[dict], bootstrap: int,
             num_seeds: int) -> list[dict]:
    """One row per grid cell: for every pair measure (within-cell pairs) and every to-start measure (the cell's used
    members), its mean, std over pairs (members) and member-bootstrap CI (jaxlmc.stats); for every barrier with a
    noise floor, the mean floor and the mean excess (barrier − floor) with its CI."""
    draws = stats.seed_draws(num_seeds, bootstrap)
    out = []
    for key, member_ids in grid.cell_groups(members).items():
        row = dict(zip(grid.CELL_KEYS, key))
        cell_members = [members[m] for m in member_ids]
        within = [p for p in pair_rows if p["same_cell"] and grid.cell(p) == key]
        starts = [s for s in start_rows if s["member"] in member_ids]
        row.update({"members": len(member_ids), "members_used": len(starts), "pairs": len(within),
                    "diverged": sum(m["diverged"] for m in cell_members),
                    "unfit": sum(bool(m.get("unfit")) for m in cell_members)})
        seed_pairs = [(members[p["i"]]["seed"], members[p["j"]]["seed"]) for p in within]
        for prefix, rows in (("", within), ("start_", starts)):
            for measure in _measures(pair_rows if not prefix else start_rows) + (["dist", "update_cos"] if not prefix
                                                                                 else ["dist"]):
                values = {name: np.array([r[name] for r in rows], np.float64)
                          for name in (measure, f"{measure}_floor") if rows and name in rows[0]}
                if measure not in values:
                    continue
                if f"{measure}_floor" in values:
                    values["excess"] = values[measure] - values[f"{measure}_floor"]
                for name, v in values.items():
                    label = f"{prefix}{measure}" + ("_excess" if name == "excess" else
                                                    "_floor" if name.endswith("_floor") else "")
                    finite = v[np.isfinite(v)]
                    row[f"{label}_mean"] = finite.mean() if finite.size else np.nan
                    row[f"{label}_std"] = finite.std() if finite.size else np.nan
                    if prefix:
                        per_seed = np.full(num_seeds, np.nan)
                        per_seed[[r["seed"] for r in rows]] = v
                        replicates = stats.member_replicates(per_seed, draws)
                    else:
                        replicates = stats.pair_replicates(stats.symmetric_matrix(num_seeds, seed_pairs, v), draws)
                    row[f"{label}_ci_lo"], row[f"{label}_ci_hi"] = stats.ci(replicates) if bootstrap else (np.nan,) * 2
        out.append(row)
    return out


@dataclasses.dataclass
class Curves:
    """The compiled pass's output for one run: curves of the member pairs, of each member to its start, and (with
    barriers.align) of the aligned member pairs; {split: (loss_PxAxR1, err_PxAxR1)} each, the last axis holding the
    curve on the evaluation set itself and then on each of its barriers.noise_resamples resamplings."""

    alphas: np.ndarray
    pairs: dict
    to_start: dict
    aligned: dict
    dist_P: np.ndarray
    cos_P: np.ndarray
    dist_K: np.ndarray
    chunk: int
    splits: list[str]
    seconds: float
    align_seconds: float
    perms: list | None = None  # weight matching's permutations of each member pair (with barriers.align)
    repaired: dict = dataclasses.field(default_factory=dict)  # the member pairs' curves after REPAIR (barriers.repair)
    curved: dict = dataclasses.field(default_factory=dict)  # along trained Bezier curves (barriers.curve_steps)
    curve_seconds: float = 0.0


def compute_curves(cfg: Config, run: FinishedRun, start_M: dict, pairs: list[tuple[int, int]], status=None,
                   reference_M: dict | None = None) -> Curves:
    """Every requested member pair and every member-to-start pair of the used members in one compiled pass; with
    barriers.align, weight (or activation) matching of each member pair and the same pass on the aligned pairs.

    `start_M` is where each member started (the fine-tuning updates θ − start, for update_cos); `reference_M` (default
    `start_M`) is the start its to-start curve and distance are measured to."""
    reference_M = start_M if reference_M is None else reference_M
    b = cfg.barriers
    used = run.used
    # Only used members enter the pass: members at positions 0..K-1, their starting points at K..2K-1.
    position = {m: k for k, m in enumerate(used)}
    take = jnp.asarray(used)
    params_K = jax.tree.map(lambda a: a[take], run.params_M)
    start_K = jax.tree.map(lambda a: a[take], start_M)
    reference_K = jax.tree.map(lambda a: a[take], reference_M)
    both_2K = jax.tree.map(lambda a, s: jnp.concatenate([a, s]), params_K, reference_K)
    num_used = len(used)
    member_pairs = [(position[i], position[j]) for i, j in pairs]
    start_pairs = [(k, num_used + k) for k in range(num_used)]
    pairs_Px2 = jnp.asarray(member_pairs + start_pairs, jnp.int32).reshape(-1, 2)

    alphas = barriers.alpha_grid(b.alphas)
    eval_sets = tasks.eval_sets(cfg, run.task, resamples=b.noise_resamples)
    with_resamples = (lambda a: a) if b.noise_resamples else (lambda a: a[..., None])
    budget = memory.memory_budget(b.memory_fraction)
    chunk = b.chunk_pairs or barriers.auto_chunk_pairs(run.model, both_2K, eval_sets, alphas, len(pairs_Px2), budget)
    if status:
        status(f"{len(member_pairs)} member pairs + {len(start_pairs)} to-start pairs × {len(alphas)} α × "
               f"{len(eval_sets)} sets (chunks of {chunk} pairs)")
    mesh = shard.device_mesh()
    curves_fn = barriers.make_curves(run.model, alphas, chunk, mesh=mesh)
    start_time = time.perf_counter()
    lines = jax.tree.map(lambda a: with_resamples(shard.to_host(a)),
                         curves_fn(*shard.replicate((both_2K, pairs_Px2, eval_sets), mesh)))
    seconds = time.perf_counter() - start_time  # includes compilation: what the researcher waits for
    num_member_pairs = len(member_pairs)

    if member_pairs:
        dist_P, cos_P = map(np.asarray, barriers.pair_geometry(params_K, start_K, pairs_Px2[:num_member_pairs]))
    else:
        dist_P = cos_P = np.zeros((0,), np.float32)
    aligned, align_seconds, perms = {}, 0.0, None
    if b.align and member_pairs:
        # Weight matching of j onto i for every member pair, then the same pass on the aligned pairs.
        start_time = time.perf_counter()
        if b.align == "activations":  # activation matching on the fixed train-evaluation subset
            x = run.task.train.x[:cfg.data.train_eval_size]
            perms = permute.match_activations(run.model, params_K, member_pairs, x)
        else:
            perms = permute.match_pairs(run.model, params_K, member_pairs)
        align_seconds = time.perf_counter() - start_time
        aligned = jax.tree.map(lambda a: with_resamples(shard.to_host(a)), curves_fn(*shard.replicate(
            (params_K, pairs_Px2[:num_member_pairs], eval_sets, [jnp.asarray(p) for p in perms]), mesh)))
    repaired = {}
    if b.repair and member_pairs:
        # REPAIR on the pairs as the study compares them: aligned when it aligns, else as they are.
        repair_x = jnp.asarray(run.task.train.x[:min(b.repair_examples, cfg.data.train_eval_size)])
        repair_fn = barriers.make_curves(run.model, alphas, chunk, mesh=mesh, repair_x=repair_x)
        args = (params_K, pairs_Px2[:num_member_pairs], eval_sets) + (
            ([jnp.asarray(p) for p in perms],) if perms is not None else ())
        repaired = jax.tree.map(lambda a: with_resamples(shard.to_host(a)), repair_fn(*shard.replicate(args, mesh)))
    curved, curve_seconds = {}, 0.0
    if b.curve_steps and member_pairs:
        # Bezier curves between the pairs as the study compares them (aligned when it aligns), on the same α grid.
        start_time = time.perf_counter()
        train_x, train_y = run.task.train.x, run.task.train.y
        train_bends = make_train_bends(run.model, b.curve_steps, cfg.finetune.batch_size, b.curve_lr, len(train_y),
                                       chunk_pairs=chunk)
        perm_args = ([jnp.asarray(p) for p in perms],) if perms is not None else ()
        member_pairs_Px2 = pairs_Px2[:num_member_pairs]
        bends_P = train_bends(params_K, member_pairs_Px2, {"x": jnp.asarray(train_x), "y": jnp.asarray(train_y)},
                              jax.random.key(0), *perm_args)
        curve_fn = make_curve_eval(run.model, alphas, chunk)
        curved = jax.tree.map(lambda a: with_resamples(np.asarray(a)),
                              curve_fn(params_K, bends_P, member_pairs_Px2, eval_sets, *perm_args))
        curve_seconds = time.perf_counter() - start_time
    return Curves(
        alphas=alphas,
        pairs={s: (c[0][:num_member_pairs], c[1][:num_member_pairs]) for s, c in lines.items()},
        to_start={s: (c[0][num_member_pairs:], c[1][num_member_pairs:]) for s, c in lines.items()},
        aligned=aligned, dist_P=dist_P, cos_P=cos_P, dist_K=np.asarray(jax.vmap(models.tree_l2)(params_K, reference_K)),
        chunk=chunk, splits=list(eval_sets), seconds=seconds, align_seconds=align_seconds, perms=perms,
        repaired=repaired, curved=curved, curve_seconds=curve_seconds)


# The barriers whose per-resampling null values are kept (barriers/nulls.npz) for the calibrated cell decision
# (stats.cell_threshold): the seeds' test error barrier, naive and aligned, and the linear-baseline one to the start.
NULL_MEASURES = (("pairs", "error", "test", "", ""), ("pairs", "error", "test", "", "_aligned"),
                 ("start", "error", "test", "_lin", ""))


def null_arrays(curves: Curves) -> dict[str, np.ndarray]:
    """{"<pairs|start>_<measure>": null_PxR} (stats.null_barriers) for NULL_MEASURES, in the row order of pairs.csv
    and to_start.csv; float32."""
    out = {}
    for which, metric, split, form, suffix in NULL_MEASURES:
        by_split = {"pairs": {"": curves.pairs, "_aligned": curves.aligned}[suffix], "start": curves.to_start}[which]
        if split not in by_split:
            continue
        curve = by_split[split][0 if metric == "loss" else 1]
        out[f"{which}_{metric}_barrier_{split}{form}{suffix}"] = stats.null_barriers(
            curve, curves.alphas, form).astype(np.float32)
    return out


def barrier_rows(members: list[dict], pairs: list[tuple[int, int]], used: list[int], curves: Curves):
    """(pair_rows, start_rows): one row per member pair and one per used member, with their cell keys."""
    pair_columns = _curve_columns(curves.pairs, curves.alphas)
    pair_columns.update(_curve_columns(curves.aligned, curves.alphas, "_aligned"))
    pair_columns.update(_curve_columns(curves.repaired, curves.alphas, "_repair"))
    pair_columns.update(_curve_columns(curves.curved, curves.alphas, "_curve"))
    pair_rows = []
    for p, (i, j) in enumerate(pairs):
        mi, mj = members[i], members[j]
        row = {"i": i, "j": j, **dict(zip(grid.CELL_KEYS, grid.cell(mi))), "same_cell": grid.cell(mi) == grid.cell(mj),
               "pretrain_step_j": mj["pretrain_step"], "lr_j": mj["lr"]}
        row.update({k: float(v[p]) for k, v in pair_columns.items()})
        row["dist"], row["update_cos"] = float(curves.dist_P[p]), float(curves.cos_P[p])
        pair_rows.append(row)
    start_columns = _curve_columns(curves.to_start, curves.alphas)
    for split, (loss, err) in curves.to_start.items():  # the start (α = 1: body + probe head) on its own
        start_columns[f"start_loss_{split}"], start_columns[f"start_error_{split}"] = loss[:, -1, 0], err[:, -1, 0]
    start_rows = []
    for k, m in enumerate(used):
        row = {"member": m, **dict(zip(grid.CELL_KEYS, grid.cell(members[m]))), "seed": members[m]["seed"]}
        row.update({key: float(v[k]) for key, v in start_columns.items()})
        row["dist"] = float(curves.dist_K[k])
        start_rows.append(row)
    return pair_rows, start_rows


def write_barriers(run: rundir.RunDir, pairs, used, curves: Curves, pair_rows, start_rows, summary, settings) -> None:
    run.write_csv(rundir.PAIRS, pair_rows)
    run.write_csv(rundir.TO_START, start_rows)
    run.write_csv(rundir.BARRIER_SUMMARY, summary)
    arrays = {"alphas": curves.alphas, "pairs": np.asarray(pairs, np.int32).reshape(-1, 2),
              "start_members": np.asarray(used, np.int32)}
    for prefix, by_split in (("", curves.pairs), ("start_", curves.to_start), ("aligned_", curves.aligned),
                             ("repair_", curves.repaired), ("curve_", curves.curved)):
        for split, (loss, err) in by_split.items():
            arrays[f"{prefix}loss_{split}"], arrays[f"{prefix}error_{split}"] = loss[..., 0], err[..., 0]
    run.write_npz(rundir.CURVES, arrays)
    run.write_npz(rundir.NULLS, null_arrays(curves))
    run.write_json(rundir.BARRIER_SETTINGS, settings)


@rundir.exclusive
def barriers_of_run(cfg: Config, out: str, status=None) -> dict:
    """Evaluate the requested member pairs and every member-to-start pair of a finished fine-tuning run in one
    compiled pass; write barriers/. With finetune.save_steps, the same at each saved fine-tuning step (one pass per
    step), in barriers/by_step/ beside the final step's rows. Returns {"pairs", "to_start", "summary", "settings"}."""
    b = cfg.barriers
    directory = rundir.RunDir(out)
    members = directory.members()
    pairs, left_out = select_pairs(b.pairs, members)  # a bad pair file is refused before any loading
    run = load_run(cfg, out)
    if not run.used:
        raise ConfigError(f"every member of {out} diverged or is unfit: there is nothing to interpolate")
    # The start every member's barrier to the start is measured against: its body with the probe head (a head that
    # works; a fresh random head sits at chance and would make that barrier meaningless). For probe-head members this
    # is exactly where they started.
    start_M = finetuning.start_params(cfg, out, run.model, members, run.task.train)
    probe_M = finetuning.start_params(cfg, out, run.model, members, run.task.train, heads="probe")
    curves = compute_curves(cfg, run, start_M, pairs, status, reference_M=probe_M)
    pair_rows, start_rows = barrier_rows(members, pairs, run.used, curves)
    summary = _summary(members, pair_rows, start_rows, b.bootstrap, cfg.finetune.seeds)
    num_used = len(run.used)
    num_evals = (len(pairs) + num_used) * (len(curves.alphas) - 2) + 2 * num_used
    settings = {"barriers": dataclasses.asdict(b), "chunk_pairs": curves.chunk, "member_pairs": len(pairs),
                "start_pairs": num_used, "left_out_pairs": left_out,
                "diverged_members": sum(m["diverged"] for m in members),
                "unfit_members": sum(bool(m.get("unfit")) for m in members), "splits": curves.splits,
                "alphas": curves.alphas.tolist(), "seconds": curves.seconds,
                "model_evals_per_s": num_evals / curves.seconds, "align_seconds": curves.align_seconds,
                "curve_seconds": curves.curve_seconds,
                "start": "each member's starting body with the linear-probe head (finetune.probe_steps, probe_l2)",
                "form": {"<metric>_barrier_<split>": "endpoint-mean: max L(α) − (L(0) + L(1))/2",
                         "<metric>_barrier_<split>_lin": "linear-baseline: max [L(α) − ((1−α)L(0) + αL(1))]",
                         "<barrier>_floor": "noise floor: 95 % quantile of the barrier of the centred curve over "
                                            "bootstrap resamplings of the evaluation examples"}}
    by_step = {cfg.finetune.steps: (members, pair_rows, start_rows, summary)}
    step_seconds = {}
    for step in cfg.finetune.save_steps:
        start_time = time.perf_counter()
        by_step[step] = _barriers_at_step(cfg, out, run, step, start_M, probe_M, status)
        step_seconds[step] = time.perf_counter() - start_time
    settings["finetune_steps"] = sorted(by_step)
    settings["seconds_per_saved_step"] = step_seconds
    layer_rows = layer_summary = None
    if b.layerwise and pairs:
        layer_rows, layer_summary, settings["layerwise_seconds"] = layerwise.layer_barriers(cfg, run, pairs,
                                                                                             curves.perms, status)
    write_barriers(directory, pairs, run.used, curves, pair_rows, start_rows, summary, settings)
    if layer_rows is not None:
        directory.write_csv(rundir.LAYERWISE, layer_rows)
        directory.write_csv(rundir.LAYERWISE_SUMMARY, layer_summary)
    directory.write_by_step({step: by_step[step] for step in sorted(by_step)})
    return {"pairs": pair_rows, "to_start": start_rows, "summary": summary, "settings": settings,
            "layerwise": layer_rows, "layerwise_summary": layer_summary}


def members_at_step(cfg: Config, out: str, run: FinishedRun, step: int, start_M: dict) -> tuple[list[dict], dict]:
    """(member rows, params_M) at a saved fine-tuning step: members.csv's rows with the metrics, divergence and
    unfit flags (study.fit_margin and study.unfit_fraction, the latter against the best member from the same start at
    that step) re-measured there."""
    saved = rundir.RunDir(out).restore_fields(rundir.CHECKPOINTS, step, ("params", "diverged"))
    params_M = jax.tree.map(jnp.asarray, saved["params"])
    results = finetuning.evaluate_members(cfg, run.model, run.task, params_M, start_M)
    rows = [{**m, **{k: float(v[i]) for k, v in results.items()}, "diverged": bool(saved["diverged"][i])}
            for i, m in enumerate(run.members)]
    for r, unfit in zip(rows, finetuning.unfit_flags(rows, cfg.study.unfit_fraction,
                                                     finetuning.chance_accuracy(cfg, run.task), cfg.study.fit_margin)):
        r["unfit"] = unfit
    return rows, params_M


def _barriers_at_step(cfg: Config, out: str, final: FinishedRun, step: int, start_M: dict, probe_M: dict, status):
    """(members, pair_rows, start_rows, summary) of the members as saved at fine-tuning step `step`."""
    members, params_M = members_at_step(cfg, out, final, step, start_M)
    run = FinishedRun(members, final.task, final.model, params_M)
    pairs, _ = select_pairs(cfg.barriers.pairs, members)
    if not run.used:
        return members, [], [], _summary(members, [], [], cfg.barriers.bootstrap, cfg.finetune.seeds)
    if status:
        status(f"fine-tuning step {step}:")
    curves = compute_curves(cfg, run, start_M, pairs, status, reference_M=probe_M)
    pair_rows, start_rows = barrier_rows(members, pairs, run.used, curves)
    return members, pair_rows, start_rows, _summary(members, pair_rows, start_rows, cfg.barriers.bootstrap,
                                                    cfg.finetune.seeds)
