"""Barriers modulo permutation: weight matching (Git Re-Basin, Ainsworth et al. 2023) for jaxlmc's models.

Hidden units can be relabelled without changing the function a network computes. Hidden layer k's units form one
permutation, P_k; the spec says which axes it indexes, derived from the parameters' layer order and shapes:
layer k's kernel (last axis) and bias, its LayerNorm's scale and bias, and the input axis (second to last) of the
next layer's kernel — for a CNN's head, the channel axis of the flattened (positions × channels) features.

Weight matching aligns network B to network A by coordinate descent: for each P_k in turn, with the others fixed,
maximise Σ ⟨A, P_k·B⟩ over every parameter P_k touches — a linear assignment problem (scipy's solver on the host);
repeat until no permutation changes. The cost matrices of many pairs are built together, vmapped, on the device.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def hidden_layers(params: dict) -> list[str]:
    """The hidden layers in order (dense0, dense1, … or conv0, …); the head comes after them."""
    names = sorted((k for k in params if k.startswith(("dense", "conv"))), key=lambda k: int(k.lstrip("denscov")))
    return names


def permutation_spec(params: dict) -> list[list[tuple[str, str, int]]]:
    """For each hidden layer k: the (layer, parameter, axis) entries its units index. One member's params."""
    layers = hidden_layers(params)
    spec = []
    for k, layer in enumerate(layers):
        entries = [(layer, "kernel", params[layer]["kernel"].ndim - 1), (layer, "bias", 0)]
        norm = f"norm{k}"
        if norm in params:
            entries += [(norm, name, 0) for name in params[norm]]
        following = layers[k + 1] if k + 1 < len(layers) else "head"
        entries.append((following, "kernel", params[following]["kernel"].ndim - 2))
        spec.append(entries)
    return spec


def _units_axis(params: dict, layer: str, name: str, axis: int, width: int):
    """The array with the permuted axis moved to the front and split out: [width, …]. A CNN head's kernel rows are
    flattened (positions × channels): its channel axis is recovered by a reshape."""
    w = params[layer][name]
    if layer == "head" and w.shape[-2] != width:
        positions = w.shape[-2] // width
        w = w.reshape(*w.shape[:-2], positions, width, w.shape[-1])
        axis = w.ndim - 2
    return jnp.moveaxis(w, axis, 0)


def permute(params: dict, perms: list, spec=None) -> dict:
    """params with hidden layer k's units reordered by perms[k] (unit u of the result is unit perms[k][u])."""
    spec = spec or permutation_spec(params)
    out = jax.tree.map(lambda a: a, params)
    for entries, perm in zip(spec, perms):
        width = perm.shape[0]
        for layer, name, axis in entries:
            w = out[layer][name]
            if layer == "head" and w.shape[-2] != width:
                positions = w.shape[-2] // width
                shaped = w.reshape(*w.shape[:-2], positions, width, w.shape[-1])
                out[layer] = {**out[layer], name: jnp.take(shaped, perm, axis=shaped.ndim - 2).reshape(w.shape)}
            else:
                out[layer] = {**out[layer], name: jnp.take(w, perm, axis=axis)}
    return out


def _cost(params_a: dict, params_b: dict, k: int, spec) -> jax.Array:
    """C[u, v] = Σ ⟨unit u of A, unit v of B⟩ over every parameter that hidden layer k's units index."""
    width = params_a[spec[k][0][0]]["bias"].shape[0]
    total = jnp.zeros((width, width), jnp.float32)
    for layer, name, axis in spec[k]:
        a = _units_axis(params_a, layer, name, axis, width).reshape(width, -1)
        b = _units_axis(params_b, layer, name, axis, width).reshape(width, -1)
        total = total + a @ b.T
    return total


def match_pairs(params_M: dict, pairs, max_iterations: int = 20, seed: int = 0) -> list[np.ndarray]:
    """Weight matching of member j to member i for every pair (i, j): perms[k] of shape [pairs, width_k].

    All pairs move in lock-step: per layer, one vmapped device call builds every pair's cost matrix with the other
    layers' current permutations applied; the assignments run on the host.
    """
    from scipy.optimize import linear_sum_assignment

    pairs = np.asarray(pairs, np.int32).reshape(-1, 2)
    one = jax.tree.map(lambda a: a[0], params_M)
    spec = permutation_spec(one)
    widths = [one[entries[0][0]]["bias"].shape[0] for entries in spec]
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
