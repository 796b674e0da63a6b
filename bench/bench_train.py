"""Training throughput: one vmapped ensemble of N members versus a loop of N single-member runs.

Both use jaxlmc's own compiled chunk (`lax.scan` over steps, state donated); the loop reuses one compiled
single-member program N times, which is what a researcher gets by launching runs one after another in one process
(separate processes would add start-up and compile time on top), on JAX's default single CPU device
(`single_runs_seconds`), while the ensemble runs on one device per core (`shard.use_cpu_cores`). Member-steps/s
for each, measured side by side in
this one run, and their ratio, are printed and written to JSON.

The data are random arrays with MNIST-1D's shapes (4000 × 40, 10 classes): throughput does not depend on the
values, and the benchmark then needs no TFDS (the GPU image lacks it).

    python -m bench.bench_train [--members 1 8 32 128] [--steps 200] [--out bench/results/train.json]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench._record import write_record
from jaxlmc import models, shard, train
from jaxlmc.config import ModelConfig


def setup(model, num_members: int, n_train: int):
    params_M = jax.vmap(model.init)(jax.random.split(jax.random.key(0), num_members))
    consts = {"lr": jnp.full((num_members, 10_000), 1e-3, jnp.float32), "wd": jnp.zeros(num_members),
              "data_key": train.member_keys(list(range(num_members)))["data"]}
    mesh = train.cpu_member_mesh(num_members)  # placed as the trainer places them: split over the CPU's devices
    return shard.shard_members((train.init_state(params_M, "adamw", 0.9, n_train), consts), mesh)


def timed_run(chunk_fn, state, consts, data, steps: int, chunk: int) -> float:
    state, loss, _ = chunk_fn(state, consts, data, chunk)  # warm-up: compile and first chunk
    loss.block_until_ready()
    start = time.perf_counter()
    for _ in range(steps // chunk):
        state, loss, _ = chunk_fn(state, consts, data, chunk)
    loss.block_until_ready()
    return time.perf_counter() - start


def random_data(n_train: int = 4000, features: int = 40, classes: int = 10) -> dict:
    rng = np.random.default_rng(0)
    return {"x": jnp.asarray(rng.normal(size=(n_train, features)).astype(np.float32)),
            "y": jnp.asarray(rng.integers(0, classes, n_train).astype(np.int32))}


def single_runs_seconds(runs: int, steps: int, chunk: int, width: int, depth: int = 2, batch: int = 100) -> float:
    """Seconds of `runs` single-member runs one after another (one compiled program reused), in a fresh process on
    JAX's default of one CPU device — the loop as a researcher runs it, every core on each operation — whatever
    the devices of this process (one per core makes a single member's step slower)."""
    command = [sys.executable, "-m", "bench.bench_train", "--single-runs", str(runs), "--steps", str(steps),
               "--chunk", str(chunk), "--width", str(width), "--depth", str(depth), "--batch", str(batch)]
    done = subprocess.run(command, env={**os.environ, "JAX_NUM_CPU_DEVICES": "1"}, capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if done.returncode != 0:
        raise RuntimeError(f"the loop of single runs failed: {done.stderr[-2000:]}")
    return float(done.stdout.split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, nargs="+", default=[1, 8, 32, 128])
    parser.add_argument("--steps", type=int, default=200, help="timed steps per run (after one warm-up chunk)")
    parser.add_argument("--chunk", type=int, default=100)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "train.json"))
    parser.add_argument("--single-runs", type=int, default=0, help="only time that many single-member runs one "
                        "after another and print their seconds (`single_runs_seconds`)")
    args = parser.parse_args()
    if args.single_runs:
        model = models.build(ModelConfig(kind="mlp", width=args.width, depth=args.depth), (40,), 10)
        chunk_fn = train.make_train_chunk(model, "adamw", 0.9, args.batch, 4000, args.chunk)
        print(sum(timed_run(chunk_fn, *setup(model, 1, 4000), random_data(), args.steps, args.chunk)
                  for _ in range(args.single_runs)))
        return
    shard.use_cpu_cores()

    n_train, features, classes = 4000, 40, 10
    rng = np.random.default_rng(0)
    data = {"x": jnp.asarray(rng.normal(size=(n_train, features)).astype(np.float32)),
            "y": jnp.asarray(rng.integers(0, classes, n_train).astype(np.int32))}
    cfg = ModelConfig(kind="mlp", width=args.width, depth=args.depth)
    model = models.build(cfg, (features,), classes)
    chunk_fn = train.make_train_chunk(model, "adamw", 0.9, args.batch, n_train, args.chunk)
    params = models.param_count(model.init(jax.random.key(0)))

    results = []
    print(f"MLP {args.depth}×{args.width} ({params:,} params), batch {args.batch}, {args.steps} timed steps, "
          f"device {jax.devices()[0].device_kind}")
    print(f"{'N':>5} {'vmapped m-steps/s':>18} {'loop m-steps/s':>15} {'ratio':>7}")
    for n in args.members:
        vmapped_s = timed_run(chunk_fn, *setup(model, n, n_train), data, args.steps, args.chunk)
        loop_s = single_runs_seconds(n, args.steps, args.chunk, args.width, args.depth, args.batch)
        row = {"members": n, "vmapped_member_steps_per_s": n * args.steps / vmapped_s,
               "loop_member_steps_per_s": n * args.steps / loop_s, "vmapped_seconds": vmapped_s,
               "loop_seconds": loop_s}
        row["ratio"] = row["vmapped_member_steps_per_s"] / row["loop_member_steps_per_s"]
        row["vmapped_examples_per_s"] = row["vmapped_member_steps_per_s"] * args.batch
        results.append(row)
        print(f"{n:>5} {row['vmapped_member_steps_per_s']:>18,.0f} {row['loop_member_steps_per_s']:>15,.0f} "
              f"{row['ratio']:>6.2f}×", flush=True)

    write_record(args.out, "train_throughput", model={"kind": "mlp", "width": args.width, "depth": args.depth,
                                                      "params": params},
                 batch_size=args.batch, timed_steps=args.steps, results=results)


if __name__ == "__main__":
    main()
