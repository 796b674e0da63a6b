"""Measurements on a finished fine-tuning run directory: interpolation barriers between members and from each member
to its starting point.

`barriers(cfg, out)` writes, under ``out/barriers/``:

    pairs.csv     one row per member pair: group keys, barriers in both forms on every evaluation set, midpoints,
                  the distance between the members and the cosine of their fine-tuning updates
    to_start.csv  one row per member: the same measures between the member and its starting point
    curves.npz    the full curves, [pairs, alphas] per metric and split, with the α grid and the pair list
    summary.csv   one row per grid cell: mean, std and bootstrap CI of every measure over its pairs / members
    settings.json the barrier settings, the chunk size used, timings and the number of diverged members left out
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxlmc import api, barriers, ckpt, models
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
        r["member"], r["pretrain_step"], r["seed"] = int(r["member"]), int(r["pretrain_step"]), int(r["seed"])
        r["lr"], r["weight_decay"] = float(r["lr"]), float(r["weight_decay"])
        r["diverged"] = r["diverged"] == "True"
        for key in ("test_acc", "ood_acc"):
            r[key] = float(r[key]) if r.get(key) not in (None, "") else float("nan")
    return rows


def cell(row: dict) -> tuple:
    return tuple(row[k] for k in CELL_KEYS)


def select_pairs(spec: str, members: list[dict]) -> tuple[list[tuple[int, int]], int]:
    """The requested pairs among non-diverged members, and how many requested pairs were left out as diverged."""
    alive = [m["member"] for m in members if not m["diverged"]]
    if spec == "all":
        return barriers.pairs_all(alive), len(barriers.pairs_all(range(len(members)))) - len(barriers.pairs_all(alive))
    if spec == "within":
        groups: dict = {}
        for m in members:
            groups.setdefault(cell(m), []).append(m["member"])
        everything = barriers.pairs_within(groups)
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
                if measure == "update_cos" and prefix:
                    continue
                values = np.array([r[measure] for r in rows], np.float64)
                finite = values[np.isfinite(values)]
                lo, hi = barriers.bootstrap_ci(finite, bootstrap)
                row[f"{prefix}{measure}_mean"] = finite.mean() if finite.size else np.nan
                row[f"{prefix}{measure}_std"] = finite.std() if finite.size else np.nan
                row[f"{prefix}{measure}_ci_lo"], row[f"{prefix}{measure}_ci_hi"] = lo, hi
        out.append(row)
    return out


def _save_npz(path: str, arrays: dict) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-", suffix=".npz")
    with os.fdopen(fd, "wb") as f:
        np.savez_compressed(f, **arrays)
    os.replace(tmp, path)


def barriers_of_run(cfg: Config, out: str, status=None) -> dict:
    """Evaluate the requested member pairs and every member-to-start pair of a finished fine-tuning run in one
    compiled pass; write out/barriers/. Returns {"pairs", "to_start", "summary", "settings"}."""
    b = cfg.barriers
    members = read_members(out)
    pairs, left_out = select_pairs(b.pairs, members)
    alive = [m["member"] for m in members if not m["diverged"]]
    task = api.load_finetune_task(cfg)
    if not alive:
        raise ConfigError(f"every member of {out} diverged: there is nothing to interpolate")

    manager = ckpt.Checkpoints(os.path.join(out, "checkpoints"), read_only=True)
    latest = manager.latest_step()
    manager.close()
    if latest != cfg.finetune.steps:
        raise ConfigError(f"{out}: the latest fine-tuning checkpoint is at step {latest}, not finetune.steps = "
                          f"{cfg.finetune.steps}; finish the run with `jaxlmc finetune` first")
    model = models.build(cfg.model, task.input_shape, task.train.num_classes)
    params_M = jax.tree.map(jnp.asarray, ckpt.restore_params(os.path.join(out, "checkpoints"), latest))
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
    eval_sets = api._eval_sets(cfg, task)
    budget = barriers.memory_budget(b.memory_fraction)
    chunk = b.chunk_pairs or barriers.auto_chunk_pairs(model, both_2K, eval_sets, alphas, len(pairs_Px2), budget)
    if status:
        status(f"{len(member_pairs)} member pairs + {len(start_pairs)} to-start pairs × {len(alphas)} α × "
               f"{len(eval_sets)} sets (chunks of {chunk} pairs)")
    curves_fn = barriers.make_curves(model, alphas, chunk)
    start_time = time.perf_counter()
    curves = jax.tree.map(np.asarray, curves_fn(both_2K, pairs_Px2, eval_sets))
    seconds = time.perf_counter() - start_time  # includes compilation: what the researcher waits for
    num_member_pairs = len(member_pairs)
    pair_curves = {s: (c[0][:num_member_pairs], c[1][:num_member_pairs]) for s, c in curves.items()}
    start_curves = {s: (c[0][num_member_pairs:], c[1][num_member_pairs:]) for s, c in curves.items()}

    if member_pairs:
        dist_P, cos_P = map(np.asarray, barriers.pair_geometry(params_K, start_K, pairs_Px2[:num_member_pairs]))
    else:
        dist_P = cos_P = np.zeros((0,), np.float32)
    pair_columns = _curve_columns(pair_curves, alphas)
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

    groups: dict = {}
    for m in members:
        groups.setdefault(cell(m), []).append(m["member"])
    summary = _summary(groups, pair_rows, start_rows, b.bootstrap)
    num_evals = len(pairs_Px2) * (len(alphas) - 2) + 2 * num_alive
    settings = {"barriers": dataclasses.asdict(b), "chunk_pairs": chunk, "member_pairs": num_member_pairs,
                "start_pairs": len(start_pairs), "left_out_diverged_pairs": left_out,
                "diverged_members": len(members) - num_alive, "splits": list(eval_sets), "alphas": alphas.tolist(),
                "seconds": seconds, "model_evals_per_s": num_evals / seconds,
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
    _save_npz(os.path.join(directory, "curves.npz"), arrays)
    api.write_atomic(os.path.join(directory, "settings.json"), json.dumps(settings, indent=2))
    return {"pairs": pair_rows, "to_start": start_rows, "summary": summary, "settings": settings}
