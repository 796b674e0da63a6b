"""One pair evaluator for every path between two members: the straight line, the straight line renormalised by
REPAIR, layer-wise interpolation and a trained Bezier curve are each a `Path` — how a pair's context is prepared and
which network sits at a point α — and `make_path_eval` evaluates any of them for all pairs × points × evaluation
batches in one compiled function: a pair's points vmapped, chunks of pairs walked by `lax.map` (memory grows with
the chunk, never with the number of pairs), pairs split over the devices of a mesh with `jax.shard_map`.

The points a path shares with the members themselves (the straight line's α = 0 and 1) are evaluated once per
member, not once per pair. Definitions: docs/science.md ("Interpolation and the two barrier forms").
"""
from __future__ import annotations

import dataclasses
from typing import Callable

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
from jaxlmc.train import loss_and_error


def lerp(params_i, params_j, alpha):
    return jax.tree.map(lambda a, b: (1.0 - alpha) * a + alpha * b, params_i, params_j)


def bezier(p_i, p_b, p_j, t):
    """φ(t) = (1 − t)²·p_i + 2t(1 − t)·p_b + t²·p_j, leaf by leaf (one pair's parameter trees, a scalar t)."""
    return jax.tree.map(lambda a, b, c: (1.0 - t) ** 2 * a + (2.0 * t * (1.0 - t)) * b + t ** 2 * c, p_i, p_b, p_j)


def pair_endpoints(model: Model, params_M, pair_2, perm_list=None):
    """(θᵢ, θⱼ) of one pair: member i and member j, the latter permuted onto member i when `perm_list` (one array
    [units] per permutation group) is given."""
    p_i = jax.tree.map(lambda a: a[pair_2[0]], params_M)
    p_j = jax.tree.map(lambda a: a[pair_2[1]], params_M)
    if perm_list is not None:
        p_j = permute(p_j, perm_list, model.permutation_spec())
    return p_i, p_j


@dataclasses.dataclass(frozen=True)
class Path:
    """A way from member i to member j.

    `prepare(p_i, p_j, extra)` builds a pair's context once (its endpoints, REPAIR's unit statistics, a trained
    bend: `extra` is the pair's slice of the evaluator's per-pair argument); `point(context, variant, alpha)` is the
    network at α, for each of `variants` paths per pair (layer-wise: one per layer group; None: one path, and no
    variant axis in the output). `members_at_ends`: the network at α = 0 and α = 1 is member i and member j
    themselves, evaluated once per member; otherwise every α is evaluated on the path, except α = 0 with
    `member_at_start` (member i itself, evaluated once per pair and shared by the variants)."""

    name: str
    prepare: Callable
    point: Callable
    variants: int | None = None
    members_at_ends: bool = True
    member_at_start: bool = False


def straight() -> Path:
    return Path("straight", lambda p_i, p_j, extra: (p_i, p_j), lambda ctx, v, alpha: lerp(*ctx, alpha))


def repaired(model: Model, x) -> Path:
    """The straight line with every interior point renormalised by REPAIR (jaxlmc.repair) on the examples `x`."""

    def prepare(p_i, p_j, extra):
        return p_i, p_j, unit_stats(model, p_i, x), unit_stats(model, p_j, x)

    def point(ctx, v, alpha):
        p_i, p_j, stats_i, stats_j = ctx
        return repair(model, lerp(p_i, p_j, alpha), stats_i, stats_j, alpha, x)

    return Path("repair", prepare, point)


def layer_wise(groups: dict[str, list[str]]) -> Path:
    """Layer-wise interpolation (Adilova et al. 2024): for group g, member i with only g's top-level parameter keys
    interpolated towards member j. At α = 1 that is member i with member j's layer g, not member j: every α but 0 is
    evaluated on the path."""
    names = list(groups)

    def point(ctx, g, alpha):
        p_i, p_j = ctx
        keys = list(p_i)
        # coef_GxK[g, k] = 1 where parameter key k belongs to layer group g: each key mixes at α times its row.
        coef_K = jnp.asarray([[1.0 if key in groups[name] else 0.0 for key in keys] for name in names])[g]
        return {key: lerp(p_i[key], p_j[key], alpha * coef_K[k]) for k, key in enumerate(keys)}

    return Path("layerwise", lambda p_i, p_j, extra: (p_i, p_j), point, variants=len(names), members_at_ends=False,
                member_at_start=True)


def bezier_curve() -> Path:
    """A quadratic Bezier curve through each pair's trained bend (jaxlmc.curves), given as the per-pair argument.
    Every point is the curve itself: φ(0) is member i bit for bit, φ(1) member j (aligned, when aligning)."""
    return Path("curve", lambda p_i, p_j, bend: (p_i, bend, p_j), lambda ctx, v, t: bezier(*ctx, t),
                members_at_ends=False)


def alpha_grid(num_alphas: int) -> np.ndarray:
    if num_alphas < 3:
        raise ValueError(f"an α grid needs at least 3 points (the ends and one interior point), got {num_alphas}")
    return np.linspace(0.0, 1.0, num_alphas, dtype=np.float32)


def check_grid(alphas) -> np.ndarray:
    """The α grid as float32, refused unless it increases from 0 to 1."""
    alphas = np.asarray(alphas, np.float32)
    if alphas.ndim != 1 or len(alphas) < 2 or alphas[0] != 0.0 or alphas[-1] != 1.0 or np.any(np.diff(alphas) <= 0):
        raise ValueError("alphas must increase from 0 to 1")
    return alphas


def make_path_eval(model: Model, path: Path, alphas, chunk_pairs: int, mesh=None, tick=None):
    """jit(params_M, pairs_Px2, eval_sets, perms=None, extra_P=None) -> {name: (loss, err)}, each P×A (P×G×A with
    variants; a trailing [1 + R] axis for a set with resample weights), on the full α grid.

    `eval_sets` maps a name to a set from `train.batch_eval_set`; `extra_P` is the path's per-pair argument (a
    Bezier curve's bends), `perms` (jaxlmc.permute: one [P, units] array per group) permutes member j onto member
    i before the path is built. With a `mesh` (jaxlmc.shard) the pairs are padded to a multiple of its size and
    split over its devices; every device holds all members (no communication at all). `tick` (a host function) is
    called once per pair after its evaluation (never for padding), possibly from several threads: a progress bar's.
    """
    alphas = check_grid(alphas)
    if chunk_pairs < 1:
        raise ValueError(f"chunk_pairs must be positive, got {chunk_pairs}")
    on_path = jnp.asarray(alphas[1:-1] if path.members_at_ends else alphas[1:] if path.member_at_start else alphas)

    def run(params_M, pairs_Px2, eval_sets, perms=None, extra_P=None):
        def evaluate(params):  # one network on every set: {name: (loss, err)}
            return {name: loss_and_error(model, params, s) for name, s in eval_sets.items()}

        def on_pair(args):
            pair_2, extra, perm_list = args
            p_i, p_j = pair_endpoints(model, params_M, pair_2, perm_list)
            ctx = path.prepare(p_i, p_j, extra)
            along = lambda v: jax.vmap(lambda a: evaluate(path.point(ctx, v, a)))(on_path)  # noqa: E731
            if path.variants is None:
                return done(pair_2, along(None))
            inner = jax.vmap(along)(jnp.arange(path.variants))
            if not path.member_at_start:
                return done(pair_2, inner)
            start = evaluate(p_i)
            return done(pair_2, jax.tree.map(lambda s0, g: jnp.concatenate(
                [jnp.broadcast_to(s0, (path.variants, 1, *s0.shape)), g], axis=1), start, inner))

        def done(pair_2, result):
            """`result`, with `tick` called once it is computed (it reads the result); never for a padding pair,
            (0, 0): no real pair joins a member with itself."""
            if tick is not None:
                jax.debug.callback(lambda pair, _: None if pair[0] == pair[1] else tick(), pair_2,
                                   jax.tree.leaves(result)[0])
            return result

        inner_P = lax.map(on_pair, (pairs_Px2, extra_P, perms), batch_size=min(chunk_pairs, pairs_Px2.shape[0]))
        if not path.members_at_ends:
            return inner_P
        num_members = jax.tree.leaves(params_M)[0].shape[0]
        ends_M = lax.map(evaluate, params_M, batch_size=min(chunk_pairs, num_members))
        i, j = pairs_Px2[:, 0], pairs_Px2[:, 1]
        full = lambda end_M, inner: jnp.concatenate([end_M[i][:, None], inner, end_M[j][:, None]], axis=1)  # noqa
        return jax.tree.map(full, ends_M, inner_P)

    if mesh is None:
        return jax.jit(run)

    def sharded(params_M, pairs_Px2, eval_sets, perms=None, extra_P=None):
        num_pairs = pairs_Px2.shape[0]
        pad = lambda a: jnp.concatenate([a, jnp.zeros(((-num_pairs) % mesh.size, *a.shape[1:]), a.dtype)])  # noqa
        per_pair = PartitionSpec(MEMBERS)
        local = jax.shard_map(run, mesh=mesh, in_specs=(PartitionSpec(), per_pair, PartitionSpec(), per_pair,
                                                        per_pair), out_specs=per_pair)
        padded = [None if tree is None else jax.tree.map(pad, tree) for tree in (perms, extra_P)]
        return jax.tree.map(lambda a: a[:num_pairs], local(params_M, pad(pairs_Px2), eval_sets, *padded))

    return jax.jit(sharded)


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


def auto_chunk_pairs(model: Model, params_M, eval_sets, alphas, num_pairs: int, budget_bytes: int,
                     max_chunk: int = 256) -> int:
    """The largest chunk of pairs whose scratch memory fits `budget_bytes`, from XLA's own memory analysis.

    The pass is compiled (not run) at two small chunk sizes; scratch memory is affine in the chunk size, so two
    points give the cost per pair. Capped at `max_chunk` (past a few hundred pairs a chunk only costs memory) and at
    the number of pairs.
    """
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), (params_M, eval_sets))

    def scratch(chunk):
        fn = make_path_eval(model, straight(), alphas, chunk)
        pairs = jax.ShapeDtypeStruct((chunk, 2), jnp.int32)
        analysis = fn.lower(abstract[0], pairs, abstract[1]).compile().memory_analysis()
        return None if analysis is None else analysis.temp_size_in_bytes

    return memory.largest_fit(scratch, budget_bytes, limit=max(1, min(num_pairs, max_chunk)), probes=(1, 4))
