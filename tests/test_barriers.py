"""The all-pairs interpolation engine against its reference loop and against barriers known in advance."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlmc import models, paths, reference, stats, train
from jaxlmc.config import ModelConfig

ALPHAS = np.linspace(0.0, 1.0, 7)


@pytest.fixture(scope="module")
def ensemble():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(90, 6)).astype(np.float32)
    y = x[:, :3].argmax(1).astype(np.int32)
    model = models.build(ModelConfig(kind="mlp", width=8, depth=1), (6,), 3)
    params_M = jax.vmap(model.init)(jax.random.split(jax.random.key(0), 5))
    return model, params_M, x, y


def compiled(model, params_M, pairs, x, y, chunk=3, batch=32, alphas=ALPHAS):
    fn = paths.make_path_eval(model, paths.straight(), alphas, chunk)
    out = fn(params_M, jnp.asarray(pairs, jnp.int32), {"train": train.batch_eval_set(x, y, batch)})
    return np.asarray(out["train"][0]), np.asarray(out["train"][1])


def test_compiled_pass_equals_reference_loop(ensemble):
    model, params_M, x, y = ensemble
    pairs = list(itertools.combinations(range(5), 2))  # 10 pairs: 4 chunks of 3, the last one padded
    loss, err = compiled(model, params_M, pairs, x, y)
    ref_loss, ref_err = reference.reference_curves(model, params_M, pairs, ALPHAS, jnp.asarray(x), jnp.asarray(y))
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(err, ref_err, atol=1e-6)
    assert np.any(stats.barrier_endpoint_mean(loss) > 1e-3)  # random inits: real barriers, not all zeros


def test_self_pair_has_zero_barrier_and_pairs_are_symmetric(ensemble):
    model, params_M, x, y = ensemble
    loss, err = compiled(model, params_M, [(2, 2), (1, 3), (3, 1)], x, y)
    np.testing.assert_allclose(loss[0], loss[0, 0], rtol=1e-6)  # a flat curve
    assert stats.barrier_endpoint_mean(loss)[0] == pytest.approx(0.0, abs=1e-6)
    assert stats.barrier_linear(loss, ALPHAS)[0] == pytest.approx(0.0, abs=1e-6)
    np.testing.assert_allclose(loss[1], loss[2][::-1], rtol=1e-5)  # B(i, j) = B(j, i), curve reversed
    np.testing.assert_allclose(err[1], err[2][::-1], atol=1e-6)
    assert stats.barrier_endpoint_mean(loss)[1] == pytest.approx(stats.barrier_endpoint_mean(loss)[2], rel=1e-5)


def test_convex_model_has_no_linear_baseline_barrier(ensemble):
    _, _, x, y = ensemble
    logistic = models.build(ModelConfig(kind="mlp", depth=0), (6,), 3)  # cross-entropy is convex in its weights
    params_M = jax.vmap(logistic.init)(jax.random.split(jax.random.key(1), 4))
    params_M = jax.tree.map(lambda a: a * 5.0, params_M)  # far-apart members
    loss, _ = compiled(logistic, params_M, list(itertools.combinations(range(4), 2)), x, y)
    assert np.all(stats.barrier_linear(loss, ALPHAS) <= 1e-5)


def test_hand_built_pair_with_known_barrier():
    """Two ReLU units h = (relu(x), relu(−x)) and the same network with the units swapped: one function, two points.
    On x = ±a (labels 0 / 1) both ends have loss log(1 + e^−a) and the margin along the line is (1 − 2α)²·a, so the
    midpoint (all weights cancel) has uniform logits: loss log 2, error ½ (a tie goes to class 0). Known barriers:
    loss log 2 − log(1 + e^−a) and error ½, in both forms."""
    a = 3.0
    model = models.build(ModelConfig(kind="mlp", width=2, depth=1), (1,), 2)
    eye, swap = np.eye(2, dtype=np.float32), np.array([[0, 1], [1, 0]], np.float32)
    params_M = {
        "dense0": {"kernel": jnp.asarray([[[1.0, -1.0]], [[-1.0, 1.0]]]), "bias": jnp.zeros((2, 2))},
        "head": {"kernel": jnp.asarray(np.stack([eye, swap])), "bias": jnp.zeros((2, 2))},
    }
    x = np.array([[a], [-a]] * 4, np.float32)
    y = np.array([0, 1] * 4, np.int32)
    loss, err = compiled(model, params_M, [(0, 1)], x, y, alphas=ALPHAS)  # 7 points: α = ½ is on the grid
    end_loss = np.log1p(np.exp(-a))
    np.testing.assert_allclose(loss[0, [0, -1]], end_loss, rtol=1e-5)
    assert loss[0, 3] == pytest.approx(np.log(2), rel=1e-6)
    expected = np.log(2) - end_loss
    assert stats.barrier_endpoint_mean(loss)[0] == pytest.approx(expected, rel=1e-5)
    assert stats.barrier_linear(loss, ALPHAS)[0] == pytest.approx(expected, rel=1e-5)
    assert stats.barrier_endpoint_mean(err)[0] == pytest.approx(0.5)
    assert stats.barrier_linear(err, ALPHAS)[0] == pytest.approx(0.5)


def test_memory_does_not_grow_with_the_number_of_pairs():
    """256 members, all 32,640 pairs: the compiled pass's scratch memory equals that of a 64-pair pass."""
    model = models.build(ModelConfig(kind="mlp", width=4, depth=1), (5,), 2)
    params_M = jax.vmap(model.init)(jax.random.split(jax.random.key(0), 256))
    x = np.random.default_rng(0).normal(size=(16, 5)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int32)
    eval_sets = {"train": train.batch_eval_set(x, y, 16)}
    fn = paths.make_path_eval(model, paths.straight(), np.linspace(0, 1, 5), 64)
    all_pairs = jnp.asarray(list(itertools.combinations(range(256), 2)), jnp.int32)
    assert all_pairs.shape == (32640, 2)

    def scratch_bytes(pairs):
        return fn.lower(params_M, pairs, eval_sets).compile().memory_analysis().temp_size_in_bytes

    small, large = scratch_bytes(all_pairs[:64]), scratch_bytes(all_pairs)
    # Only the [pairs, α] outputs scale with the pairs; the scratch space may hold a few such arrays, never the
    # pairs × parameters that an unchunked pass would need (32,640 × 2 × 34 params × 4 B ≈ 8.9 MB).
    assert large - small < 32640 * 5 * 4 * 8
    loss, err = fn(params_M, all_pairs, eval_sets)["train"]
    assert loss.shape == (32640, 5) and np.isfinite(np.asarray(loss)).all()
