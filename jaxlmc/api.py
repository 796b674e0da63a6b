"""The importable API behind the CLI: pretraining, fine-tuning grids, run directories.

A run directory (``--out``) holds

    config.json                the resolved config, with library versions (provenance)
    pretrain/checkpoints/STEP  Orbax: the pretraining state at each of pretrain.save_steps (and the latest)
    pretrain/checkpoints.csv   loss and accuracy of each pretraining checkpoint
    checkpoints/STEP           Orbax: the stacked fine-tuning state (params_M, opt_M, data order, diverged_M, step)
    members.csv                one row per fine-tuned member

Running the same command again resumes from the latest checkpoint of each stage.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import json
import os
import tempfile
from importlib import metadata

import jax
import jax.numpy as jnp
import numpy as np

from jaxlmc import ckpt, data, models, shard, train
from jaxlmc.config import TRAINING_SECTIONS, Config, ConfigError

MEMBER_COLUMNS = ["member", "pretrain_step", "lr", "weight_decay", "schedule", "seed", "train_loss", "train_acc",
                  "test_loss", "test_acc", "ood_loss", "ood_acc", "val_loss", "val_acc", "dist_from_init", "diverged"]


# --------------------------------------------------------------------------------------------- run directory


def write_atomic(path: str, text: str | bytes) -> None:
    """Write a whole file or nothing: a kill mid-write leaves the previous version. With several processes the
    primary one writes and the others wait for it."""
    if shard.is_primary():
        directory = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
        with os.fdopen(fd, "wb" if isinstance(text, bytes) else "w") as f:
            f.write(text)
        os.replace(tmp, path)
    shard.sync(f"write {path}")


def _versions() -> dict:
    names = ["jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "tensorflow-datasets", "mnist1d", "numpy"]
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def open_run_dir(cfg: Config, out: str) -> None:
    """Create `out` with its config.json, or check that an existing run directory was trained with the same config.

    Only the training sections must agree (and not data.data_dir, which says where the data is, not what it is);
    reporting and measuring settings may change from one invocation to the next.
    """
    path = os.path.join(out, "config.json")
    shard.sync(f"open {out}")
    exists = os.path.exists(path)
    shard.sync(f"opened {out}")  # every process decided on the directory as it was before any of them writes to it
    if exists:
        with open(path) as f:
            saved = json.load(f)["config"]
        mine = json.loads(cfg.to_json())
        diffs = [f"{section}.{key}: {saved.get(section, {}).get(key)!r} -> {value!r}"
                 for section in TRAINING_SECTIONS for key, value in mine[section].items()
                 if (section, key) != ("data", "data_dir") and saved.get(section, {}).get(key) != value]
        if diffs:
            raise ConfigError(f"run directory {out} was made with a different config ({'; '.join(diffs)}); "
                              "use a new --out, or the same config to resume")
        return
    os.makedirs(out, exist_ok=True)
    write_atomic(path, json.dumps({"config": cfg.to_dict(), "versions": _versions(),
                                   "devices": [str(d) for d in jax.devices()]}, indent=2))


def _write_csv(path: str, rows: list[dict], columns: list[str]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(path, buffer.getvalue())


# --------------------------------------------------------------------------------------------- data


@dataclasses.dataclass(frozen=True)
class Task:
    train: data.Split
    test: data.Split
    ood: data.Split | None = None
    val: data.Split | None = None  # held out from the training split: never trained on, never the test set

    @property
    def input_shape(self):
        return self.train.x.shape[1:]


def _load(key: str, name: str, label_map: str, data_dir: str, splits=("train", "test"), stats_from=None) -> dict:
    try:
        return data.load_task(name, label_map, data_dir or None, splits=splits, stats_from=stats_from)
    except ValueError as err:  # an unknown dataset or label map is a config error: name the key
        raise ConfigError(f"{key}: {err}") from None


def load_pretrain_task(cfg: Config) -> Task:
    splits = _load("data.pretrain_task", cfg.data.pretrain_task, cfg.data.pretrain_labels, cfg.data.data_dir)
    return Task(splits["train"], splits["test"])


def load_finetune_task(cfg: Config) -> Task:
    d = cfg.data
    splits = _load("data.finetune_task", d.finetune_task, d.finetune_labels, d.data_dir)
    ood = None
    if d.ood_task:
        ood = _load("data.ood_task", d.ood_task, d.finetune_labels, d.data_dir, splits=("test",),
                    stats_from=d.finetune_task)["test"]
        if ood.x.shape[1:] != splits["train"].x.shape[1:]:
            raise ConfigError(f"data.ood_task {d.ood_task} has inputs {ood.x.shape[1:]}, the fine-tuning task "
                              f"{splits['train'].x.shape[1:]}")
    full = splits["train"]
    n_val = d.validation_size
    if n_val >= len(full.y):
        raise ConfigError(f"data.validation_size {n_val} leaves no training examples ({d.finetune_task} has "
                          f"{len(full.y)})")
    # The last examples of the training split are held out; TFDS splits are shuffled at preparation.
    cut = len(full.y) - n_val
    train_split = dataclasses.replace(full, x=full.x[:cut], y=full.y[:cut])
    val = dataclasses.replace(full, x=full.x[cut:], y=full.y[cut:], name=full.name + "[validation]") if n_val else None
    return Task(train_split, splits["test"], ood, val)


def _device_split(split: data.Split):
    return {"x": jnp.asarray(split.x), "y": jnp.asarray(split.y)}


def eval_sets(cfg: Config, task: Task, validation: bool = False) -> dict[str, tuple]:
    """The fixed train subset, test, (if any) OOD and (if asked and held out) validation sets, batched on the device
    once per run."""
    n = cfg.data.train_eval_size
    sets = {"train": train.batch_eval_set(task.train.x[:n], task.train.y[:n], cfg.run.eval_batch_size),
            "test": train.batch_eval_set(task.test.x, task.test.y, cfg.run.eval_batch_size)}
    if task.ood is not None:
        sets["ood"] = train.batch_eval_set(task.ood.x, task.ood.y, cfg.run.eval_batch_size)
    if validation and task.val is not None:
        sets["val"] = train.batch_eval_set(task.val.x, task.val.y, cfg.run.eval_batch_size)
    return sets


# --------------------------------------------------------------------------------------------- the training loop


def _boundaries(start: int, total: int, chunk_steps: int, stops: set[int]) -> list[int]:
    """Steps at which a chunk ends: every `chunk_steps`, at every checkpoint stop, and at the end."""
    ends, step = [], start
    while step < total:
        step = min([s for s in stops if s > step] + [step + chunk_steps, total])
        ends.append(step)
    return ends


def run_loop(chunk_fn, state, consts, device_data, total_steps: int, chunk_steps: int, save_at: set[int],
             save_fn, progress=None):
    """Advance every member to `total_steps` in compiled chunks; save at the steps in `save_at` and at the end.

    The metrics of a chunk are read on the host only after the next chunk was dispatched, so the device never waits
    for the host. Returns the final state.
    """
    step = int(state["step"])
    pending = None

    def report(loss_LxM, n):
        if progress is not None:
            progress.advance(n, shard.to_host(loss_LxM)[:n])  # the one host read per chunk

    for end in _boundaries(step, total_steps, chunk_steps, save_at):
        state, loss_LxM, _ = chunk_fn(state, consts, device_data, end - step)
        if pending is not None:
            report(*pending)
        pending = (loss_LxM, end - step)
        step = end
        if end in save_at or end == total_steps:
            save_fn(end, state)
    if pending is not None:
        report(*pending)
    return state


# --------------------------------------------------------------------------------------------- pretraining


def pretrain(cfg: Config, out: str, progress: bool = True, task: Task | None = None) -> list[dict]:
    """Pretrain one model on the pretraining task; save Orbax checkpoints at `pretrain.save_steps`.

    Resumes from the latest checkpoint in `out/pretrain/checkpoints`. Returns one row per saved checkpoint with its
    train/test loss and accuracy (also written to `out/pretrain/checkpoints.csv`).
    """
    p = cfg.pretrain
    task = task or load_pretrain_task(cfg)  # before the run directory: bad data leaves nothing behind
    if p.batch_size > len(task.train.y):
        raise ConfigError(f"pretrain.batch_size {p.batch_size} exceeds the {len(task.train.y)} training examples")
    open_run_dir(cfg, out)
    model = models.build(cfg.model, task.input_shape, task.train.num_classes)
    key = jax.random.key(p.seed)
    params_1 = jax.tree.map(lambda a: a[None], model.init(jax.random.fold_in(key, 0)))
    consts = {
        "lr": jnp.asarray(train.lr_table([p.lr], [p.schedule], p.steps, p.warmup_steps)),
        "wd": jnp.asarray([p.weight_decay], jnp.float32),
        "data_key": jax.random.fold_in(key, 1)[None],
    }
    n_train = len(task.train.y)
    # One process: the model lives on one device. Several: it is replicated over all of them, so that it is one
    # global array that Orbax saves once.
    mesh = shard.global_mesh()
    state = shard.replicate(train.init_state(params_1, p.optimizer, p.momentum, n_train), mesh)
    consts = shard.replicate(consts, mesh)
    manager = ckpt.Checkpoints(os.path.join(out, "pretrain", "checkpoints"), keep_steps=p.save_steps)
    latest = manager.latest_step()
    if latest is not None:
        state = manager.restore(latest, shard.abstract(state))
    elif 0 in p.save_steps:
        manager.save(0, state)

    save_at = set(p.save_steps) | set(range(cfg.run.checkpoint_every, p.steps, cfg.run.checkpoint_every))
    chunk_fn = train.make_train_chunk(model, p.optimizer, p.momentum, p.batch_size, n_train, cfg.run.chunk_steps)
    device_data = shard.replicate(_device_split(task.train), mesh)
    from jaxlmc.ui import TrainingProgress

    with TrainingProgress("pretrain", total_steps=p.steps, num_members=1, start_step=int(state["step"]),
                          enabled=progress) as bar:
        state = run_loop(chunk_fn, state, consts, device_data, p.steps, cfg.run.chunk_steps, save_at,
                            manager.save, bar)

    # Evaluate every kept checkpoint (also those saved before a resume) so the table is complete.
    evaluate = train.make_evaluate(model)
    sets = eval_sets(cfg, task)
    rows = []
    for step in sorted(set(p.save_steps) | {p.steps}):
        params = manager.restore(step, shard.abstract(state))["params"]
        train_loss, train_acc = map(shard.to_host, evaluate(params, shard.replicate(sets["train"], mesh)))
        test_loss, test_acc = map(shard.to_host, evaluate(params, shard.replicate(sets["test"], mesh)))
        rows.append({"step": step, "train_loss": float(train_loss[0]), "train_acc": float(train_acc[0]),
                     "test_loss": float(test_loss[0]), "test_acc": float(test_acc[0])})
    manager.close()
    _write_csv(os.path.join(out, "pretrain", "checkpoints.csv"), rows,
               ["step", "train_loss", "train_acc", "test_loss", "test_acc"])
    return rows


def pretraining_complete(cfg: Config, out: str) -> bool:
    directory = os.path.join(out, "pretrain", "checkpoints")
    if not os.path.isdir(directory):
        return False
    steps = ckpt.Checkpoints(directory, read_only=True).steps()
    return all(s in steps for s in cfg.finetune.pretrain_steps) and cfg.pretrain.steps in steps


# --------------------------------------------------------------------------------------------- fine-tuning


def member_grid(cfg: Config) -> list[dict]:
    """Every (pretraining checkpoint × lr × weight decay × schedule × seed), in that nesting order; with
    finetune.scratch the checkpoints are preceded by -1, the from-scratch control."""
    f = cfg.finetune
    steps = ([-1] if f.scratch else []) + list(f.pretrain_steps)  # -1: the from-scratch control row
    cells = itertools.product(steps, f.lrs, f.weight_decays, f.schedules, range(f.seeds))
    return [{"member": i, "pretrain_step": s, "lr": lr, "weight_decay": wd, "schedule": sch, "seed": seed}
            for i, (s, lr, wd, sch, seed) in enumerate(cells)]


def finetune(cfg: Config, out: str, progress: bool = True) -> list[dict]:
    """Fine-tune every member of the grid simultaneously in one compiled program; write members.csv.

    Pretrains first if the run directory lacks the pretraining checkpoints. Resumes from the latest fine-tuning
    checkpoint. Returns the rows of members.csv.
    """
    f = cfg.finetune
    # Everything that can be wrong with the inputs is checked before the run directory is touched.
    task = load_finetune_task(cfg)
    pre_task = load_pretrain_task(cfg)
    if task.input_shape != pre_task.input_shape:
        raise ConfigError(f"data.finetune_task inputs {task.input_shape} differ from data.pretrain_task inputs "
                          f"{pre_task.input_shape}")
    if f.batch_size > len(task.train.y):
        raise ConfigError(f"finetune.batch_size {f.batch_size} exceeds the {len(task.train.y)} training examples")
    open_run_dir(cfg, out)
    if not pretraining_complete(cfg, out):
        pretrain(cfg, out, progress=progress, task=pre_task)

    rows = member_grid(cfg)
    model = models.build(cfg.model, task.input_shape, task.train.num_classes)
    keys = train.member_keys([r["seed"] for r in rows])

    start_M = start_params(cfg, out, model, rows)
    params_M = jax.tree.map(jnp.copy, start_M)  # the state's copy is donated; start_M is kept for distances

    consts = {
        "lr": jnp.asarray(train.lr_table([r["lr"] for r in rows], [r["schedule"] for r in rows], f.steps,
                                         f.warmup_steps)),
        "wd": jnp.asarray([r["weight_decay"] for r in rows], jnp.float32),
        "data_key": keys["data"],
    }
    n_train = len(task.train.y)
    chunk_fn = train.make_train_chunk(model, f.optimizer, f.momentum, f.batch_size, n_train, cfg.run.chunk_steps)
    device_data = _device_split(task.train)
    manager = ckpt.Checkpoints(os.path.join(out, "checkpoints"), keep_latest=2)
    latest = manager.latest_step()
    num_members = len(rows)
    fit = members_per_program(cfg, chunk_fn, params_M, consts, device_data, n_train)
    if fit >= num_members or latest == f.steps:
        mesh = shard.member_mesh(num_members)
        state = shard.shard_members(train.init_state(params_M, f.optimizer, f.momentum, n_train), mesh)
        if latest is not None:
            state = manager.restore(latest, shard.abstract(state))
        state = _train_part(cfg, chunk_fn, state, shard.shard_members(consts, mesh),
                            shard.replicate(device_data, mesh), manager, "finetune", progress)
    else:
        state = _train_in_parts(cfg, out, chunk_fn, params_M, consts, device_data, fit, manager, progress)
    manager.close()

    results = evaluate_members(cfg, model, task, state["params"], start_M)
    diverged = shard.to_host(state["diverged"])
    for r, i in zip(rows, range(len(rows))):
        r.update({k: float(v[i]) for k, v in results.items()})
        r["diverged"] = bool(diverged[i])
    _write_csv(os.path.join(out, "members.csv"), rows, MEMBER_COLUMNS)
    return rows


def members_per_program(cfg: Config, chunk_fn, params_M, consts, device_data, n_train: int) -> int:
    """How many members one compiled program can train at once: run.max_members, else all of them when their
    state is small beside the free memory, else the number that XLA's memory analysis of the compiled training
    chunk (at 1 and 2 members: memory is affine in the member count) fits in 80 % of the free memory."""
    from jaxlmc.barriers import available_memory_bytes

    num_members = jax.tree.leaves(params_M)[0].shape[0]
    if cfg.run.max_members:
        return min(cfg.run.max_members, num_members)
    f = cfg.finetune
    budget = 0.8 * available_memory_bytes()
    state_M = jax.eval_shape(lambda p: train.init_state(p, f.optimizer, f.momentum, n_train), params_M)
    state_bytes = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(state_M))
    if 4 * state_bytes < 0.05 * budget:  # the usual case: no need to compile anything to know it fits
        return num_members

    def footprint(m):
        take = lambda tree: jax.tree.map(  # noqa: E731
            lambda a: jax.ShapeDtypeStruct((m, *a.shape[1:]), a.dtype) if a.ndim else a, tree)
        abstract_state = jax.eval_shape(lambda p: train.init_state(p, f.optimizer, f.momentum, n_train),
                                        take(jax.eval_shape(lambda: params_M)))
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), (consts, device_data))
        analysis = chunk_fn.lower(abstract_state, take(abstract[0]), abstract[1], 1).compile().memory_analysis()
        if analysis is None:
            return None
        return analysis.temp_size_in_bytes + analysis.argument_size_in_bytes + analysis.output_size_in_bytes

    one, two = footprint(1), footprint(2)
    if one is None or two is None:
        return num_members
    per_member = max(two - one, 1)
    return int(max(1, min(num_members, (budget - (one - per_member)) // per_member)))


def _train_part(cfg: Config, chunk_fn, state, consts, device_data, manager, label: str, progress: bool):
    f = cfg.finetune
    save_at = set(range(cfg.run.checkpoint_every, f.steps, cfg.run.checkpoint_every))
    num_members = state["diverged"].shape[0]
    from jaxlmc.ui import TrainingProgress

    with TrainingProgress(label, total_steps=f.steps, num_members=num_members, start_step=int(state["step"]),
                          enabled=progress) as bar:
        return run_loop(chunk_fn, state, consts, device_data, f.steps, cfg.run.chunk_steps, save_at, manager.save,
                        bar)


def _train_in_parts(cfg: Config, out: str, chunk_fn, params_M, consts, device_data, fit: int, manager,
                    progress: bool):
    """Members that do not fit one program are trained in as few parts as possible, one after another, each
    checkpointed in parts/partK (and resumed from there); the finished parts are stacked into one state saved in
    checkpoints/ like a single program's, and parts/ is removed. Members are independent, so the result is the
    same as training them all at once (tested)."""
    f = cfg.finetune
    num_members = jax.tree.leaves(params_M)[0].shape[0]
    num_parts = -(-num_members // fit)
    finished = []
    for k, members in enumerate(np.array_split(np.arange(num_members), num_parts)):
        take = jnp.asarray(members)
        part_params = jax.tree.map(lambda a: a[take], params_M)
        part_consts = jax.tree.map(lambda a: a[take], consts)
        mesh = shard.member_mesh(len(members))
        state = shard.shard_members(
            train.init_state(part_params, f.optimizer, f.momentum, device_data["y"].shape[0]), mesh)
        part_manager = ckpt.Checkpoints(os.path.join(out, "parts", f"part{k}"), keep_latest=2)
        latest = part_manager.latest_step()
        if latest is not None:
            state = part_manager.restore(latest, shard.abstract(state))
        if latest != f.steps:
            state = _train_part(cfg, chunk_fn, state, shard.shard_members(part_consts, mesh),
                                shard.replicate(device_data, mesh), part_manager, f"finetune {k + 1}/{num_parts}",
                                progress)
        part_manager.close()
        finished.append(jax.tree.map(shard.to_host, state))
    state = {key: (finished[0][key] if key == "step" else
                   jax.tree.map(lambda *parts: np.concatenate(parts), *[p[key] for p in finished]))
             for key in finished[0]}
    manager.save(f.steps, state)  # atomic: until it lands, a rerun resumes from the finished parts
    import shutil

    shutil.rmtree(os.path.join(out, "parts"), ignore_errors=True)
    return state


def start_params(cfg: Config, out: str, model: models.Model, rows: list[dict]) -> dict:
    """start_M: every member's starting point.

    A member starts from its pretraining checkpoint, or (pretrain_step -1, the scratch control) from its own random
    initialisation (the seed's "init" key stream). It gets a new head drawn from its seed's "head" stream when
    finetune.new_head is set or the fine-tuning task's classes differ from the pretraining task's.
    """
    keys = train.member_keys([r["seed"] for r in rows])
    pre_dir = os.path.join(out, "pretrain", "checkpoints")
    # Pretraining states have a member axis of length 1.
    starts = {s: jax.tree.map(lambda a: a[0], ckpt.restore_params(pre_dir, s))
              for s in sorted({r["pretrain_step"] for r in rows if r["pretrain_step"] >= 0})}
    scratch = [k for k, r in enumerate(rows) if r["pretrain_step"] < 0]
    if scratch:
        scratch_S = jax.tree.map(np.asarray, jax.jit(jax.vmap(model.init))(keys["init"][jnp.asarray(scratch)]))
        for n, k in enumerate(scratch):
            starts[("scratch", k)] = jax.tree.map(lambda a, n=n: a[n], scratch_S)
    sources = [starts[("scratch", k) if r["pretrain_step"] < 0 else r["pretrain_step"]] for k, r in enumerate(rows)]

    head_shapes = jax.tree.map(lambda a: tuple(a.shape), jax.eval_shape(model.init, jax.random.key(0))["head"])
    new_head = cfg.finetune.new_head or any(jax.tree.map(lambda a: tuple(a.shape), src["head"]) != head_shapes
                                            for src in sources)
    bodies = [{k: v for k, v in src.items() if not (new_head and k == "head")} for src in sources]
    start_M = jax.tree.map(lambda *leaves: jnp.asarray(np.stack(leaves)), *bodies)
    if new_head:
        # jit lets XLA drop the body initialisation: only the heads are materialised.
        start_M["head"] = jax.jit(jax.vmap(lambda k: model.init(k)["head"]))(keys["head"])
    return start_M


def evaluate_members(cfg: Config, model: models.Model, task: Task, params_M, start_M) -> dict[str, np.ndarray]:
    """Per-member train (fixed subset) / test / OOD loss and accuracy, and distance from the starting point."""
    out = {}
    evaluate = train.make_evaluate(model)
    mesh = shard.mesh_of(params_M)  # evaluation data replicated beside sharded members
    for name, eval_set in eval_sets(cfg, task, validation=True).items():
        loss_M, acc_M = evaluate(params_M, shard.replicate(eval_set, mesh))
        out[f"{name}_loss"], out[f"{name}_acc"] = shard.to_host(loss_M), shard.to_host(acc_M)
    for name in ("ood", "val"):
        if f"{name}_acc" not in out:
            nan = np.full(len(out["test_acc"]), np.nan)
            out[f"{name}_loss"], out[f"{name}_acc"] = nan, nan
    out["dist_from_init"] = shard.to_host(train.distance_from(params_M, shard.shard_members(start_M, mesh)))
    return out


def load_member(out: str, index: int, step: int | None = None) -> dict:
    """One fine-tuned member's parameters (host arrays) from a run directory's latest (or given) checkpoint."""
    params_M = ckpt.restore_params(os.path.join(out, "checkpoints"), step)
    num_members = jax.tree.leaves(params_M)[0].shape[0]
    if not 0 <= index < num_members:
        raise IndexError(f"member {index} out of range: the run has {num_members} members")
    return jax.tree.map(lambda a: a[index], params_M)
