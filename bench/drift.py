"""Float-precision drift: how far one member's parameters move when it is trained inside ensembles of different sizes.

Member 0 (the default MLP, AdamW at LR 1e-3, MNIST-1D-shaped random data) is trained alone and inside ensembles of
N members (the others are other seeds), for T steps; printed: the largest absolute and the relative L2 difference of
member 0's parameters from the lone run, and whether they are bit-equal. The numbers go into docs/science.md
("Reproducibility at float precision").

    python -m bench.drift [--members 1 8 64] [--steps 100 1000] [--out bench/results/drift.json]
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from bench._record import write_record
from jaxlmc import models, shard, train
from jaxlmc.config import ModelConfig


def train_members(model, data, num_members: int, steps: int, chunk: int = 100):
    params_M = jax.vmap(model.init)(jax.vmap(jax.random.key)(jnp.arange(num_members)))
    consts = {"lr": jnp.full((num_members, steps), 1e-3, jnp.float32), "wd": jnp.zeros(num_members),
              "data_key": train.member_keys(list(range(num_members)))["data"]}
    state = train.init_state(params_M, "adamw", 0.9, data["y"].shape[0])
    chunk_fn = train.make_train_chunk(model, "adamw", 0.9, 100, data["y"].shape[0], chunk)
    done = 0
    while done < steps:
        n = min(chunk, steps - done)
        state, _, _ = chunk_fn(state, consts, data, n)
        done += n
    return jax.tree.map(lambda a: np.asarray(a[0]), state["params"])


def main(argv=None) -> None:
    shard.use_cpu_cores()  # as the jaxlmc command: one CPU device per core
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--steps", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--out", default="bench/results/drift.json")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4000, 40)).astype(np.float32)
    y = (x[:, :10].argmax(1)).astype(np.int32)  # a learnable rule, so training moves the parameters
    data = {"x": jnp.asarray(x), "y": jnp.asarray(y)}
    model = models.build(ModelConfig(), (40,), 10)
    rows = []
    for steps in args.steps:
        alone = train_members(model, data, 1, steps)
        flat_alone = np.concatenate([a.ravel() for a in jax.tree.leaves(alone)])
        for n in args.members:
            member = train_members(model, data, n, steps)
            flat = np.concatenate([a.ravel() for a in jax.tree.leaves(member)])
            row = {"steps": steps, "members": n, "bit_equal": bool(np.array_equal(flat, flat_alone)),
                   "max_abs_diff": float(np.abs(flat - flat_alone).max()),
                   "relative_l2_diff": float(np.linalg.norm(flat - flat_alone) / np.linalg.norm(flat_alone))}
            rows.append(row)
            print(f"{steps:5d} steps, member 0 of {n:3d}: bit-equal to alone {row['bit_equal']!s:5}, max |Δ| "
                  f"{row['max_abs_diff']:.2e}, relative L2 {row['relative_l2_diff']:.2e}")
    write_record(args.out, "drift", rows=rows)


if __name__ == "__main__":
    main()
