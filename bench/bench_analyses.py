"""Analysis throughput: jaxlmc's compiled forms of four analyses versus a plain Python loop computing the same numbers.

Side by side in this one run, each with its rate, their ratio and a check that both give the same numbers:
  layer-wise barriers  hybrid-model evaluations per second (one evaluation = one point of a layer-wise curve: member i
             with one layer group interpolated towards member j at one α, on the whole evaluation set), for P pairs
             (every pair within each cell of members) × G layer groups (Model.layer_groups: dense0, dense1, head for
             the MLP) × A α.
    compiled   paths.layer_wise: every pair × group × α in one jit call (α = 0, member i itself, is
               evaluated once per pair and shared by the groups; compilation excluded, a warm-up call runs first),
    loop       reference.reference_layer_curves: a Python loop over pairs, groups and α, building each hybrid model
               eagerly and calling one jit-compiled forward pass on it (compiled before timing). The loop is timed on
               the first --loop-pairs pairs only and its rate is per curve point (the output says so); the two must
               agree on those pairs (losses to rtol 1e-4, errors exactly).
  sharpness  members per second: the top Hessian eigenvalue of the mean training loss on --sharpness-examples
             examples, by --iterations steps of power iteration (Hessian-vector products) per member.
    compiled   sharpness.make_top_hessian_eigenvalue on all M members at once (vmapped, one program),
    loop       one member at a time: a jitted one-member program (compiled once, reused for every member) built
               from the same parts as make_top_hessian_eigenvalue's per-member body (sharpness.power_iteration on
               Hessian-vector products of train.loss_and_error's mean loss, start direction drawn from
               fold_in(key, m)). Not make_top_hessian_eigenvalue itself on a member axis of 1: that would start every
               member from fold_in(key, 0), and 20 iterations do not converge to 1e-3 (residuals of a few %), so the
               two could not be checked against each other; with the same start they must agree to rtol 1e-3.
  merges     merges evaluated per second: TIES-Merging of each of G groups (grid cells) of K members at every
             setting of merges.DEFAULT_GRIDS["ties"] (density × scale), each merge's accuracy on a validation set.
    compiled   merges.make_merged_eval: every group × setting in one jit call (the members' updates and TIES's
               magnitude ranks computed once for all groups),
    loop       a Python loop over groups and settings calling the jitted merges.ties on that group's K members
               (so each call flattens and ranks them again, as a plain loop over a merge function does) and then a
               jitted train.loss_and_error on the merged model; accuracies must be equal (to half an example).

  curves     pair-steps per second: training the bend of a quadratic Bezier curve between each pair (Garipov et al.
             2018) for --curve-steps Adam steps, batches of 100 training examples, t ~ U(0, 1) per pair and step.
    compiled   curves.make_train_bends: every pair's bend in one jit call (lax.scan over steps, vmapped over pairs),
    loop       make_train_bends compiled for one pair (a pair axis of 1) and called once per pair, on the first
               --loop-pairs pairs: the same program a loop of single-pair runs would reuse. Each call is pair 0 of
               its own, so only the first pair draws what it draws in the vmapped call: that pair's bends must
               agree (rtol 1e-4); the others cost the same with other draws (equality for every pair against
               curves.reference_train_bend is tested in tests/test_curves.py).

Members are fine-tune-like: a shared random start of the model plus small random updates, each the sum of a direction
shared by the members of a cell and the member's own (so updates within a cell are correlated, as for fine-tunes with
the same hyperparameters, and TIES's sign election and Model Stock's angle see realistic structure). Data are random
with MNIST-1D's shapes (40 features, 10 classes; evaluation sets of 1000 examples, the size of its test split): the
cost does not depend on the values, and the benchmark needs no TFDS (the GPU image lacks it).

    python -m bench.bench_analyses [--width 256] [--depth 2] [--members 16] [--cell-size 8] [--alphas 11]
                                   [--loop-pairs 4] [--sharpness-members 32] [--iterations 20] [--merge-groups 8]
                                   [--curve-steps 100] [--analyses barriers sharpness merges curves]
                                   [--out bench/results/analyses.json]

(--help lists the rest.) Defaults: 56 pairs (16 members in cells of 8) × 3 groups × 11 α; 32 members, 20
iterations, 500 examples; 8 groups of 8 members × 12 TIES settings on 1000 examples.
"""
from __future__ import annotations

import argparse
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from bench._record import write_record
from jaxlmc import curves, merges, models, pair_sets, paths, reference, shard, sharpness, train
from jaxlmc.analysis import group_weights
from jaxlmc.config import ModelConfig

FEATURES, CLASSES = 40, 10
ANALYSES = ("barriers", "sharpness", "merges", "curves")


def fine_tunes(model, num_members: int, cell_size: int, seed: int = 0, scale: float = 0.05):
    """(params_M, start_M): one shared random start and, per member, start + update, where each leaf's update is
    scale × (the leaf's RMS, or 0.05 for an all-zero leaf such as a bias at init) × (cell direction + own noise)/√2."""
    key_start, key_cell, key_member = jax.random.split(jax.random.key(seed), 3)
    start = model.init(key_start)
    num_cells = math.ceil(num_members / cell_size)
    cell_M = jnp.arange(num_members) // cell_size
    leaves, treedef = jax.tree.flatten(start)
    params = []
    for k, leaf in enumerate(leaves):
        rms = float(jnp.sqrt(jnp.mean(jnp.square(leaf))))
        size = scale * (rms if rms > 0 else 0.05)
        cell = jax.random.normal(jax.random.fold_in(key_cell, k), (num_cells, *leaf.shape))
        own = jax.random.normal(jax.random.fold_in(key_member, k), (num_members, *leaf.shape))
        params.append(leaf[None] + size * (cell[cell_M] + own) / math.sqrt(2.0))
    start_M = jax.tree.map(lambda a: jnp.broadcast_to(a, (num_members, *a.shape)) + 0.0, start)
    return jax.tree.unflatten(treedef, params), start_M


def random_data(rng, n: int):
    return (rng.normal(size=(n, FEATURES)).astype(np.float32), rng.integers(0, CLASSES, n).astype(np.int32))


def timed_twice(fn, *args):
    """(result, seconds of the second call, seconds of the first: compile + run)."""
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - start
    start = time.perf_counter()
    result = jax.block_until_ready(fn(*args))
    return result, time.perf_counter() - start, first


# --------------------------------------------------------------------------------------------- the three analyses


def bench_barriers(model, args, rng) -> dict:
    params_M, _ = fine_tunes(model, args.members, args.cell_size)
    cells = {c: list(range(c, min(c + args.cell_size, args.members))) for c in range(0, args.members, args.cell_size)}
    pairs = pair_sets.pairs_within(cells)
    groups = model.layer_groups(jax.tree.map(lambda a: a[0], params_M))
    alphas = paths.alpha_grid(args.alphas)
    x, y = random_data(rng, args.examples)
    sets = {"test": train.batch_eval_set(x, y, args.batch)}
    chunk = max(1, min(args.chunk_pairs, len(pairs)))
    fn = paths.make_path_eval(model, paths.layer_wise(groups), alphas, chunk)
    curves, compiled_s, first_s = timed_twice(fn, params_M, jnp.asarray(pairs, jnp.int32), sets)

    loop_pairs = pairs[: args.loop_pairs]
    xj, yj = jnp.asarray(x), jnp.asarray(y)
    reference.reference_layer_curves(model, params_M, loop_pairs[:1], alphas[:2], groups, xj, yj)  # compile
    start = time.perf_counter()
    ref_loss, ref_err = reference.reference_layer_curves(model, params_M, loop_pairs, alphas, groups, xj, yj)
    loop_s = time.perf_counter() - start
    loss, err = (np.asarray(a)[: len(loop_pairs)] for a in curves["test"])
    agree = bool(np.allclose(loss, ref_loss, rtol=1e-4, atol=1e-5) and np.allclose(err, ref_err, atol=1e-6))

    points = len(pairs) * len(groups) * args.alphas
    row = {"analysis": "layer-wise barriers", "unit": "hybrid evals/s", "members": args.members,
           "cell_size": args.cell_size, "pairs": len(pairs), "groups": list(groups), "alphas": args.alphas,
           "examples": args.examples, "chunk_pairs": chunk, "curve_points": points,
           "models_evaluated_by_compiled": len(pairs) * (len(groups) * (args.alphas - 1) + 1),
           "loop_pairs": len(loop_pairs), "compiled_seconds": compiled_s, "compile_seconds": first_s - compiled_s,
           "loop_seconds": loop_s, "compiled_rate": points / compiled_s,
           "loop_rate": len(loop_pairs) * len(groups) * args.alphas / loop_s, "agree": agree,
           "max_abs_loss_diff": float(np.abs(loss - ref_loss).max())}
    row["note"] = (f"loop timed on {len(loop_pairs)} of {len(pairs)} pairs, rate per curve point"
                   if len(loop_pairs) < len(pairs) else "loop timed on every pair")
    print(f"  barriers: {len(pairs)} pairs ({args.members} members, cells of {args.cell_size}) × {len(groups)} groups "
          f"× {args.alphas} α on {args.examples} examples, chunk {chunk}; {row['note']}; "
          f"compile {row['compile_seconds']:.1f} s", flush=True)
    return row


def one_member_top_eigenvalue(model, iterations: int):
    """jit(params, m, eval_set, key) -> (eig, residual) of one member (no member axis) that the vmapped program
    calls member m: the same steps as make_top_hessian_eigenvalue's per-member body, m a traced argument."""

    def member(params, m, eval_set, key):
        flat_P, unravel = ravel_pytree(params)
        grad_fn = jax.grad(lambda f_P: train.loss_and_error(model, unravel(f_P), eval_set[:3])[0])
        hvp_fn = lambda v_P: jax.jvp(grad_fn, (flat_P,), (v_P,))[1]
        v0_P = jax.random.normal(jax.random.fold_in(key, m), flat_P.shape, flat_P.dtype)
        eig, residual, _ = sharpness.power_iteration(hvp_fn, v0_P, iterations)
        finite = jnp.all(jnp.isfinite(flat_P))
        return jnp.where(finite, eig, jnp.nan), jnp.where(finite, residual, jnp.nan)

    return jax.jit(member)


def bench_sharpness(model, args, rng) -> dict:
    params_M, _ = fine_tunes(model, args.sharpness_members, args.cell_size, seed=1)
    x, y = random_data(rng, args.sharpness_examples)
    train_set = train.batch_eval_set(x, y, args.batch)
    key = jax.random.key(0)
    top = sharpness.make_top_hessian_eigenvalue(model, args.iterations)
    (eig_M, residual_M), compiled_s, first_s = timed_twice(top, params_M, train_set, key)

    loop_members = min(args.sharpness_loop_members or args.sharpness_members, args.sharpness_members)
    single = one_member_top_eigenvalue(model, args.iterations)
    members = [jax.tree.map(lambda a, m=m: a[m], params_M) for m in range(loop_members)]
    jax.block_until_ready(single(members[0], 0, train_set, key))  # compile the one-member program
    start = time.perf_counter()
    loop_eig, loop_res = [], []
    for m, params in enumerate(members):
        e, r = single(params, m, train_set, key)
        loop_eig.append(float(e))
        loop_res.append(float(r))
    loop_s = time.perf_counter() - start
    eig = np.asarray(eig_M)[:loop_members]
    loop_eig = np.asarray(loop_eig)
    rel = np.abs(eig - loop_eig) / np.abs(loop_eig)
    row = {"analysis": "sharpness", "unit": "members/s", "members": args.sharpness_members,
           "iterations": args.iterations, "examples": args.sharpness_examples, "loop_members": loop_members,
           "compiled_seconds": compiled_s, "compile_seconds": first_s - compiled_s, "loop_seconds": loop_s,
           "compiled_rate": args.sharpness_members / compiled_s, "loop_rate": loop_members / loop_s,
           "agree": bool(np.allclose(eig, loop_eig, rtol=1e-3, atol=0)), "max_rel_eig_diff": float(rel.max()),
           "max_residual": float(np.max(np.asarray(residual_M))),
           "eig_range": [float(np.min(eig_M)), float(np.max(eig_M))]}
    row["note"] = ("loop timed on every member" if loop_members == args.sharpness_members
                   else f"loop timed on {loop_members} of {args.sharpness_members} members")
    print(f"  sharpness: {args.sharpness_members} members, {args.iterations} iterations on "
          f"{args.sharpness_examples} examples; eigenvalues {row['eig_range'][0]:.3g}…{row['eig_range'][1]:.3g} "
          f"(residuals ≤ {row['max_residual']:.1e}), compiled vs loop max relative difference "
          f"{row['max_rel_eig_diff']:.1e}; {row['note']}; compile {row['compile_seconds']:.1f} s", flush=True)
    return row


def bench_merges(model, args, rng) -> dict:
    num_members = args.merge_groups * args.cell_size
    params_M, start_M = fine_tunes(model, num_members, args.cell_size, seed=2)
    x, y = random_data(rng, args.examples)
    val_set = train.batch_eval_set(x, y, args.batch)
    grid = merges.DEFAULT_GRIDS["ties"]
    idx_GxK = np.arange(num_members).reshape(args.merge_groups, args.cell_size)
    weights_GxM = group_weights(idx_GxK, num_members)
    hyper = {name: np.tile(np.array([s[name] for s in grid], np.float32), (args.merge_groups, 1))
             for name in merges.HYPERS["ties"]}
    merged_eval = merges.make_merged_eval(model)
    (_, acc_GxH), compiled_s, first_s = timed_twice(merged_eval, params_M, start_M, weights_GxM, val_set, "ties",
                                                    hyper)

    loop_groups = min(args.loop_groups or args.merge_groups, args.merge_groups)
    evaluate = jax.jit(lambda params, eval_set: train.loss_and_error(model, params, eval_set))
    ones_K = jnp.ones(args.cell_size, jnp.float32)

    def loop(groups):
        acc = np.zeros((groups, len(grid)))
        for g in range(groups):
            take = jnp.asarray(idx_GxK[g])
            members = jax.tree.map(lambda a, t=take: a[t], params_M)
            starts = jax.tree.map(lambda a, t=take: a[t], start_M)
            for h, setting in enumerate(grid):
                merged = merges.ties(members, starts, ones_K, setting["density"], setting["scale"])
                acc[g, h] = 1.0 - float(evaluate(merged, val_set)[1])
        return acc

    loop(1)  # compile
    start = time.perf_counter()
    loop_acc = loop(loop_groups)
    loop_s = time.perf_counter() - start
    acc = np.asarray(acc_GxH)[:loop_groups]
    num_merges = args.merge_groups * len(grid)
    row = {"analysis": "merges (TIES)", "unit": "merges/s", "groups": args.merge_groups,
           "group_size": args.cell_size, "members": num_members, "settings": len(grid), "grid": grid,
           "examples": args.examples, "loop_groups": loop_groups, "compiled_seconds": compiled_s,
           "compile_seconds": first_s - compiled_s, "loop_seconds": loop_s, "compiled_rate": num_merges / compiled_s,
           "loop_rate": loop_groups * len(grid) / loop_s,
           "agree": bool(np.allclose(acc, loop_acc, rtol=0, atol=0.5 / args.examples)),
           "max_abs_acc_diff": float(np.abs(acc - loop_acc).max()),
           "acc_range": [float(np.min(acc_GxH)), float(np.max(acc_GxH))],
           "params": models.param_count(jax.tree.map(lambda a: a[0], params_M))}
    row["note"] = ("loop timed on every group" if loop_groups == args.merge_groups
                   else f"loop timed on {loop_groups} of {args.merge_groups} groups")
    print(f"  merges: {args.merge_groups} groups × {args.cell_size} members ({num_members}), TIES × {len(grid)} "
          f"settings on {args.examples} examples; {row['note']}; compile {row['compile_seconds']:.1f} s", flush=True)
    return row


def bench_curves(model, args, rng) -> dict:
    params_M, _ = fine_tunes(model, args.members, args.cell_size)
    cells = {c: list(range(c, min(c + args.cell_size, args.members))) for c in range(0, args.members, args.cell_size)}
    pairs = pair_sets.pairs_within(cells)
    x, y = random_data(rng, 4000)
    data = {"x": jnp.asarray(x), "y": jnp.asarray(y)}
    key = jax.random.key(0)
    fn = curves.make_train_bends(model, args.curve_steps, 100, 1e-3, len(y), chunk_pairs=min(args.chunk_pairs,
                                                                                             len(pairs)))
    bends, compiled_s, first_s = timed_twice(fn, params_M, jnp.asarray(pairs, jnp.int32), data, key)
    loop_pairs = pairs[: args.loop_pairs]
    single = curves.make_train_bends(model, args.curve_steps, 100, 1e-3, len(y), chunk_pairs=1)
    one = lambda pair: single(params_M, jnp.asarray([pair], jnp.int32), data, key)  # noqa: E731
    jax.block_until_ready(one(loop_pairs[0]))  # compile
    start = time.perf_counter()
    looped = [jax.block_until_ready(one(pair)) for pair in loop_pairs]
    loop_s = time.perf_counter() - start
    agree = all(np.allclose(a[0], b, rtol=1e-4, atol=1e-5) for a, b in zip(
        jax.tree.leaves(looped[0]), jax.tree.leaves(jax.tree.map(lambda v: v[0], bends))))
    row = {"analysis": "Bezier curves", "unit": "pair-steps/s", "pairs": len(pairs), "steps": args.curve_steps,
           "loop_pairs": len(loop_pairs), "compiled_seconds": compiled_s, "compile_seconds": first_s - compiled_s,
           "loop_seconds": loop_s, "compiled_rate": len(pairs) * args.curve_steps / compiled_s,
           "loop_rate": len(loop_pairs) * args.curve_steps / loop_s, "agree": agree,
           "note": f"loop timed on {len(loop_pairs)} of {len(pairs)} pairs"}
    print(f"  curves: {len(pairs)} pairs × {args.curve_steps} steps (batch 100); {row['note']}; "
          f"compile {row['compile_seconds']:.1f} s", flush=True)
    return row


def main() -> None:
    shard.use_cpu_cores()  # as the jaxlmc command: one CPU device per core
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--examples", type=int, default=1000, help="evaluation set (barriers, merges)")
    parser.add_argument("--batch", type=int, default=1000, help="evaluation batch of the compiled forms")
    parser.add_argument("--analyses", nargs="+", default=list(ANALYSES), choices=ANALYSES)
    parser.add_argument("--members", type=int, default=16, help="barriers: members, paired within cells")
    parser.add_argument("--cell-size", type=int, default=8,
                        help="members per cell: barrier pairs, merge groups, structure of the updates")
    parser.add_argument("--alphas", type=int, default=11)
    parser.add_argument("--chunk-pairs", type=int, default=8, help="barriers: pairs vmapped at a time")
    parser.add_argument("--loop-pairs", type=int, default=4, help="barriers: pairs timed in the loop")
    parser.add_argument("--sharpness-members", type=int, default=32)
    parser.add_argument("--sharpness-loop-members", type=int, default=0, help="members timed in the loop (0: all)")
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--sharpness-examples", type=int, default=500)
    parser.add_argument("--merge-groups", type=int, default=8, help="merges: groups (cells) of --cell-size")
    parser.add_argument("--loop-groups", type=int, default=0, help="merges: groups timed in the loop (0: all)")
    parser.add_argument("--curve-steps", type=int, default=100, help="curves: Adam steps of each bend")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "analyses.json"))
    args = parser.parse_args()

    model = models.build(ModelConfig(kind="mlp", width=args.width, depth=args.depth), (FEATURES,), CLASSES)
    params = models.param_count(model.init(jax.random.key(0)))
    print(f"MLP {args.depth}×{args.width} ({params:,} params), device {jax.devices()[0].device_kind}")
    rng = np.random.default_rng(0)
    bench = {"barriers": bench_barriers, "sharpness": bench_sharpness, "merges": bench_merges, "curves": bench_curves}
    results = [bench[name](model, args, rng) for name in args.analyses]
    for row in results:
        row["ratio"] = row["compiled_rate"] / row["loop_rate"]

    print(f"{'analysis':>20} {'unit':>15} {'compiled':>10} {'loop':>10} {'ratio':>8} {'agree':>6}")
    for row in results:
        print(f"{row['analysis']:>20} {row['unit']:>15} {row['compiled_rate']:>10,.1f} {row['loop_rate']:>10,.1f} "
              f"{row['ratio']:>7.1f}× {'yes' if row['agree'] else 'NO':>6}")
    write_record(args.out, "analyses", model={"kind": "mlp", "width": args.width, "depth": args.depth,
                                              "params": params}, results=results)


if __name__ == "__main__":
    main()
