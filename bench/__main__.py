"""The benchmark suite: jaxlmc against what a researcher would otherwise use, side by side in one run.

    python -m bench [--quick] [--out bench/results/suite.json]
    python -m bench --map [--widths 16 64 256 1024] [--members 1 4 16 64 256 1024]   (bench.throughput_map)

Same model (MLP 40 → 256 → 256 → 10, MNIST-1D's shapes), batch size and steps for every contender:
  training    member-steps/s and examples/s for N members: jaxlmc vmapped (one compiled program, on one CPU device
              per core: `--cpu-devices`), a loop of single-member jaxlmc runs (one compiled program reused N
              times, in a child process on JAX's default single CPU device), and a PyTorch `torch.func` ensemble
              (`stack_module_state` + `vmap(grad(functional_call))` + Adam on the stacked tensors) when torch is
              installed; XLA's FLOP count of the vmapped step over its time, as a fraction of a dense f32 matmul's
              FLOP/s measured in the same run on the same device (the practical peak); peak memory of the compiled
              vmapped step (XLA's memory analysis: arguments + outputs + scratch).
  barriers    pair-α evaluations/s of the compiled pass vs the reference loop (bench.bench_barriers), and the pass's
              FLOP/s fraction.
Data are random arrays with MNIST-1D's shapes: the cost does not depend on the values, and no TFDS is needed (the
GPU image lacks it). Writes JSON (device, versions, date) and a PNG of throughput vs N beside it.
"""
from __future__ import annotations

import argparse
import itertools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench._record import matmul_flops_per_s, write_record
from bench.bench_train import setup, single_runs_seconds, timed_run
from bench.throughput_map import plot_map, throughput_map
from jaxlmc import memory, models, paths, reference, shard, train
from jaxlmc.config import ModelConfig

FEATURES, CLASSES, N_TRAIN = 40, 10, 4000


def compiled_stats(jitted, *args) -> tuple[float, int]:
    """XLA's FLOP count and memory footprint (arguments + outputs + scratch) of one call. XLA counts the body of a
    loop (scan, map) once, whatever its trip count: callers count loop-free programs or scale by the trip count."""
    compiled = jitted.lower(*args).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    memory = compiled.memory_analysis()
    footprint = (memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes
                 if memory is not None else -1)
    return float(cost.get("flops", float("nan"))), int(footprint)


def torch_ensemble_seconds(num_members: int, steps: int, width: int, batch: int,
                           min_seconds: float = 0.0) -> float | None:
    """Seconds per step of the same training as a PyTorch user would write it with torch.func (`steps` timed
    steps, more until `min_seconds` have passed); None when torch is not installed."""
    try:
        import torch
        from torch.func import functional_call, grad, stack_module_state, vmap
    except ImportError:
        return None
    torch.manual_seed(0)
    nets = [torch.nn.Sequential(torch.nn.Linear(FEATURES, width), torch.nn.ReLU(), torch.nn.Linear(width, width),
                                torch.nn.ReLU(), torch.nn.Linear(width, CLASSES)) for _ in range(num_members)]
    params, _ = stack_module_state(nets)
    base = nets[0].to("meta")
    x_all = torch.randn(N_TRAIN, FEATURES)
    y_all = torch.randint(0, CLASSES, (N_TRAIN,))

    def loss(p, x, y):
        return torch.nn.functional.cross_entropy(functional_call(base, p, (x,)), y)

    grads_fn = vmap(grad(loss))
    leaves = [torch.nn.Parameter(v) for v in params.values()]
    optimizer = torch.optim.Adam(leaves, lr=1e-3)  # elementwise: Adam on stacked tensors is Adam per member
    names = list(params)

    def step():
        idx = torch.randint(0, N_TRAIN, (num_members, batch))
        g = grads_fn(dict(zip(names, leaves)), x_all[idx], y_all[idx])
        for leaf, name in zip(leaves, names):
            leaf.grad = g[name]
        optimizer.step()

    for _ in range(3):
        step()  # warm-up
    start, done = time.perf_counter(), 0
    while done < steps or time.perf_counter() - start < min_seconds:
        step()
        done += 1
    return (time.perf_counter() - start) / done


def training(members: list[int], steps: int, chunk: int, width: int, batch: int, peak: float) -> list[dict]:
    rng = np.random.default_rng(0)
    data = {"x": jnp.asarray(rng.normal(size=(N_TRAIN, FEATURES)).astype(np.float32)),
            "y": jnp.asarray(rng.integers(0, CLASSES, N_TRAIN).astype(np.int32))}
    model = models.build(ModelConfig(kind="mlp", width=width, depth=2), (FEATURES,), CLASSES)
    chunk_fn = train.make_train_chunk(model, "adamw", 0.9, batch, N_TRAIN, chunk)
    # For XLA's FLOP count: one step of all members in one group (XLA's cost analysis counts a loop's body once, so
    # the count of a step that loops over member groups would miss all groups but one; the FLOPs are the same).
    one_step_fn = train.make_train_chunk(model, "adamw", 0.9, batch, N_TRAIN, 1, member_group=2**31)
    # XLA's count for one member's step; N members do N times that (a program split over devices is counted per
    # device, so the N-member program's own count would depend on the split).
    flops_per_member_step, _ = compiled_stats(one_step_fn, *setup(model, 1, N_TRAIN), data, 1)
    rows = []
    print(f"{'N':>5} {'vmapped':>10} {'loop':>10} {'torch.func':>11} {'vs loop':>8} {'vs torch':>9} {'peak %':>7} "
          f"{'memory MB':>10}   (member-steps/s)")
    for n in members:
        state, consts = setup(model, n, N_TRAIN)
        _, per_device = compiled_stats(chunk_fn, state, consts, data, chunk)
        footprint = per_device * len(state["diverged"].sharding.device_set)  # every device holds its share
        flops_per_step = n * flops_per_member_step
        vmapped_s = timed_run(chunk_fn, state, consts, data, steps, chunk)
        loop_s = single_runs_seconds(n, steps, chunk, width, 2, batch)
        torch_step_s = torch_ensemble_seconds(n, steps, width, batch)
        torch_s = torch_step_s * steps if torch_step_s is not None else None
        row = {"members": n, "vmapped_member_steps_per_s": n * steps / vmapped_s,
               "loop_member_steps_per_s": n * steps / loop_s,
               "torch_func_member_steps_per_s": n * steps / torch_s if torch_s else None,
               "vmapped_flops_per_s": flops_per_step * steps / vmapped_s, "memory_bytes": footprint}
        row["vmapped_examples_per_s"] = row["vmapped_member_steps_per_s"] * batch
        row["ratio_vs_loop"] = row["vmapped_member_steps_per_s"] / row["loop_member_steps_per_s"]
        row["ratio_vs_torch_func"] = (row["vmapped_member_steps_per_s"] / row["torch_func_member_steps_per_s"]
                                      if torch_s else None)
        row["fraction_of_matmul_peak"] = row["vmapped_flops_per_s"] / peak
        rows.append(row)
        torch_text = f"{row['torch_func_member_steps_per_s']:>11.0f}" if torch_s else f"{'–':>11}"
        vs_torch = f"{row['ratio_vs_torch_func']:>8.2f}×" if torch_s else f"{'–':>9}"
        print(f"{n:>5} {row['vmapped_member_steps_per_s']:>10.0f} {row['loop_member_steps_per_s']:>10.0f} "
              f"{torch_text} {row['ratio_vs_loop']:>7.2f}× {vs_torch} {100 * row['fraction_of_matmul_peak']:>6.0f}% "
              f"{footprint / 2**20:>10.1f}")
    return rows


def barrier_pass(members: int, alphas: int, loop_pairs: int, width: int, peak: float) -> dict:
    rng = np.random.default_rng(0)
    model = models.build(ModelConfig(kind="mlp", width=width, depth=2), (FEATURES,), CLASSES)
    params_M = jax.vmap(model.init)(jax.random.split(jax.random.key(0), members))
    x = rng.normal(size=(1000, FEATURES)).astype(np.float32)
    y = rng.integers(0, CLASSES, 1000).astype(np.int32)
    sets = {"test": train.batch_eval_set(x, y, 1000)}
    pairs = list(itertools.combinations(range(members), 2))
    pairs_Px2 = jnp.asarray(pairs, jnp.int32)
    grid = paths.alpha_grid(alphas)
    chunk = paths.auto_chunk_pairs(model, params_M, sets, grid, len(pairs), memory.memory_budget(0.5))
    fn = paths.make_path_eval(model, paths.straight(), grid, chunk)
    _, footprint = compiled_stats(fn, params_M, pairs_Px2, sets)
    # FLOPs: one model on the evaluation set (a single batch: no loop) × the models the pass evaluates.
    one = jax.tree.map(lambda a: a[0], params_M)
    per_model, _ = compiled_stats(jax.jit(lambda p, s: train.loss_and_error(model, p, s)), one, sets["test"])
    flops = per_model * (len(pairs) * (alphas - 2) + members)
    jax.block_until_ready(fn(params_M, pairs_Px2, sets))
    start = time.perf_counter()
    jax.block_until_ready(fn(params_M, pairs_Px2, sets))
    compiled_s = time.perf_counter() - start
    reference.reference_curves(model, params_M, pairs[:1], grid[:2], jnp.asarray(x), jnp.asarray(y))  # compile
    start = time.perf_counter()
    reference.reference_curves(model, params_M, pairs[:loop_pairs], grid, jnp.asarray(x), jnp.asarray(y))
    loop_s = time.perf_counter() - start
    row = {"pairs": len(pairs), "alphas": alphas, "chunk_pairs": chunk,
           "compiled_evals_per_s": len(pairs) * alphas / compiled_s, "loop_evals_per_s": loop_pairs * alphas / loop_s,
           "flops_per_s": flops / compiled_s, "memory_bytes": footprint}
    row["ratio"] = row["compiled_evals_per_s"] / row["loop_evals_per_s"]
    row["fraction_of_matmul_peak"] = row["flops_per_s"] / peak
    print(f"barrier pass: {row['compiled_evals_per_s']:.0f} pair-α evals/s vs loop {row['loop_evals_per_s']:.0f} "
          f"({row['ratio']:.1f}×), {100 * row['fraction_of_matmul_peak']:.0f}% of matmul peak, chunk {chunk}")
    return row


def plot(rows: list[dict], device: str, path: str) -> None:
    try:
        import matplotlib
    except ImportError:  # e.g. a bare accelerator image: the JSON has every number
        print("matplotlib is not installed: no plot")
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4))
    n = [r["members"] for r in rows]
    for key, label, style in (("vmapped_member_steps_per_s", "jaxlmc vmapped", "o-"),
                              ("loop_member_steps_per_s", "loop of single jaxlmc runs", "s--"),
                              ("torch_func_member_steps_per_s", "PyTorch torch.func ensemble", "^:")):
        values = [r[key] for r in rows]
        if all(v is not None for v in values):
            ax.plot(n, values, style, label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("members N")
    ax.set_ylabel("member-steps / s")
    ax.set_title(f"Training throughput, MLP 2×256, batch 100 ({device})", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"plot in {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N = 1, 8, 32 and fewer steps: about a minute")
    parser.add_argument("--members", type=int, nargs="+")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--map", action="store_true", help="the throughput map over width × N instead (a few minutes)")
    parser.add_argument("--widths", type=int, nargs="+", default=[16, 64, 256, 1024], help="the map's widths")
    parser.add_argument("--cpu-devices", type=int, default=0,
                        help="CPU devices (0: one per core, as the jaxlmc command; 1: one device for every core)")
    parser.add_argument("--out")
    args = parser.parse_args()
    shard.use_cpu_cores(args.cpu_devices)
    if args.map:
        return run_map(args)
    args.out = args.out or os.path.join(os.path.dirname(__file__), "results", "suite.json")
    members = args.members or ([1, 8, 32] if args.quick else [1, 8, 32, 128, 512])
    steps = args.steps or (50 if args.quick else 200)
    chunk = min(50, steps)
    device = jax.devices()[0].device_kind
    peak = matmul_flops_per_s()
    print(f"device {device}; dense f32 matmul: {peak / 1e9:.1f} GFLOP/s")
    rows = training(members, steps, chunk, 256, 100, peak)
    barrier = barrier_pass(8 if args.quick else 16, 25, 4 if args.quick else 8, 256, peak)
    out = args.out if not args.quick or args.out.endswith("quick.json") else args.out.replace(".json", "_quick.json")
    write_record(out, "suite", quick=args.quick, matmul_flops_per_s=peak, model={"kind": "mlp", "width": 256,
                 "depth": 2, "batch": 100}, timed_steps=steps, training=rows, barriers=barrier)
    plot(rows, device, out.replace(".json", ".png"))


def run_map(args) -> None:
    members = args.members or [1, 4, 16, 64, 256, 1024]
    peak = matmul_flops_per_s()
    device = jax.devices()[0].device_kind
    print(f"device {device} × {jax.device_count()}; dense f32 matmul: {peak / 1e9:.1f} GFLOP/s")
    rows = throughput_map(args.widths, members, peak, torch_seconds=torch_ensemble_seconds)
    out = args.out or os.path.join(os.path.dirname(__file__), "results", "map.json")
    write_record(out, "throughput_map", matmul_flops_per_s=peak, model={"kind": "mlp", "depth": 2, "batch": 100},
                 cells=rows)
    plot_map(rows, device, out.replace(".json", ".png"))


if __name__ == "__main__":
    main()
