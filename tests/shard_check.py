"""Run by tests/test_shard.py in a subprocess with 8 forced CPU devices (the flag must be set before JAX starts).

    python tests/shard_check.py DATA_DIR REFERENCE_RUN WORK_DIR

fine-tunes the tiny grid from scratch on 8 devices (WORK_DIR/fresh), resumes a copy of the 1-device REFERENCE_RUN
from its step-10 checkpoint on 8 devices (WORK_DIR/resumed), and computes the barriers of another copy on 8 devices
(WORK_DIR/barriers); prints what it placed where, for the test to check.
"""
import os
import shutil
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_NUM_CPU_DEVICES"] = "8"  # the tests' own setting (1) would win over XLA's flag
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

from jaxlmc import api, barrier_stage, ckpt, config, shard, train  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from test_shard import OVERRIDES  # noqa: E402

data_dir, reference, work = sys.argv[1:4]
cfg = config.load("configs/mnist1d.toml", OVERRIDES + [f'data.data_dir="{data_dir}"'])
print("devices", len(jax.devices()))

api.finetune(cfg, os.path.join(work, "fresh"), progress=False)

resumed = os.path.join(work, "resumed")
shutil.copytree(reference, resumed)
shutil.rmtree(os.path.join(resumed, "checkpoints", str(cfg.finetune.steps)))
os.remove(os.path.join(resumed, "members.csv"))
# The 1-device checkpoint restores straight into the 8-device sharding.
template = shard.shard_members(train.init_state(jax.tree.map(jax.numpy.asarray, ckpt.restore_params(
    os.path.join(resumed, "checkpoints"))), cfg.finetune.optimizer, cfg.finetune.momentum, 10), shard.member_mesh(8))
manager = ckpt.Checkpoints(os.path.join(resumed, "checkpoints"), read_only=True)
print("resume from", manager.latest_step())
restored = manager.restore(manager.latest_step(), shard.abstract(
    {**template, "perm": jax.ShapeDtypeStruct((8, 3500), jax.numpy.int32, sharding=template["perm"].sharding)}))
manager.close()
print("restored on", len(restored["params"]["head"]["kernel"].sharding.device_set), "devices")
api.finetune(cfg, resumed, progress=False)

barrier_run = os.path.join(work, "barriers")
shutil.copytree(reference, barrier_run, ignore=shutil.ignore_patterns("barriers"))
barrier_stage.barriers_of_run(cfg, barrier_run)
print("done")
