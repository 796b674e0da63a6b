"""Loss and error along the straight line between members: all pairs × all α × all evaluation batches in one
compiled function (the engine), plus a plain reference loop used as ground truth.

θ(α) = (1 − α)·θᵢ + α·θⱼ. Endpoints (α = 0, 1) are the members themselves and are evaluated once per member; the
compiled pass evaluates only the interior α of each pair, vmapped over α and over a chunk of pairs, with the chunks
walked by `lax.map`, so peak memory depends on the chunk size, never on the number of pairs. Every evaluation set
(train subset, test, OOD) is evaluated on the same interpolated weights inside the same pass.

jaxlmc's models have no BatchNorm (see jaxlmc.models), so an interpolated network's outputs need no recomputed
statistics: every number here is computed from the interpolated weights alone.

Barriers (docs/science.md, "Interpolation and the two barrier forms"), for a curve L(α) on the full grid including the endpoints:
  endpoint-mean form   max_α L(α) − ½·(L(0) + L(1))                 (Frankle et al. 2020; Ainsworth et al. 2023)
  linear-baseline form max_α [L(α) − ((1 − α)·L(0) + α·L(1))]        (Entezari et al. 2022; Juneja et al. 2023)
"""
from __future__ import annotations

import csv
import itertools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec

from jaxlmc import memory
from jaxlmc.models import Model
from jaxlmc.permute import permute
from jaxlmc.repair import repair, unit_stats
from jaxlmc.shard import MEMBERS
from jaxlmc.train import cross_entropy, loss_and_error


def lerp(params_i, params_j, alpha):
    return jax.tree.map(lambda a, b: (1.0 - alpha) * a + alpha * b, params_i, params_j)


def alpha_grid(num_alphas: int) -> np.ndarray:
    if num_alphas < 3:
        raise ValueError(f"an α grid needs at least 3 points (the ends and one interior point), got {num_alphas}")
    return np.linspace(0.0, 1.0, num_alphas, dtype=np.float32)


def pair_endpoints(model: Model, params_M, pair_2, perm_list=None):
    """(θᵢ, θⱼ) of one pair: member i and member j, the latter permuted onto member i when `perm_list` (one array
    [units] per permutation group) is given."""
    p_i = jax.tree.map(lambda a: a[pair_2[0]], params_M)
    p_j = jax.tree.map(lambda a: a[pair_2[1]], params_M)
    if perm_list is not None:
        p_j = permute(p_j, perm_list, model.permutation_spec())
    return p_i, p_j


def _checked_grid(alphas, chunk_pairs: int) -> np.ndarray:
    """The α grid as float32, refused unless it increases from 0 to 1; and a positive chunk size."""
    alphas = np.asarray(alphas, np.float32)
    if alphas[0] != 0.0 or alphas[-1] != 1.0 or np.any(np.diff(alphas) <= 0):
        raise ValueError("alphas must increase from 0 to 1")
    if chunk_pairs < 1:
        raise ValueError(f"chunk_pairs must be positive, got {chunk_pairs}")
    return alphas


def make_curves(model: Model, alphas: np.ndarray, chunk_pairs: int, mesh=None, repair_x=None):
    """jit(params_M, pairs_Px2, eval_sets) -> {name: (loss_PxA, err_PxA)} on the full α grid.

    `eval_sets` maps a name to a set from `train.batch_eval_set`. `alphas` must increase from 0 to 1; the endpoints
    come from one evaluation per member, walked in chunks of `chunk_pairs` members. With a `mesh` (jaxlmc.shard) the
    pairs are padded to a multiple of its size and split over its devices with `jax.shard_map`; every device holds
    all members and evaluates their endpoints itself (no communication at all). Given an optional fourth argument,
    perms (jaxlmc.permute.match_pairs: one [P, width] array per hidden layer), member j of each pair is permuted onto
    member i inside the pass before interpolating. With `repair_x` (training examples), every interior point is
    renormalised by REPAIR (jaxlmc.repair) on those examples before it is evaluated.
    """
    alphas = _checked_grid(alphas, chunk_pairs)
    interior = jnp.asarray(alphas[1:-1])

    def curves(params_M, pairs_Px2, eval_sets, perms=None):
        def evaluate(params):  # one model on every set: {name: (loss, err)}
            return {name: loss_and_error(model, params, s) for name, s in eval_sets.items()}

        num_members = jax.tree.leaves(params_M)[0].shape[0]
        ends_M = lax.map(evaluate, params_M, batch_size=min(chunk_pairs, num_members))

        def on_pair(args):
            pair_2, perm_list = args
            p_i, p_j = pair_endpoints(model, params_M, pair_2, perm_list)
            if repair_x is None:
                return jax.vmap(lambda a: evaluate(lerp(p_i, p_j, a)))(interior)
            stats_i, stats_j = (unit_stats(model, p, repair_x) for p in (p_i, p_j))
            return jax.vmap(lambda a: evaluate(repair(model, lerp(p_i, p_j, a), stats_i, stats_j, a, repair_x)))(
                interior)

        inner_P = lax.map(on_pair, (pairs_Px2, perms), batch_size=min(chunk_pairs, pairs_Px2.shape[0]))
        i, j = pairs_Px2[:, 0], pairs_Px2[:, 1]

        def full(end_M, inner_PxI):
            return jnp.concatenate([end_M[i][:, None], inner_PxI, end_M[j][:, None]], axis=1)

        return jax.tree.map(full, ends_M, inner_P)

    if mesh is None:
        return jax.jit(curves)

    def sharded(params_M, pairs_Px2, eval_sets, perms=None):
        num_pairs = pairs_Px2.shape[0]
        pad = lambda a: jnp.concatenate([a, jnp.zeros(((-num_pairs) % mesh.size, *a.shape[1:]), a.dtype)])  # noqa
        local = jax.shard_map(curves, mesh=mesh, in_specs=(PartitionSpec(), PartitionSpec(MEMBERS), PartitionSpec(),
                                                            PartitionSpec(MEMBERS)),
                              out_specs=PartitionSpec(MEMBERS))
        padded_perms = None if perms is None else [pad(p) for p in perms]
        return jax.tree.map(lambda a: a[:num_pairs], local(params_M, pad(pairs_Px2), eval_sets, padded_perms))

    return jax.jit(sharded)


def make_layer_curves(model: Model, alphas: np.ndarray, chunk_pairs: int, groups: dict[str, list[str]]):
    """jit(params_M, pairs_Px2, eval_sets[, perms]) -> {name: (loss_PxGxA, err_PxGxA)}: layer-wise interpolation
    (Adilova et al. 2024) of every pair, for every layer group and α in one compiled pass.

    For group g the network is member i with only g's parameters interpolated, θ(α) = θᵢ except θᵍ(α) = (1 − α)·θᵢᵍ
    + α·θⱼᵍ; at α = 1 it is member i with member j's layer g, not member j, so the whole grid except α = 0 (member i
    itself, shared by every group) is evaluated, and barriers are read against that curve's own ends. `groups` is
    Model.layer_groups (every top-level parameter key in exactly one group). With `perms`, member j is weight-matched
    onto member i first, as in make_curves.
    """
    alphas = _checked_grid(alphas, chunk_pairs)
    names = list(groups)
    rest = jnp.asarray(alphas[1:])

    def curves(params_M, pairs_Px2, eval_sets, perms=None):
        keys = list(params_M)
        # coef_GxK[g, k] = 1 where parameter group k belongs to layer group g: the mixing weight of each key is α times
        # its row, so one vmap over (group, α) builds every hybrid network.
        coef_GxK = jnp.asarray([[1.0 if key in groups[name] else 0.0 for key in keys] for name in names])

        def evaluate(params):
            return {name: loss_and_error(model, params, s) for name, s in eval_sets.items()}

        def on_pair(args):
            pair_2, perm_list = args
            p_i, p_j = pair_endpoints(model, params_M, pair_2, perm_list)
            start = evaluate(p_i)

            def hybrid(coef_K, alpha):
                return evaluate({key: lerp(p_i[key], p_j[key], alpha * coef_K[k]) for k, key in enumerate(keys)})

            inner_GxA = jax.vmap(lambda c: jax.vmap(lambda a: hybrid(c, a))(rest))(coef_GxK)
            return jax.tree.map(lambda s0, g: jnp.concatenate([jnp.broadcast_to(s0, (len(names), 1, *s0.shape)), g],
                                                              axis=1), start, inner_GxA)

        return lax.map(on_pair, (pairs_Px2, perms), batch_size=min(chunk_pairs, pairs_Px2.shape[0]))

    return jax.jit(curves)


def reference_layer_curves(model: Model, params_M, pairs, alphas, groups: dict[str, list[str]], x, y):
    """Ground truth for make_layer_curves: (loss_PxGxA, err_PxGxA) by a plain loop, one hybrid model at a time."""
    forward = jax.jit(model.apply)
    loss = np.zeros((len(pairs), len(groups), len(alphas)))
    err = np.zeros_like(loss)
    for p, (i, j) in enumerate(pairs):
        p_i = jax.tree.map(lambda a: a[i], params_M)
        p_j = jax.tree.map(lambda a: a[j], params_M)
        for g, keys in enumerate(groups.values()):
            for k, alpha in enumerate(alphas):
                params = {key: lerp(p_i[key], p_j[key], float(alpha)) if key in keys else p_i[key] for key in p_i}
                logits = forward(params, x)
                loss[p, g, k] = float(cross_entropy(logits, y).mean())
                err[p, g, k] = float((jnp.argmax(logits, -1) != y).mean())
    return loss, err


@jax.jit
def pair_geometry(params_M, start_M, pairs_Px2):
    """(dist_P, update_cos_P): ‖θᵢ − θⱼ‖ and the cosine similarity of the fine-tuning updates θᵢ − startᵢ, θⱼ − startⱼ.

    Differences are taken per pair (never via ‖a‖² + ‖b‖² − 2a·b, which cancels catastrophically in float32 for
    nearby fine-tunes); pairs are walked with `lax.map` so memory does not grow with their number.
    """
    flat = lambda tree: jnp.concatenate([a.reshape(a.shape[0], -1) for a in jax.tree.leaves(tree)], 1)  # noqa: E731
    theta_MxD = flat(params_M)
    update_MxD = theta_MxD - flat(start_M)
    update_norm_M = jnp.linalg.norm(update_MxD, axis=1)

    def one(pair_2):
        i, j = pair_2[0], pair_2[1]
        dist = jnp.linalg.norm(theta_MxD[i] - theta_MxD[j])
        denom = update_norm_M[i] * update_norm_M[j]
        cos = jnp.where(denom > 0, jnp.dot(update_MxD[i], update_MxD[j]) / jnp.where(denom > 0, denom, 1.0), jnp.nan)
        return dist, cos

    return lax.map(one, pairs_Px2, batch_size=min(64, pairs_Px2.shape[0]))


def reference_curves(model: Model, params_M, pairs, alphas, x, y):
    """Ground truth: a plain loop over pairs and α, one model and one full-batch evaluation at a time."""
    forward = jax.jit(model.apply)
    loss = np.zeros((len(pairs), len(alphas)))
    err = np.zeros((len(pairs), len(alphas)))
    for p, (i, j) in enumerate(pairs):
        p_i = jax.tree.map(lambda a: a[i], params_M)
        p_j = jax.tree.map(lambda a: a[j], params_M)
        for k, alpha in enumerate(alphas):
            logits = forward(lerp(p_i, p_j, float(alpha)), x)
            loss[p, k] = float(cross_entropy(logits, y).mean())
            err[p, k] = float((jnp.argmax(logits, -1) != y).mean())
    return loss, err


# --------------------------------------------------------------------------------------------- barriers


def barrier_endpoint_mean(curve_PxA):
    curve = np.asarray(curve_PxA)
    return curve.max(axis=1) - 0.5 * (curve[:, 0] + curve[:, -1])


def barrier_linear(curve_PxA, alphas):
    curve = np.asarray(curve_PxA)
    alphas = np.asarray(alphas)[None]
    baseline = (1.0 - alphas) * curve[:, :1] + alphas * curve[:, -1:]
    return (curve - baseline).max(axis=1)


def midpoint(curve_PxA, alphas):
    """The curve at α = ½ (linearly interpolated between grid points when ½ is not on the grid)."""
    return np.array([np.interp(0.5, alphas, row) for row in np.asarray(curve_PxA)])


# --------------------------------------------------------------------------------------------- pair sets


def pairs_all(members) -> list[tuple[int, int]]:
    return list(itertools.combinations(sorted(members), 2))


def pairs_within(groups: dict) -> list[tuple[int, int]]:
    """All pairs inside each group ({key: [member, ...]})."""
    return [pair for members in groups.values() for pair in pairs_all(members)]


def read_pairs(path: str, num_members: int) -> list[tuple[int, int]]:
    """An explicit pair list: a CSV file with columns i and j, or two integers per line (comma or space separated)."""
    with open(path, newline="") as f:
        text = f.read()
    lines = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if lines and not lines[0].replace(",", " ").split()[0].lstrip("-").isdigit():
        rows = list(csv.DictReader(lines))
        if not rows or not {"i", "j"} <= set(rows[0]):
            raise ValueError(f"pair file {path}: a header must name columns i and j")
        raw = [(row["i"], row["j"]) for row in rows]
    else:
        raw = [tuple(line.replace(",", " ").split()[:2]) for line in lines]
    pairs = []
    for number, (i, j) in enumerate(raw, 1):
        try:
            pair = (int(i), int(j))
        except (TypeError, ValueError):
            raise ValueError(f"pair file {path}, pair {number}: {i!r}, {j!r} are not member indices") from None
        bad = [m for m in pair if not 0 <= m < num_members]
        if bad:
            raise ValueError(f"pair file {path}, pair {number}: member {bad[0]} out of range (the run has "
                             f"{num_members} members)")
        pairs.append(pair)
    if not pairs:
        raise ValueError(f"pair file {path} lists no pairs")
    return pairs


# --------------------------------------------------------------------------------------------- chunk size


def auto_chunk_pairs(model: Model, params_M, eval_sets, alphas, num_pairs: int, budget_bytes: int,
                     max_chunk: int = 256) -> int:
    """The largest chunk of pairs whose scratch memory fits `budget_bytes`, from XLA's own memory analysis.

    The pass is compiled (not run) at two small chunk sizes; scratch memory is affine in the chunk size, so two
    points give the cost per pair. Capped at `max_chunk` (past a few hundred pairs a chunk only costs memory) and at
    the number of pairs.
    """
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), (params_M, eval_sets))

    def scratch(chunk):
        fn = make_curves(model, alphas, chunk)
        pairs = jax.ShapeDtypeStruct((chunk, 2), jnp.int32)
        analysis = fn.lower(abstract[0], pairs, abstract[1]).compile().memory_analysis()
        return None if analysis is None else analysis.temp_size_in_bytes

    return memory.largest_fit(scratch, budget_bytes, limit=max(1, min(num_pairs, max_chunk)), probes=(1, 4))
