"""Barrier throughput: jaxlmc's compiled all-pairs pass versus the plain reference loop (one model per α per pair).

Pair-α evaluations per second — one evaluation is one interpolated model on the whole evaluation set — for
  compiled   paths.make_path_eval(straight): all pairs × α × batches in one jit call (chunk size chosen automatically,
             compilation excluded; the first call's compile time is reported separately),
  loop       reference.reference_curves: the way git-re-basin and open_lth do it, a Python loop over pairs and α
             calling one jit-compiled forward pass per interpolated model (already compiled before timing),
measured side by side in this one run, with their ratio, printed and written to JSON. Both produce the same curves
(checked here, and in tests/test_barriers.py).

Members are random initialisations with MNIST-1D's shapes (40 features, 10 classes) and the evaluation set is random
(1000 examples, the size of MNIST-1D's test split): the cost does not depend on the values, and the benchmark needs
no TFDS (the GPU image lacks it).

    python -m bench.bench_barriers [--members 8] [--alphas 25] [--out bench/results/barriers.json]
"""
from __future__ import annotations

import argparse
import itertools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench._record import write_record
from jaxlmc import memory, models, shard, paths, reference, train
from jaxlmc.config import ModelConfig

MODELS = {  # name: (config, input shape)
    "mlp 2×256 (default)": (ModelConfig(kind="mlp", width=256, depth=2), (40,)),
    "mlp 1×32": (ModelConfig(kind="mlp", width=32, depth=1), (40,)),
    "cnn 3×32 k5": (ModelConfig(kind="cnn", width=32, depth=3, kernel_size=5), (40,)),
}


def main() -> None:
    shard.use_cpu_cores()  # as the jaxlmc command: one CPU device per core
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=8, help="all pairs of this many members")
    parser.add_argument("--alphas", type=int, default=25)
    parser.add_argument("--examples", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=1000, help="evaluation batch of the compiled pass")
    parser.add_argument("--loop-pairs", type=int, default=8, help="pairs timed in the loop (its rate is per pair)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "barriers.json"))
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    classes = 10
    alphas = paths.alpha_grid(args.alphas)
    pairs = list(itertools.combinations(range(args.members), 2))
    device = jax.devices()[0]
    print(f"{len(pairs)} pairs × {args.alphas} α on {args.examples} examples, device {device.device_kind}")
    print(f"{'model':>22} {'chunk':>6} {'compiled eval/s':>16} {'loop eval/s':>12} {'ratio':>7} {'compile s':>10}")
    results = []
    for name in args.models:
        cfg, shape = MODELS[name]
        model = models.build(cfg, shape, classes)
        params_M = jax.vmap(model.init)(jax.random.split(jax.random.key(0), args.members))
        x = rng.normal(size=(args.examples, *shape)).astype(np.float32)
        y = rng.integers(0, classes, args.examples).astype(np.int32)
        sets = {"test": train.batch_eval_set(x, y, args.batch)}
        pairs_Px2 = jnp.asarray(pairs, jnp.int32)
        chunk = paths.auto_chunk_pairs(model, params_M, sets, alphas, len(pairs), memory.memory_budget(0.5))
        fn = paths.make_path_eval(model, paths.straight(), alphas, chunk)

        start = time.perf_counter()
        jax.block_until_ready(fn(params_M, pairs_Px2, sets))  # compile + first run
        first_s = time.perf_counter() - start
        start = time.perf_counter()
        curves = jax.block_until_ready(fn(params_M, pairs_Px2, sets))
        compiled_s = time.perf_counter() - start

        loop_pairs = pairs[: args.loop_pairs]
        # compile
        reference.reference_curves(model, params_M, loop_pairs[:1], alphas[:2], jnp.asarray(x), jnp.asarray(y))
        start = time.perf_counter()
        ref_loss, _ = reference.reference_curves(model, params_M, loop_pairs, alphas, jnp.asarray(x), jnp.asarray(y))
        loop_s = time.perf_counter() - start
        np.testing.assert_allclose(np.asarray(curves["test"][0])[: len(loop_pairs)], ref_loss, rtol=1e-4, atol=1e-5)

        row = {"model": name, "params": models.param_count(params_M) // args.members, "chunk_pairs": chunk,
               "pairs": len(pairs), "alphas": args.alphas, "examples": args.examples,
               "compiled_evals_per_s": len(pairs) * args.alphas / compiled_s,
               "loop_evals_per_s": len(loop_pairs) * args.alphas / loop_s,
               "compiled_seconds": compiled_s, "loop_seconds": loop_s, "loop_pairs": len(loop_pairs),
               "compile_and_first_run_seconds": first_s}
        row["ratio"] = row["compiled_evals_per_s"] / row["loop_evals_per_s"]
        results.append(row)
        print(f"{name:>22} {chunk:>6} {row['compiled_evals_per_s']:>16.0f} {row['loop_evals_per_s']:>12.0f} "
              f"{row['ratio']:>6.1f}× {first_s - compiled_s:>10.1f}")

    write_record(args.out, "barriers", results=results)


if __name__ == "__main__":
    main()
