#!/usr/bin/env bash
# The benchmark suite and the transformer benchmark on a lent GPU, in under 10 minutes. The accelerator image has jax, flax, optax, orbax and torch
# but not tensorflow-datasets or this package installed: the suite needs neither (random data with MNIST-1D's
# shapes; jaxlmc imported from the source tree). Results go to $OUT (the device tool's output folder) or
# bench/results/.
#
#     bash bench/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
out="${OUT:-bench/results}"
mkdir -p "$out"
python3 -c "import jax, flax, optax; print('jax', jax.__version__, jax.devices())"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
timeout 400 python3 -m bench --members 1 8 32 128 256 512 --steps 200 --out "$out/suite_gpu.json"
timeout 150 python3 -m bench.bench_transformer --members 1 8 64 256 --steps 50 --out "$out/transformer_gpu.json"
