"""jaxlmc on one's own model and arrays: `fit` trains N members of any Flax NNX module at once, `pair_barriers`
interpolates between them, `barrier_summary` gives each cell's barriers with intervals over seeds.

    import jaxlmc
    members = jaxlmc.fit(lambda rngs: Net(rngs), (x_train, y_train), lr=[1e-3, 3e-3], seeds=32, steps=1000,
                         batch_size=128)
    rows = jaxlmc.pair_barriers(members, {"test": (x_test, y_test)})
    print(jaxlmc.format_table(jaxlmc.barrier_summary(members, rows)))

These are the engines the `jaxlmc` command and the study run (jaxlmc.train, jaxlmc.loop, jaxlmc.interpolation), with
plain values instead of a TOML config and a run directory: the per-pair columns are those of barriers/pairs.csv, the
summary's those of barriers/summary.csv.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxlmc import (data, decide, files, grid, interpolation, layout, loop, models, optimizers, pair_sets,
                    rundir, shard, spec_check, train, trainer)
from jaxlmc.layerwise import layer_rows
from jaxlmc.measures import BezierSettings
from jaxlmc.settings import DEFAULT_ALPHAS, FinetuneConfig

# The per-member hyperparameters `fit` takes, in the grid's nesting order (seeds innermost), with their members.csv
# column names.
HYPERPARAMETERS = ("lr", "weight_decay", "schedule", "dropout")


@dataclasses.dataclass
class Members:
    """Trained members of one model: `params` and `start` hold every member's final and starting parameters stacked
    on a leading member axis (params_M…); `table` one row per member (member, its hyperparameters, seed, diverged,
    unfit, train loss and accuracy on the first `train_eval_size` training examples, distance from its start
    `dist_from_init`, as in members.csv); `curves` the training curves (step_K, loss_KxM, acc_KxM: each member's
    mean batch loss and accuracy per chunk); `cell_keys` the hyperparameters that vary between members — members
    that differ only in their seed share a cell; `pair_keys` the member columns each pair row names."""

    model: models.Model
    params: dict
    start: dict
    table: list[dict]
    curves: dict
    cell_keys: tuple[str, ...]
    pair_keys: tuple[str, ...] = ("seed_i", "seed_j")  # the member columns each pair row names ("<column>_i"/"_j")
    task: object = None  # a study's fine-tuning task (jaxlmc.tasks.Task), for a finished run's stages

    @property
    def used(self) -> list[int]:
        """The members that enter barriers, soups and basins: neither diverged nor unfit (grid.usable)."""
        return [r["member"] for r in self.table if grid.usable(r)]

    def used_groups(self) -> tuple[list[tuple], np.ndarray]:
        """The cells and idx_GxK of their used members (padded with -1)."""
        groups: dict = {}
        for r in self.table:
            groups.setdefault(tuple(r[k] for k in self.cell_keys), []).extend([r["member"]] if grid.usable(r) else [])
        width = max([len(v) for v in groups.values()] + [1])
        idx = np.full((len(groups), width), -1, np.int64)
        for g, ids in enumerate(groups.values()):
            idx[g, :len(ids)] = ids
        return list(groups), idx

    def __len__(self) -> int:
        return len(self.table)

    def member(self, index: int) -> dict:
        """One member's parameters (device arrays)."""
        return jax.tree.map(lambda a: a[index], self.params)


def _values(name: str, value) -> list:
    values = list(value) if isinstance(value, (list, tuple, np.ndarray, range)) else [value]
    if not values:
        raise ValueError(f"{name}: no values given")
    for v in values:
        if isinstance(v, (int, float, np.floating, np.integer)) and not np.isfinite(v):
            raise ValueError(f"{name}: {v} is not finite")
    return [v.item() if isinstance(v, np.generic) else v for v in values]


def member_rows(seeds, **hyperparameters) -> list[dict]:
    """Every combination of the hyperparameters' values (a scalar is one value, a list an axis), seeds innermost:
    one row per member, {"member", <hyperparameter>…, "seed"}. `seeds`: a count (0 .. n − 1) or the seeds."""
    seed_list = list(range(seeds)) if isinstance(seeds, (int, np.integer)) else _values("seeds", seeds)
    if not seed_list or any(not isinstance(s, (int, np.integer)) or s < 0 for s in seed_list):
        raise ValueError(f"seeds: a positive count or non-negative integers, got {seeds!r}")
    if len(set(seed_list)) != len(seed_list):
        raise ValueError(f"seeds: {seed_list} repeats a seed")
    axes = {name: _values(name, value) for name, value in hyperparameters.items()}
    combos = itertools.product(*axes.values(), seed_list)
    return [{"member": m, **dict(zip([*axes, "seed"], combo))} for m, combo in enumerate(combos)]


def _check_rows(rows: list[dict], n_train: int, batch_size: int, steps: int, max_members: int) -> None:
    checks = {"lr": ("be positive", lambda v: v > 0), "weight_decay": ("be non-negative", lambda v: v >= 0),
              "dropout": ("lie in [0, 1)", lambda v: 0 <= v < 1),
              "schedule": ("be constant, cosine or linear", lambda v: v in ("constant", "cosine", "linear"))}
    for name, (what, ok) in checks.items():
        bad = [r[name] for r in rows if not ok(r[name])]
        if bad:
            raise ValueError(f"{name}: every value must {what}, got {bad[0]!r}")
    if not 0 < batch_size <= n_train:
        raise ValueError(f"batch_size {batch_size} must lie in [1, {n_train}] (the training examples)")
    if steps < 1:
        raise ValueError(f"steps must be positive, got {steps}")
    if not isinstance(max_members, (int, np.integer)) or max_members < 0:
        raise ValueError(f"max_members must be a non-negative integer (0: as many as the memory holds), got "
                         f"{max_members!r}")


def _arrays(train_data, label_map: str, data_dir: str | None) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) from arrays or from a dataset's name (TFDS, or one registered with jaxlmc.data.register_dataset)."""
    if isinstance(train_data, str):
        split = data.load_task(train_data, label_map, data_dir, splits=("train",))["train"]
        return split.x, split.y
    x, y = train_data
    x, y = np.asarray(x), np.asarray(y)
    if len(x) != len(y):
        raise ValueError(f"train: {len(x)} inputs but {len(y)} labels")
    if y.dtype.kind not in "iu":
        raise ValueError(f"train: labels must be integers, got {y.dtype}")
    return x if x.dtype.kind in "iu" else x.astype(np.float32), y.astype(np.int32)


def _start(model: models.Model, params, rows: list[dict], init: str, seed_offset: int) -> dict:
    """start_M: every member from `params` (one member's), or from its seed's draw of the module's initialisation
    (init "per_seed"), or all from seed 0's draw ("shared")."""
    if params is not None:
        return jax.tree.map(lambda a: jnp.broadcast_to(jnp.asarray(a), (len(rows), *jnp.shape(a))), params)
    if init not in ("per_seed", "shared"):
        raise ValueError(f'init: {init!r} is neither "per_seed" nor "shared"')
    seeds = [r["seed"] for r in rows] if init == "per_seed" else [0] * len(rows)
    return jax.jit(jax.vmap(model.init))(train.member_keys(seeds, seed_offset)["init"])


def _model(model, x: np.ndarray, y: np.ndarray, num_classes: int | None, permutation_spec) -> tuple:
    """(Model, the parameters of a module instance or None)."""
    if isinstance(model, models.Model):
        return model, None
    classes = num_classes or int(y.max()) + 1
    return models.from_module(model, x.shape[1:], classes, permutation_spec)


def _optimizer(optimizer, rows: list[dict]):
    if isinstance(optimizer, str):
        if optimizer not in optimizers.OPTIMIZERS:
            raise ValueError(f"optimizer: {optimizer!r} is not one of {sorted(optimizers.OPTIMIZERS)} (or pass an "
                             "optax constructor, such as optax.adamw)")
        return optimizer
    return optimizers.from_optax(optimizer, weight_decay=any(r["weight_decay"] for r in rows))


def _settings(model: models.Model, rows, steps, batch_size, warmup_steps, optimizer, momentum, seed_offset, x, y,
              start_M, compute_dtype: str) -> dict:
    """What a checkpointed `fit` must find unchanged to resume: everything that decides the members' training."""
    name = optimizer if isinstance(optimizer, str) else getattr(optimizer, "__qualname__", repr(optimizer))
    return {"model": model.kind.name, "members": rows, "steps": steps, "batch_size": batch_size,
            "warmup_steps": warmup_steps, "optimizer": name, "momentum": momentum, "seed_offset": seed_offset,
            "compute_dtype": compute_dtype,
            "train": {"x": list(x.shape), "y": list(y.shape)},
            "params": {jax.tree_util.keystr(k): list(v.shape[1:]) for k, v in jax.tree_util.tree_leaves_with_path(
                start_M)}}


def _open_directory(directory: str, settings: dict) -> None:
    """Create the directory of a checkpointed `fit`, or check that the one there was made by the same call."""
    path = os.path.join(directory, layout.FIT_SETTINGS)
    if os.path.exists(path):
        with open(path) as f:
            before = json.loads(f.read())
        changed = rundir.settings_changes(before, json.loads(json.dumps(settings, default=str)))
        if changed:
            names = ", ".join(c.split(":")[0] for c in changed)
            raise ValueError(f"{directory} holds a fit with other {names} ({'; '.join(c[:80] for c in changed)}): "
                             "resume it with the same arguments, or give another directory")
        return
    files.write_atomic(path, json.dumps(settings, indent=1, default=str), os.path.abspath(directory))


def fit(model, train_data, *, steps: int, batch_size: int, lr, seeds=1, weight_decay=0.0, schedule="constant",
        dropout=0.0, warmup_steps: int = 0, optimizer="adamw", momentum: float = 0.9, params: dict | None = None,
        init: str = "per_seed", num_classes: int | None = None, permutation_spec=None, directory: str | None = None,
        checkpoint_every: int = 0, chunk_steps: int = 100, seed_offset: int = 0, train_eval_size: int = 1000,
        fit_margin: float = 0.05, label_map: str = "identity", data_dir: str | None = None,
        compute_dtype: str = "float32", max_members: int = 0, progress: loop.Progress | None = None) -> Members:
    """Train every member — each combination of `lr`, `weight_decay`, `schedule` and `dropout` (a scalar: one value;
    a list: an axis) × `seeds` — of one model simultaneously, in one compiled program (`jax.vmap` over the members,
    `lax.scan` over steps, sharded over the devices).

    `model`: a Flax NNX module (its parameters are every member's start), a function `rngs -> module` (each seed
    draws its own initialisation, or seed 0's for all with init="shared"), or a jaxlmc `Model`; `params` overrides
    the start (one member's parameters: a pretrained checkpoint). `train_data`: (x, y) arrays, or a dataset's name
    (TFDS, or registered). `optimizer`: a registered name ("adamw", "sgd") or any optax constructor taking the rate
    first (`optax.adamw`, `functools.partial(optax.sgd, momentum=0.9)`), called per member with its rate — a
    schedule of `schedule` after `warmup_steps` of linear warm-up — and, when some member decays, `weight_decay=`.

    A member's seed decides its data order (and its initialisation and dropout masks where those apply); a member
    whose loss stops being finite is frozen and flagged `diverged`, one that ends no better than always predicting
    the most frequent label plus `fit_margin` is flagged `unfit`: neither enters barriers. With `directory` the
    training is checkpointed (Orbax) at the end and every `checkpoint_every` steps, and a rerun with the same
    arguments resumes from the last checkpoint (bit for bit as if never stopped); without, nothing is written.
    `compute_dtype="bfloat16"`: the training pass in bfloat16, parameters and optimiser state in float32. Members
    that do not fit the memory together train in as few parts as it holds, one after another (`max_members`: at most
    that many per part), with the same result.
    """
    x, y = _arrays(train_data, label_map, data_dir)
    rows = member_rows(seeds, lr=lr, weight_decay=weight_decay, schedule=schedule, dropout=dropout)
    _check_rows(rows, len(y), batch_size, steps, max_members)
    if compute_dtype not in ("float32", "bfloat16"):
        raise ValueError(f'compute_dtype: {compute_dtype!r} is neither "float32" nor "bfloat16"')
    model, instance_params = _model(model, x, y, num_classes, permutation_spec)
    if any(r["dropout"] for r in rows) and not model.kind.dropout:
        raise ValueError(f"dropout: model {model.kind.name!r} is called with a batch alone; per-member dropout needs "
                         "a call (x, drop) that passes `drop` to jaxlmc.models.dropout")
    opt = _optimizer(optimizer, rows)
    start_M = _start(model, instance_params if params is None else params, rows, init, seed_offset)
    if model.kind.permutation_spec is not None:  # a spec that changes the function is refused before training
        spec_check.check_spec(model, jax.tree.map(lambda a: a[0], start_M), x[:4])
    consts = grid.member_consts(FinetuneConfig(steps=steps, warmup_steps=warmup_steps, seed_offset=seed_offset), rows)
    how = trainer.MemberTraining(opt, momentum, batch_size, steps, chunk_steps, compute_dtype=compute_dtype,
                                 checkpoint_every=checkpoint_every, max_members=max_members)
    store = None
    if directory is not None:
        _open_directory(directory, _settings(model, rows, steps, batch_size, warmup_steps, optimizer, momentum,
                                             seed_offset, x, y, start_M, compute_dtype))
        store = trainer.MemberStore(rundir.RunDir(directory), layout.FIT_CHECKPOINTS, layout.FIT_CURVES)
    state, curves_arrays = trainer.train_members(model, start_M, consts, x, y, how, store, progress, label="fit")
    return _finish(model, rows, state, start_M, x, y, train_eval_size, fit_margin, curves_arrays)


def _finish(model: models.Model, rows: list[dict], state: dict, start_M: dict, x, y, train_eval_size: int,
            fit_margin: float, curves: dict) -> Members:
    params_M = state["params"]
    n = min(train_eval_size, len(y))
    loss_M, acc_M = map(shard.to_host, train.make_evaluate(model)(params_M, shard.replicate(
        train.batch_eval_set(x[:n], y[:n], 1000), shard.mesh_of(params_M))))
    dist_M = shard.to_host(train.distance_from(params_M, shard.shard_members(start_M, shard.mesh_of(params_M))))
    diverged_M = shard.to_host(state["diverged"])
    measured = [{"diverged": bool(d), "train_acc": float(acc)} for d, acc in zip(diverged_M, acc_M)]
    unfit_M = grid.unfit_flags(measured, 0.0, grid.chance_accuracy(y[:n]), fit_margin, start_keys=())
    table = [{**r, "diverged": m["diverged"], "unfit": unfit, "train_loss": float(loss), "train_acc": m["train_acc"],
              "dist_from_init": float(dist)}
             for r, m, unfit, loss, dist in zip(rows, measured, unfit_M, loss_M, dist_M)]
    varied = tuple(k for k in HYPERPARAMETERS if len({r[k] for r in rows}) > 1)
    return Members(model, params_M, start_M, table, curves, varied)


@dataclasses.dataclass
class Barriers:
    """The barriers of member pairs (`pairs`: one row per pair, barriers/pairs.csv's columns) and, when asked, of each
    member to its start (`to_start`: barriers/to_start.csv's), with the curves they were read from."""

    members: Members
    pairs: list[dict]
    to_start: list[dict]
    curves: interpolation.PairCurves
    layers: list[dict] = dataclasses.field(default_factory=list)  # per pair and layer group (layerwise=True)
    pair_ids: list[tuple[int, int]] = dataclasses.field(default_factory=list)  # the pairs measured (member numbers)
    left_out: int = 0  # requested pairs left out: a member diverged or is unfit
    used: list[int] = dataclasses.field(default_factory=list)  # the members interpolated

    def summary(self, margin: float = decide.MARGIN) -> list[dict]:
        """One row per cell (barriers/summary.csv's columns): each measure's mean and std over the cell's pairs, and
        its 95 % interval over seeds (pairs share members, so seeds are the units: jaxlmc.decide); for every barrier
        with a noise floor, the floor and the excess over its null mean; each cell's verdict ("one basin" within
        `margin`, "separate basins", "not resolved") with the p-values of all cells adjusted together."""
        seeds = sorted({r["seed"] for r in self.members.table})
        index = {s: k for k, s in enumerate(seeds)}
        members = [{**r, "seed": index[r["seed"]]} for r in self.members.table]
        starts = [{**r, "seed": index[r["seed"]]} for r in self.to_start]
        return interpolation.cell_summary(members, self.pairs, starts, len(seeds), self.members.cell_keys, margin)


def pair_barriers(members: Members, eval_data, *, pairs="within", align: str | None = None, align_x=None,
                  repair_x=None, bezier: BezierSettings | None = None, measures: list[str] | tuple[str, ...] = (),
                  num_alphas: int = DEFAULT_ALPHAS, noise_resamples: int = 100, to_start: bool = False,
                  reference: dict | None = None, layerwise: bool = False, chunk_pairs: int = 0,
                  memory_fraction: float = 0.5, eval_batch_size: int = 1000, status=None,
                  progress: loop.Progress | None = None) -> Barriers:
    """Interpolate between members: loss and error along θ(α) = (1 − α)·θᵢ + α·θⱼ on `num_alphas` points, for every
    pair in one compiled pass (docs/science.md defines both barrier forms and the noise floor).

    `eval_data`: (x, y) (named "test") or {name: (x, y)}. `pairs`: "within" (the pairs inside each cell: members
    that differ only in their seed), "ring:K", "all", a pair file or a list of (i, j). Diverged and unfit members are
    left out. `align`: "weights" (weight matching; the model needs a permutation spec) or "activations" (activation
    matching on `align_x`; the module needs `unit_activations`) adds the `_aligned` columns; `repair_x` (examples) the
    `_repair` columns (REPAIR, on the aligned pairs when aligning); `bezier` (jaxlmc.measures.BezierSettings) the
    `_curve` columns; `measures` further registered pair measures by name (jaxlmc.measures: a path of one's own),
    each its columns; `noise_resamples` bootstrap resamplings of each evaluation set give every barrier a noise floor
    (`_floor`); `to_start` adds each member's line to its own start, `reference` (params_M…) each member's line
    to that point instead (such as its start with a working head); `layerwise` the layer-wise barriers (Adilova et
    al. 2024: one top-level parameter group interpolated at a time, aligned too when aligning) in `Barriers.layers`;
    `chunk_pairs` 0: the largest chunk of pairs whose scratch memory fits `memory_fraction` of the free memory.
    `progress` (e.g. jaxlmc.ui.TrainingProgress) shows the pairs as they are evaluated.
    """
    named = {"test": eval_data} if isinstance(eval_data, tuple) else dict(eval_data)
    if not named:
        raise ValueError("eval_data: no evaluation set given")
    table = members.table
    used = [r["member"] for r in table if grid.usable(r)]
    if not used:
        raise ValueError(f"pair_barriers: every one of the {len(table)} members diverged or is unfit (members.table's "
                         "diverged and unfit columns): there is nothing to interpolate")
    if align is not None and members.model.kind.permutation_spec is None:
        raise ValueError(f"align={align!r}: model {members.model.kind.name!r} has no permutation spec; pass "
                         "permutation_spec=[[jaxlmc.UnitAxis(layer, name, axis), …], …] (per hidden layer, every "
                         "parameter axis its units index) to jaxlmc.fit, or align=None")
    if to_start and reference is None and members.start is None:
        raise ValueError("to_start: these members carry no start (Members.start is None): pass reference=params_M…")
    kept, left_out = pair_sets.select_pairs(os.fspath(pairs) if isinstance(pairs, os.PathLike) else pairs, table,
                                            members.cell_keys, grid.usable)
    position = {m: k for k, m in enumerate(used)}
    take = jnp.asarray(used, jnp.int32)
    sub = lambda tree: jax.tree.map(lambda a: a[take], tree)  # noqa: E731
    reference = members.start if to_start and reference is None else reference
    curves = interpolation.pair_curves(
        members.model, sub(members.params), [(position[i], position[j]) for i, j in kept],
        train.eval_sets(named, eval_batch_size, noise_resamples), num_alphas=num_alphas, start_K=sub(members.start),
        reference_K=None if reference is None else sub(reference), chunk_pairs=chunk_pairs,
        memory_fraction=memory_fraction, align=align, align_x=align_x, repair_x=repair_x, bezier=bezier,
        measures=measures, status=status, progress=progress)
    pair_rows, start_rows = interpolation.barrier_rows(table, kept, used, curves, members.cell_keys, members.pair_keys)
    layers = []
    if layerwise and kept:
        layers = layer_rows(members.model, sub(members.params), [(position[i], position[j]) for i, j in kept],
                            train.eval_sets(named, eval_batch_size), curves.alphas, curves.chunk, curves.perms, table,
                            members.cell_keys, pair_ids=kept)
    return Barriers(members, pair_rows, start_rows, curves, layers, kept, left_out, used)


def format_table(rows: list[dict], columns: list[str] | None = None, digits: int = 4) -> str:
    """A plain-text table of `rows` (all their columns, or `columns`), numbers to `digits` significant digits."""
    if not rows:
        return "(no rows)"
    columns = columns or list(rows[0])
    text = [[c for c in columns]] + [[f"{r.get(c, ''):.{digits}g}" if isinstance(r.get(c), float) else
                                      str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(line[k]) for line in text) for k in range(len(columns))]
    return "\n".join("  ".join(v.rjust(w) for v, w in zip(line, widths)) for line in text)
