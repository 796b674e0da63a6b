"""Barriers modulo permutation: weight matching (Git Re-Basin, Ainsworth et al. 2023) for jaxlmc's models.

Hidden units can be relabelled without changing the function a network computes. Hidden layer k's units form one
permutation, P_k; the model kind's permutation spec (jaxlmc.models) says which parameter axes it indexes: for the
MLP and CNN, layer k's kernel (output axis) and bias, its LayerNorm's scale and bias, and the input axis of the next
layer's kernel — for a CNN's head, the channel axis of the flattened (positions × channels) features. Nothing here
reads parameter names: a kind without a spec cannot be aligned, and says so.

Weight matching aligns network B to network A by coordinate descent: for each P_k in turn, with the others fixed,
maximise Σ ⟨A, P_k·B⟩ over every parameter P_k touches — a linear assignment problem (scipy's solver on the host);
repeat until no permutation changes. The cost matrices of many pairs are built together, vmapped, on the device.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from scipy.optimize import linear_sum_assignment

from jaxlmc.models import Model, PermutationSpec, UnitAxis


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
            w = out[entry.layer][entry.name]
            if entry.blocks > 1:
                shaped = w.reshape(*w.shape[:entry.axis], entry.blocks, width, *w.shape[entry.axis + 1:])
                moved = jnp.take(shaped, perm, axis=entry.axis + 1).reshape(w.shape)
            else:
                moved = jnp.take(w, perm, axis=entry.axis)
            out[entry.layer] = {**out[entry.layer], entry.name: moved}
    return out


def _width(params: dict, entries: list[UnitAxis]) -> int:
    first = entries[0]
    return params[first.layer][first.name].shape[first.axis] // first.blocks


def _cost(params_a: dict, params_b: dict, k: int, spec: PermutationSpec) -> jax.Array:
    """C[u, v] = Σ ⟨unit u of A, unit v of B⟩ over every parameter that hidden layer k's units index."""
    width = _width(params_a, spec[k])
    total = jnp.zeros((width, width), jnp.float32)
    for entry in spec[k]:
        a = _units_first(params_a[entry.layer][entry.name], entry, width).reshape(width, -1)
        b = _units_first(params_b[entry.layer][entry.name], entry, width).reshape(width, -1)
        total = total + a @ b.T
    return total


def match_pairs(model: Model, params_M: dict, pairs, max_iterations: int = 20, seed: int = 0) -> list[np.ndarray]:
    """Weight matching of member j to member i for every pair (i, j): perms[k] of shape [pairs, width_k].

    The model's kind supplies the permutation spec (ValueError for a kind that declares none). All pairs move in
    lock-step: per layer, one vmapped device call builds every pair's cost matrix with the other layers' current
    permutations applied; the assignments run on the host.
    """
    spec = model.permutation_spec()
    pairs = np.asarray(pairs, np.int32).reshape(-1, 2)
    one = jax.tree.map(lambda a: a[0], params_M)
    widths = [_width(one, entries) for entries in spec]
    perms = [np.tile(np.arange(w, dtype=np.int32), (len(pairs), 1)) for w in widths]
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
