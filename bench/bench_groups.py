"""Member groups on this device: member-steps/s of the same vmapped training chunk with every member in one group
and with groups of 1, 2, 4, 8 and 16 (`run.member_group`; the automatic choice is `train.CPU_MEMBER_GROUP` on one
CPU device, `train.CORE_MEMBER_GROUP` per device on one device per core: `--cpu-devices`), side by side in one run,
for `python -m bench`'s MLP and `python -m bench.bench_transformer`'s transformer. Members
are independent, so every variant trains the same members; only the order of the work differs.

    python -m bench.bench_groups [--steps 200] [--cpu-devices 0] [--out bench/results/groups.json]
"""
from __future__ import annotations

import argparse
import os

import jax.numpy as jnp
import numpy as np

from bench._record import write_record
from bench.bench_train import setup, timed_run
from jaxlmc import models, shard, train
from jaxlmc.config import ModelConfig

GROUPS = (1, 2, 4, 8, 16)
ONE_GROUP = 2**31  # a request above any member count: all members in one group


def measure(name: str, model, data: dict, batch: int, members: list[int], steps: int, chunk: int) -> list[dict]:
    rows = []
    n_train = len(data["y"])
    for n in members:
        row = {"model": name, "members": n, "auto_group": train.group_of(setup(model, n, n_train)[0])}
        for group in (ONE_GROUP, *[g for g in GROUPS if g < n]):
            fn = train.make_train_chunk(model, "adamw", 0.9, batch, n_train, chunk, member_group=group)
            seconds = timed_run(fn, *setup(model, n, n_train), data, steps, chunk)
            row["all" if group == ONE_GROUP else f"group_{group}"] = n * steps / seconds
        rows.append(row)
        ratios = "  ".join(f"{k.removeprefix('group_')}: {v:,.0f} ({v / row['all']:.2f}×)" for k, v in row.items()
                           if k.startswith("group_"))
        print(f"{name:>11} N={n:<4} all: {row['all']:,.0f}  {ratios}   (member-steps/s; automatic: "
              f"{row['auto_group']})", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "groups.json"))
    parser.add_argument("--cpu-devices", type=int, default=0, help="0: one per core (as the jaxlmc command); 1: one")
    args = parser.parse_args()
    devices = shard.use_cpu_cores(args.cpu_devices)
    rng = np.random.default_rng(0)
    mlp_data = {"x": jnp.asarray(rng.normal(size=(4000, 40)).astype(np.float32)),
                "y": jnp.asarray(rng.integers(0, 10, 4000).astype(np.int32))}
    mlp = models.build(ModelConfig(kind="mlp", width=256, depth=2), (40,), 10)
    rows = measure("MLP 2×256", mlp, mlp_data, 100, [32, 128], args.steps, 50)
    tokens = rng.integers(0, 16, (4000, 33)).astype(np.int32)
    lm_data = {"x": jnp.asarray(tokens[:, :-1]), "y": jnp.asarray(tokens[:, 1:])}
    cfg = ModelConfig(kind="transformer", width=32, depth=2, heads=4, vocab_size=16)
    lm = models.build(cfg, (32,), 16, per_token=True)
    rows += measure("transformer", lm, lm_data, 32, [64], max(args.steps // 4, 25), 25)
    write_record(args.out, "groups", cpu_devices=devices, timed_steps=args.steps, rows=rows)


if __name__ == "__main__":
    main()
