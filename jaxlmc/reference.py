"""Ground truth for the compiled passes: plain loops over pairs and α, one network and one full-batch evaluation at a
time (tests and benchmarks compare jaxlmc.paths' evaluator against them)."""
from __future__ import annotations

import jax
import numpy as np

from jaxlmc.models import Model
from jaxlmc.paths import lerp
from jaxlmc.train import mean_accuracy, mean_loss


def reference_curves(model: Model, params_M, pairs, alphas, x, y):
    """Ground truth for the straight line: a plain loop over pairs and α, one model and one full-batch evaluation at a
    time."""
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


def reference_layer_curves(model: Model, params_M, pairs, alphas, groups: dict[str, list[str]], x, y):
    """Ground truth for layer-wise interpolation (paths.layer_wise): (loss_PxGxA, err_PxGxA) by a plain loop, one
    hybrid model at a time."""
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
