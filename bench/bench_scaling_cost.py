"""How a study's cost grows with model size, members and pairs: the scaling study's cost trend (issue 37), measured
side by side in one run on the MLP of configs/mnist1d_scaling.toml (depth 2, batch 50, MNIST-1D's shapes).

  training      vmapped member-steps/s at every width × number of members N (jaxlmc's compiled chunk)
  barrier pass  seconds of the compiled straight-line pass over all pairs of N members (9 α points, 500 examples)

then the fitted growth (jaxlmc.trends.power_law: one measurement per point, no interval): member-steps/s against
width at each N and against N at each width; the pass's seconds against width at each N and against the number of
pairs at each width. Random data: the cost does not depend on the values.

    python -m bench.bench_scaling_cost [--widths 32 64 128 256 512] [--members 8 32 128] [--out …/scaling_cost.json]
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
from bench.bench_train import setup, timed_run
from jaxlmc import memory, models, paths, train, trends
from jaxlmc.config import ModelConfig

FEATURES, CLASSES, N_TRAIN, BATCH, ALPHAS, EXAMPLES = 40, 5, 10_000, 50, 9, 500


def _model(width: int) -> models.Model:
    return models.build(ModelConfig(kind="mlp", width=width, depth=2), (FEATURES,), CLASSES)


def training_rate(width: int, members: int, steps: int, chunk: int) -> float:
    """Vmapped member-steps/s of `members` members (after a warm-up chunk that compiles)."""
    rng = np.random.default_rng(0)
    data = {"x": jnp.asarray(rng.normal(size=(N_TRAIN, FEATURES)).astype(np.float32)),
            "y": jnp.asarray(rng.integers(0, CLASSES, N_TRAIN).astype(np.int32))}
    model = _model(width)
    chunk_fn = train.make_train_chunk(model, "sgd", 0.9, BATCH, N_TRAIN, chunk)
    state, consts = setup(model, members, N_TRAIN)  # (bench_train's members: Adam's state, replaced by SGD's)
    state = train.init_state(state["params"], "sgd", 0.9, N_TRAIN)
    return members * steps / timed_run(chunk_fn, state, consts, data, steps, chunk)


def barrier_seconds(width: int, members: int) -> tuple[int, float]:
    """(pairs, seconds) of one compiled straight-line pass over every pair of `members` members."""
    rng = np.random.default_rng(0)
    model = _model(width)
    params_M = jax.vmap(model.init)(jax.random.split(jax.random.key(0), members))
    sets = {"test": train.batch_eval_set(rng.normal(size=(EXAMPLES, FEATURES)).astype(np.float32),
                                         rng.integers(0, CLASSES, EXAMPLES).astype(np.int32), EXAMPLES)}
    pairs_Px2 = jnp.asarray(list(itertools.combinations(range(members), 2)), jnp.int32)
    grid = paths.alpha_grid(ALPHAS)
    chunk = paths.auto_chunk_pairs(model, params_M, sets, grid, len(pairs_Px2), memory.memory_budget(0.5))
    fn = paths.make_path_eval(model, paths.straight(), grid, chunk)
    jax.block_until_ready(fn(params_M, pairs_Px2, sets))  # compile
    start = time.perf_counter()
    jax.block_until_ready(fn(params_M, pairs_Px2, sets))
    return len(pairs_Px2), time.perf_counter() - start


def _fit(sizes, values) -> float:
    return trends.power_law(sizes, values, np.zeros((len(sizes), 0))).exponent


def growth(rows: list[dict], widths: list[int], members: list[int]) -> list[dict]:
    """The fitted exponents: each quantity against width at every N, and against N (or pairs) at every width."""
    at = {(r["width"], r["members"]): r for r in rows}
    fits = []
    for n in members:
        line = [at[(w, n)] for w in widths]
        fits += [{"quantity": q, "against": "width", "members": n,
                  "exponent": _fit(widths, [r[q] for r in line])}
                 for q in ("member_steps_per_s", "barrier_seconds")]
    for w in widths:
        line = [at[(w, n)] for n in members]
        fits.append({"quantity": "member_steps_per_s", "against": "members", "width": w,
                     "exponent": _fit(members, [r["member_steps_per_s"] for r in line])})
        fits.append({"quantity": "barrier_seconds", "against": "pairs", "width": w,
                     "exponent": _fit([r["pairs"] for r in line], [r["barrier_seconds"] for r in line])})
    return fits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[32, 64, 128, 256, 512])
    parser.add_argument("--members", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--steps", type=int, default=100, help="timed steps per point (after one warm-up chunk)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "scaling_cost.json"))
    args = parser.parse_args()
    rows = []
    print(f"{'width':>6} {'N':>5} {'member-steps/s':>15} {'pairs':>6} {'barrier s':>10}")
    for width, n in itertools.product(args.widths, args.members):
        rate = training_rate(width, n, args.steps, chunk=min(50, args.steps))
        pairs, seconds = barrier_seconds(width, n)
        rows.append({"width": width, "members": n, "member_steps_per_s": rate, "pairs": pairs,
                     "barrier_seconds": seconds})
        print(f"{width:>6} {n:>5} {rate:>15,.0f} {pairs:>6} {seconds:>10.3f}")
    fits = growth(rows, args.widths, args.members)
    for f in fits:
        where = f"N={f['members']}" if "members" in f and f["against"] == "width" else f"width {f.get('width')}"
        print(f"{f['quantity']:>20} ∝ {f['against']}^{f['exponent']:+.2f}  ({where})")
    write_record(args.out, "scaling_cost", command="python -m bench.bench_scaling_cost " + " ".join(
        [f"--widths {' '.join(map(str, args.widths))}", f"--members {' '.join(map(str, args.members))}",
         f"--steps {args.steps}"]), batch=BATCH, alphas=ALPHAS, examples=EXAMPLES, rows=rows, fits=fits)


if __name__ == "__main__":
    main()
