"""The member axis spread over devices: one named `Mesh` with a single axis, "members", and `NamedSharding`s.

Members are independent, so sharding their leading axis needs no communication during training: XLA's partitioner
keeps every vmapped operation on the devices that hold the members, and the training data are replicated. The
barrier pass shards its pair axis the same way (`jax.shard_map`, every device holding all members). With several
processes (`jax.distributed.initialize`), `jax.devices()` lists every process's devices and the same code runs on
all of them; host arrays are placed with `jax.make_array_from_callback` (each process fills its own shards from
the same host data) and read back with `to_host`, which gathers across processes when needed.
"""
from __future__ import annotations

import os
import re

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MEMBERS = "members"


def use_cpu_cores(count: int = 0) -> int:
    """Make the CPU one JAX device per core (`count`, or the cores this process may run on), so that the members of a
    training chunk, split over them, run on every core at once (`train.cpu_member_mesh`) instead of every small
    per-member matmul being split over the cores. Call it right after importing jax: it changes nothing once JAX
    has computed anything, nor when the process already says how many CPU devices it wants (`JAX_NUM_CPU_DEVICES`,
    XLA's `--xla_force_host_platform_device_count`). The `jaxlmc` command calls it. Returns the CPU device count
    the process will have (or has)."""
    requested = count or len(os.sched_getaffinity(0))
    forced = re.search(r"xla_force_host_platform_device_count=(\d+)", os.environ.get("XLA_FLAGS", ""))
    if "JAX_NUM_CPU_DEVICES" in os.environ or forced:  # read, not asked of JAX: that would start it
        return int(os.environ.get("JAX_NUM_CPU_DEVICES") or forced.group(1))
    try:
        jax.config.update("jax_num_cpu_devices", requested)
    except RuntimeError:  # JAX already started: its devices stay as they are
        return len(jax.devices("cpu"))
    return requested


def member_mesh(num_members: int, devices=None) -> Mesh | None:
    """A mesh over the most devices that divide `num_members` evenly, or None for a single device."""
    devices = list(devices if devices is not None else jax.devices())
    count = max(d for d in range(1, len(devices) + 1) if num_members % d == 0)
    if count == 1:
        return None
    return Mesh(np.asarray(devices[:count]), (MEMBERS,))


def device_mesh(devices=None) -> Mesh | None:
    """A mesh over every device (for axes that are padded to fit it, like the barrier pass's pairs)."""
    devices = list(devices if devices is not None else jax.devices())
    return Mesh(np.asarray(devices), (MEMBERS,)) if len(devices) > 1 else None


def _sharding(mesh: Mesh, leaf) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(MEMBERS) if np.ndim(leaf) else PartitionSpec())


def _place(leaf, sharding):
    if jax.dtypes.issubdtype(getattr(leaf, "dtype", np.float32), jax.dtypes.prng_key):
        data = jax.random.key_data(leaf)
        impl = jax.random.key_impl(leaf)
        placed = _place(data, NamedSharding(sharding.mesh, PartitionSpec(*sharding.spec)))
        return jax.random.wrap_key_data(placed, impl=impl)
    host = to_host(leaf)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def shard_members(tree, mesh: Mesh | None):
    """Every leaf with a leading member axis split over the mesh; scalars replicated. No-op without a mesh."""
    if mesh is None:
        return tree
    return jax.tree.map(lambda leaf: _place(leaf, _sharding(mesh, leaf)), tree)


def replicate(tree, mesh: Mesh | None):
    if mesh is None:
        return tree
    return jax.tree.map(lambda leaf: _place(leaf, NamedSharding(mesh, PartitionSpec())), tree)


def abstract(tree):
    """Shapes, dtypes and shardings of a placed tree: the target Orbax restores into."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=getattr(a, "sharding", None)), tree)


def to_host(leaf) -> np.ndarray:
    """A host copy of an array, gathered from every process when this one does not hold all of it."""
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
        if leaf.is_fully_replicated:
            return np.asarray(leaf.addressable_data(0))
        return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
    return np.asarray(leaf)


def is_primary() -> bool:
    """The process that writes the run directory's own files (Orbax coordinates checkpoints itself)."""
    return jax.process_index() == 0


def sync(name: str) -> None:
    """Wait until every process gets here (a no-op with one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def global_mesh() -> Mesh | None:
    """With several processes, a mesh over every process's devices (for state that must be a global array, such as
    the single pretraining model, replicated); None with one process."""
    return device_mesh() if jax.process_count() > 1 else None


def mesh_of(tree) -> Mesh | None:
    """The mesh a placed tree's first leaf lives on, if it has one."""
    sharding = getattr(jax.tree.leaves(tree)[0], "sharding", None)
    return getattr(sharding, "mesh", None) if isinstance(sharding, NamedSharding) else None
