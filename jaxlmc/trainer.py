"""The one resumable trainer: pretraining trains through `train_resumable`; fine-tuning and the library's `fit`
train their members through `train_members` (one compiled program, or parts when memory is short), which trains
each program through `train_resumable`.

It restores the newest intact checkpoint (jaxlmc.ckpt) into the prepared state, restores the training curves cut
back to that step, trains the rest in compiled chunks (jaxlmc.loop), and saves at the requested steps and at the end
— the curves first, so that after a kill they are at most ahead of the checkpoint, never behind. Rerun after an
interruption, it continues bit for bit as if it had never stopped.
"""
from __future__ import annotations

import dataclasses
import logging
import shutil
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from jaxlmc import layout, loop, memory, models, rundir, shard, train


def train_resumable(label: str, manager, state, chunk_fn, consts, device_data, steps: int, chunk_steps: int,
                    save_at: Iterable[int], curves_file: loop.CurvesFile, *, required: Iterable[int] = (),
                    save_start: bool = False, progress: loop.Progress | None = None, halt_on_divergence: bool = False,
                    on_resume: Callable[[int | None], None] | None = None) -> tuple[dict, loop.TrainingCurves]:
    """(state at `steps`, its training curves): `state` (initialised and sharded by the caller) restored from
    `manager`'s newest intact checkpoint — one that lacks a step of `required` is not a complete run to resume
    from —, then trained to `steps` with `chunk_fn` under a progress bar named `label`, saved at `save_at` and at the
    end. `save_start`: a fresh state is saved at step 0 too (a starting point others read). `on_resume(latest)` is
    told the step training resumes from (None: a fresh start) before it trains."""
    latest, restored = manager.resume(shard.abstract(state), required=list(required))
    state = state if restored is None else restored
    if on_resume is not None:
        on_resume(latest)
    curves = loop.TrainingCurves.from_arrays(curves_file.read() if latest is not None else None, upto=latest or 0)
    num_members = state["diverged"].shape[0]

    def save(step, state, curves):
        curves_file.write(curves.arrays(num_members))  # first: ahead of the checkpoint, never behind
        manager.save(step, state)

    if latest is None and save_start:
        save(0, state, curves)
    if latest != steps:
        state = loop.train_to(label, chunk_fn, state, consts, device_data, steps, chunk_steps, set(save_at), save,
                              progress, curves, halt_on_divergence)
    return state, curves


@dataclasses.dataclass(frozen=True)
class MemberStore:
    """Where a member training is checkpointed: run directory `run`, Orbax checkpoints in `checkpoints` (the training's
    save_steps kept for ever, of the rest the newest `keep_latest`), training curves in `curves`; a training in parts
    keeps part k in parts/partK until the finished parts are stacked."""

    run: rundir.RunDir
    checkpoints: str
    curves: str
    keep_latest: int = 1


@dataclasses.dataclass(frozen=True)
class MemberTraining:
    """How every member trains: a jaxlmc.train chunk's settings and the steps."""

    optimizer: object  # a registered name or a jaxlmc.optimizers factory
    momentum: float
    batch_size: int
    steps: int
    chunk_steps: int
    member_group: int = 0
    compute_dtype: str = "float32"
    save_steps: tuple[int, ...] = ()  # kept for ever, and a checkpoint there is required to resume past it
    checkpoint_every: int = 0
    max_members: int = 0  # members per compiled program (0: as many as the memory holds)


def train_members(model: models.Model, start_M: dict, consts: dict, x, y, how: MemberTraining,
                  store: MemberStore | None = None, progress: loop.Progress | None = None,
                  label: str = "finetune") -> tuple[dict, dict]:
    """(state, curves arrays) of every member trained from `start_M` (params_M…, with its per-member `consts`,
    jaxlmc.grid.member_consts) on the training arrays `x`, `y` — in one compiled program, or in as few parts as the
    memory holds (members are independent: the result is the same). With a `store` the training is checkpointed and
    resumes bit for bit where it stopped; without, nothing is written."""
    n_train = len(y)
    chunk_fn = train.make_train_chunk(model, how.optimizer, how.momentum, how.batch_size, n_train, how.chunk_steps,
                                      member_group=how.member_group, compute_dtype=how.compute_dtype)
    device_data = {"x": jnp.asarray(x), "y": jnp.asarray(y)}
    params_M = jax.tree.map(jnp.copy, start_M)  # the state's copy is donated; start_M is the caller's
    num_members = jax.tree.leaves(params_M)[0].shape[0]
    fit = members_per_program(chunk_fn, params_M, consts, device_data, how)
    if fit < num_members:
        parts = len(_parts(num_members, fit))
        why = f"max_members = {fit}" if how.max_members else f"the free memory holds {fit} per program"
        logging.getLogger("jaxlmc").warning(f"{label}: {num_members} members train in {parts} parts, one after "
                                            f"another ({why})")
    if store is None:
        if fit >= num_members:
            state, curves = train_program(label, chunk_fn, params_M, consts, device_data, how, None, None, progress)
            return state, curves.arrays(num_members)
        return _in_memory_parts(label, chunk_fn, params_M, consts, device_data, how, fit, progress)
    run = store.run
    with run.checkpoints(store.checkpoints, keep_steps=how.save_steps, keep_latest=store.keep_latest) as manager:
        if fit >= num_members or how.steps in manager.verified_steps():
            state, curves = train_program(label, chunk_fn, params_M, consts, device_data, how, manager,
                                          run.curves_file(store.curves), progress)
            return state, curves.arrays(num_members)
        return _checkpointed_parts(label, chunk_fn, params_M, consts, device_data, how, fit, store, manager, progress)


def members_per_program(chunk_fn, params_M, consts, device_data, how: MemberTraining) -> int:
    """How many members one compiled program can train at once: `how.max_members`, else all of them when their
    state is small beside the free memory, else the number that XLA's memory analysis of the compiled training
    chunk (at 1 and 2 members: memory is affine in the member count) fits in 80 % of the free memory."""
    num_members = jax.tree.leaves(params_M)[0].shape[0]
    if how.max_members:
        return min(how.max_members, num_members)
    n_train = device_data["y"].shape[0]
    budget = 0.8 * memory.available_memory_bytes()
    state_M = jax.eval_shape(lambda p: train.init_state(p, how.optimizer, how.momentum, n_train), params_M)
    state_bytes = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(state_M))
    if 4 * state_bytes < 0.05 * budget:  # the usual case: no need to compile anything to know it fits
        return num_members

    def footprint(m):
        take = lambda tree: jax.tree.map(  # noqa: E731
            lambda a: jax.ShapeDtypeStruct((m, *a.shape[1:]), a.dtype) if a.ndim else a, tree)
        abstract_state = jax.eval_shape(lambda p: train.init_state(p, how.optimizer, how.momentum, n_train),
                                        take(jax.eval_shape(lambda: params_M)))
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), (consts, device_data))
        analysis = chunk_fn.lower(abstract_state, take(abstract[0]), abstract[1], 1).compile().memory_analysis()
        if analysis is None:
            return None
        per_device = analysis.temp_size_in_bytes + analysis.argument_size_in_bytes + analysis.output_size_in_bytes
        return per_device * devices_for(m)  # the CPU's devices share one memory

    # Members split over the CPU's devices (train.cpu_member_mesh): XLA reports one device's share, so the program is
    # measured at 1 and 2 members per device and counted over all of them.
    devices_for = lambda m: getattr(train.cpu_member_mesh(m), "size", 1)  # noqa: E731
    per_probe = devices_for(2 * jax.device_count())
    return memory.largest_fit(footprint, budget, limit=num_members, probes=(per_probe, 2 * per_probe))


def train_program(label: str, chunk_fn, params_M, consts, device_data, how: MemberTraining, manager, curves_file,
                  progress: loop.Progress | None) -> tuple[dict, loop.TrainingCurves]:
    """Members starting at `params_M` trained to `how.steps` in one program, sharded over the devices; resumed from
    and saved with `manager` (at how.checkpoint_every and how.save_steps; None: nothing saved), their curves kept
    in `curves_file`."""
    mesh = shard.member_mesh(jax.tree.leaves(params_M)[0].shape[0])
    n_train = device_data["y"].shape[0]
    state = shard.shard_members(train.init_state(params_M, how.optimizer, how.momentum, n_train), mesh)
    consts, device_data = shard.shard_members(consts, mesh), shard.replicate(device_data, mesh)
    if manager is None:
        curves = loop.TrainingCurves()
        state = loop.train_to(label, chunk_fn, state, consts, device_data, how.steps, how.chunk_steps, set(),
                              lambda *_: None, progress, curves)
        return state, curves
    every = how.checkpoint_every
    save_at = (set(range(every, how.steps, every)) if every else set()) | set(how.save_steps)
    return train_resumable(label, manager, state, chunk_fn, consts, device_data, how.steps, how.chunk_steps, save_at,
                           curves_file, required=how.save_steps, progress=progress)


def _stacked(states: list[dict]) -> dict:
    """One state of the members of `states` (parts, in order) on the host."""
    return {key: (states[0][key] if key == "step" else
                  jax.tree.map(lambda *parts: np.concatenate(parts), *[p[key] for p in states]))
            for key in states[0]}


def _stacked_curves(curves: list[dict]) -> dict:
    return {"step_K": curves[0]["step_K"],
            **{name: np.concatenate([c[name] for c in curves], axis=1) for name in ("loss_KxM", "acc_KxM")}}


def _parts(num_members: int, fit: int) -> list[np.ndarray]:
    return np.array_split(np.arange(num_members), -(-num_members // fit))


def _in_memory_parts(label, chunk_fn, params_M, consts, device_data, how: MemberTraining, fit: int, progress):
    parts = _parts(jax.tree.leaves(params_M)[0].shape[0], fit)
    states, curves = [], []
    for k, members in enumerate(parts):
        take = lambda tree: jax.tree.map(lambda a: a[jnp.asarray(members)], tree)  # noqa: E731
        state, part_curves = train_program(f"{label} {k + 1}/{len(parts)}", chunk_fn, take(params_M), take(consts),
                                           device_data, how, None, None, progress)
        states.append(jax.tree.map(shard.to_host, state))
        curves.append(part_curves.arrays(len(members)))
    return _stacked(states), _stacked_curves(curves)


def _checkpointed_parts(label, chunk_fn, params_M, consts, device_data, how: MemberTraining, fit: int,
                        store: MemberStore, manager, progress):
    """Members that do not fit one program are trained in as few parts as possible, one after another, each
    checkpointed in parts/partK (and resumed from there); the finished parts are stacked into one state saved in
    the store's checkpoints like a single program's (so is each of how.save_steps, and so are the training curves),
    and parts/ is removed. Members are independent, so the result is the same as training them all at once
    (tested)."""
    run = store.run
    parts = _parts(jax.tree.leaves(params_M)[0].shape[0], fit)
    finished = []
    for k, members in enumerate(parts):
        take = lambda tree: jax.tree.map(lambda a: a[jnp.asarray(members)], tree)  # noqa: E731
        with run.checkpoints(run.part(k), keep_steps=how.save_steps, keep_latest=2) as part_manager:
            state, _ = train_program(f"{label} {k + 1}/{len(parts)}", chunk_fn, take(params_M), take(consts),
                                     device_data, how, part_manager, run.curves_file(run.part_curves(k)), progress)
        finished.append(jax.tree.map(shard.to_host, state))
    curves = _stacked_curves([run.read_npz(run.part_curves(k)) for k in range(len(parts))])
    run.write_npz(store.curves, curves)  # first: ahead of the checkpoints, never behind
    for step in how.save_steps:  # the kept steps first: the final one marks the run finished
        saved = []
        for k, one in enumerate(finished):
            with run.checkpoints(run.part(k), read_only=True) as part_manager:
                saved.append(part_manager.restore_like(step, one))
        manager.save(step, _stacked(saved))
    state = _stacked(finished)
    manager.save(how.steps, state)  # atomic: until it lands, a rerun resumes from the finished parts
    shutil.rmtree(run.path(layout.PARTS), ignore_errors=True)
    return state, curves
