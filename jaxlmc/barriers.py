"""Loss and error along the straight line between members: all pairs × all α × all evaluation batches in one
compiled function (the engine), plus a plain reference loop used as ground truth.

θ(α) = (1 − α)·θᵢ + α·θⱼ. Endpoints (α = 0, 1) are the members themselves and are evaluated once per member; the
compiled pass evaluates only the interior α of each pair, vmapped over α and over a chunk of pairs, with the chunks
walked by `lax.map`, so peak memory depends on the chunk size, never on the number of pairs.

jaxlmc's models have no BatchNorm (see jaxlmc.models), so an interpolated network's outputs need no recomputed
statistics: every number here is computed from the interpolated weights alone.

Barriers (BRIEF §2), for a curve L(α) on the full grid including the endpoints:
  endpoint-mean form   max_α L(α) − ½·(L(0) + L(1))                 (Frankle et al. 2020; Ainsworth et al. 2023)
  linear-baseline form max_α [L(α) − ((1 − α)·L(0) + α·L(1))]        (Entezari et al. 2022; Juneja et al. 2023)
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxlmc.models import Model
from jaxlmc.train import cross_entropy, loss_and_error


def lerp(params_i, params_j, alpha):
    return jax.tree.map(lambda a, b: (1.0 - alpha) * a + alpha * b, params_i, params_j)


def make_curves(model: Model, alphas: np.ndarray, chunk_pairs: int):
    """jit(params_M, pairs_Px2, eval_set) -> (loss_PxA, err_PxA) on the full α grid (eval_set: train.batch_eval_set).

    `alphas` must start at 0 and end at 1; the endpoints come from one evaluation per member.
    """
    alphas = np.asarray(alphas, np.float32)
    if alphas[0] != 0.0 or alphas[-1] != 1.0 or np.any(np.diff(alphas) <= 0):
        raise ValueError("alphas must increase from 0 to 1")
    interior = jnp.asarray(alphas[1:-1])

    def curves(params_M, pairs_Px2, eval_set):
        evaluate = lambda p: loss_and_error(model, p, eval_set)  # noqa: E731
        end_loss_M, end_err_M = jax.vmap(evaluate)(params_M)

        num_pairs = pairs_Px2.shape[0]
        num_chunks = -(-num_pairs // chunk_pairs)
        padded = jnp.concatenate([pairs_Px2, jnp.zeros((num_chunks * chunk_pairs - num_pairs, 2), pairs_Px2.dtype)])

        def chunk(pairs_Cx2):
            p_i = jax.tree.map(lambda a: a[pairs_Cx2[:, 0]], params_M)
            p_j = jax.tree.map(lambda a: a[pairs_Cx2[:, 1]], params_M)
            on_line = lambda pi, pj, a: evaluate(lerp(pi, pj, a))  # noqa: E731
            over_alpha = jax.vmap(on_line, in_axes=(None, None, 0))
            return jax.vmap(over_alpha, in_axes=(0, 0, None))(p_i, p_j, interior)

        loss, err = lax.map(chunk, padded.reshape(num_chunks, chunk_pairs, 2))
        loss = loss.reshape(-1, interior.shape[0])[:num_pairs]
        err = err.reshape(-1, interior.shape[0])[:num_pairs]
        i, j = pairs_Px2[:, 0], pairs_Px2[:, 1]
        full_loss = jnp.concatenate([end_loss_M[i][:, None], loss, end_loss_M[j][:, None]], axis=1)
        full_err = jnp.concatenate([end_err_M[i][:, None], err, end_err_M[j][:, None]], axis=1)
        return full_loss, full_err

    return jax.jit(curves)


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


def barrier_endpoint_mean(curve_PxA):
    curve = np.asarray(curve_PxA)
    return curve.max(axis=1) - 0.5 * (curve[:, 0] + curve[:, -1])


def barrier_linear(curve_PxA, alphas):
    curve = np.asarray(curve_PxA)
    alphas = np.asarray(alphas)[None]
    baseline = (1.0 - alphas) * curve[:, :1] + alphas * curve[:, -1:]
    return (curve - baseline).max(axis=1)
