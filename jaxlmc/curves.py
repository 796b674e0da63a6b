"""Mode connectivity curves (Garipov et al. 2018, "Loss surfaces, mode connectivity, and fast ensembling of DNNs",
NeurIPS): a quadratic Bezier curve between the two members of every pair, its bend trained so that the whole curve
has low training loss — for many pairs at once (vmapped over pairs, walked in chunks), plus a plain per-pair loop
used as ground truth.

Definitions. For a pair (i, j) with endpoints θᵢ, θⱼ and a bend θ_b (one more point in weight space, of the same
shape), the curve is

    φ(t) = (1 − t)²·θᵢ + 2t(1 − t)·θ_b + t²·θⱼ,     t ∈ [0, 1],

so φ(0) = θᵢ and φ(1) = θⱼ exactly (the other coefficients are exact zeros) and φ(½) = ¼θᵢ + ½θ_b + ¼θⱼ. With
perms (jaxlmc.permute: one [P, units] array per permutation group, aligning member j onto member i), θⱼ is member
j with its hidden units reordered: the same function as member j at a different point, and the curve ends there.

What is trained and what is fixed. Only the bend is trained; the endpoints θᵢ, θⱼ are constants (no gradient flows
into them, and they are never updated). The objective is the expected training loss along the curve,

    ℓ(θ_b) = E_{t ~ U(0, 1)} L(φ(t)),

minimised by stochastic gradient: each step of each pair draws one t uniformly and one batch of training examples
(indices uniform with replacement), and takes one Adam step (optax.adam) on the mean cross-entropy of the
network φ(t) on that batch (a per-token task's B×T labels are averaged over positions too). No dropout, no weight
decay. The draws of pair p at step s come from fold_in(fold_in(key, p), s), split into the key of t and the key of
the batch, so a pair's training does not depend on which other pairs are trained beside it, nor on the chunking.

Why the bend starts at the midpoint. With θ_b = (θᵢ + θⱼ)/2 the Bezier curve is exactly the straight line:
(1 − t)²θᵢ + t(1 − t)(θᵢ + θⱼ) + t²θⱼ = (1 − t)θᵢ + tθⱼ. Training therefore starts from the linear interpolation
(jaxlmc.paths), so a trained curve is the straight line bent only as far as the loss asks for, and a pair with
no barrier has nothing to fix (Garipov et al. initialise the same way). With perms the midpoint is that of θᵢ and
the aligned θⱼ, i.e. training starts from the aligned straight line.

jaxlmc's models have no BatchNorm, so a point on the curve needs no recomputed statistics (Garipov et al. recompute
them for their BatchNorm networks).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from jax import lax

from jaxlmc.models import Model
from jaxlmc.paths import bezier, pair_endpoints
from jaxlmc.train import mean_loss


def midpoint(p_i, p_j):
    """The bend that makes the Bezier curve the straight line: (p_i + p_j) / 2."""
    return jax.tree.map(lambda a, b: 0.5 * (a + b), p_i, p_j)


def draws(pair_key, step, batch_size: int, n_train: int):
    """(t, idx_B): pair `pair_key`'s draws at `step`: t ~ U(0, 1) and batch_size example indices in [0, n_train),
    uniform with replacement."""
    key_t, key_batch = jax.random.split(jax.random.fold_in(pair_key, step))
    return jax.random.uniform(key_t, ()), jax.random.randint(key_batch, (batch_size,), 0, n_train)


def _check(steps: int, batch_size: int, lr: float, n_train: int):
    if steps < 0:
        raise ValueError(f"steps must not be negative, got {steps}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if n_train < 1:
        raise ValueError(f"n_train must be positive, got {n_train}")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr}")


def _step_fn(model: Model, tx: optax.GradientTransformation, batch_size: int, n_train: int):
    """One pair's training step: (p_i, p_j, bend, opt, x, y, pair_key, step) -> (bend, opt, loss)."""

    def loss_fn(bend, p_i, p_j, t, x_B, y_B):
        return mean_loss(model.apply(bezier(p_i, bend, p_j, t), x_B), y_B)

    def step_fn(p_i, p_j, bend, opt, x, y, pair_key, step):
        t, idx_B = draws(pair_key, step, batch_size, n_train)
        loss, grads = jax.value_and_grad(loss_fn)(bend, p_i, p_j, t, x[idx_B], y[idx_B])
        updates, opt = tx.update(grads, opt, bend)
        return optax.apply_updates(bend, updates), opt, loss

    return step_fn


def make_train_bends(model: Model, steps: int, batch_size: int, lr: float, n_train: int,
                     chunk_pairs: int | None = None):
    """jit(params_M, pairs_Px2, data, key[, perms]) -> bends_P: every pair's trained bend (leading pair axis).

    `data` is the device-resident training split {"x": x_N…, "y": y_N (or N×T per token)}; examples are drawn from
    its first `n_train`. Each bend starts at the midpoint of its endpoints (of member i and the aligned member j
    when perms are given: then the bend lives in member i's unit order, and evaluating the curve needs the same
    perms) and takes `steps` Adam steps at learning rate `lr` inside one `lax.scan`; pair p draws from
    fold_in(key, p) (see `draws`). Pairs are vmapped in chunks of `chunk_pairs` (all at once when None) walked by
    `lax.map`, so memory grows with the chunk, not with the number of pairs.
    """
    _check(steps, batch_size, lr, n_train)
    if chunk_pairs is not None and chunk_pairs < 1:
        raise ValueError(f"chunk_pairs must be positive, got {chunk_pairs}")
    tx = optax.adam(lr)
    step_fn = _step_fn(model, tx, batch_size, n_train)

    def train_bends(params_M, pairs_Px2, data, key, perms=None):
        num_pairs = pairs_Px2.shape[0]
        available = data["y"].shape[0]
        if n_train > available:
            raise ValueError(f"n_train = {n_train} exceeds the {available} training examples given")

        def on_pair(args):
            pair_2, index, perm_list = args
            p_i, p_j = pair_endpoints(model, params_M, pair_2, perm_list)
            pair_key = jax.random.fold_in(key, index)
            bend = midpoint(p_i, p_j)

            def body(carry, step):
                bend, opt = carry
                bend, opt, _ = step_fn(p_i, p_j, bend, opt, data["x"], data["y"], pair_key, step)
                return (bend, opt), None

            (bend, _), _ = lax.scan(body, (bend, tx.init(bend)), jnp.arange(steps))
            return bend

        chunk = num_pairs if chunk_pairs is None else min(chunk_pairs, num_pairs)
        indices = jnp.arange(num_pairs, dtype=jnp.uint32)
        return lax.map(on_pair, (pairs_Px2, indices, perms), batch_size=max(chunk, 1))

    return jax.jit(train_bends)


def reference_train_bend(model: Model, p_i, p_j, x, y, steps: int, batch_size: int, lr: float, key_for_pair):
    """Ground truth for make_train_bends: one pair's bend, by a plain Python loop over steps (one jitted step each).

    `p_j` is member j as the curve should end (already permuted onto member i if aligned), `x`, `y` the first
    n_train = len(y) training examples, and `key_for_pair` = jax.random.fold_in(key, p) for the pair's index p in
    the vmapped call. "Same draws" then means: at every step the same t and the same batch indices, bit for bit (the
    keys are derived identically, by `draws`), and the same Adam update from the same midpoint; the two bends differ
    only by floating-point rounding (vmapped, scanned and fused programs may order sums differently).
    """
    _check(steps, batch_size, lr, len(y))
    tx = optax.adam(lr)
    step_fn = jax.jit(_step_fn(model, tx, batch_size, len(y)))
    x, y = jnp.asarray(x), jnp.asarray(y)
    bend = midpoint(p_i, p_j)
    opt = tx.init(bend)
    for step in range(steps):
        bend, opt, _ = step_fn(p_i, p_j, bend, opt, x, y, key_for_pair, jnp.asarray(step, jnp.int32))
    return bend

