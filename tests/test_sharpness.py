"""Sharpness: power iteration on Hessian-vector products finds the largest-magnitude eigenvalue, agrees with the dense
Hessian of tiny real models (per example and per token), and keeps members independent."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from jaxlmc import models, sharpness, train
from jaxlmc.config import ModelConfig

MEMBERS, N, FEATURES, CLASSES, ITERATIONS = 4, 50, 4, 3, 100


def rotated(diagonal, seed=0):
    """Q·diag·Qᵀ for a random orthogonal Q: a symmetric matrix with known eigenpairs (Q's columns)."""
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(len(diagonal), len(diagonal))))
    return q @ np.diag(diagonal) @ q.T, q


@pytest.mark.parametrize("diagonal, top", [((5.0, 2.0, 1.0), 5.0), ((-6.0, 5.0, 1.0), -6.0)])
def test_power_iteration_finds_the_eigenvalue_of_largest_magnitude_of_a_known_matrix(diagonal, top):
    a, q = rotated(diagonal)
    a = jnp.asarray(a, jnp.float32)
    v0 = jnp.asarray([1.0, 1.0, 1.0])
    eig, residual, v = jax.jit(lambda v0: sharpness.power_iteration(lambda v: a @ v, v0, ITERATIONS))(v0)
    assert float(eig) == pytest.approx(top, abs=1e-4)  # -6 beats 5: largest magnitude, not largest value
    assert float(residual) < 1e-4
    assert abs(float(np.dot(np.asarray(v), q[:, 0]))) == pytest.approx(1.0, abs=1e-4)  # the top eigenvector
    # Too few iterations for the gap (|2/5|, |5/6|) leaves a visible residual: the diagnostic is not constant.
    _, early, _ = sharpness.power_iteration(lambda v: a @ v, v0, 2)
    assert float(early) > 1e-2


def test_power_iteration_on_a_zero_operator_returns_zero_not_nan():
    eig, residual, v = sharpness.power_iteration(lambda v: jnp.zeros_like(v), jnp.asarray([3.0, 4.0]), 5)
    assert float(eig) == 0.0 and float(residual) == 0.0
    np.testing.assert_allclose(v, [0.6, 0.8], rtol=1e-6)


@pytest.fixture(scope="module")
def mlp():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, FEATURES)).astype(np.float32)
    y = rng.integers(0, CLASSES, N).astype(np.int32)
    model = models.build(ModelConfig(kind="mlp", width=6, depth=1), (FEATURES,), CLASSES)
    params_M = jax.vmap(model.init)(jax.random.split(jax.random.key(0), MEMBERS))
    eval_set = train.batch_eval_set(x, y, 16)  # 50 = 3·16 + 2: the last batch is mostly padding, masked out
    fn = sharpness.make_top_hessian_eigenvalue(model, ITERATIONS)
    eig_M, residual_M = fn(params_M, eval_set, jax.random.key(1))
    return model, params_M, x, y, eval_set, fn, np.asarray(eig_M), np.asarray(residual_M)


def test_the_vmapped_estimate_matches_the_dense_hessian_of_each_member(mlp):
    model, params_M, x, y, _, _, eig_M, residual_M = mlp
    reference_M = [sharpness.hessian_eigenvalue_reference(model, jax.tree.map(lambda a, m=m: a[m], params_M), x, y)
                   for m in range(MEMBERS)]
    assert eig_M.shape == residual_M.shape == (MEMBERS,)
    np.testing.assert_allclose(eig_M, reference_M, rtol=1e-3)
    assert len(set(np.round(reference_M, 4))) == MEMBERS  # distinct members: a mixed-up member axis would show
    assert np.all(residual_M < 1e-3)


def test_the_start_key_and_resample_weights_do_not_change_the_answer(mlp):
    _, params_M, x, y, eval_set, fn, eig_M, _ = mlp
    other_key, _ = fn(params_M, eval_set, jax.random.key(7))
    np.testing.assert_allclose(other_key, eig_M, rtol=1e-3)
    weighted = train.batch_eval_set(x, y, 16, train.resample_counts(N, 3))  # the Hessian is of the plain mean
    np.testing.assert_allclose(fn(params_M, weighted, jax.random.key(1))[0], eig_M, rtol=1e-5)


def test_a_diverged_member_gives_nan_and_leaves_the_others_unchanged(mlp):
    model, params_M, _, _, eval_set, fn, eig_M, residual_M = mlp
    broken = jax.tree.map(lambda a: a, params_M)
    broken["dense0"]["kernel"] = broken["dense0"]["kernel"].at[1].set(jnp.nan)
    # Member 3: a −inf bias behind a ReLU is an exact zero, so its loss (and power iteration) stay finite; only the
    # explicit check of the parameters flags it.
    broken["dense0"]["bias"] = broken["dense0"]["bias"].at[3, 0].set(-jnp.inf)
    assert np.isfinite(train.loss_and_error(model, jax.tree.map(lambda a: a[3], broken), eval_set)[0])
    eig, residual = map(np.asarray, fn(broken, eval_set, jax.random.key(1)))
    assert np.all(np.isnan(eig[[1, 3]])) and np.all(np.isnan(residual[[1, 3]]))
    np.testing.assert_allclose(eig[[0, 2]], eig_M[[0, 2]], rtol=1e-6)
    np.testing.assert_allclose(residual[[0, 2]], residual_M[[0, 2]], rtol=1e-4, atol=1e-7)


def test_no_random_direction_is_sharper_than_the_top_eigenvalue(mlp):
    model, params_M, _, _, eval_set, _, eig_M, _ = mlp

    def rayleigh_quotients(params, key):
        flat_P, unravel = ravel_pytree(params)
        grad_fn = jax.grad(lambda f: train.loss_and_error(model, unravel(f), eval_set)[0])
        v_DxP = jax.random.normal(key, (20, flat_P.size))
        v_DxP = v_DxP / jnp.linalg.norm(v_DxP, axis=1, keepdims=True)
        hv_DxP = jax.vmap(lambda v: jax.jvp(grad_fn, (flat_P,), (v,))[1])(v_DxP)
        return jnp.sum(v_DxP * hv_DxP, axis=1)

    quotients_MxD = np.asarray(jax.jit(jax.vmap(rayleigh_quotients, in_axes=(0, None)))(params_M, jax.random.key(3)))
    assert np.all(np.abs(quotients_MxD) <= np.abs(eig_M)[:, None] * (1 + 1e-4))
    assert np.all(np.abs(quotients_MxD).max(axis=1) > 0)  # not vacuous: the directions do see curvature


@pytest.mark.slow
def test_per_token_sharpness_matches_the_dense_hessian_of_a_tiny_language_model():
    cfg = ModelConfig(kind="transformer", width=4, depth=1, heads=1, vocab_size=5)
    context, n = 2, 8
    model = models.build(cfg, (context,), 5, per_token=True)
    # Two lone inits stacked: an eager vmap of the transformer's init takes seconds longer on CPU.
    params_M = jax.tree.map(lambda *a: jnp.stack(a), *[model.init(k) for k in jax.random.split(jax.random.key(0), 2)])
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 5, (n, context + 1))
    x, y = tokens[:, :-1].astype(np.float32), tokens[:, 1:].astype(np.int32)  # labels N×T: the next token
    eig_M, residual_M = sharpness.make_top_hessian_eigenvalue(model, 50)(
        params_M, train.batch_eval_set(x, y, 3), jax.random.key(1))
    reference_M = [sharpness.hessian_eigenvalue_reference(model, jax.tree.map(lambda a, m=m: a[m], params_M), x, y)
                   for m in range(2)]
    np.testing.assert_allclose(eig_M, reference_M, rtol=1e-3)
    assert np.all(np.asarray(residual_M) < 1e-3)
