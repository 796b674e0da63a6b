#!/usr/bin/env bash
# Benchmarks on a lent GPU, each part in under 10 minutes: "suite" (the benchmark suite and the transformer
# benchmark) or "pythia" (fine-tuning members with Pythia-70m's shapes: member-steps/s, memory per member, the
# largest N that fits). Random data: no dataset is read. jaxlmc is imported from the source tree; importing it needs
# packages an accelerator image may lack (tensorflow-datasets, array-record, mnist1d, tokenizers, safetensors,
# huggingface_hub): bring them as wheels on PYTHONPATH. Results go to $OUT (the device tool's output folder) or
# bench/results/.
#
#     bash bench/gpu.sh [suite|pythia]
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
out="${OUT:-bench/results}"
mkdir -p "$out"
python3 -c "import jax, flax, optax; print('jax', jax.__version__, jax.devices())"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
case "${1:-suite}" in
  suite)
    timeout 400 python3 -m bench --members 1 8 32 128 256 512 --steps 200 --out "$out/suite_gpu.json"
    timeout 150 python3 -m bench.bench_transformer --members 1 8 64 256 --steps 50 --out "$out/transformer_gpu.json" ;;
  pythia)
    timeout 240 python3 -m bench.bench_pythia --shape 70m --members 1 8 32 --steps 20 --out "$out/pythia_gpu.json"
    timeout 240 python3 -m bench.bench_pythia --shape 70m --members 1 32 --steps 20 --remat \
      --out "$out/pythia_remat_gpu.json" ;;
  *) echo "usage: bash bench/gpu.sh [suite|pythia]" >&2; exit 2 ;;
esac
