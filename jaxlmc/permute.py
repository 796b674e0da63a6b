"""Barriers modulo permutation: weight matching and activation matching (Git Re-Basin, Ainsworth et al. 2023).

Hidden units can be relabelled without changing the function a network computes. Hidden layer k's units form one
permutation, P_k; the model kind's permutation spec (jaxlmc.models) says which parameter axes it indexes: for the
MLP and CNN, layer k's kernel (output axis) and bias, its LayerNorm's scale and bias, and the input axis of the next
layer's kernel — for a CNN's head, the channel axis of the flattened (positions × channels) features. Nothing here
reads parameter names: a kind without a spec cannot be aligned, and says so.

Weight matching aligns network B to network A by coordinate descent: for each P_k in turn, with the others fixed,
maximise Σ ⟨A, P_k·B⟩ over every parameter P_k touches — a linear assignment problem (scipy's solver on the host);
repeat until no permutation changes. The cost matrices of many pairs are built together, vmapped, on the device.

Activation matching (Ainsworth et al. 2023, §3.1) aligns B to A by what the units compute instead: on a set of
examples, the cost of pairing A's unit u with B's unit v is the Pearson correlation of their activations (the model
kind's `unit_activations`: one array per permutation group, examples × units × features, summed over a unit's
features), and each group's permutation is one linear assignment maximising the summed correlation — no coordinate
descent, the groups do not interact. Both methods return permutations in the same convention (`permute` applies
them to member j to align it with member i).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from scipy.optimize import linear_sum_assignment

from jaxlmc.models import Model, PermutationSpec, UnitAxis, get_path, set_path


def _units_first(w, entry: UnitAxis, width: int):
    """The array with the units' axis moved to the front: [width, …] (a blocked axis is split into blocks × width
    first, keeping the blocks in place)."""
    axis = entry.axis
    if entry.blocks > 1:
        w = w.reshape(*w.shape[:axis], entry.blocks, width, *w.shape[axis + 1:])
        axis += 1
    return jnp.moveaxis(w, axis, 0)


def permute(params: dict, perms: list, spec: PermutationSpec) -> dict:
    """params with hidden layer k's units reordered by perms[k] (unit u of the result is unit perms[k][u])."""
    out = dict(params)
    for entries, perm in zip(spec, perms):
        width = perm.shape[0]
        for entry in entries:
            w = get_path(out, entry.path)
            if entry.blocks > 1:
                shaped = w.reshape(*w.shape[:entry.axis], entry.blocks, width, *w.shape[entry.axis + 1:])
                moved = jnp.take(shaped, perm, axis=entry.axis + 1).reshape(w.shape)
            else:
                moved = jnp.take(w, perm, axis=entry.axis)
            out = set_path(out, entry.path, moved)
    return out


def _width(params: dict, entries: list[UnitAxis]) -> int:
    first = entries[0]
    return get_path(params, first.path).shape[first.axis] // first.blocks


def _cost(params_a: dict, params_b: dict, k: int, spec: PermutationSpec) -> jax.Array:
    """C[u, v] = Σ ⟨unit u of A, unit v of B⟩ over every parameter that hidden layer k's units index."""
    width = _width(params_a, spec[k])
    total = jnp.zeros((width, width), jnp.float32)
    for entry in spec[k]:
        a = _units_first(get_path(params_a, entry.path), entry, width).reshape(width, -1)
        b = _units_first(get_path(params_b, entry.path), entry, width).reshape(width, -1)
        total = total + a @ b.T
    return total


def _identity_perms(model: Model, params_M: dict, pairs):
    """(spec, pairs_Px2, widths, perms): the permutation spec, the pairs as an array, each group's width, and the
    identity permutation of every group for every pair (where matching starts, and what it returns without pairs)."""
    spec = model.permutation_spec()
    pairs = np.asarray(pairs, np.int32).reshape(-1, 2)
    one = jax.tree.map(lambda a: a[0], params_M)
    widths = [_width(one, entries) for entries in spec]
    return spec, pairs, widths, [np.tile(np.arange(w, dtype=np.int32), (len(pairs), 1)) for w in widths]


def match_pairs(model: Model, params_M: dict, pairs, max_iterations: int = 20, seed: int = 0) -> list[np.ndarray]:
    """Weight matching of member j to member i for every pair (i, j): perms[k] of shape [pairs, width_k].

    The model's kind supplies the permutation spec (ValueError for a kind that declares none). All pairs move in
    lock-step: per layer, one vmapped device call builds every pair's cost matrix with the other layers' current
    permutations applied; the assignments run on the host.
    """
    spec, pairs, widths, perms = _identity_perms(model, params_M, pairs)
    if not spec or len(pairs) == 0:
        return perms
    i_idx, j_idx = jnp.asarray(pairs[:, 0]), jnp.asarray(pairs[:, 1])

    @jax.jit(static_argnums=2)
    def costs(params_M, perms, k):
        def one_pair(i, j, perm_list):
            a = jax.tree.map(lambda x: x[i], params_M)
            b = jax.tree.map(lambda x: x[j], params_M)
            # Every layer but k permuted; layer k left as is, so the cost is against B's own unit order.
            fixed = [jnp.arange(p.shape[0]) if n == k else p for n, p in enumerate(perm_list)]
            return _cost(a, permute(b, fixed, spec), k, spec)

        return jax.vmap(one_pair)(i_idx, j_idx, perms)

    rng = np.random.default_rng(seed)
    for _ in range(max_iterations):
        changed = False
        for k in rng.permutation(len(spec)):
            c = np.asarray(costs(params_M, [jnp.asarray(p) for p in perms], int(k)))
            for p in range(len(pairs)):
                _, cols = linear_sum_assignment(c[p], maximize=True)
                if not np.array_equal(cols, perms[k][p]):
                    old = c[p][np.arange(widths[k]), perms[k][p]].sum()
                    new = c[p][np.arange(widths[k]), cols].sum()
                    if new > old + 1e-6 * abs(old):
                        perms[k][p] = cols
                        changed = True
        if not changed:
            break
    return perms


def _grouped_activations(model: Model, params_M: dict, x) -> list[jax.Array]:
    """Every member's unit activations on the batch x, per group M × N × units × F (a unit's features flattened,
    F = 1 where it has none)."""
    acts = jax.vmap(lambda p: model.unit_activations(p, x))(params_M)
    return [a.reshape(*a.shape[:3], -1) for a in acts]


def _products(z, i, j):
    """Σ over examples and features of member i's standardised units (rows) times member j's (columns)."""
    return jnp.einsum("nuf,nvf->uv", z[i], z[j], precision=jax.lax.Precision.HIGHEST)


def activation_correlations(model: Model, params_M: dict, pairs, x, batch_size: int = 256,
                            eps: float = 1e-8) -> list[jax.Array]:
    """For every pair (i, j) and permutation group k: C[k][p, u, v] = Σ_f corr(unit u of member i, unit v of member
    j) over the examples `x` (positions folded in where the kind has them), f running over a unit's features.

    Correlations are Pearson's: each unit (and feature) is standardised over all examples, with `eps` added to its
    standard deviation, so a dead unit (constant) correlates 0 with everything. Two passes over `x` in batches of
    `batch_size` examples bound the memory: the first accumulates every member's means and variances (Chan's
    pairwise update), the second every pair's products of standardised activations. Each batch's activations are
    computed for all members at once (vmapped, one jitted function: the last batch is padded and its padding
    weighted 0, so nothing recompiles), and every pair's matrices on the device (vmapped over pairs). Peak memory
    grows with `batch_size` × positions (a sequence's tokens, a signal's positions) × units, times the members for
    the activations and the pairs for the products: lower `batch_size` for long sequences or many pairs.
    """
    pairs = np.asarray(pairs, np.int32).reshape(-1, 2)
    x = np.asarray(x)
    n = len(x)
    if n < 2:
        raise ValueError(f"activation matching needs at least 2 examples, got {n}")
    size = min(batch_size, n)
    i_idx, j_idx = jnp.asarray(pairs[:, 0]), jnp.asarray(pairs[:, 1])

    def batches():
        for start in range(0, n, size):
            xb = x[start:start + size]
            real = len(xb)
            if real < size:  # pad with copies of the last example, weighted 0
                xb = np.concatenate([xb, np.repeat(xb[-1:], size - real, axis=0)])
            yield jnp.asarray(xb), jnp.asarray(np.arange(size) < real, jnp.float32)

    activations = jax.jit(lambda params_M, xb: _grouped_activations(model, params_M, xb))

    def row_weights(keep, a):
        # Rows are example-major (an example's positions are consecutive): each example's weight, per row.
        return jnp.repeat(keep, a.shape[1] // keep.shape[0]).reshape(1, -1, 1, 1)

    @jax.jit
    def moments(acts, keep, state):
        out = []
        for a, (count, mean, m2) in zip(acts, state):
            w = row_weights(keep, a)
            count_b = jnp.sum(w)
            mean_b = jnp.sum(w * a, axis=1) / count_b
            m2_b = jnp.sum(w * jnp.square(a - mean_b[:, None]), axis=1)
            total = count + count_b
            delta = mean_b - mean
            m2 = m2 + m2_b + jnp.square(delta) * (count * count_b / total)
            out.append((total, mean + delta * (count_b / total), m2))
        return out

    @jax.jit
    def products(acts, keep, standard, sums):
        out = []
        for a, (mean, inv_std), total in zip(acts, standard, sums):
            z = (a - mean[:, None]) * inv_std[:, None] * row_weights(keep, a)  # M × N × units × F
            out.append(total + jax.vmap(_products, in_axes=(None, 0, 0))(z, i_idx, j_idx))
        return out

    state = sums = None
    for xb, keep in batches():
        acts = activations(params_M, xb)
        if state is None:
            state = [(jnp.zeros((), jnp.float32),) + (jnp.zeros((a.shape[0], *a.shape[2:]), jnp.float32),) * 2
                     for a in acts]
            sums = [jnp.zeros((len(pairs), a.shape[2], a.shape[2]), jnp.float32) for a in acts]
        state = moments(acts, keep, state)
    standard = [(mean, 1.0 / (jnp.sqrt(m2 / count) + eps)) for count, mean, m2 in state]
    for xb, keep in batches():
        sums = products(activations(params_M, xb), keep, standard, sums)
    # count: the examples times their positions, the same for every member.
    return [total / count for total, (count, _, _) in zip(sums, state)]


def match_activations(model: Model, params_M: dict, pairs, x, batch_size: int = 256,
                      eps: float = 1e-8) -> list[np.ndarray]:
    """Activation matching of member j to member i for every pair (i, j) on the examples `x`: perms[k] of shape
    [pairs, width_k], in `match_pairs`'s format and convention (`permute(params_j, [perms[k][p] …], spec)` aligns
    member j to member i).

    Per group, the cost is `activation_correlations` (Pearson, summed over a unit's features — a transformer head's
    dimensions, the residual stream's sites) and the permutation the assignment that maximises it (scipy, on the
    host): unit u of the aligned member is member j's unit best correlated with member i's unit u.
    """
    spec, pairs, widths, perms = _identity_perms(model, params_M, pairs)
    if not spec or len(pairs) == 0:
        return perms
    costs = activation_correlations(model, params_M, pairs, x, batch_size, eps)
    got = [c.shape[-1] for c in costs]
    if got != widths:
        raise ValueError(f"model kind {model.kind.name!r}: unit_activations gives {got} units per group, its "
                         f"permutation spec {widths}")
    for k, cost in enumerate(costs):
        cost = np.asarray(cost)
        for p in range(len(pairs)):
            _, cols = linear_sum_assignment(cost[p], maximize=True)
            perms[k][p] = cols
    return perms
