"""Measurements on a finished fine-tuning run directory.

`barriers_of_run(cfg, out)`: interpolation barriers between members and from each member to its starting point,
written under ``out/barriers/``:

    pairs.csv     one row per member pair: group keys, barriers in both forms on every evaluation set, midpoints,
                  the distance between the members and the cosine of their fine-tuning updates
    to_start.csv  one row per member: the same measures between the member and its starting point
    curves.npz    the full curves, [pairs, alphas] per metric and split, with the α grid and the pair list
    summary.csv   one row per grid cell: mean, std and bootstrap CI of every measure over its pairs / members
    settings.json the barrier settings, the chunk size used, timings and the number of diverged members left out

`soups_of_run(cfg, out)`: soups, ensembles, best and mean member per grid cell (``out/soups.csv``).
`similarity_of_run(cfg, out)`: accuracy spread, prediction disagreement, CKA and basins per grid cell
(``out/similarity.csv``, ``out/basins.csv``, ``out/similarity.npz``).
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxlmc import analysis, api, barriers, ckpt, models, permute, shard
from jaxlmc.config import TRAINING_SECTIONS, Config, ConfigError, from_dict, parse_override

CELL_KEYS = ("pretrain_step", "lr", "weight_decay", "schedule")
PAIR_KEYS = ("i", "j", "pretrain_step", "lr", "weight_decay", "schedule", "same_cell", "pretrain_step_j", "lr_j")


def run_config(out: str, overrides=()) -> Config:
    """The config a run directory was trained with, with overrides of the measuring sections only."""
    path = os.path.join(out, "config.json")
    if not os.path.exists(path):
        raise ConfigError(f"{out} is not a run directory (no config.json); run `jaxlmc finetune` first")
    with open(path) as f:
        raw = json.load(f)["config"]
    for text in overrides:
        section, key, value = parse_override(text)
        if section in TRAINING_SECTIONS and (section, key) != ("data", "data_dir"):
            raise ConfigError(f"{section}.{key} decides how the members in {out} were trained and cannot be "
                              "overridden here; only [run], [barriers] and data.data_dir can")
        raw.setdefault(section, {})[key] = value
    return from_dict(raw)


def read_members(out: str) -> list[dict]:
    path = os.path.join(out, "members.csv")
    if not os.path.exists(path):
        raise ConfigError(f"{out} has no finished fine-tuning (no members.csv); run `jaxlmc finetune` first")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for key, value in r.items():
            if key in ("member", "pretrain_step", "seed"):
                r[key] = int(value)
            elif key == "diverged":
                r[key] = value == "True"
            elif key != "schedule":
                r[key] = float(value) if value not in (None, "") else float("nan")
    return rows


def cell_groups(members: list[dict]) -> dict[tuple, list[int]]:
    """{cell: [member, ...]} in grid order (every member, diverged or not)."""
    groups: dict = {}
    for m in members:
        groups.setdefault(cell(m), []).append(m["member"])
    return groups


@dataclasses.dataclass
class FinishedRun:
    members: list[dict]
    task: api.Task
    model: models.Model
    params_M: dict  # the final parameters of every member (device arrays)

    @property
    def alive(self) -> list[int]:
        return [m["member"] for m in self.members if not m["diverged"]]

    def alive_groups(self) -> tuple[list[tuple], np.ndarray]:
        """The cells and idx_GxK of their non-diverged members (padded with -1)."""
        groups = {key: [m for m in ids if not self.members[m]["diverged"]]
                  for key, ids in cell_groups(self.members).items()}
        width = max([len(v) for v in groups.values()] + [1])
        idx = np.full((len(groups), width), -1, np.int64)
        for g, ids in enumerate(groups.values()):
            idx[g, :len(ids)] = ids
        return list(groups), idx


def load_run(cfg: Config, out: str) -> FinishedRun:
    """A finished fine-tuning run: members.csv, the fine-tuning task, the model and the final parameters."""
    members = read_members(out)
    task = api.load_finetune_task(cfg)
    manager = ckpt.Checkpoints(os.path.join(out, "checkpoints"), read_only=True)
    latest = manager.latest_step()
    manager.close()
    if latest != cfg.finetune.steps:
        raise ConfigError(f"{out}: the latest fine-tuning checkpoint is at step {latest}, not finetune.steps = "
                          f"{cfg.finetune.steps}; finish the run with `jaxlmc finetune` first")
    model = models.build(cfg.model, task.input_shape, task.train.num_classes)
    params_M = jax.tree.map(jnp.asarray, ckpt.restore_params(os.path.join(out, "checkpoints"), latest))
    return FinishedRun(members, task, model, params_M)


def cell(row: dict) -> tuple:
    return tuple(row[k] for k in CELL_KEYS)


def select_pairs(spec: str, members: list[dict]) -> tuple[list[tuple[int, int]], int]:
    """The requested pairs among non-diverged members, and how many requested pairs were left out as diverged."""
    alive = [m["member"] for m in members if not m["diverged"]]
    if spec == "all":
        return barriers.pairs_all(alive), len(barriers.pairs_all(range(len(members)))) - len(barriers.pairs_all(alive))
    if spec == "within":
        everything = barriers.pairs_within(cell_groups(members))
        kept = [p for p in everything if not (members[p[0]]["diverged"] or members[p[1]]["diverged"])]
        return kept, len(everything) - len(kept)
    if not os.path.isfile(spec):
        raise ConfigError(f'barriers.pairs: {spec!r} is neither "within", "all" nor an existing pair file')
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
        row = dict(zip(CELL_KEYS, key))
        within = [p for p in pair_rows if p["same_cell"] and (p["pretrain_step"], p["lr"], p["weight_decay"],
                                                              p["schedule"]) == key]
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


def _save_npz(path: str, arrays: dict) -> None:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    api.write_atomic(path, buffer.getvalue())


def barriers_of_run(cfg: Config, out: str, status=None) -> dict:
    """Evaluate the requested member pairs and every member-to-start pair of a finished fine-tuning run in one
    compiled pass; write out/barriers/. Returns {"pairs", "to_start", "summary", "settings"}."""
    b = cfg.barriers
    members = read_members(out)
    pairs, left_out = select_pairs(b.pairs, members)  # a bad pair file is refused before any loading
    run = load_run(cfg, out)
    task, model, params_M, alive = run.task, run.model, run.params_M, run.alive
    if not alive:
        raise ConfigError(f"every member of {out} diverged: there is nothing to interpolate")
    start_M = api.start_params(cfg, out, model, members)

    # Only non-diverged members enter the pass: members at positions 0..K-1, their starting points at K..2K-1.
    position = {m: k for k, m in enumerate(alive)}
    take = jnp.asarray(alive)
    params_K = jax.tree.map(lambda a: a[take], params_M)
    start_K = jax.tree.map(lambda a: a[take], start_M)
    both_2K = jax.tree.map(lambda a, s: jnp.concatenate([a, s]), params_K, start_K)
    num_alive = len(alive)
    member_pairs = [(position[i], position[j]) for i, j in pairs]
    start_pairs = [(k, num_alive + k) for k in range(num_alive)]
    pairs_Px2 = jnp.asarray(member_pairs + start_pairs, jnp.int32).reshape(-1, 2)

    alphas = barriers.alpha_grid(b.alphas)
    eval_sets = api.eval_sets(cfg, task)
    budget = barriers.memory_budget(b.memory_fraction)
    chunk = b.chunk_pairs or barriers.auto_chunk_pairs(model, both_2K, eval_sets, alphas, len(pairs_Px2), budget)
    if status:
        status(f"{len(member_pairs)} member pairs + {len(start_pairs)} to-start pairs × {len(alphas)} α × "
               f"{len(eval_sets)} sets (chunks of {chunk} pairs)")
    mesh = shard.device_mesh()
    curves_fn = barriers.make_curves(model, alphas, chunk, mesh=mesh)
    start_time = time.perf_counter()
    curves = jax.tree.map(shard.to_host, curves_fn(*shard.replicate((both_2K, pairs_Px2, eval_sets), mesh)))
    seconds = time.perf_counter() - start_time  # includes compilation: what the researcher waits for
    num_member_pairs = len(member_pairs)
    pair_curves = {s: (c[0][:num_member_pairs], c[1][:num_member_pairs]) for s, c in curves.items()}
    start_curves = {s: (c[0][num_member_pairs:], c[1][num_member_pairs:]) for s, c in curves.items()}

    if member_pairs:
        dist_P, cos_P = map(np.asarray, barriers.pair_geometry(params_K, start_K, pairs_Px2[:num_member_pairs]))
    else:
        dist_P = cos_P = np.zeros((0,), np.float32)
    pair_columns = _curve_columns(pair_curves, alphas)
    aligned_curves, align_seconds = {}, 0.0
    if b.align and member_pairs:
        # Weight matching of j onto i for every member pair, then the same pass on the aligned pairs.
        start_time = time.perf_counter()
        perms = permute.match_pairs(params_K, member_pairs)
        align_seconds = time.perf_counter() - start_time
        member_Px2 = pairs_Px2[:num_member_pairs]
        aligned_curves = jax.tree.map(shard.to_host, curves_fn(*shard.replicate(
            (params_K, member_Px2, eval_sets, [jnp.asarray(p) for p in perms]), mesh)))
        pair_columns.update({f"{k}_aligned": v for k, v in _curve_columns(aligned_curves, alphas).items()})
    pair_rows = []
    for p, (i, j) in enumerate(pairs):
        mi, mj = members[i], members[j]
        row = {"i": i, "j": j, **{k: mi[k] for k in CELL_KEYS}, "same_cell": cell(mi) == cell(mj),
               "pretrain_step_j": mj["pretrain_step"], "lr_j": mj["lr"]}
        row.update({k: float(v[p]) for k, v in pair_columns.items()})
        row["dist"], row["update_cos"] = float(dist_P[p]), float(cos_P[p])
        pair_rows.append(row)

    start_columns = _curve_columns(start_curves, alphas)
    dist_K = np.asarray(jax.vmap(models.tree_l2)(params_K, start_K))
    start_rows = []
    for k, m in enumerate(alive):
        row = {"member": m, **{key: members[m][key] for key in CELL_KEYS}, "seed": members[m]["seed"]}
        row.update({key: float(v[k]) for key, v in start_columns.items()})
        row["dist"] = float(dist_K[k])
        start_rows.append(row)

    summary = _summary(cell_groups(members), pair_rows, start_rows, b.bootstrap)
    num_evals = len(pairs_Px2) * (len(alphas) - 2) + 2 * num_alive
    settings = {"barriers": dataclasses.asdict(b), "chunk_pairs": chunk, "member_pairs": num_member_pairs,
                "start_pairs": len(start_pairs), "left_out_diverged_pairs": left_out,
                "diverged_members": len(members) - num_alive, "splits": list(eval_sets), "alphas": alphas.tolist(),
                "seconds": seconds, "model_evals_per_s": num_evals / seconds, "align_seconds": align_seconds,
                "form": {"<metric>_barrier_<split>": "endpoint-mean: max L(α) − (L(0) + L(1))/2",
                         "<metric>_barrier_<split>_lin": "linear-baseline: max [L(α) − ((1−α)L(0) + αL(1))]"}}

    directory = os.path.join(out, "barriers")
    os.makedirs(directory, exist_ok=True)
    pair_fields = list(PAIR_KEYS) + list(pair_columns) + ["dist", "update_cos"]
    api._write_csv(os.path.join(directory, "pairs.csv"), pair_rows, pair_fields)
    api._write_csv(os.path.join(directory, "to_start.csv"), start_rows,
                   ["member", *CELL_KEYS, "seed", *start_columns, "dist"])
    api._write_csv(os.path.join(directory, "summary.csv"), summary, list(summary[0]) if summary else list(CELL_KEYS))
    arrays = {"alphas": alphas, "pairs": np.asarray(pairs, np.int32).reshape(-1, 2),
              "start_members": np.asarray(alive, np.int32)}
    for split, (loss, err) in pair_curves.items():
        arrays[f"loss_{split}"], arrays[f"error_{split}"] = loss, err
    for split, (loss, err) in start_curves.items():
        arrays[f"start_loss_{split}"], arrays[f"start_error_{split}"] = loss, err
    for split, (loss, err) in aligned_curves.items():
        arrays[f"aligned_loss_{split}"], arrays[f"aligned_error_{split}"] = loss, err
    _save_npz(os.path.join(directory, "curves.npz"), arrays)
    api.write_atomic(os.path.join(directory, "settings.json"), json.dumps(settings, indent=2))
    return {"pairs": pair_rows, "to_start": start_rows, "summary": summary, "settings": settings}


# --------------------------------------------------------------------------------------------- soups and ensembles

SOUP_COLUMNS = [*CELL_KEYS, "members", "members_used", "best_member", "best_val_acc", "best_test_acc", "best_ood_acc",
                "mean_test_acc", "mean_ood_acc", "uniform_val_acc", "uniform_test_acc", "uniform_ood_acc",
                "greedy_size", "greedy_members", "greedy_val_acc", "greedy_test_acc", "greedy_ood_acc",
                "ensemble_test_acc", "ensemble_ood_acc", "uniform_gain", "greedy_gain", "ensemble_gain"]


def soups_of_run(cfg: Config, out: str) -> list[dict]:
    """Per grid cell: uniform soup, greedy soup (chosen on the validation split), logit ensemble, best member (by
    validation accuracy) and mean member, each on test and OOD. Gains are test accuracy over the best member's.
    Writes out/soups.csv."""
    run = load_run(cfg, out)
    if run.task.val is None:
        raise ConfigError("data.validation_size is 0: greedy soups and the best member are chosen on a held-out "
                          "validation split, so it must be positive")
    cells, idx_GxK = run.alive_groups()
    num_members = len(run.members)
    sets = api.eval_sets(cfg, run.task, validation=True)
    val_acc_M = np.array([m["val_acc"] for m in run.members])
    uniform_GxM = analysis.group_weights(idx_GxK, num_members)
    soup_accuracy = analysis.make_soup_accuracy(run.model)
    greedy_GxM = analysis.greedy_soup(run.model, run.params_M, idx_GxK, sets["val"], val_acc_M, soup_accuracy)
    usable = uniform_GxM.sum(axis=1) > 0  # a cell whose members all diverged has no soup: its accuracies stay NaN
    acc = {}
    for name in ("val", "test", "ood"):
        if name in sets:
            for kind, weights in (("uniform", uniform_GxM), ("greedy", greedy_GxM)):
                acc[kind, name] = np.full(len(cells), np.nan)
                if usable.any():
                    acc[kind, name][usable] = np.asarray(soup_accuracy(run.params_M, jnp.asarray(weights[usable]),
                                                                       sets[name]))
    outputs = analysis.make_outputs(run.model)
    logits = {name: np.asarray(outputs(run.params_M, jnp.asarray(split.x))[0])
              for name, split in (("test", run.task.test), ("ood", run.task.ood)) if split is not None}

    rows = []
    all_members = cell_groups(run.members)
    for g, key in enumerate(cells):
        ids = [int(i) for i in idx_GxK[g] if i >= 0]
        row = {**dict(zip(CELL_KEYS, key)), "members": len(all_members[key]), "members_used": len(ids)}
        row.update({f"{kind}_{name}_acc": float(values[g]) for (kind, name), values in acc.items()})  # NaN if none
        if ids:
            best = max(ids, key=lambda i: val_acc_M[i])
            chosen = [int(i) for i in np.flatnonzero(greedy_GxM[g])]
            row.update({"best_member": best, "best_val_acc": val_acc_M[best],
                        "greedy_size": len(chosen), "greedy_members": " ".join(map(str, chosen))})
            for split_name, split in (("test", run.task.test), ("ood", run.task.ood)):
                if split is None:
                    continue
                row[f"best_{split_name}_acc"] = run.members[best][f"{split_name}_acc"]
                row[f"mean_{split_name}_acc"] = float(np.mean([run.members[i][f"{split_name}_acc"] for i in ids]))
                row[f"ensemble_{split_name}_acc"] = analysis.ensemble_accuracy(logits[split_name][ids], split.y)
            for kind in ("uniform", "greedy", "ensemble"):
                row[f"{kind}_gain"] = row[f"{kind}_test_acc"] - row["best_test_acc"]
        rows.append(row)
    api._write_csv(os.path.join(out, "soups.csv"), rows, SOUP_COLUMNS)
    return rows


# --------------------------------------------------------------------------------------------- path dependence

SIMILARITY_COLUMNS = [*CELL_KEYS, "members_used", "test_acc_std", "test_acc_range", "ood_acc_std", "ood_acc_range",
                      "disagreement_test", "disagreement_ood", "cka_mean", "cka_min", "basin_threshold", "basins",
                      "basin_sizes", "largest_basin_fraction"]


def similarity_of_run(cfg: Config, out: str) -> list[dict]:
    """Per grid cell: spread of test and OOD accuracy over seeds, mean pairwise prediction disagreement, linear CKA of
    penultimate representations, and basins: clusters of the test error barrier matrix (barriers/pairs.csv) cut at
    study.basin_threshold. Writes out/similarity.csv, out/basins.csv and out/similarity.npz (the matrices)."""
    run = load_run(cfg, out)
    pairs_path = os.path.join(out, "barriers", "pairs.csv")
    if not os.path.exists(pairs_path):
        raise ConfigError(f"{out} has no barriers/pairs.csv; run `jaxlmc barriers {out}` first")
    with open(pairs_path, newline="") as f:
        barrier_of = {(int(r["i"]), int(r["j"])): float(r["error_barrier_test"]) for r in csv.DictReader(f)}
    cells, idx_GxK = run.alive_groups()
    n = cfg.study.similarity_examples
    outputs = analysis.make_outputs(run.model)
    logits_test, features = map(np.asarray, outputs(run.params_M, jnp.asarray(run.task.test.x[:n])))
    preds_ood = None
    if run.task.ood is not None:
        preds_ood = np.asarray(outputs(run.params_M, jnp.asarray(run.task.ood.x[:n]))[0]).argmax(-1)
    preds_test = logits_test.argmax(-1)

    rows, basin_rows, arrays = [], [], {}
    for g, key in enumerate(cells):
        ids = [int(i) for i in idx_GxK[g] if i >= 0]
        row = {**dict(zip(CELL_KEYS, key)), "members_used": len(ids)}
        if not ids:
            rows.append(row)
            continue
        for split in ("test", "ood"):
            values = np.array([run.members[i][f"{split}_acc"] for i in ids])
            row[f"{split}_acc_std"], row[f"{split}_acc_range"] = float(values.std()), float(np.ptp(values))
        off = ~np.eye(len(ids), dtype=bool)
        disagree_test = analysis.disagreement(preds_test[ids])
        row["disagreement_test"] = float(disagree_test[off].mean()) if len(ids) > 1 else np.nan
        if preds_ood is not None:
            disagree_ood = analysis.disagreement(preds_ood[ids])
            row["disagreement_ood"] = float(disagree_ood[off].mean()) if len(ids) > 1 else np.nan
        cka = np.asarray(analysis.linear_cka(jnp.asarray(features[ids])))
        row["cka_mean"] = float(cka[off].mean()) if len(ids) > 1 else np.nan
        row["cka_min"] = float(cka[off].min()) if len(ids) > 1 else np.nan
        barrier = np.full((len(ids), len(ids)), np.nan)
        np.fill_diagonal(barrier, 0.0)
        for a, i in enumerate(ids):
            for b, j in enumerate(ids):
                value = barrier_of.get((i, j), barrier_of.get((j, i)))
                if value is not None:
                    barrier[a, b] = value
        labels = analysis.basins(barrier, cfg.study.basin_threshold)
        sizes = np.bincount(labels)
        row.update({"basin_threshold": cfg.study.basin_threshold, "basins": int(len(sizes)), "basin_sizes": "+".join(map(str, sizes)),
                    "largest_basin_fraction": float(sizes.max() / len(ids))})
        rows.append(row)
        for i, label in zip(ids, labels):
            basin_rows.append({"member": i, **dict(zip(CELL_KEYS, key)), "basin": int(label)})
        arrays.update({f"cell{g}_members": np.asarray(ids), f"cell{g}_barrier": barrier, f"cell{g}_cka": cka,
                       f"cell{g}_disagreement_test": disagree_test, f"cell{g}_basin": labels})
    api._write_csv(os.path.join(out, "basins.csv"), basin_rows, ["member", *CELL_KEYS, "basin"])
    _save_npz(os.path.join(out, "similarity.npz"), arrays)
    api._write_csv(os.path.join(out, "similarity.csv"), rows, SIMILARITY_COLUMNS)
    return rows
