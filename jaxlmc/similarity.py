"""Path dependence beyond barriers, per grid cell of a finished run: spread of test and OOD accuracy over seeds, mean
pairwise prediction disagreement, linear CKA of penultimate representations, and basins: average-linkage clusters of
the seeds' barrier excess — the headline barrier (jaxlmc.decide: linear-baseline test error barrier, after weight
matching when measured) minus its null mean — cut at the study's margin, the barrier below which the cell verdicts
call members one basin (similarity.csv, basins.csv, similarity.npz). Basins describe a cell; its verdict decides."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxlmc import analysis, decide, grid, rundir
from jaxlmc.config import Config, ConfigError
from jaxlmc.barrier_stage import load_run


def _barrier_matrix(ids: list[int], barrier_of: dict) -> np.ndarray:
    """barrier_KxK of the members `ids` from {(i, j): barrier}; NaN for a pair that was not measured."""
    barrier = np.full((len(ids), len(ids)), np.nan)
    np.fill_diagonal(barrier, 0.0)
    for a, i in enumerate(ids):
        for b, j in enumerate(ids):
            value = barrier_of.get((i, j), barrier_of.get((j, i)))
            if value is not None:
                barrier[a, b] = value
    return barrier


def _off_mean(matrix: np.ndarray, reduce=np.mean) -> float:
    """A reduction of the off-diagonal entries of a K×K matrix (NaN when K < 2)."""
    if len(matrix) < 2:
        return np.nan
    return float(reduce(matrix[~np.eye(len(matrix), dtype=bool)]))


def cell_similarity(members: list[dict], ids: list[int], preds_test, preds_ood, features,
                    barrier_of: dict, threshold: float) -> tuple[dict, dict]:
    """(the similarity columns of one cell with members `ids`, its matrices): basins cut `barrier_of` {(i, j):
    barrier excess} at `threshold`."""
    row = {}
    for split in ("test", "ood"):
        values = np.array([members[i][f"{split}_acc"] for i in ids])
        row[f"{split}_acc_std"], row[f"{split}_acc_range"] = float(values.std()), float(np.ptp(values))
    disagree_test = analysis.disagreement(preds_test[ids])
    row["disagreement_test"] = _off_mean(disagree_test)
    if preds_ood is not None:
        row["disagreement_ood"] = _off_mean(analysis.disagreement(preds_ood[ids]))
    cka = np.asarray(analysis.linear_cka(jnp.asarray(features[ids])))
    row["cka_mean"], row["cka_min"] = _off_mean(cka), _off_mean(cka, np.min)
    barrier = _barrier_matrix(ids, barrier_of)
    labels = analysis.basins(barrier, threshold)
    sizes = np.bincount(labels)
    row.update({"basin_threshold": threshold, "basins": int(len(sizes)),
                "basin_sizes": "+".join(map(str, sizes)), "largest_basin_fraction": float(sizes.max() / len(ids))})
    return row, {"members": np.asarray(ids), "barrier": barrier, "cka": cka, "disagreement_test": disagree_test,
                 "basin": labels}



@rundir.exclusive
def similarity_of_run(cfg: Config, out: str) -> list[dict]:
    """Similarity and basins of every cell of a finished run whose barriers were measured; writes similarity.csv,
    basins.csv and similarity.npz (the matrices, as cell<G>_<name>)."""
    run = load_run(cfg, out)
    directory = rundir.RunDir(out)
    if not directory.exists(rundir.PAIRS):
        raise ConfigError(f"{out} has no barriers/pairs.csv; run `jaxlmc barriers {out}` first")
    pair_rows = directory.read_csv(rundir.PAIRS)
    column = decide.basin_measure(pair_rows)
    excess_of = {(r["i"], r["j"]): r[column] - r.get(f"{column}_null", 0.0) for r in pair_rows}
    cells, idx_GxK = run.used_groups()
    n = cfg.study.similarity_examples
    outputs = analysis.make_outputs(run.model)
    logits_test, features = map(np.asarray, outputs(run.params, jnp.asarray(run.task.test.x[:n])))
    preds_ood = None
    if run.task.ood is not None:
        preds_ood = np.asarray(outputs(run.params, jnp.asarray(run.task.ood.x[:n]))[0]).argmax(-1)

    rows, basin_rows, arrays = [], [], {}
    for g, key in enumerate(cells):
        ids = [int(i) for i in idx_GxK[g] if i >= 0]
        row = {**dict(zip(grid.CELL_KEYS, key)), "members_used": len(ids)}
        if ids:
            columns, matrices = cell_similarity(run.table, ids, logits_test.argmax(-1), preds_ood, features,
                                                excess_of, cfg.study.margin)
            row.update(columns)
            basin_rows += [{"member": i, **dict(zip(grid.CELL_KEYS, key)), "basin": int(label)}
                           for i, label in zip(ids, matrices["basin"])]
            arrays.update({f"cell{g}_{name}": value for name, value in matrices.items()})
        rows.append(row)
    directory.write_csv(rundir.BASINS, basin_rows)
    directory.write_npz(rundir.SIMILARITY_ARRAYS, arrays)
    directory.write_csv(rundir.SIMILARITY, rows)
    return rows
