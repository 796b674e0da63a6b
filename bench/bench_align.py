"""Weight matching throughput: pairs aligned per second for a 256-member run.

The members are independent random initialisations of the default MLP (2×256; from-scratch controls are the case
alignment is for, and random networks need the most coordinate-descent sweeps); the pairs are those the study
aligns, every pair within each grid cell: 32 cells × 8 seeds = 896 pairs. Cost matrices are built on the device for
all pairs at once (vmapped); the linear assignments run on the host with scipy.

    python -m bench.bench_align [--members 256] [--seeds 8] [--out bench/results/align.json]
"""
from __future__ import annotations

import argparse
import itertools
import os
import time

import jax

from bench._record import write_record
from jaxlmc import models, permute, shard
from jaxlmc.config import ModelConfig


def main() -> None:
    shard.use_cpu_cores()  # as the jaxlmc command: one CPU device per core
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=256)
    parser.add_argument("--seeds", type=int, default=8, help="members per cell")
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "align.json"))
    args = parser.parse_args()
    model = models.build(ModelConfig(kind="mlp", width=args.width, depth=2), (40,), 10)
    params_M = jax.vmap(model.init)(jax.random.split(jax.random.key(0), args.members))
    pairs = [pair for start in range(0, args.members, args.seeds)
             for pair in itertools.combinations(range(start, start + args.seeds), 2)]
    permute.match_pairs(model, params_M, pairs[:2], max_iterations=1)  # compile
    start = time.perf_counter()
    perms = permute.match_pairs(model, params_M, pairs)
    seconds = time.perf_counter() - start
    moved = sum(float((p != range(p.shape[1])).mean()) for p in perms) / len(perms)
    print(f"{len(pairs)} pairs of {args.members} members (MLP 2×{args.width}) aligned in {seconds:.1f} s: "
          f"{len(pairs) / seconds:.1f} pairs/s; {100 * moved:.0f} % of units moved")
    write_record(args.out, "weight_matching", members=args.members, pairs=len(pairs), width=args.width,
                 seconds=seconds, pairs_per_s=len(pairs) / seconds, fraction_of_units_moved=moved)


if __name__ == "__main__":
    main()
