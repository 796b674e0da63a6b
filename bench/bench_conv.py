"""CNN training throughput with jaxlmc's PatchConv (patches @ kernel) versus flax's nnx.Conv, side by side.

Same MNIST-1D CNN (configs/mnist1d_cnn.toml: 3 conv layers × 32 channels, kernel 5), same data shapes, same
compiled training chunk; only the convolution implementation differs. Prints member-steps/s and the ratio for each
N and writes JSON.

    python -m bench.bench_conv [--members 1 8 32] [--steps 100] [--out bench/results/conv.json]
"""
from __future__ import annotations

import argparse
import os
import sys

import jax
from flax import nnx

sys.path.insert(0, os.path.dirname(__file__))
from bench_train import setup, timed_run  # noqa: E402

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench._record import write_record
from jaxlmc import models, shard, train  # noqa: E402
from jaxlmc.config import ModelConfig  # noqa: E402


def build(cfg, conv_cls):
    # Classifier looks PatchConv up at build time; swapping it in for the build is the only difference.
    saved = models.PatchConv
    models.PatchConv = conv_cls
    try:
        return models.build(cfg, (40,), 10)
    finally:
        models.PatchConv = saved


def main() -> None:
    shard.use_cpu_cores()  # as the jaxlmc command: one CPU device per core
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--chunk", type=int, default=50)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "conv.json"))
    args = parser.parse_args()

    n_train = 4000
    rng = np.random.default_rng(0)
    data = {"x": jnp.asarray(rng.normal(size=(n_train, 40)).astype(np.float32)),
            "y": jnp.asarray(rng.integers(0, 10, n_train).astype(np.int32))}
    cfg = ModelConfig(kind="cnn", width=32, depth=3, kernel_size=5)
    variants = {"patch_conv": build(cfg, models.PatchConv), "nnx_conv": build(cfg, nnx.Conv)}
    chunks = {name: train.make_train_chunk(m, "adamw", 0.9, 100, n_train, args.chunk) for name, m in variants.items()}

    print(f"MNIST-1D CNN 3×32 k5, batch 100, {args.steps} timed steps, device {jax.devices()[0].device_kind}")
    print(f"{'N':>4} {'PatchConv m-steps/s':>20} {'nnx.Conv m-steps/s':>19} {'ratio':>7}")
    results = []
    for n in args.members:
        speed = {name: n * args.steps / timed_run(chunks[name], *setup(variants[name], n, n_train), data,
                                                  args.steps, args.chunk)
                 for name in variants}
        row = {"members": n, **{f"{k}_member_steps_per_s": v for k, v in speed.items()},
               "ratio": speed["patch_conv"] / speed["nnx_conv"]}
        results.append(row)
        print(f"{n:>4} {speed['patch_conv']:>20,.0f} {speed['nnx_conv']:>19,.0f} {row['ratio']:>6.2f}×", flush=True)

    write_record(args.out, "conv_implementation", timed_steps=args.steps, results=results)


if __name__ == "__main__":
    main()
