"""Layer-wise barriers of a finished run (`barriers.layerwise`): each layer group of a member pair interpolated alone
while the rest stays at the first member, every group × pair × α in one compiled pass (jaxlmc.barriers), with
member-bootstrap CIs per cell. Called by jaxlmc.barrier_stage's barrier stage; `run` is its FinishedRun.
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxlmc import grid, memory, paths, shard, stats, tasks
from jaxlmc.config import Config


def layer_barriers(cfg: Config, run, pairs: list[tuple[int, int]], perms: list | None,
                   status=None) -> tuple[list[dict], list[dict], float]:
    """(rows, summary, seconds) of the layer-wise barriers of the member pairs on the test set: every layer group ×
    pair × α in one compiled pass (paths.layer_wise), naive and, with `perms`, aligned. Rows: one per pair
    and group; summary: one per cell and group, the mean over the cell's pairs with its member-bootstrap CI."""
    alphas = paths.alpha_grid(cfg.barriers.alphas)
    groups = run.model.layer_groups(jax.tree.map(lambda a: a[0], run.params_M))
    test = {"test": tasks.eval_sets(cfg, run.task)["test"]}
    chunk = cfg.barriers.chunk_pairs or max(1, paths.auto_chunk_pairs(
        run.model, run.params_M, test, alphas, len(pairs), memory.memory_budget(cfg.barriers.memory_fraction))
        // len(groups))
    if status:
        status(f"layer-wise: {len(pairs)} pairs × {len(groups)} layer groups × {len(alphas) - 1} α")
    mesh = shard.device_mesh()
    fn = paths.make_path_eval(run.model, paths.layer_wise(groups), alphas, chunk, mesh=mesh)
    pairs_Px2 = jnp.asarray(pairs, jnp.int32).reshape(-1, 2)
    start_time = time.perf_counter()
    variants = {"": fn(*shard.replicate((run.params_M, pairs_Px2, test), mesh))}
    if perms is not None:
        variants["_aligned"] = fn(*shard.replicate((run.params_M, pairs_Px2, test, [jnp.asarray(p) for p in perms]),
                                                   mesh))
    variants = jax.tree.map(np.asarray, variants)  # waits for the pass: the time below is the computation's
    seconds = time.perf_counter() - start_time
    rows = []
    for p, (i, j) in enumerate(pairs):
        for g, name in enumerate(groups):
            row = {"i": i, "j": j, **dict(zip(grid.CELL_KEYS, grid.cell(run.members[i]))), "layer": name,
                   "layer_index": g}
            for suffix, curves in variants.items():
                loss, err = (np.asarray(c)[p, g] for c in curves["test"])
                for metric, curve in (("loss", loss), ("error", err)):
                    for form in stats.FORMS:
                        row[f"{metric}_barrier_test{form}{suffix}"] = float(
                            stats.barrier(curve[None], alphas, form)[0])
            rows.append(row)
    draws = stats.seed_draws(cfg.finetune.seeds, cfg.barriers.bootstrap)
    measures = [k for k in rows[0] if k.startswith(("loss_", "error_"))] if rows else []
    summary = []
    for key in grid.cell_groups(run.members):
        for g, name in enumerate(groups):
            cell_rows = [r for r in rows if r["layer"] == name and grid.cell(r) == key
                         and grid.cell(run.members[r["j"]]) == key]
            if not cell_rows:
                continue
            row = {**dict(zip(grid.CELL_KEYS, key)), "layer": name, "layer_index": g, "pairs": len(cell_rows)}
            seed_pairs = [(run.members[r["i"]]["seed"], run.members[r["j"]]["seed"]) for r in cell_rows]
            for measure in measures:
                v = np.array([r[measure] for r in cell_rows], np.float64)
                row[f"{measure}_mean"] = float(np.nanmean(v))
                replicates = stats.pair_replicates(stats.symmetric_matrix(cfg.finetune.seeds, seed_pairs, v), draws)
                row[f"{measure}_ci_lo"], row[f"{measure}_ci_hi"] = (stats.ci(replicates) if cfg.barriers.bootstrap
                                                                    else (np.nan, np.nan))
            summary.append(row)
    return rows, summary, seconds
