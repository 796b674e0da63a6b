"""Model merges of fine-tuned members relative to the parameters they were fine-tuned from: pure functions over stacked
parameters (leading member axis M) and their starts (start_M, one start per member), merged per group.

Every merge works on the members' updates τₘ = θₘ − startₘ and adds the merged update to a base, the start of the
group's first member (the members of a grid cell share their start, so which member's is immaterial there; with a
weight vector the "first" member is the lowest-indexed one with a positive weight).

  task arithmetic  base + λ·Σₘ wₘ τₘ                                     (Ilharco et al. 2023, "Editing models with
                   task arithmetic"). With 0/1 weights and λ = 1/K it is the uniform soup of the K members.
  TIES-Merging     trim each τₘ to its top-`density` fraction by magnitude, over all its parameters at once; elect
                   each coordinate's sign γ = sgn Σₘ wₘ τ̂ₘ; take the disjoint mean over the members whose trimmed
                   τ̂ₘ is non-zero with sign γ (0 where none); base + λ·merged    (Yadav et al. 2023, "TIES-Merging:
                   resolving interference when merging models"). With 0/1 weights this is the paper's unweighted
                   rule; other positive weights give mergekit's weighted form (weighted election, weighted mean).
  Model Stock      cos θ = the mean pairwise cosine between the N members' updates, t = N cos θ / (1 + (N − 1) cos θ),
                   t·(mean of the members' θ) + (1 − t)·base                       (Jang et al. 2024, "Model Stock:
                   all we need is just a few fine-tuned models"). The angle is the whole model's (all parameters
                   flattened), as the paper states it ("layer-agnostic"); mergekit computes it per tensor row instead.

Groups (grid cells) are rows of member indices idx_GxK padded with -1, or weight rows weights_GxM with zeros for
non-members (`analysis.group_weights`): a merge reads only the members a row weights, so groups of different sizes
are merged by one program. Members are flattened once to M×D updates (`_prepare`): what does not depend on the group
(the updates, TIES's magnitude ranks, Model Stock's Gram matrix) is computed once, outside the map over groups.

Hyperparameters (λ, density) are traced values, so a whole grid of them is evaluated by one compiled program; only
the method is static. `choose_on_validation` picks each group's hyperparameters on the validation set alone;
`evaluate_chosen` then evaluates the chosen merges on other sets (test, OOD).
"""
from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.flatten_util import ravel_pytree

from jaxlmc.analysis import group_weights
from jaxlmc.models import Model
from jaxlmc.train import loss_and_error

METHODS = ("task_arithmetic", "ties", "model_stock")
# The hyperparameters each method reads (all traced scalars).
HYPERS: dict[str, tuple[str, ...]] = {"task_arithmetic": ("scale",), "ties": ("density", "scale"),
                                      "model_stock": ()}

# Contractions over members and parameters in full float32: GPUs otherwise default to TF32 matmuls, whose 10-bit
# mantissa would swamp the small differences between fine-tunes of one start.
_EXACT = lax.Precision.HIGHEST


def hyper_grid(**values) -> list[dict]:
    """The product of hyperparameter values in order, the first axis slowest: hyper_grid(density=[.1, .2],
    scale=[1, 2]) -> [{density: .1, scale: 1}, {density: .1, scale: 2}, {density: .2, scale: 1}, …]."""
    names = list(values)
    return [dict(zip(names, combo)) for combo in itertools.product(*(values[n] for n in names))]


# Default search grids. λ is absolute: task arithmetic's multiplies the weighted *sum* of updates (with 0/1 weights
# λ = 1/K is the uniform soup); TIES's multiplies a disjoint *mean*, so λ = 1 is the paper's merge.
DEFAULT_GRIDS: dict[str, list[dict]] = {
    # Ilharco et al.'s grid, λ in 0.05 … 1.0: with K members of one task λ = 1/K is the uniform soup, so the grid
    # must reach well below 1/K (K = 8 seeds: 0.125) as well as above it.
    "task_arithmetic": hyper_grid(scale=[round(0.05 * k, 2) for k in range(1, 21)]),
    "ties": hyper_grid(density=[0.1, 0.2, 0.5], scale=[0.5, 1.0, 1.5, 2.0]),
    "model_stock": [{}],
}


# --------------------------------------------------------------------------------------------- flat updates


def _flat(tree_M):
    """M×D: each member's parameters as one vector (leaves in jax.tree order, each row-major)."""
    return jax.vmap(lambda tree: ravel_pytree(tree)[0])(tree_M)


def _prepare(params_M, start_M, method: str) -> dict:
    """What every group's merge shares: updates τ_MxD (each θₘ − startₘ taken coordinate by coordinate, so nearby
    fine-tunes lose nothing to cancellation), starts, the map back to a tree, and per method its group-free part."""
    if method not in METHODS:
        raise ValueError(f"unknown merge method {method!r}; expected one of {METHODS}")
    start_MxD = _flat(start_M)
    prep = {"update_MxD": _flat(params_M) - start_MxD, "start_MxD": start_MxD,
            "unravel": ravel_pytree(jax.tree.map(lambda a: a[0], params_M))[1]}
    if method == "ties":
        prep["rank_MxD"] = _magnitude_ranks(prep["update_MxD"])
    if method == "model_stock":
        prep["cos_MxM"] = _update_cosines(prep["update_MxD"])
    return prep


def _base(start_MxD, weights_M):
    """The start of the group's first member: the lowest index with a positive weight."""
    return start_MxD[jnp.argmax(weights_M > 0)]


def _magnitude_ranks(update_MxD):
    """rank_MxD: each coordinate's place when a member's |τ| is sorted decreasingly, equal magnitudes in index order
    (a stable sort), so "keep the top k" keeps exactly k coordinates, the same ones on every run. Ranks do not depend
    on the density, so one sort per member serves every density of a grid."""
    num = update_MxD.shape[1]

    def one(update_D):
        order_D = jnp.argsort(-jnp.abs(update_D), stable=True)
        return jnp.zeros((num,), jnp.int32).at[order_D].set(jnp.arange(num, dtype=jnp.int32))

    return jax.vmap(one)(update_MxD)


def _update_cosines(update_MxD):
    """cos_MxM between every two members' updates (NaN where one has zero norm). Dot products of the updates
    themselves, never ‖a‖² + ‖b‖² − 2a·b."""
    gram_MxM = jnp.einsum("md,nd->mn", update_MxD, update_MxD, precision=_EXACT)
    norm_M = jnp.sqrt(jnp.diagonal(gram_MxM))
    denom_MxM = norm_M[:, None] * norm_M[None, :]
    cos = gram_MxM / jnp.where(denom_MxM > 0, denom_MxM, 1.0)
    return jnp.where(denom_MxM > 0, jnp.clip(cos, -1.0, 1.0), jnp.nan)  # clip: rounding can leave |cos| a hair > 1


def _mean_pair_cosine(cos_MxM, member_M):
    """The mean of cos over the pairs i < j of a group's members; NaN with fewer than two members, or when a
    member's update is zero (its cosines are undefined, and a mean that silently skipped them would mislead)."""
    num = member_M.shape[0]
    upper_MxM = jnp.arange(num)[:, None] < jnp.arange(num)[None, :]
    pair_MxM = member_M[:, None] & member_M[None, :] & upper_MxM
    count = pair_MxM.sum()
    total = jnp.where(pair_MxM, cos_MxM, 0.0).sum()  # NaN cosines of members survive the where, as intended
    return jnp.where(count > 0, total / jnp.maximum(count, 1), jnp.nan)


# --------------------------------------------------------------------------------------------- merges, flat


def _task_arithmetic_flat(prep, weights_M, scale):
    update_D = jnp.einsum("m,md->d", weights_M, prep["update_MxD"], precision=_EXACT)
    return _base(prep["start_MxD"], weights_M) + scale * update_D


def _ties_flat(prep, weights_M, density, scale):
    update_MxD = prep["update_MxD"]
    num = update_MxD.shape[1]
    # k = round(density·D) (half to even) coordinates kept per member; a traced k, so densities share one program.
    keep = jnp.clip(jnp.round(density * num), 0, num)
    trimmed_MxD = jnp.where(prep["rank_MxD"] < keep, update_MxD, 0.0)
    weight_M = jnp.where(weights_M > 0, weights_M, 0.0)  # only members with a positive weight take part
    elected_D = jnp.sign(jnp.einsum("m,md->d", weight_M, trimmed_MxD, precision=_EXACT))
    # A member counts at a coordinate when it takes part, its trimmed update is non-zero and has the elected sign
    # (sign(0) = 0 never equals an elected ±1; an elected 0 — a tie — leaves the coordinate at the base).
    agree_MxD = (weight_M[:, None] > 0) & (trimmed_MxD != 0) & (jnp.sign(trimmed_MxD) == elected_D[None, :])
    w_MxD = jnp.where(agree_MxD, weight_M[:, None], 0.0)
    total_D = w_MxD.sum(axis=0)
    merged_D = (w_MxD * trimmed_MxD).sum(axis=0) / jnp.where(total_D > 0, total_D, 1.0)
    return _base(prep["start_MxD"], weights_M) + scale * merged_D


def _model_stock_flat(prep, weights_M):
    """(merged_D, t, cos). Model Stock has no member weights: a positive weight only marks a member. With one member
    (or an undefined angle: a zero update) t falls back to 1, the plain average; the returned cos stays NaN."""
    member_M = weights_M > 0
    n = member_M.sum().astype(jnp.float32)
    cos = _mean_pair_cosine(prep["cos_MxM"], member_M)
    t = jnp.where(jnp.isnan(cos), 1.0, n * cos / (1.0 + (n - 1.0) * cos))
    mean_update_D = jnp.einsum("m,md->d", member_M / jnp.maximum(n, 1.0), prep["update_MxD"], precision=_EXACT)
    # t·mean θ + (1 − t)·base = base + t·mean τ when the members share the base; written as the update form so the
    # small updates are never recovered from differences of large weights.
    return _base(prep["start_MxD"], weights_M) + t * mean_update_D, t, cos


def _merge_flat(method: str, prep, weights_M, hyper: dict):
    """(merged_D, aux): one group's merge; aux holds Model Stock's t and cos (empty for the other methods)."""
    if method == "task_arithmetic":
        return _task_arithmetic_flat(prep, weights_M, hyper["scale"]), {}
    if method == "ties":
        return _ties_flat(prep, weights_M, hyper["density"], hyper["scale"]), {}
    merged, t, cos = _model_stock_flat(prep, weights_M)
    return merged, {"t": t, "cos": cos}


# --------------------------------------------------------------------------------------------- public merges


@jax.jit
def task_arithmetic(params_M, start_M, weights_M, scale):
    """base + scale·Σₘ wₘ (θₘ − startₘ): one merged parameter tree."""
    prep = _prepare(params_M, start_M, "task_arithmetic")
    return prep["unravel"](_task_arithmetic_flat(prep, weights_M, scale))


@jax.jit
def ties(params_M, start_M, weights_M, density, scale):
    """TIES-Merging of the members with a positive weight: one merged parameter tree (see the module docstring)."""
    prep = _prepare(params_M, start_M, "ties")
    return prep["unravel"](_ties_flat(prep, weights_M, density, scale))


@jax.jit
def model_stock(params_M, start_M, weights_M):
    """(merged params, t, cos θ) of Model Stock over the members with a positive weight, with the whole-model angle."""
    prep = _prepare(params_M, start_M, "model_stock")
    merged, t, cos = _model_stock_flat(prep, weights_M)
    return prep["unravel"](merged), t, cos


def _member_mask(idx_GxK, num_members: int):
    """member_GxM: which members each row of idx_GxK names (-1 names none; a one-hot compare, never a scatter, which
    would wrap -1 round to the last member)."""
    idx = jnp.asarray(idx_GxK)
    return (idx[:, :, None] == jnp.arange(num_members)[None, None, :]).any(axis=1)


@jax.jit
def mean_update_cosine(params_M, start_M, idx_GxK):
    """cos_G: per group, the mean over pairs of its members of the cosine between their updates θ − start (NaN for a
    group with fewer than two members or a zero update)."""
    update_MxD = _flat(params_M) - _flat(start_M)
    cos_MxM = _update_cosines(update_MxD)
    return jax.vmap(_mean_pair_cosine, in_axes=(None, 0))(cos_MxM, _member_mask(idx_GxK, update_MxD.shape[0]))


def merge_groups(params_M, start_M, weights_GxM, method: str, hyper: dict | None = None):
    """(merged params_G, aux_G): every group's merge, stacked on a leading group axis, walked with `lax.map`.
    `hyper` maps each of HYPERS[method] to a scalar or a per-group array [G]; aux_G holds Model Stock's t_G and cos_G.
    """
    return _merge_groups(params_M, start_M, jnp.asarray(weights_GxM), method, _check_hyper(method, hyper or {}))


def _check_hyper(method: str, hyper: dict) -> dict:
    if method not in METHODS:
        raise ValueError(f"unknown merge method {method!r}; expected one of {METHODS}")
    if set(hyper) != set(HYPERS[method]):
        raise ValueError(f"{method} takes hyperparameters {sorted(HYPERS[method])}, got {sorted(hyper)}")
    return {name: jnp.asarray(value, jnp.float32) for name, value in hyper.items()}


@functools.partial(jax.jit, static_argnames="method")
def _merge_groups(params_M, start_M, weights_GxM, method, hyper):
    prep = _prepare(params_M, start_M, method)
    num_groups = weights_GxM.shape[0]
    hyper_G = {name: jnp.broadcast_to(value, (num_groups,)) for name, value in hyper.items()}

    def one(args):
        merged, aux = _merge_flat(method, prep, *args)
        return prep["unravel"](merged), aux

    return lax.map(one, (weights_GxM, hyper_G))


# --------------------------------------------------------------------------------------------- evaluation


def make_merged_eval(model: Model, batch_merges: int = 8):
    """jit(params_M, start_M, weights_GxM, eval_set, method, hyper_GxH) -> (loss_GxH, acc_GxH): the loss and accuracy
    of H merges of each of G groups on one evaluation set (`train.batch_eval_set`).

    `hyper_GxH` maps each of HYPERS[method] to a G×H array (a grid broadcast over groups, or G×1 per-group choices);
    Model Stock takes {} and gives H = 1. `method` is static; the hyperparameters are traced, so a whole grid shares
    one compiled program. The G·H merges are walked with `lax.map`, `batch_merges` of them vmapped at a time, so
    memory holds a few merged models, never all of them. With resample weights in the set, the outputs gain the
    [1 + R] axis of `loss_and_error`.
    """

    def evaluate(params_M, start_M, weights_GxM, eval_set, method, hyper_GxH):
        prep = _prepare(params_M, start_M, method)
        num_groups = weights_GxM.shape[0]
        per_group = max([v.shape[1] for v in hyper_GxH.values()], default=1)
        # One job per (group, setting), group-major: the rows of the output.
        weights_JxM = jnp.repeat(weights_GxM, per_group, axis=0)
        hyper_J = {name: jnp.broadcast_to(v, (num_groups, per_group)).reshape(-1) for name, v in hyper_GxH.items()}

        def one(args):
            merged, _ = _merge_flat(method, prep, *args)
            loss, err = loss_and_error(model, prep["unravel"](merged), eval_set)
            return loss, 1.0 - err

        num_jobs = num_groups * per_group
        loss_J, acc_J = lax.map(one, (weights_JxM, hyper_J), batch_size=min(batch_merges, num_jobs))
        shape = (num_groups, per_group) + loss_J.shape[1:]
        return loss_J.reshape(shape), acc_J.reshape(shape)

    jitted = jax.jit(evaluate, static_argnames="method")

    def call(params_M, start_M, weights_GxM, eval_set, method: str, hyper_GxH: dict):
        return jitted(params_M, start_M, jnp.asarray(weights_GxM), eval_set, method,
                      {k: jnp.atleast_2d(v) for k, v in _check_hyper(method, hyper_GxH).items()})

    return call


def _grid_arrays(method: str, grid: list[dict], num_groups: int) -> dict:
    """{name: G×H} of a grid shared by every group."""
    for setting in grid:
        if set(setting) != set(HYPERS[method]):
            raise ValueError(f"{method} takes hyperparameters {sorted(HYPERS[method])}, got {sorted(setting)}")
    return {name: np.tile(np.array([s[name] for s in grid], np.float32), (num_groups, 1)) for name in HYPERS[method]}


def choose_on_validation(model: Model, params_M, start_M, idx_GxK: np.ndarray, val_set, method: str,
                         grid: list[dict] | None = None, merged_eval=None) -> dict:
    """Each group's hyperparameters for `method`, chosen on the validation set `val_set` and on nothing else: the
    setting of `grid` (default DEFAULT_GRIDS[method]) with the highest validation accuracy, equal accuracies going to
    the first in grid order. `merged_eval` (from make_merged_eval) may be passed to share its compiled program.

    Returns {"index_G": int, "hyper": {name: value_G}, "val_acc_GxH", "val_loss_GxH", "grid"}; a group with no
    member gets index -1, NaN hyperparameters and NaN accuracies. Evaluate other sets with `evaluate_chosen`.
    """
    grid = DEFAULT_GRIDS[method] if grid is None else list(grid)
    if not grid:
        raise ValueError("an empty hyperparameter grid")
    merged_eval = merged_eval or make_merged_eval(model)
    weights_GxM = group_weights(idx_GxK, _num_members(params_M))
    usable_G = weights_GxM.sum(axis=1) > 0
    num_groups = len(weights_GxM)
    acc = np.full((num_groups, len(grid)), np.nan)
    loss = np.full((num_groups, len(grid)), np.nan)
    if usable_G.any():
        hyper = _grid_arrays(method, grid, int(usable_G.sum()))
        loss_u, acc_u = merged_eval(params_M, start_M, weights_GxM[usable_G], val_set, method, hyper)
        loss[usable_G], acc[usable_G] = _plain(loss_u), _plain(acc_u)  # Model Stock's G×1 fills its one-point grid
    # argmax takes the first of equal maxima: grid order breaks ties. NaN (a diverged merge) never wins.
    index_G = np.where(usable_G, np.where(np.isnan(acc), -np.inf, acc).argmax(axis=1), -1)
    chosen = {name: np.where(usable_G, np.array([s[name] for s in grid], np.float32)[np.maximum(index_G, 0)],
                             np.nan).astype(np.float32) for name in HYPERS[method]}
    return {"index_G": index_G, "hyper": chosen, "val_acc_GxH": acc, "val_loss_GxH": loss, "grid": grid}


def evaluate_chosen(model: Model, params_M, start_M, idx_GxK: np.ndarray, method: str, choice: dict,
                    eval_sets: dict, merged_eval=None) -> dict:
    """{name: (loss_G, acc_G)}: each group's merge at the hyperparameters `choose_on_validation` chose for it,
    evaluated on each set of `eval_sets` (test, OOD, …); NaN for a group with no member."""
    merged_eval = merged_eval or make_merged_eval(model)
    weights_GxM = group_weights(idx_GxK, _num_members(params_M))
    usable_G = weights_GxM.sum(axis=1) > 0
    hyper = {name: np.asarray(v)[usable_G][:, None] for name, v in choice["hyper"].items()}
    out = {}
    for name, eval_set in eval_sets.items():
        loss = np.full(len(weights_GxM), np.nan)
        acc = np.full(len(weights_GxM), np.nan)
        if usable_G.any():
            loss_u, acc_u = merged_eval(params_M, start_M, weights_GxM[usable_G], eval_set, method, hyper)
            loss[usable_G], acc[usable_G] = _plain(loss_u)[:, 0], _plain(acc_u)[:, 0]
        out[name] = (loss, acc)
    return out



def _num_members(params_M) -> int:
    return jax.tree.leaves(params_M)[0].shape[0]


def _plain(values) -> np.ndarray:
    """G×H of the plain means: with resample weights in the set (a trailing [1 + R] axis), its first entry."""
    values = np.asarray(values)
    return values[..., 0] if values.ndim == 3 else values
