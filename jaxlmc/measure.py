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

from jaxlmc import barriers, ckpt, finetuning, grid, memory, models, permute, rundir, shard, tasks
from jaxlmc.config import Config, ConfigError


@dataclasses.dataclass
class FinishedRun:
    members: list[dict]
    task: tasks.Task
    model: models.Model
    params_M: dict  # the final parameters of every member (device arrays)

    @property
    def alive(self) -> list[int]:
        return [m["member"] for m in self.members if not m["diverged"]]

    def alive_groups(self) -> tuple[list[tuple], np.ndarray]:
        """The cells and idx_GxK of their non-diverged members (padded with -1)."""
        groups = {key: [m for m in ids if not self.members[m]["diverged"]]
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
    manager = ckpt.Checkpoints(run.path(rundir.CHECKPOINTS), read_only=True)
    latest = manager.latest_step()
    manager.close()
    if latest != cfg.finetune.steps:
        raise ConfigError(f"{out}: the latest fine-tuning checkpoint is at step {latest}, not finetune.steps = "
                          f"{cfg.finetune.steps}; finish the run with `jaxlmc finetune` first")
    model = models.build(cfg.model, task.input_shape, task.train.num_classes)
    params_M = jax.tree.map(jnp.asarray, ckpt.restore_params(run.path(rundir.CHECKPOINTS), latest))
    return FinishedRun(members, task, model, params_M)


def select_pairs(spec: str, members: list[dict]) -> tuple[list[tuple[int, int]], int]:
    """The requested pairs among non-diverged members, and how many requested pairs were left out as diverged."""
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
    kept = [p for p in requested if not (members[p[0]]["diverged"] or members[p[1]]["diverged"])]
    return kept, len(requested) - len(kept)


def _curve_columns(curves: dict, alphas: np.ndarray) -> dict[str, np.ndarray]:
    """Per-pair barrier columns from {split: (loss_PxA, err_PxA)}."""
    columns = {}
    for split, (loss, err) in curves.items():
        for metric, curve in (("loss", loss), ("error", err)):
            columns[f"{metric}_barrier_{split}"] = barriers.barrier_endpoint_mean(curve)
            columns[f"{metric}_barrier_{split}_lin"] = barriers.barrier_linear(curve, alphas)
            columns[f"{metric}_mid_{split}"] = barriers.midpoint(curve, alphas)
    return columns


def _summary(groups: dict, pair_rows: list[dict], start_rows: list[dict], bootstrap: int) -> list[dict]:
    """One row per grid cell: mean, std and bootstrap CI of every pair measure (within-cell pairs) and of every
    to-start measure (the cell's members)."""
    measures = [k for k in (pair_rows or start_rows or [{}])[0] if k.startswith(("loss_", "error_"))]
    measures += ["dist", "update_cos"]
    out = []
    for key, member_ids in groups.items():
        row = dict(zip(grid.CELL_KEYS, key))
        within = [p for p in pair_rows if p["same_cell"] and grid.cell(p) == key]
        starts = [s for s in start_rows if s["member"] in member_ids]
        row.update({"members": len(member_ids), "members_used": len(starts), "pairs": len(within)})
        for prefix, rows in (("", within), ("start_", starts)):
            for measure in measures:
                if prefix and (measure == "update_cos" or measure.endswith("_aligned")):
                    continue  # defined for pairs of members only
                values = np.array([r[measure] for r in rows], np.float64)
                finite = values[np.isfinite(values)]
                lo, hi = barriers.bootstrap_ci(finite, bootstrap)
                row[f"{prefix}{measure}_mean"] = finite.mean() if finite.size else np.nan
                row[f"{prefix}{measure}_std"] = finite.std() if finite.size else np.nan
                row[f"{prefix}{measure}_ci_lo"], row[f"{prefix}{measure}_ci_hi"] = lo, hi
        out.append(row)
    return out


@dataclasses.dataclass
class Curves:
    """The compiled pass's output for one run: curves of the member pairs, of each member to its start, and (with
    barriers.align) of the aligned member pairs; {split: (loss_PxA, err_PxA)} each."""

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


def compute_curves(cfg: Config, run: FinishedRun, start_M: dict, pairs: list[tuple[int, int]], status=None) -> Curves:
    """Every requested member pair and every member-to-start pair of the non-diverged members in one compiled pass;
    with barriers.align, weight matching of each member pair and the same pass on the aligned pairs."""
    b = cfg.barriers
    alive = run.alive
    # Only non-diverged members enter the pass: members at positions 0..K-1, their starting points at K..2K-1.
    position = {m: k for k, m in enumerate(alive)}
    take = jnp.asarray(alive)
    params_K = jax.tree.map(lambda a: a[take], run.params_M)
    start_K = jax.tree.map(lambda a: a[take], start_M)
    both_2K = jax.tree.map(lambda a, s: jnp.concatenate([a, s]), params_K, start_K)
    num_alive = len(alive)
    member_pairs = [(position[i], position[j]) for i, j in pairs]
    start_pairs = [(k, num_alive + k) for k in range(num_alive)]
    pairs_Px2 = jnp.asarray(member_pairs + start_pairs, jnp.int32).reshape(-1, 2)

    alphas = barriers.alpha_grid(b.alphas)
    eval_sets = tasks.eval_sets(cfg, run.task)
    budget = memory.memory_budget(b.memory_fraction)
    chunk = b.chunk_pairs or barriers.auto_chunk_pairs(run.model, both_2K, eval_sets, alphas, len(pairs_Px2), budget)
    if status:
        status(f"{len(member_pairs)} member pairs + {len(start_pairs)} to-start pairs × {len(alphas)} α × "
               f"{len(eval_sets)} sets (chunks of {chunk} pairs)")
    mesh = shard.device_mesh()
    curves_fn = barriers.make_curves(run.model, alphas, chunk, mesh=mesh)
    start_time = time.perf_counter()
    curves = jax.tree.map(shard.to_host, curves_fn(*shard.replicate((both_2K, pairs_Px2, eval_sets), mesh)))
    seconds = time.perf_counter() - start_time  # includes compilation: what the researcher waits for
    num_member_pairs = len(member_pairs)

    if member_pairs:
        dist_P, cos_P = map(np.asarray, barriers.pair_geometry(params_K, start_K, pairs_Px2[:num_member_pairs]))
    else:
        dist_P = cos_P = np.zeros((0,), np.float32)
    aligned, align_seconds = {}, 0.0
    if b.align and member_pairs:
        # Weight matching of j onto i for every member pair, then the same pass on the aligned pairs.
        start_time = time.perf_counter()
        perms = permute.match_pairs(run.model, params_K, member_pairs)
        align_seconds = time.perf_counter() - start_time
        aligned = jax.tree.map(shard.to_host, curves_fn(*shard.replicate(
            (params_K, pairs_Px2[:num_member_pairs], eval_sets, [jnp.asarray(p) for p in perms]), mesh)))
    return Curves(
        alphas=alphas,
        pairs={s: (c[0][:num_member_pairs], c[1][:num_member_pairs]) for s, c in curves.items()},
        to_start={s: (c[0][num_member_pairs:], c[1][num_member_pairs:]) for s, c in curves.items()},
        aligned=aligned, dist_P=dist_P, cos_P=cos_P, dist_K=np.asarray(jax.vmap(models.tree_l2)(params_K, start_K)),
        chunk=chunk, splits=list(eval_sets), seconds=seconds, align_seconds=align_seconds)


def barrier_rows(members: list[dict], pairs: list[tuple[int, int]], alive: list[int], curves: Curves):
    """(pair_rows, start_rows): one row per member pair and one per non-diverged member, with their cell keys."""
    pair_columns = _curve_columns(curves.pairs, curves.alphas)
    pair_columns.update({f"{k}_aligned": v for k, v in _curve_columns(curves.aligned, curves.alphas).items()})
    pair_rows = []
    for p, (i, j) in enumerate(pairs):
        mi, mj = members[i], members[j]
        row = {"i": i, "j": j, **dict(zip(grid.CELL_KEYS, grid.cell(mi))), "same_cell": grid.cell(mi) == grid.cell(mj),
               "pretrain_step_j": mj["pretrain_step"], "lr_j": mj["lr"]}
        row.update({k: float(v[p]) for k, v in pair_columns.items()})
        row["dist"], row["update_cos"] = float(curves.dist_P[p]), float(curves.cos_P[p])
        pair_rows.append(row)
    start_columns = _curve_columns(curves.to_start, curves.alphas)
    start_rows = []
    for k, m in enumerate(alive):
        row = {"member": m, **dict(zip(grid.CELL_KEYS, grid.cell(members[m]))), "seed": members[m]["seed"]}
        row.update({key: float(v[k]) for key, v in start_columns.items()})
        row["dist"] = float(curves.dist_K[k])
        start_rows.append(row)
    return pair_rows, start_rows


def write_barriers(run: rundir.RunDir, pairs, alive, curves: Curves, pair_rows, start_rows, summary, settings) -> None:
    run.write_csv(rundir.PAIRS, pair_rows)
    run.write_csv(rundir.TO_START, start_rows)
    run.write_csv(rundir.BARRIER_SUMMARY, summary)
    arrays = {"alphas": curves.alphas, "pairs": np.asarray(pairs, np.int32).reshape(-1, 2),
              "start_members": np.asarray(alive, np.int32)}
    for prefix, by_split in (("", curves.pairs), ("start_", curves.to_start), ("aligned_", curves.aligned)):
        for split, (loss, err) in by_split.items():
            arrays[f"{prefix}loss_{split}"], arrays[f"{prefix}error_{split}"] = loss, err
    run.write_npz(rundir.CURVES, arrays)
    run.write_json(rundir.BARRIER_SETTINGS, settings)


def barriers_of_run(cfg: Config, out: str, status=None) -> dict:
    """Evaluate the requested member pairs and every member-to-start pair of a finished fine-tuning run in one
    compiled pass; write barriers/. Returns {"pairs", "to_start", "summary", "settings"}."""
    b = cfg.barriers
    directory = rundir.RunDir(out)
    members = directory.members()
    pairs, left_out = select_pairs(b.pairs, members)  # a bad pair file is refused before any loading
    run = load_run(cfg, out)
    if not run.alive:
        raise ConfigError(f"every member of {out} diverged: there is nothing to interpolate")
    start_M = finetuning.start_params(cfg, out, run.model, members)
    curves = compute_curves(cfg, run, start_M, pairs, status)
    pair_rows, start_rows = barrier_rows(members, pairs, run.alive, curves)
    summary = _summary(grid.cell_groups(members), pair_rows, start_rows, b.bootstrap)
    num_alive = len(run.alive)
    num_evals = (len(pairs) + num_alive) * (len(curves.alphas) - 2) + 2 * num_alive
    settings = {"barriers": dataclasses.asdict(b), "chunk_pairs": curves.chunk, "member_pairs": len(pairs),
                "start_pairs": num_alive, "left_out_diverged_pairs": left_out,
                "diverged_members": len(members) - num_alive, "splits": curves.splits,
                "alphas": curves.alphas.tolist(), "seconds": curves.seconds,
                "model_evals_per_s": num_evals / curves.seconds, "align_seconds": curves.align_seconds,
                "form": {"<metric>_barrier_<split>": "endpoint-mean: max L(α) − (L(0) + L(1))/2",
                         "<metric>_barrier_<split>_lin": "linear-baseline: max [L(α) − ((1−α)L(0) + αL(1))]"}}
    write_barriers(directory, pairs, run.alive, curves, pair_rows, start_rows, summary, settings)
    return {"pairs": pair_rows, "to_start": start_rows, "summary": summary, "settings": settings}
