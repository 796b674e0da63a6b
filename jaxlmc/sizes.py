"""What a run needs in memory, estimated before anything is built, allocated or written, so that a grid or a model
too large for the machine is refused in one line (a ConfigError giving the estimate and the memory available)
instead of dying in Python (a MemoryError while building the member grid) or inside XLA (an abort).

The estimates are lower bounds, so they never refuse a run that would fit:

* all members at once: every member's starting point is kept (distances from the start) beside its current
  parameters, whether the members train in one program or in parts (jaxlmc.finetuning): 2 × 4 bytes per parameter;
* one member's training step, the least one program holds: its float32 parameters, gradients and optimiser state
  (from optax's own `init`, abstractly), its data order (4 bytes per training example), and the largest single array
  its forward and backward pass creates at its batch size (read off the traced program, `largest_array_bytes`), or
  its forward pass at the evaluation batch size (run.eval_batch_size, or the largest evaluation set if smaller).

Parameter counts come from `jax.eval_shape` of the model's initialisation and activations from `jax.make_jaxpr`:
shapes only, nothing is allocated.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxlmc import grid, memory, models, train
from jaxlmc.config import Config, ConfigError


@dataclasses.dataclass(frozen=True)
class Footprint:
    """The memory a phase of training needs at least, in bytes."""

    what: str  # "pretraining" or "fine-tuning"
    members: int
    params_per_member: int
    all_members_bytes: int  # held for every member at once
    one_member_bytes: int  # one member's training step (one program holds at least this)
    largest_array_bytes: int  # the largest activation of that step (included in one_member_bytes)


def _human(num_bytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(num_bytes) < 1000 or unit == "PB":
            return f"{num_bytes:.3g} {unit}" if unit != "B" else f"{int(num_bytes)} B"
        num_bytes /= 1000
    raise AssertionError


def _nbytes(aval) -> int:
    return int(math.prod(aval.shape)) * np.dtype(aval.dtype).itemsize


def _subjaxprs(value):
    """Jaxprs nested in an equation's parameter (scan, cond, jit, custom VJPs …)."""
    if hasattr(value, "jaxpr") and hasattr(value.jaxpr, "eqns"):  # a ClosedJaxpr
        yield value.jaxpr
    elif hasattr(value, "eqns"):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _subjaxprs(v)


def largest_array_bytes(jaxpr) -> int:
    """The largest array any equation of a (closed) jaxpr creates, nested programs included."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    largest = 0
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            if hasattr(var.aval, "shape"):
                largest = max(largest, _nbytes(var.aval))
        for value in eqn.params.values():
            for sub in _subjaxprs(value):
                largest = max(largest, largest_array_bytes(sub))
    return largest


def member_count(cfg: Config) -> int:
    """The number of fine-tuning members, by arithmetic on the grid's axes (the grid itself is not built)."""
    return math.prod(grid.axis_size(axis, cfg.finetune) for axis in grid.AXES)


def footprint(model: models.Model, members: int, batch_size: int, eval_batch_size: int, n_train: int,
              opt_kind: str, momentum: float, what: str) -> Footprint:
    """A lower bound of the memory `members` members of `model` need (see the module's docstring)."""
    params = jax.eval_shape(model.init, jax.random.key(0))
    num_params = sum(int(math.prod(leaf.shape)) for leaf in jax.tree.leaves(params))
    param_bytes = sum(_nbytes(leaf) for leaf in jax.tree.leaves(params))
    opt = jax.eval_shape(train.make_tx(opt_kind, momentum, 0.0, 0.0).init, params)
    opt_bytes = sum(_nbytes(leaf) for leaf in jax.tree.leaves(opt))
    label_shape = model.input_shape if model.per_token else ()

    def loss(p, x, y):
        return train.mean_loss(model.apply(p, x), y)

    def batch(n):
        return (jax.ShapeDtypeStruct((n, *model.input_shape), jnp.float32),  # (jaxlmc.data's inputs, tokens too)
                jax.ShapeDtypeStruct((n, *label_shape), jnp.int32))

    largest = max(largest_array_bytes(jax.make_jaxpr(jax.grad(loss))(params, *batch(batch_size))),
                  largest_array_bytes(jax.make_jaxpr(model.apply)(params, batch(eval_batch_size)[0])))
    one = 2 * param_bytes + opt_bytes + 4 * n_train + largest
    return Footprint(what, members, num_params, members * 2 * param_bytes, one, largest)


def check(fp: Footprint, available_bytes: int | None = None, device_bytes: int | None = None) -> None:
    """Refuse (ConfigError, one line) a footprint that cannot fit: all members' parameters beside the memory of all
    devices, one member's step beside one device's."""
    available_bytes = total_memory_bytes() if available_bytes is None else available_bytes
    device_bytes = memory.available_memory_bytes() if device_bytes is None else device_bytes
    who = f"{fp.members:,} member{'s' if fp.members != 1 else ''} × {fp.params_per_member:,} parameters"
    if fp.all_members_bytes > available_bytes:
        fewer = "fewer members (finetune.seeds, the grid's values) or " if fp.members > 1 else ""
        raise ConfigError(f"{fp.what} of {who} needs at least {_human(fp.all_members_bytes)} (each member's starting "
                          f"and current parameters) but {_human(available_bytes)} of memory are available; use "
                          f"{fewer}a smaller model (model.width, model.depth)")
    if fp.one_member_bytes > device_bytes:
        raise ConfigError(f"{fp.what}: one member of {fp.params_per_member:,} parameters needs at least "
                          f"{_human(fp.one_member_bytes)} per step (parameters, gradients, optimiser state, and "
                          f"{_human(fp.largest_array_bytes)} for its largest activation) but "
                          f"{_human(device_bytes)} of memory are available; use a smaller model (model.width, "
                          "model.depth) or batch (batch_size, run.eval_batch_size)")


def total_memory_bytes() -> int:
    """Free memory over every device of the run: the host's on the CPU (its devices share it), else the sum of every
    local device's headroom times the processes."""
    devices = jax.local_devices()
    if devices[0].platform == "cpu":
        return memory.available_memory_bytes(devices[0])
    return sum(memory.available_memory_bytes(d) for d in devices) * jax.process_count()


def _eval_batch(cfg: Config, task) -> int:
    """The largest evaluation batch: run.eval_batch_size, or the largest evaluation set when smaller
    (jaxlmc.train.batch_eval_set)."""
    sizes = [min(cfg.data.train_eval_size, len(task.train.y)), len(task.test.y)]
    sizes += [len(split.y) for split in (getattr(task, "ood", None), getattr(task, "val", None)) if split is not None]
    return min(cfg.run.eval_batch_size, max(sizes))


def check_pretraining(cfg: Config, model: models.Model, task) -> None:
    """Refuse a pretraining of `model` on `task` (jaxlmc.tasks.Task) that cannot fit (ConfigError)."""
    p = cfg.pretrain
    check(footprint(model, 1, p.batch_size, _eval_batch(cfg, task), len(task.train.y), p.optimizer, p.momentum,
                    "pretraining"))


def check_finetuning(cfg: Config, model: models.Model, task) -> None:
    """Refuse a fine-tuning grid of `model` on `task` (jaxlmc.tasks.Task) that cannot fit (ConfigError)."""
    f = cfg.finetune
    check(footprint(model, member_count(cfg), f.batch_size, _eval_batch(cfg, task), len(task.train.y), f.optimizer,
                    f.momentum, "fine-tuning"))
