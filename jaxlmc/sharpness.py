"""Sharpness: the top eigenvalue of the training loss's Hessian for every member, in one compiled program.

For one member with parameters θ (all of them, flattened into one vector of P scalars) and the mean cross-entropy
L(θ) over a fixed evaluation subset of the training data, the Hessian H = ∇²L(θ) is P×P — too big to form for a
real model, but a Hessian-vector product Hv costs about two gradients: forward-over-reverse differentiation,
`jax.jvp(jax.grad(L), (θ,), (v,))` (Pearlmutter 1994). Power iteration v ← Hv / ‖Hv‖ from a random unit vector then
converges to the eigenvector whose eigenvalue has the LARGEST MAGNITUDE, and the Rayleigh quotient vᵀHv estimates
that eigenvalue.

  * At (or near) a minimum H is positive semi-definite, so the largest-magnitude eigenvalue is the top eigenvalue
    λ_max: the sharpness of Keskar et al. 2017 ("On large-batch training for deep learning: generalization gap and
    sharp minima") and of Cohen et al. 2021 ("Gradient descent on neural networks typically occurs at the edge of
    stability"), where full-batch GD with step size η drives λ_max up to ≈ 2/η and hovers there.
  * Away from a minimum (e.g. at initialisation) H can have negative eigenvalues; if the most negative one is larger
    in magnitude than λ_max, power iteration returns it (a negative number), not λ_max. The sign says which it is.
  * The error after k iterations shrinks like |λ₂/λ₁|^k (λ₂ the second-largest magnitude): with a small eigengap —
    or two eigenvalues of equal magnitude and opposite sign — it converges slowly or not at all. Hence the
    diagnostic residual ‖Hv − λv‖ / |λ| returned with every estimate: near 0 for a converged eigenpair; a member
    whose residual is not small has an estimate to distrust (run more iterations).

The loss is `jaxlmc.train.loss_and_error`'s, so sharpness is measured on exactly the objective the members were
trained on, per token for language-modelling tasks (labels B×T, logits B×T×C), with padded examples masked out.
Resample weights an evaluation set may carry are ignored: the Hessian is of the plain mean.

`hessian_eigenvalue_reference` is a plain dense ground truth for tests (small models only). `sharpness_of_run` is
the study's stage: every member of a finished run and every start, in sharpness/.
"""
from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.flatten_util import ravel_pytree

from jaxlmc import finetuning, grid, rundir
from jaxlmc.config import Config
from jaxlmc.barrier_stage import load_run
from jaxlmc.models import Model
from jaxlmc.train import batch_eval_set, loss_and_error, mean_loss


def power_iteration(hvp_fn: Callable[[jax.Array], jax.Array], v0_P: jax.Array, iterations: int):
    """(eig, residual, v_P): the largest-magnitude eigenpair of the symmetric operator `hvp_fn` (P → P), by
    `iterations` steps of power iteration from `v0_P` (need not be normalised), then one more product for the
    Rayleigh quotient eig = vᵀHv at the final unit v and the residual ‖Hv − eig·v‖ / |eig|.

    Pure and traceable: vmap it over members (each with its own `hvp_fn` closure over its parameters).
    """
    def normalise(w_P, fallback_P):
        norm = jnp.linalg.norm(w_P)
        # Hv = 0 exactly (a zero Hessian, or v in its null space): v is itself an eigenvector (eigenvalue 0), so keep
        # it instead of dividing by zero. A non-finite product still propagates (NaN == 0 is False).
        zero = norm == 0
        return jnp.where(zero, fallback_P, w_P / jnp.where(zero, 1.0, norm))

    v_P = v0_P / jnp.linalg.norm(v0_P)
    # One product per step; the loop carries only v, so memory does not grow with the number of iterations.
    v_P = lax.fori_loop(0, iterations, lambda _, v: normalise(hvp_fn(v), v), v_P)
    hv_P = hvp_fn(v_P)
    eig = jnp.vdot(v_P, hv_P)
    error = jnp.linalg.norm(hv_P - eig * v_P)
    # An exact eigenvector of eigenvalue 0 (error 0, eig 0) has residual 0, not 0/0.
    residual = jnp.where(error == 0, 0.0, error / jnp.abs(eig))
    return eig, residual, v_P


def _mean_loss(model: Model, params: dict, eval_set: tuple) -> jax.Array:
    # Only (x, y, mask): without the resample weights `loss_and_error` returns the plain mean as a scalar.
    return loss_and_error(model, params, eval_set[:3])[0]


def make_top_hessian_eigenvalue(model: Model, iterations: int):
    """jit(params_M, eval_set, key) -> (eig_M, residual_M): each member's largest-magnitude Hessian eigenvalue.

    The Hessian is of the mean training loss over `eval_set` (a fixed subset of training data batched by
    `jaxlmc.train.batch_eval_set`) with respect to all of a member's parameters. Member m starts power iteration
    from a Gaussian direction drawn from fold_in(key, m); every member runs `iterations` Hessian-vector products plus
    one for the Rayleigh quotient, all members vmapped in one program. A member with any non-finite parameter (a
    diverged one) gets NaN for both numbers; the others are unaffected (nothing is shared across members).
    """
    def member(params, m, eval_set, key):
        flat_P, unravel = ravel_pytree(params)
        grad_fn = jax.grad(lambda f_P: _mean_loss(model, unravel(f_P), eval_set))
        # jvp of grad per product, not jax.linearize once: linearising would keep every batch's activations (the
        # whole evaluation set's) alive across the loop, while jvp recomputes them batch by batch under lax.map.
        hvp_fn = lambda v_P: jax.jvp(grad_fn, (flat_P,), (v_P,))[1]
        v0_P = jax.random.normal(jax.random.fold_in(key, m), flat_P.shape, flat_P.dtype)
        eig, residual, _ = power_iteration(hvp_fn, v0_P, iterations)
        # Non-finite parameters usually yield NaN anyway, but not always (a −inf bias behind a ReLU is an exact zero:
        # finite loss, finite Hessian): check them rather than report a number for a diverged member.
        finite = jnp.all(jnp.isfinite(flat_P))
        return jnp.where(finite, eig, jnp.nan), jnp.where(finite, residual, jnp.nan)

    def top_eigenvalue(params_M, eval_set, key):
        num_members = jax.tree.leaves(params_M)[0].shape[0]
        return jax.vmap(member, in_axes=(0, 0, None, None))(params_M, jnp.arange(num_members), eval_set, key)

    return jax.jit(top_eigenvalue)


def hessian_eigenvalue_reference(model: Model, params: dict, x_NxF, y_N) -> float:
    """Ground truth for one member (not stacked): the dense Hessian of the mean cross-entropy on (x, y) over the
    flattened parameters, and its eigenvalue of largest magnitude (numpy's eigvalsh, in float64). P² memory and
    about P gradient evaluations: tiny models only.

    The mean is over every label, so per token (labels N×T) it is the mean per token, as in `loss_and_error`.
    """
    hessian_PxP = np.asarray(_dense_hessian(model, params, jnp.asarray(x_NxF, jnp.float32),
                                            jnp.asarray(y_N, jnp.int32)), np.float64)
    eigs = np.linalg.eigvalsh(0.5 * (hessian_PxP + hessian_PxP.T))  # symmetric up to float32 round-off
    return float(eigs[np.argmax(np.abs(eigs))])


@functools.partial(jax.jit, static_argnums=0)
def _dense_hessian(model: Model, params: dict, x, y) -> jax.Array:
    # Compiled once per model and shapes (the model is static): run eagerly, jax.hessian of even a tiny
    # transformer takes seconds per member.
    flat_P, unravel = ravel_pytree(params)
    return jax.hessian(lambda f_P: mean_loss(model.apply(unravel(f_P), x), y))(flat_P)


# --------------------------------------------------------------------------------------------- the study's stage


@rundir.exclusive
def sharpness_of_run(cfg: Config, out: str) -> list[dict]:
    """The top Hessian eigenvalue of the training loss (study.sharpness_examples of the fixed train-evaluation
    subset, study.sharpness_iterations power-iteration steps) of every member of a finished run and of every start
    (probe head); writes sharpness/members.csv and sharpness/starts.csv (empty with 0 iterations) and returns the
    members' rows."""
    s = cfg.study
    directory = rundir.RunDir(out)
    if not s.sharpness_iterations:
        directory.write_csv(rundir.SHARPNESS, [])
        directory.write_csv(rundir.START_SHARPNESS, [])
        return []
    run = load_run(cfg, out)
    n = min(s.sharpness_examples, cfg.data.train_eval_size, len(run.task.train.y))
    train_set = batch_eval_set(run.task.train.x[:n], run.task.train.y[:n], cfg.run.eval_batch_size)
    top = make_top_hessian_eigenvalue(run.model, s.sharpness_iterations)
    key = jax.random.key(0)  # a fixed start direction per member: reruns give the same numbers
    eig_M, residual_M = map(np.asarray, top(run.params, train_set, key))
    rows = [{"member": m["member"], **dict(zip(grid.CELL_KEYS, grid.cell(m))), "seed": m["seed"],
             "diverged": m["diverged"], "unfit": bool(m.get("unfit")), "sharpness": float(eig_M[k]),
             "sharpness_residual": float(residual_M[k])} for k, m in enumerate(run.table)]
    # One start per body: a checkpoint's (shared by its members) or a scratch seed's own initialisation.
    bodies = {}
    for k, m in enumerate(run.table):
        bodies.setdefault((m["pretrain_step"], m["seed"] if m["pretrain_step"] < 0 else -1), k)
    probe_M = finetuning.start_params(cfg, out, run.model, run.table, run.task.train, heads="probe")
    take = jnp.asarray(list(bodies.values()))
    starts = jax.tree.map(lambda a: jnp.asarray(a)[take], probe_M)
    eig_S, residual_S = map(np.asarray, top(starts, train_set, key))
    start_rows = [{"pretrain_step": step, "seed": seed, "sharpness": float(eig_S[k]),
                   "sharpness_residual": float(residual_S[k])} for k, (step, seed) in enumerate(bodies)]
    directory.write_csv(rundir.SHARPNESS, rows)
    directory.write_csv(rundir.START_SHARPNESS, start_rows)
    return rows
