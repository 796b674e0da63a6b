"""Where the vmapped training step's time goes on this device: the profile behind the README's explanation of the
throughput targets. Each part is compiled on its own and timed after warm-up, at the suite's model and batch size.

Besides the parts, the two bounds of a step: its FLOPs (XLA's count) at the rate of one flat matmul measured here,
and the bytes an ungrouped step must stream (parameters read by forward and backward, gradients written and read,
AdamW's parameters, two moments read and written: 10 member-state-sized passes) at the measured copy bandwidth
(`x * a + b` over an array that size). Grouped (the default on a CPU): the chunk trains `train.member_group_size`
members at a time, all its steps, so their state stays in the cache.

    python -m bench.profile_step [--members 32 128 512]
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import optax

from bench.bench_train import setup
from jaxlmc import models, train
from jaxlmc.config import ModelConfig


def ms(f, *args, repeats: int = 30) -> float:
    jax.block_until_ready(f(*args))
    start = time.perf_counter()
    for _ in range(repeats):
        out = f(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / repeats * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, nargs="+", default=[32, 128])
    args = parser.parse_args()
    batch, width, n_train = 100, 256, 4000
    model = models.build(ModelConfig(kind="mlp", width=width, depth=2), (40,), 10)
    tx = optax.adamw(1e-3)
    print(f"device {jax.devices()[0].device_kind}; MLP 2×{width}, batch {batch}; milliseconds per step")
    print(f"{'N':>5} {'group':>6} {'grouped step':>13} {'ungrouped':>10} {'FLOP bound':>11} {'byte bound':>11} "
          f"{'GB/s':>6} {'fwd':>7} {'fwd+bwd':>8} {'adamw':>7} {'flat mm':>8} {'batched mm':>11}")
    for n in args.members:
        state, consts = setup(model, n, n_train)
        x = jax.random.normal(jax.random.key(1), (n, batch, 40))
        y = jnp.zeros((n, batch), jnp.int32)
        data = {"x": jax.random.normal(jax.random.key(2), (n_train, 40)), "y": jnp.zeros((n_train,), jnp.int32)}
        param_bytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(state["params"]))
        group = train.group_of(state)

        def chunk_ms(member_group):
            step = train.make_train_chunk(model, "adamw", 0.9, batch, n_train, 50, member_group=member_group)
            s, loss, _ = step(jax.tree.map(jnp.copy, state), consts, data, 50)  # compile; the state is donated
            loss.block_until_ready()
            start = time.perf_counter()
            for _ in range(4):
                s, loss, _ = step(s, consts, data, 50)
            loss.block_until_ready()
            return (time.perf_counter() - start) / 200 * 1e3

        grouped, ungrouped = chunk_ms(0), chunk_ms(2**31)
        one = train.make_train_chunk(model, "adamw", 0.9, batch, n_train, 1, member_group=2**31)
        flops = one.lower(state, consts, data, 1).compile().cost_analysis()["flops"]
        flat_array = jnp.ones((param_bytes // 4,))
        copy_ms = ms(jax.jit(lambda a: a * 1.0001 + 1.0), flat_array)
        bandwidth = 2 * param_bytes / (copy_ms / 1e3)
        byte_bound = 10 * param_bytes / bandwidth * 1e3

        def loss(p, x, y):
            return train.cross_entropy(model.apply(p, x), y).mean()

        params = state["params"]
        fwd = ms(jax.jit(jax.vmap(loss)), params, x, y)
        grad_fn = jax.jit(jax.vmap(jax.grad(loss)))
        grads = grad_fn(params, x, y)
        fwd_bwd = ms(grad_fn, params, x, y)
        opt = jax.vmap(tx.init)(params)

        @jax.jit
        def update(p, g, o):
            u, o = jax.vmap(tx.update)(g, o, p)
            return optax.apply_updates(p, u), o

        adam = ms(update, params, grads, opt)
        a = jnp.ones((n * batch, width))
        flat = ms(jax.jit(lambda a, w: a @ w), a, jnp.ones((width, width)))
        batched = ms(jax.jit(lambda a, w: jnp.einsum("nbi,nij->nbj", a, w)), a.reshape(n, batch, width),
                     jnp.ones((n, width, width)))
        flat_rate = 2 * n * batch * width * width / (flat / 1e3)
        flop_bound = flops / flat_rate * 1e3
        print(f"{n:>5} {group:>6} {grouped:>13.2f} {ungrouped:>10.2f} {flop_bound:>11.2f} {byte_bound:>11.2f} "
              f"{bandwidth / 1e9:>6.1f} {fwd:>7.2f} {fwd_bwd:>8.2f} {adam:>7.2f} {flat:>8.2f} {batched:>11.2f}")


if __name__ == "__main__":
    main()
