"""Every Orbax call in jaxlmc lives here.

A `Checkpoints` wraps one `orbax.checkpoint.CheckpointManager` over a directory of step-numbered checkpoints of a
state pytree. Orbax writes each checkpoint to a temporary directory and renames it when complete, so a process
killed at any moment (kill -9) leaves either the previous checkpoints or the new one, never a torn one; leftover
temporary directories are ignored and cleaned up on the next start.
"""
from __future__ import annotations

import logging
import os
from typing import Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

# Orbax logs every save at INFO/WARNING through absl; the progress bar already says what is happening.
logging.getLogger("absl").setLevel(logging.ERROR)


class Checkpoints:
    def __init__(self, directory: str, keep_steps: Sequence[int] = (), keep_latest: int = 1,
                 read_only: bool = False):
        """`keep_steps` are kept for ever (e.g. the pretraining checkpoints); of the rest the newest `keep_latest`."""
        policies = [checkpoint_managers.LatestN(keep_latest)]
        if keep_steps:
            policies.append(checkpoint_managers.CustomSteps(list(keep_steps)))
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=False,
            cleanup_tmp_directories=not read_only,
            create=not read_only,
            read_only=read_only,
            preservation_policy=None if read_only else checkpoint_managers.AnyPreservationPolicy(policies),
        )
        # Orbax's tensorstore layer refuses relative paths; run directories are usually given relative to the cwd.
        self._manager = ocp.CheckpointManager(os.path.abspath(directory), options=options,
                                              item_handlers=ocp.StandardCheckpointHandler())

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state) -> None:
        self._manager.save(step, args=ocp.args.StandardSave(state), force=True)
        self._manager.wait_until_finished()

    def restore(self, step: int, abstract_state):
        """Restore into the structure, shapes, dtypes (and shardings) of `abstract_state` (e.g. from eval_shape)."""
        return self._manager.restore(step, args=ocp.args.StandardRestore(abstract_state))

    def restore_like(self, step: int, host_tree):
        """Restore into the structure, shapes and dtypes of a tree of host arrays, as host arrays."""
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), np.asarray(a).dtype, sharding=device),
                              host_tree)
        return jax.tree.map(np.asarray, self.restore(step, target))

    def restore_raw(self, step: int):
        """Restore without a target from the caller: nested dicts/lists of arrays on this process's first device,
        whatever devices saved them (a checkpoint saved sharded over 8 devices restores on 1)."""
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                              self._manager.item_metadata(step))
        return self._manager.restore(step, args=ocp.args.StandardRestore(target))

    def close(self) -> None:
        self._manager.close()


def restore_params(directory: str, step: int | None = None) -> dict:
    """The `params` subtree of a saved state (latest step by default), as host numpy arrays."""
    manager = Checkpoints(directory, read_only=True)
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {directory}")
    if step not in manager.steps():
        raise FileNotFoundError(f"no checkpoint at step {step} in {directory} (have {manager.steps()})")
    raw = manager.restore_raw(step)
    manager.close()
    return jax.tree.map(np.asarray, raw["params"])


def restore_fields(directory: str, step: int, fields: Sequence[str]) -> dict:
    """Some top-level entries (e.g. "params", "diverged") of the state saved at `step`, as host numpy arrays."""
    manager = Checkpoints(directory, read_only=True)
    if step not in manager.steps():
        manager.close()
        raise FileNotFoundError(f"no checkpoint at step {step} in {directory} (have {manager.steps()})")
    raw = manager.restore_raw(step)
    manager.close()
    return {name: jax.tree.map(np.asarray, raw[name]) for name in fields}
