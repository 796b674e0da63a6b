"""Members split over several CPU devices (`shard.use_cpu_cores`): every core trains its own members' groups
(`train.cpu_member_mesh`), and every member comes out as on one device."""
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxlmc import models, shard, train, trainer
from jaxlmc.config import ModelConfig

HERE = os.path.dirname(__file__)


def train_tiny(num_members: int, member_group: int = 0):
    """Six steps (over an epoch boundary) of a small MLP's members at different rates; host arrays out."""
    model = models.build(ModelConfig(kind="mlp", width=16, depth=2), (5,), 3)
    params_M = jax.vmap(model.init)(jax.random.split(jax.random.key(0), num_members))
    rng = np.random.default_rng(0)
    data = {"x": rng.normal(size=(40, 5)).astype(np.float32), "y": rng.integers(0, 3, 40).astype(np.int32)}
    consts = {"lr": np.repeat(np.geomspace(1e-3, 1e-1, num_members)[:, None], 8, 1).astype(np.float32),
              "wd": np.zeros(num_members, np.float32),
              "data_key": train.member_keys(list(range(num_members)))["data"]}
    chunk_fn = train.make_train_chunk(model, "adamw", 0.9, 10, 40, 6, member_group=member_group)
    state, loss_LxM, _ = chunk_fn(train.init_state(params_M, "adamw", 0.9, 40), consts, data, 6)
    return {"loss": np.asarray(loss_LxM), **{f"p{i}": np.asarray(a) for i, a in enumerate(jax.tree.leaves(
        state["params"]))}}


def size_check() -> int:
    """The trainer's member count per program for a wide MLP whose ten million members fit no memory."""
    model = models.build(ModelConfig(kind="mlp", width=256, depth=2), (5,), 3)
    params_1 = model.init(jax.random.key(0))
    many = lambda a: jax.ShapeDtypeStruct((10**7, *np.shape(a)), np.asarray(a).dtype)  # noqa: E731
    consts = {"lr": jax.ShapeDtypeStruct((10**7, 8), np.float32), "wd": jax.ShapeDtypeStruct((10**7,), np.float32),
              "data_key": jax.ShapeDtypeStruct((10**7, 2), np.uint32)}
    arrays = {"x": jax.ShapeDtypeStruct((40, 5), np.float32), "y": jax.ShapeDtypeStruct((40,), np.int32)}
    chunk_fn = train.make_train_chunk(model, "adamw", 0.9, 10, 40, 6)
    return trainer.members_per_program(chunk_fn, jax.tree.map(many, params_1), consts, arrays,
                                       trainer.MemberTraining("adamw", 0.9, 10, 6, 6))


if __name__ == "__main__":  # run by the tests below in a process with two CPU devices
    out, num_members = sys.argv[1], int(sys.argv[2])
    assert jax.device_count() == 2
    assert (train.cpu_member_mesh(num_members) is not None) == (num_members % 2 == 0)
    np.savez(out, **train_tiny(num_members), fit=size_check())


@pytest.mark.slow
def test_members_on_two_cpu_devices_equal_one_device(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "2"}
    for num_members in (8, 5):  # split 4 + 4 (groups of 4 on each device); 5 does not split: one device
        out = str(tmp_path / f"two{num_members}.npz")
        done = subprocess.run([sys.executable, os.path.join(HERE, "test_cpu_cores.py"), out, str(num_members)],
                              env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        two, one = np.load(out), train_tiny(num_members)
        assert np.isfinite(one["loss"]).all()
        for key in one:
            np.testing.assert_allclose(two[key], one[key], rtol=1e-5, atol=1e-6, err_msg=key)
    # The size check counts both devices' shares of the one memory: about as many members as one device holds
    # (not ten million because the 2-member probe is split 1 + 1).
    assert 0.8 < int(two["fit"]) / size_check() < 1.25 and size_check() < 10**7


def test_use_cpu_cores_before_and_after_jax_starts():
    script = ("import jax; from jaxlmc import shard; n = shard.use_cpu_cores(2); "
              "print(n, jax.device_count(), shard.use_cpu_cores(3), jax.device_count())")
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_NUM_CPU_DEVICES", "XLA_FLAGS")}
    done = subprocess.run([sys.executable, "-c", script], env={**env, "JAX_PLATFORMS": "cpu"}, capture_output=True,
                          text=True, timeout=120)
    assert done.stdout.split() == ["2", "2", "2", "2"], done.stderr[-2000:]  # once started, it stays at 2
    done = subprocess.run([sys.executable, "-c", script], env={**env, "JAX_PLATFORMS": "cpu",
                          "JAX_NUM_CPU_DEVICES": "1"}, capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["1", "1", "1", "1"], done.stderr[-2000:]  # the user's own setting wins
    started = jax.device_count()  # this process's JAX has started: nothing changes
    assert shard.use_cpu_cores(started + 3) == started and jax.device_count() == started
