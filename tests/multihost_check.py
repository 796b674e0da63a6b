"""One of the 2 processes of tests/test_shard.py's multi-host test: 4 forced CPU devices each, 8 in all, joined by
JAX's distributed runtime (gloo collectives on the CPU).

    python tests/multihost_check.py PROCESS_ID PORT DATA_DIR OUT
"""
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

process_id, port, data_dir, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=process_id)

from jaxlmc import api, config, measure  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from test_shard import OVERRIDES  # noqa: E402

print("process", jax.process_index(), "of", jax.process_count(), "devices", len(jax.devices()), flush=True)
cfg = config.load("configs/mnist1d.toml", OVERRIDES + [f'data.data_dir="{data_dir}"'])
api.finetune(cfg, out, progress=False)
measure.barriers_of_run(cfg, out)
print("done", flush=True)
