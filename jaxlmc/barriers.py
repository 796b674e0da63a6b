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

from jaxlmc import memory, paths
from jaxlmc.models import Model
from jaxlmc.paths import lerp, pair_endpoints
from jaxlmc.train import mean_accuracy, mean_loss

__all__ = ["alpha_grid", "auto_chunk_pairs", "barrier_endpoint_mean", "barrier_linear", "lerp", "make_curves",
           "make_layer_curves", "midpoint", "pair_endpoints", "pair_geometry", "pairs_all", "pairs_within",
           "read_pairs", "reference_curves", "reference_layer_curves"]


def alpha_grid(num_alphas: int) -> np.ndarray:
    if num_alphas < 3:
        raise ValueError(f"an α grid needs at least 3 points (the ends and one interior point), got {num_alphas}")
    return np.linspace(0.0, 1.0, num_alphas, dtype=np.float32)


def make_curves(model: Model, alphas: np.ndarray, chunk_pairs: int, mesh=None, repair_x=None, tick=None):
    """jit(params_M, pairs_Px2, eval_sets[, perms]) -> {name: (loss_PxA, err_PxA)}: the straight line between the
    members of every pair on the full α grid (jaxlmc.paths.make_path_eval), member i and j themselves at the ends
    (one evaluation per member).

    `eval_sets` maps a name to a set from `train.batch_eval_set`; with a `mesh` the pairs are split over its devices.
    Given perms (jaxlmc.permute.match_pairs: one [P, width] array per hidden layer), member j of each pair is
    permuted onto member i inside the pass before interpolating. With `repair_x` (training examples), every interior
    point is renormalised by REPAIR (jaxlmc.repair) on those examples before it is evaluated. `tick()` is called once
    per pair evaluated (a progress bar's).
    """
    path = paths.straight() if repair_x is None else paths.repaired(model, repair_x)
    return paths.make_path_eval(model, path, alphas, chunk_pairs, mesh, tick)


def make_layer_curves(model: Model, alphas: np.ndarray, chunk_pairs: int, groups: dict[str, list[str]], mesh=None):
    """jit(params_M, pairs_Px2, eval_sets[, perms]) -> {name: (loss_PxGxA, err_PxGxA)}: layer-wise interpolation
    (Adilova et al. 2024, jaxlmc.paths.layer_wise) of every pair, for every layer group and α in one compiled pass.

    For group g the network is member i with only g's parameters interpolated; at α = 1 it is member i with member
    j's layer g, not member j, so the whole grid except α = 0 (member i itself, shared by every group) is evaluated,
    and barriers are read against that curve's own ends. `groups` is Model.layer_groups (every top-level parameter
    key in exactly one group). With `perms`, member j is weight-matched onto member i first, as in make_curves.
    """
    return paths.make_path_eval(model, paths.layer_wise(groups), alphas, chunk_pairs, mesh)


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
                loss[p, g, k] = float(mean_loss(logits, y))
                err[p, g, k] = 1.0 - float(mean_accuracy(logits, y))
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
            loss[p, k] = float(mean_loss(logits, y))
            err[p, k] = 1.0 - float(mean_accuracy(logits, y))
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


def pairs_ring(groups: dict, k: int) -> list[tuple[int, int]]:
    """Inside each group ({key: [member, ...]}, in seed order), each member with its next k, cyclically: every member
    sits in 2k pairs (all pairs once k ≥ (n − 1)/2), so seeds stay the units at O(n·k) pairs instead of O(n²)."""
    out = []
    for members in groups.values():
        n = len(members)
        ring = {tuple(sorted((members[s], members[(s + d) % n]))) for s in range(n) for d in range(1, min(k, n - 1) + 1)}
        out += sorted(ring)
    return out


def pair_design(spec: str, groups: dict, num_members: int) -> list[tuple[int, int]] | None:
    """The pairs of a named design — "within" (all pairs inside each group), "ring:K" (`pairs_ring`) or "all" —, or
    None when `spec` names none."""
    if spec == "within":
        return pairs_within(groups)
    if spec == "all":
        return pairs_all(range(num_members))
    if spec.startswith("ring:"):
        k = spec[len("ring:"):]
        if not k.isdigit() or int(k) < 1:
            raise ValueError(f'pairs: {spec!r}: a ring design is "ring:K" with K a positive integer (each member paired '
                             "with its next K seeds in its cell)")
        return pairs_ring(groups, int(k))
    return None


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
        pairs.append(pair)
    if not pairs:
        raise ValueError(f"pair file {path} lists no pairs")
    return check_pairs(pairs, num_members, f"pair file {path}, ")


def check_pairs(pairs: list[tuple[int, int]], num_members: int, where: str = "") -> list[tuple[int, int]]:
    """`pairs`, refused in one line (ValueError; `where` prefixes it) when one names a member out of range, pairs a
    member with itself, or repeats an earlier pair, either way round (the straight line between (i, j) is that of
    (j, i) reversed: one barrier, and a repeated pair would count twice in a cell's mean)."""
    seen: dict = {}
    for number, pair in enumerate(pairs, 1):
        bad = [m for m in pair if not 0 <= m < num_members]
        if bad:
            raise ValueError(f"{where}pair {number}: member {bad[0]} out of range (there are {num_members} members)")
        if pair[0] == pair[1]:
            raise ValueError(f"{where}pair {number}: {pair} pairs member {pair[0]} with itself")
        key = tuple(sorted(pair))
        if key in seen:
            raise ValueError(f"{where}pair {number}: {pair} repeats pair {seen[key]} (the same two members"
                             f"{' the other way round' if pair != pairs[seen[key] - 1] else ''})")
        seen[key] = number
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
