"""REPAIR (Jordan et al. 2023, "REPAIR: REnormalizing Permuted Activations for Interpolation Repair"): renormalise an
interpolated network so that each hidden unit's pre-activation statistics are the interpolation of the endpoints'.

Interpolating two networks, even aligned ones, shrinks the variance of hidden units layer after layer ("variance
collapse": averaged weights of units that are not perfectly correlated give smaller activations), and the barrier
partly measures that collapse rather than a real change of basin. REPAIR removes it: for each hidden layer in order,
with the layers before it already repaired, the interpolated network's per-unit mean μ_α and standard deviation σ_α
of the pre-activation (measured on training examples) are reset to the targets μ_t = (1 − α)μᵢ + αμⱼ and
σ_t = (1 − α)σᵢ + ασⱼ of the endpoints, z' = (z − μ_α)·σ_t/σ_α + μ_t.

jaxlmc's models have no BatchNorm, so the correction is folded into the per-unit affine parameters that produce the
pre-activation (Model.repair_points): a layer's kernel (output axis) and bias when nothing normalises it, or its
LayerNorm's scale and bias when one does (LayerNorm then feeds the nonlinearity, and REPAIR resets what it feeds).
Where it applies: every hidden layer of an MLP or CNN (the units weight matching permutes), and each transformer
block's MLP hidden units (its pre-GELU projection). The transformer's residual stream is renormalised by the
LayerNorm in front of every block already, and attention heads have no per-unit pre-activation to reset, so REPAIR
leaves them as they are.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxlmc.models import Model

EPS = 1e-5  # a dead unit (σ = 0) keeps its parameters instead of being scaled by σ_t / 0


def unit_stats(model: Model, params: dict, x) -> list[tuple[jax.Array, jax.Array]]:
    """[(mean_U, std_U)] of each repair point's pre-activation over the examples `x` (positions folded into them)."""
    out = []
    for a in model.preactivations(params, x):
        flat = a.reshape(-1, a.shape[-1])
        out.append((flat.mean(axis=0), flat.std(axis=0)))
    return out


def repair(model: Model, params_alpha: dict, stats_i, stats_j, alpha, x) -> dict:
    """The interpolated parameters `params_alpha` (at `alpha` between endpoints with unit statistics `stats_i`,
    `stats_j` from `unit_stats`) with each repair point's pre-activation statistics reset to the interpolated
    targets, layer by layer in order (each measured with the earlier ones already repaired)."""
    params = {key: dict(value) for key, value in params_alpha.items()}
    for k, (key, scale_name) in enumerate(model.repair_points()):
        mean_t = (1.0 - alpha) * stats_i[k][0] + alpha * stats_j[k][0]
        std_t = (1.0 - alpha) * stats_i[k][1] + alpha * stats_j[k][1]
        mean, std = unit_stats(model, params, x)[k]
        gain = jnp.where(std > EPS, std_t / jnp.where(std > EPS, std, 1.0), 1.0)
        scale = params[key][scale_name]  # its last axis is the units
        params[key][scale_name] = scale * gain.reshape((1,) * (scale.ndim - 1) + gain.shape)
        params[key]["bias"] = (params[key]["bias"] - mean) * gain + jnp.where(std > EPS, mean_t, mean)
    return params
