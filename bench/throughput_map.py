"""Where vectorising pays off: member-steps/s of jaxlmc's vmapped training, a loop of single-member jaxlmc runs and a
PyTorch `torch.func` ensemble over the MLP's width × the member count N (`python -m bench --map`).

Every contender trains the MLP 40 → W → W → 10 (MNIST-1D's shapes, depth 2) with AdamW at batch 100 on random data.
Each cell is timed after compilation and warm-up for at least `min_seconds` (whole chunks of `chunk` steps). The loop
runs one compiled single-member program on JAX's default single CPU device (`single_runs_seconds`: a child
process); its N runs are N times one run's time (every run is the same program on the same shapes), measured once
per width. A cell whose training state (parameters, gradients and two Adam moments,
for every member) would pass `memory_fraction` of the free memory is not run and says so. The fraction of the
matmul peak is XLA's FLOP count of one member's step × N × the rate, over the same run's dense matmul rate: it tells
dispatch-bound cells (small models: the time goes to launching many tiny operations, which vmapping merges) from
compute-bound ones (large models: the matmuls already fill the cores, so merging members gains little).
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from bench.bench_train import setup, single_runs_seconds
from jaxlmc import memory, models, train
from jaxlmc.config import ModelConfig

FEATURES, CLASSES, N_TRAIN, BATCH = 40, 10, 4000, 100


def chunk_rate(chunk_fn, state, consts, data, chunk: int, min_seconds: float) -> float:
    """Steps per second of a compiled chunk, after one warm-up chunk, over whole chunks lasting ≥ `min_seconds`."""
    state, loss, _ = chunk_fn(state, consts, data, chunk)
    loss.block_until_ready()
    start, steps = time.perf_counter(), 0
    while steps == 0 or time.perf_counter() - start < min_seconds:
        state, loss, _ = chunk_fn(state, consts, data, chunk)
        loss.block_until_ready()
        steps += chunk
    return steps / (time.perf_counter() - start)


def state_bytes_per_member(model) -> int:
    """Parameters, gradients and Adam's two moments of one member, in bytes."""
    return 4 * 4 * models.param_count(model.init(jax.random.key(0)))


def throughput_map(widths: list[int], members: list[int], peak: float, chunk: int = 10, min_seconds: float = 0.5,
                   memory_fraction: float = 0.4, torch_seconds=None) -> list[dict]:
    """One row per (width, N) cell: member-steps/s of the three contenders, their ratios, and the vmapped step's
    fraction of the `peak` FLOP/s. `torch_seconds(n, steps, width, batch, min_seconds)` times the torch.func
    ensemble per step (None: not installed)."""
    rng = np.random.default_rng(0)
    data = {"x": jnp.asarray(rng.normal(size=(N_TRAIN, FEATURES)).astype(np.float32)),
            "y": jnp.asarray(rng.integers(0, CLASSES, N_TRAIN).astype(np.int32))}
    budget = memory_fraction * memory.available_memory_bytes()
    rows = []
    print(f"{'width':>6} {'N':>5} {'vmapped':>10} {'loop':>10} {'torch.func':>11} {'vs loop':>8} {'vs torch':>9} "
          f"{'peak %':>7}   (member-steps/s)")
    for width in widths:
        model = models.build(ModelConfig(kind="mlp", width=width, depth=2), (FEATURES,), CLASSES)
        chunk_fn = train.make_train_chunk(model, "adamw", 0.9, BATCH, N_TRAIN, chunk)
        one_step_fn = train.make_train_chunk(model, "adamw", 0.9, BATCH, N_TRAIN, 1)
        one = setup(model, 1, N_TRAIN)
        flops_per_member_step = one_step_fn.lower(*one, data, 1).compile().cost_analysis()["flops"]
        loop_steps = max(chunk, int(min_seconds * chunk_rate(chunk_fn, *one, data, chunk, 0.1)) // chunk * chunk)
        loop_rate = loop_steps / single_runs_seconds(1, loop_steps, chunk, width, 2, BATCH)  # one member's steps/s
        per_member = state_bytes_per_member(model)
        for n in members:
            row = {"width": width, "members": n, "params_per_member": per_member // 16}
            if n * per_member > budget:
                row["skipped"] = f"state {n * per_member / 2**30:.1f} GiB > {budget / 2**30:.1f}"
                rows.append(row)
                print(f"{width:>6} {n:>5}   skipped: {row['skipped']}")
                continue
            vmapped = n * chunk_rate(chunk_fn, *setup(model, n, N_TRAIN), data, chunk, min_seconds)
            per_step = torch_seconds(n, 1, width, BATCH, min_seconds) if torch_seconds else None
            row.update({"vmapped_member_steps_per_s": vmapped, "loop_member_steps_per_s": loop_rate,
                        "torch_func_member_steps_per_s": n / per_step if per_step else None,
                        "ratio_vs_loop": vmapped / loop_rate,
                        "fraction_of_matmul_peak": vmapped * flops_per_member_step / peak})
            row["ratio_vs_torch_func"] = vmapped / row["torch_func_member_steps_per_s"] if per_step else None
            rows.append(row)
            torch_text = f"{row['torch_func_member_steps_per_s']:>11.0f}" if per_step else f"{'–':>11}"
            vs_torch = f"{row['ratio_vs_torch_func']:>8.2f}×" if per_step else f"{'–':>9}"
            print(f"{width:>6} {n:>5} {vmapped:>10.0f} {loop_rate:>10.0f} {torch_text} {row['ratio_vs_loop']:>7.2f}× "
                  f"{vs_torch} {100 * row['fraction_of_matmul_peak']:>6.1f}%", flush=True)
    return rows


def plot_map(rows: list[dict], device: str, path: str) -> None:
    """One panel per width: member-steps/s against N for the three contenders."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    widths = sorted({r["width"] for r in rows})
    fig, axes = plt.subplots(1, len(widths), figsize=(3.2 * len(widths), 3.4), squeeze=False)
    for ax, width in zip(axes[0], widths):
        cells = [r for r in rows if r["width"] == width and "skipped" not in r]
        n = [r["members"] for r in cells]
        for key, label, style in (("vmapped_member_steps_per_s", "jaxlmc vmapped", "o-"),
                                  ("loop_member_steps_per_s", "loop of single runs", "s--"),
                                  ("torch_func_member_steps_per_s", "torch.func", "^:")):
            values = [r[key] for r in cells]
            if values and all(v is not None for v in values):
                ax.plot(n, values, style, label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("members N")
        ax.set_title(f"width {width}", fontsize=9)
    axes[0][0].set_ylabel("member-steps / s")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"MLP 40→W→W→10, AdamW, batch 100 ({device})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"plot in {path}")
