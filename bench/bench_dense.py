"""A dense seed ensemble: ten thousand fine-tunes of one MNIST-1D MLP in one compiled program, and how the cost grows
with the member count.

1. Growth (random data with MNIST-1D's shapes, AdamW, batch 100): for N = 1 … 10,000 in ascending order, member-steps/s
   of the vmapped training chunk (timed after compilation) and the process's peak resident memory after it (ascending
   N, so the peak is the largest N's), with XLA's own footprint of the compiled chunk; the cost is linear when
   member-steps/s stays flat and memory per member stays constant.
2. The size check: how many members one compiled program can hold in 80 % of the free memory
   (`trainer.members_per_program`'s rule: XLA's memory analysis at 1 and 2 members, affine), before anything runs.
3. The fine-tunes: a start trained on MNIST-1D (`--pretrain-steps`), then `--seeds` members fine-tuned from it at one
   rate with `jaxlmc.fit` (one cell: they differ only in their seed: data order) and their within-cell barriers on
   the test set through the ring pair design (`--pairs ring:K`: each member with its next K seeds), each part timed.

    python -m bench.bench_dense [--members 1 10 100 1000 10000] [--width 64] [--seeds 10000] [--pairs ring:1]
"""
from __future__ import annotations

import argparse
import os
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench._record import write_record
from bench.bench_train import setup, timed_run
from jaxlmc import data, library, memory, models, shard, train, trainer
from jaxlmc.config import ModelConfig

FEATURES, CLASSES, N_TRAIN, BATCH = 40, 10, 4000, 100


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def footprint_bytes(chunk_fn, state, consts, data_arrays, chunk: int) -> int:
    """XLA's memory analysis of the compiled chunk (arguments + outputs + scratch), over every device it runs on."""
    analysis = chunk_fn.lower(state, consts, data_arrays, chunk).compile().memory_analysis()
    per_device = analysis.argument_size_in_bytes + analysis.output_size_in_bytes + analysis.temp_size_in_bytes
    return per_device * len(state["diverged"].sharding.device_set)


def growth(model, members: list[int], steps: int, chunk: int) -> list[dict]:
    rng = np.random.default_rng(0)
    arrays = {"x": jnp.asarray(rng.normal(size=(N_TRAIN, FEATURES)).astype(np.float32)),
              "y": jnp.asarray(rng.integers(0, CLASSES, N_TRAIN).astype(np.int32))}
    chunk_fn = train.make_train_chunk(model, "adamw", 0.9, BATCH, N_TRAIN, chunk)
    baseline = peak_rss_bytes()
    rows = []
    print(f"{'N':>6} {'member-steps/s':>15} {'peak RSS MB':>12} {'KB per further member':>22} "
          f"{'XLA footprint MB':>17}")
    previous_n, previous_peak = 0, baseline
    for n in members:
        state, consts = setup(model, n, N_TRAIN)
        xla = footprint_bytes(chunk_fn, state, consts, arrays, chunk)
        seconds = timed_run(chunk_fn, state, consts, arrays, steps, chunk)
        peak = peak_rss_bytes()
        # Memory per member: the peak's growth since the last, smaller N over the members added (the process's
        # fixed cost — JAX, compiled programs — cancels).
        row = {"members": n, "member_steps_per_s": n * steps / seconds, "peak_rss_bytes": peak,
               "peak_rss_per_further_member": (peak - previous_peak) / (n - previous_n), "xla_footprint_bytes": xla}
        previous_n, previous_peak = n, peak
        rows.append(row)
        print(f"{n:>6} {row['member_steps_per_s']:>15,.0f} {peak / 2**20:>12,.0f} "
              f"{row['peak_rss_per_further_member'] / 1024:>22,.1f} {xla / 2**20:>17,.1f}", flush=True)
        del state, consts
    return rows


def size_check(model) -> dict:
    """The largest member count one program holds, predicted by the trainer's own rule before training
    (`trainer.members_per_program`, asked about an abstract ensemble too large for any memory)."""
    chunk_fn = train.make_train_chunk(model, "adamw", 0.9, BATCH, N_TRAIN, 100)
    limit = 10**8
    widen = lambda tree: jax.tree.map(  # noqa: E731
        lambda a: jax.ShapeDtypeStruct((limit, *a.shape[1:]), a.dtype), tree)
    state_1, consts_1 = setup(model, 1, N_TRAIN)
    arrays = {"x": jax.ShapeDtypeStruct((N_TRAIN, FEATURES), jnp.float32),
              "y": jax.ShapeDtypeStruct((N_TRAIN,), jnp.int32)}
    how = trainer.MemberTraining("adamw", 0.9, BATCH, 100, 100)
    largest = trainer.members_per_program(chunk_fn, widen(state_1["params"]), widen(consts_1), arrays, how)
    budget = 0.8 * memory.available_memory_bytes()
    print(f"size check: at most {largest:,} members per program in {budget / 2**30:.1f} GiB (80 % of the free memory)")
    return {"budget_bytes": budget, "largest_members_per_program": largest}


def fine_tunes(width: int, seeds: int, pretrain_steps: int, steps: int, lr: float, pairs: str,
               data_dir: str | None) -> dict:
    task = data.load_task("mnist1d", data_dir=data_dir)
    train_xy, test_xy = (task["train"].x, task["train"].y), (task["test"].x, task["test"].y)
    spec = models.build(ModelConfig(kind="mlp", width=width, depth=2), (FEATURES,), CLASSES)
    start = time.perf_counter()
    pretrained = library.fit(spec, train_xy, steps=pretrain_steps, batch_size=BATCH, lr=1e-3, seeds=1)
    pretrain_s = time.perf_counter() - start
    start_params = jax.tree.map(lambda a: a[0], pretrained.params)
    print(f"start: {pretrain_steps} steps in {pretrain_s:.1f} s, train loss {pretrained.table[0]['train_loss']:.3f}")
    start = time.perf_counter()
    members = library.fit(spec, train_xy, steps=steps, batch_size=BATCH, lr=lr, seeds=seeds, params=start_params,
                          progress=False)
    fit_s = time.perf_counter() - start
    used = len(members.used)
    print(f"fine-tunes: {seeds:,} members × {steps} steps in {fit_s:.1f} s ({seeds * steps / fit_s:,.0f} "
          f"member-steps/s, compilation included); {used:,} used (not diverged, not unfit)")
    start = time.perf_counter()
    barriers = library.pair_barriers(members, test_xy, pairs=pairs, noise_resamples=0, progress=False)
    barrier_s = time.perf_counter() - start
    loss_barriers = np.asarray([row["loss_barrier_test"] for row in barriers.pairs], float)
    print(f"barriers: {len(loss_barriers):,} pairs ({pairs}) in {barrier_s:.1f} s "
          f"({len(loss_barriers) / barrier_s:,.0f}"
          f" pairs/s, compilation included); test loss barrier mean {loss_barriers.mean():.4f}, median "
          f"{np.median(loss_barriers):.4f}, 95th percentile {np.percentile(loss_barriers, 95):.4f}")
    test_acc = np.asarray([r.get("test_acc", np.nan) for r in members.table], float)
    return {"width": width, "seeds": seeds, "pretrain_steps": pretrain_steps, "steps": steps, "lr": lr,
            "pretrain_seconds": pretrain_s, "fit_seconds": fit_s, "used_members": used, "pairs": pairs,
            "num_pairs": len(loss_barriers), "barrier_seconds": barrier_s,
            "loss_barrier_test_mean": float(loss_barriers.mean()),
            "loss_barrier_test_median": float(np.median(loss_barriers)),
            "loss_barrier_test_p95": float(np.percentile(loss_barriers, 95)),
            "train_loss_mean": float(np.mean([r["train_loss"] for r in members.table])),
            "test_acc_mean": float(np.nanmean(test_acc)) if np.isfinite(test_acc).any() else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, nargs="+", default=[1, 10, 100, 1000, 10000])
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--steps", type=int, default=100, help="timed steps per member count (growth)")
    parser.add_argument("--seeds", type=int, default=10000)
    parser.add_argument("--pretrain-steps", type=int, default=2000)
    parser.add_argument("--finetune-steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--pairs", default="ring:1")
    parser.add_argument("--data-dir", default=os.environ.get("JAXLMC_DATA_DIR"))
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "dense.json"))
    args = parser.parse_args()
    cores = shard.use_cpu_cores()
    model = models.build(ModelConfig(kind="mlp", width=args.width, depth=2), (FEATURES,), CLASSES)
    print(f"MLP 2×{args.width} ({models.param_count(model.init(jax.random.key(0))):,} parameters), "
          f"{cores} CPU devices, {memory.available_memory_bytes() / 2**30:.1f} GiB free")
    check = size_check(model)
    rows = growth(model, args.members, args.steps, 50)
    fits = args.seeds <= check["largest_members_per_program"]
    print(f"{args.seeds:,} fine-tunes: {'one program' if fits else 'in parts (the trainer says how many)'}")
    tunes = fine_tunes(args.width, args.seeds, args.pretrain_steps, args.finetune_steps, args.lr, args.pairs,
                       args.data_dir)
    write_record(args.out, "dense", width=args.width, size_check=check, growth=rows, fine_tunes=tunes)


if __name__ == "__main__":
    main()
