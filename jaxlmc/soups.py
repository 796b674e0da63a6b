"""Soups, merges and ensembles of a finished run, per grid cell: uniform soup, greedy soup (chosen on the validation
split), logit ensemble, best member (by validation accuracy) and mean member, each on test and OOD (soups.csv); and
the model merges of jaxlmc.merges — task arithmetic, TIES, Model Stock — with their hyperparameters chosen on the
validation split alone, beside the mean cosine between the members' updates (merges.csv)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxlmc import analysis, finetuning, grid, merges, rundir, tasks
from jaxlmc.config import Config, ConfigError
from jaxlmc.barrier_stage import load_run
from jaxlmc.library import Members


def _soup_accuracies(cfg: Config, run: Members, idx_GxK: np.ndarray):
    """({(kind, split): acc_G} of the uniform and greedy soups, greedy weights_GxM, val_acc_M)."""
    sets = tasks.eval_sets(cfg, run.task, validation=True)
    val_acc_M = np.array([m["val_acc"] for m in run.table])
    uniform_GxM = analysis.group_weights(idx_GxK, len(run.table))
    soup_accuracy = analysis.make_soup_accuracy(run.model)
    greedy_GxM = analysis.greedy_soup(run.model, run.params, idx_GxK, sets["val"], val_acc_M, soup_accuracy)
    usable = uniform_GxM.sum(axis=1) > 0  # a cell whose members all diverged has no soup: its accuracies stay NaN
    acc = {}
    for name in ("val", "test", "ood"):
        if name in sets:
            for kind, weights in (("uniform", uniform_GxM), ("greedy", greedy_GxM)):
                acc[kind, name] = np.full(len(idx_GxK), np.nan)
                if usable.any():
                    acc[kind, name][usable] = np.asarray(soup_accuracy(run.params, jnp.asarray(weights[usable]),
                                                                       sets[name]))
    return acc, greedy_GxM, val_acc_M


def soup_rows(cfg: Config, run: Members) -> list[dict]:
    """One row per grid cell (the columns of rundir.SOUPS). Gains are test accuracy over the best member's."""
    cells, idx_GxK = run.used_groups()
    acc, greedy_GxM, val_acc_M = _soup_accuracies(cfg, run, idx_GxK)
    outputs = analysis.make_outputs(run.model)
    splits = {name: split for name, split in (("test", run.task.test), ("ood", run.task.ood)) if split is not None}
    logits = {name: np.asarray(outputs(run.params, jnp.asarray(split.x))[0]) for name, split in splits.items()}
    all_members = grid.cell_groups(run.table)
    rows = []
    for g, key in enumerate(cells):
        ids = [int(i) for i in idx_GxK[g] if i >= 0]
        row = {**dict(zip(grid.CELL_KEYS, key)), "members": len(all_members[key]), "members_used": len(ids)}
        row.update({f"{kind}_{name}_acc": float(values[g]) for (kind, name), values in acc.items()})  # NaN if none
        if ids:
            best = max(ids, key=lambda i: val_acc_M[i])
            chosen = [int(i) for i in np.flatnonzero(greedy_GxM[g])]
            row.update({"best_member": best, "best_val_acc": val_acc_M[best],
                        "greedy_size": len(chosen), "greedy_members": " ".join(map(str, chosen))})
            for name, split in splits.items():
                row[f"best_{name}_acc"] = run.table[best][f"{name}_acc"]
                row[f"mean_{name}_acc"] = float(np.mean([run.table[i][f"{name}_acc"] for i in ids]))
                row[f"ensemble_{name}_acc"] = analysis.ensemble_accuracy(logits[name][ids], split.y)
            for kind in ("uniform", "greedy", "ensemble"):
                row[f"{kind}_gain"] = row[f"{kind}_test_acc"] - row["best_test_acc"]
        rows.append(row)
    return rows


def merge_rows(cfg: Config, out: str, run: Members) -> list[dict]:
    """One row per grid cell (rundir.MERGES): each merge method's hyperparameters chosen on the validation split,
    its validation, test and OOD accuracy, the gain over the best member's test accuracy, Model Stock's interpolation
    weight t and the mean cosine between the members' updates (each member's from its own start: the body of its
    checkpoint and its head policy's head)."""
    cells, idx_GxK = run.used_groups()
    start_M = jax.tree.map(jnp.asarray, finetuning.start_params(cfg, out, run.model, run.table, run.task.train))
    sets = tasks.eval_sets(cfg, run.task, validation=True)
    others = {name: sets[name] for name in ("test", "ood") if name in sets}
    merged_eval = merges.make_merged_eval(run.model)
    cos_G = np.asarray(merges.mean_update_cosine(run.params, start_M, jnp.asarray(idx_GxK)))
    weights_GxM = analysis.group_weights(idx_GxK, len(run.table))
    usable = weights_GxM.sum(axis=1) > 0
    t_G = np.full(len(cells), np.nan)
    if usable.any():
        _, aux = merges.merge_groups(run.params, start_M, weights_GxM[usable], "model_stock")
        t_G[usable] = np.asarray(aux["t"])
    all_members = grid.cell_groups(run.table)
    rows = [{**dict(zip(grid.CELL_KEYS, key)), "members": len(all_members[key]),
             "members_used": int((idx_GxK[g] >= 0).sum()), "update_cos": float(cos_G[g]),
             "model_stock_t": float(t_G[g])} for g, key in enumerate(cells)]
    best_test = {}
    for g, ids in enumerate(idx_GxK):
        ids = [int(i) for i in ids if i >= 0]
        if ids:
            best = max(ids, key=lambda i: run.table[i]["val_acc"])
            best_test[g] = run.table[best]["test_acc"]
    for method in merges.METHODS:
        choice = merges.choose_on_validation(run.model, run.params, start_M, idx_GxK, sets["val"], method,
                                             merged_eval=merged_eval)
        chosen = merges.evaluate_chosen(run.model, run.params, start_M, idx_GxK, method, choice, others,
                                        merged_eval=merged_eval)
        val_acc_G = np.array([row[i] if i >= 0 else np.nan for row, i in zip(choice["val_acc_GxH"],
                                                                                 choice["index_G"])])
        for g, row in enumerate(rows):
            row.update({f"{method}_{name}": float(values[g]) for name, values in choice["hyper"].items()})
            row[f"{method}_val_acc"] = float(val_acc_G[g])
            row.update({f"{method}_{name}_acc": float(acc[g]) for name, (_, acc) in chosen.items()})
            row[f"{method}_gain"] = row[f"{method}_test_acc"] - best_test.get(g, np.nan)
    return rows


@rundir.exclusive
def soups_of_run(cfg: Config, out: str) -> list[dict]:
    """Soups, ensembles, best and mean member of every cell of a finished run (soups.csv), and the merges
    (merges.csv)."""
    run = load_run(cfg, out)
    if run.task.val is None:
        raise ConfigError("data.validation_size is 0: greedy soups and the best member are chosen on a held-out "
                          "validation split, so it must be positive")
    rows = soup_rows(cfg, run)
    merged = merge_rows(cfg, out, run)
    directory = rundir.RunDir(out)
    directory.write_csv(rundir.SOUPS, rows)
    directory.write_csv(rundir.MERGES, merged)
    return rows
