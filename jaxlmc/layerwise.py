"""Layer-wise barriers (Adilova et al. 2024): each layer group of a member pair interpolated alone while the rest
stays at the first member, every group × pair × α in one compiled pass (jaxlmc.paths.layer_wise). `layer_rows` gives
the rows (the library's `pair_barriers(layerwise=True)` and the barrier stage's); `layer_barriers` is the barrier
stage's (`barriers.layerwise`), with member-bootstrap CIs per cell; `run` is a finished run's `Members`
(jaxlmc.barrier_stage.load_run).
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
    groups = run.model.layer_groups(jax.tree.map(lambda a: a[0], run.params))
    test = {"test": tasks.eval_sets(cfg, run.task)["test"]}
    chunk = cfg.barriers.chunk_pairs or max(1, paths.auto_chunk_pairs(
        run.model, run.params, test, alphas, len(pairs), memory.memory_budget(cfg.barriers.memory_fraction))
        // len(groups))
    if status:
        status(f"layer-wise: {len(pairs)} pairs × {len(groups)} layer groups × {len(alphas) - 1} α")
    start_time = time.perf_counter()
    rows = layer_rows(run.model, run.params, pairs, test, alphas, chunk, perms, run.table, grid.CELL_KEYS)
    seconds = time.perf_counter() - start_time
    draws = stats.seed_draws(cfg.finetune.seeds, cfg.barriers.bootstrap)
    measures = [k for k in rows[0] if k.startswith(("loss_", "error_"))] if rows else []
    summary = []
    for key in grid.cell_groups(run.table):
        for g, name in enumerate(groups):
            cell_rows = [r for r in rows if r["layer"] == name and grid.cell(r) == key
                         and grid.cell(run.table[r["j"]]) == key]
            if not cell_rows:
                continue
            row = {**dict(zip(grid.CELL_KEYS, key)), "layer": name, "layer_index": g, "pairs": len(cell_rows)}
            seed_pairs = [(run.table[r["i"]]["seed"], run.table[r["j"]]["seed"]) for r in cell_rows]
            for measure in measures:
                v = np.array([r[measure] for r in cell_rows], np.float64)
                row[f"{measure}_mean"] = float(np.nanmean(v))
                replicates = stats.pair_replicates(stats.symmetric_matrix(cfg.finetune.seeds, seed_pairs, v), draws)
                row[f"{measure}_ci_lo"], row[f"{measure}_ci_hi"] = (stats.ci(replicates) if cfg.barriers.bootstrap
                                                                    else (np.nan, np.nan))
            summary.append(row)
    return rows, summary, seconds


def layer_rows(model, params_M, pairs: list[tuple[int, int]], eval_sets: dict, alphas, chunk_pairs: int,
               perms: list | None, table: list[dict], cell_keys: tuple[str, ...],
               pair_ids: list[tuple[int, int]] | None = None) -> list[dict]:
    """One row per pair and layer group: both barrier forms of loss and error on every set of `eval_sets`, naive and,
    with `perms` (the pairs' alignments), aligned. `pairs` index the member axis of `params_M`; `pair_ids` (default:
    `pairs`) are the same pairs' rows in `table`, whose `cell_keys` each row carries."""
    groups = model.layer_groups(jax.tree.map(lambda a: a[0], params_M))
    mesh = shard.device_mesh()
    fn = paths.make_path_eval(model, paths.layer_wise(groups), alphas, chunk_pairs, mesh=mesh)
    args = (params_M, jnp.asarray(pairs, jnp.int32).reshape(-1, 2), eval_sets)
    variants = {"": fn(*shard.replicate(args, mesh))}
    if perms is not None:
        variants["_aligned"] = fn(*shard.replicate(args + ([jnp.asarray(p) for p in perms],), mesh))
    variants = jax.tree.map(shard.to_host, variants)
    rows = []
    for p, (i, j) in enumerate(pairs if pair_ids is None else pair_ids):
        for g, name in enumerate(groups):
            row = {"i": i, "j": j, **{k: table[i][k] for k in cell_keys}, "layer": name, "layer_index": g}
            for suffix, by_set in variants.items():
                for split, (loss, err) in by_set.items():
                    for metric, curve in (("loss", loss), ("error", err)):
                        for form in stats.FORMS:
                            row[f"{metric}_barrier_{split}{form}{suffix}"] = float(
                                stats.barrier(curve[p, g][None], alphas, form)[0])
            rows.append(row)
    return rows
