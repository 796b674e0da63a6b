"""The member axis over 8 forced CPU devices gives the single-device results; checkpoints move between 8 devices
and 1 in both directions; the barrier pass splits its pairs over the devices."""
import csv
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxlmc import api, barrier_stage, ckpt, config, shard

from conftest import TINY

pytestmark = pytest.mark.slow  # every test here runs whole studies or several processes

# Few steps: members are independent, but a one-ulp difference in a reduction (XLA picks kernels per batch shape)
# grows chaotically over many Adam steps at a large rate; 20 steps keep the comparison at float32 precision.
OVERRIDES = TINY + ["finetune.steps=20", "run.checkpoint_every=10", "run.chunk_steps=5", "barriers.alphas=5",
                     "barriers.align=true"]


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def assert_params_close(a_dir, b_dir):
    a, b = ckpt.restore_params(a_dir), ckpt.restore_params(b_dir)  # b was saved on 8 devices, restored on 1
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_member_mesh_uses_the_most_devices_that_divide_the_members():
    devices = list(range(8))  # stand-ins: the mesh only arranges them
    assert shard.member_mesh(120, devices).size == 8
    assert shard.member_mesh(12, devices).size == 6
    assert shard.member_mesh(7, devices).size == 7
    assert shard.member_mesh(11, devices) is None  # a prime beyond the device count: one device
    assert shard.member_mesh(8, [0]) is None


@pytest.fixture(scope="module")
def one_device(build_once, data_dir):
    """(config, run directory): the tiny grid fine-tuned and its barriers measured on one device, once a session."""
    cfg = config.load("configs/mnist1d.toml", OVERRIDES + [f'data.data_dir="{data_dir}"'])

    def make(path):
        api.finetune(cfg, path, progress=False)
        barrier_stage.barriers_of_run(cfg, path)
    out, _ = build_once("shard", make)
    return cfg, out


def test_eight_devices_equal_one(one_device, data_dir, tmp_path):
    cfg, reference = one_device
    work = tmp_path / "eight"
    work.mkdir()
    done = subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "shard_check.py"), data_dir,
                           reference, str(work)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "devices 8" in done.stdout and "resume from 10" in done.stdout and "restored on 8 devices" in done.stdout

    assert_params_close(os.path.join(reference, "checkpoints"), str(work / "fresh" / "checkpoints"))
    assert_params_close(os.path.join(reference, "checkpoints"), str(work / "resumed" / "checkpoints"))
    for a, b in zip(read_csv(os.path.join(reference, "members.csv")), read_csv(work / "fresh" / "members.csv")):
        assert float(a["test_loss"]) == pytest.approx(float(b["test_loss"]), rel=1e-5)

    ref_pairs, pairs = read_csv(os.path.join(reference, "barriers", "pairs.csv")), read_csv(
        work / "barriers" / "barriers" / "pairs.csv")
    assert len(ref_pairs) == len(pairs) == 4
    for a, b in zip(ref_pairs, pairs):
        assert (a["i"], a["j"]) == (b["i"], b["j"])
        for key in ("loss_barrier_test", "error_barrier_ood", "loss_barrier_train_lin", "dist", "update_cos"):
            assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-4, abs=1e-6), key


def test_two_processes_equal_one(one_device, data_dir, tmp_path):
    """2 processes × 4 devices on 127.0.0.1, launched as a researcher would on two hosts (`--distributed`; JAX's
    distributed runtime with gloo collectives): the grid and its barriers come out as in one process."""
    cfg, reference = one_device
    out = str(tmp_path / "two")
    sets = [arg for o in OVERRIDES + [f'data.data_dir="{data_dir}"'] for arg in ("--set", o)]
    for command in (["finetune", "configs/mnist1d.toml", "--out", out, *sets], ["barriers", out]):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        procs = []
        for i in range(2):
            env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "4",
                   "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAXLMC_NUM_PROCESSES": "2",
                   "JAXLMC_PROCESS_ID": str(i)}
            procs.append(subprocess.Popen([sys.executable, "-m", "jaxlmc.cli", *command, "--distributed"], env=env,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        outputs = [p.communicate(timeout=600) for p in procs]
        for p, (stdout, stderr) in zip(procs, outputs):
            assert p.returncode == 0, stderr[-3000:]
        # Only the primary process prints jaxlmc's tables (gloo prints its own connection lines on every process).
        assert "results in" in outputs[0][0] and "results in" not in outputs[1][0]
    assert_params_close(os.path.join(reference, "checkpoints"), os.path.join(out, "checkpoints"))
    for a, b in zip(read_csv(os.path.join(reference, "members.csv")), read_csv(os.path.join(out, "members.csv"))):
        assert float(a["test_loss"]) == pytest.approx(float(b["test_loss"]), rel=1e-5)
    for a, b in zip(read_csv(os.path.join(reference, "barriers", "pairs.csv")),
                    read_csv(os.path.join(out, "barriers", "pairs.csv"))):
        for key in ("loss_barrier_test", "error_barrier_ood", "dist", "update_cos"):
            assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-4, abs=1e-6), key
