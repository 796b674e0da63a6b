"""Layer-wise barriers (Adilova et al. 2024): the compiled pass against a plain loop, and its consistency with the
whole-network pass."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlmc import models, paths, reference, train
from jaxlmc.config import ModelConfig

ALPHAS = np.linspace(0, 1, 5, dtype=np.float32)


def _members(cfg, shape, classes, n=4, per_token=False):
    model = models.build(cfg, shape, classes, per_token)
    params_M = jax.vmap(model.init)(jax.random.split(jax.random.key(1), n))
    return model, params_M


@pytest.mark.parametrize("kind", ["mlp", pytest.param("transformer", marks=pytest.mark.slow)])
def test_layerwise_pass_matches_the_plain_loop(kind):
    rng = np.random.default_rng(0)
    if kind == "mlp":
        model, params_M = _members(ModelConfig(kind="mlp", width=8, depth=2), (5,), 3)
        x, y = rng.normal(size=(40, 5)).astype(np.float32), rng.integers(0, 3, 40).astype(np.int32)
    else:
        model, params_M = _members(ModelConfig(kind="transformer", width=8, depth=2, heads=2, vocab_size=7), (6,), 3)
        x, y = rng.integers(0, 7, (40, 6)).astype(np.float32), rng.integers(0, 3, 40).astype(np.int32)
    groups = model.layer_groups(jax.tree.map(lambda a: a[0], params_M))
    assert len(groups) == (3 if kind == "mlp" else 6)
    pairs = [(0, 1), (2, 3), (1, 3)]
    fn = paths.make_path_eval(model, paths.layer_wise(groups), ALPHAS, 2)
    out = fn(params_M, jnp.asarray(pairs, jnp.int32), {"test": train.batch_eval_set(x, y, 16)})
    loss, err = map(np.asarray, out["test"])
    ref_loss, ref_err = reference.reference_layer_curves(model, params_M, pairs, ALPHAS, groups, x, y)
    assert loss.shape == (3, len(groups), len(ALPHAS))
    np.testing.assert_allclose(loss, ref_loss, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(err, ref_err, atol=1e-6)
    # α = 0 is member i for every group; interpolating the last layer alone changes the network.
    np.testing.assert_allclose(loss[:, :, 0], np.repeat(loss[:, :1, 0], len(groups), axis=1))
    assert not np.allclose(loss[:, -1, -1], loss[:, -1, 0])


def test_one_group_holding_every_layer_is_the_whole_network_curve():
    model, params_M = _members(ModelConfig(kind="mlp", width=8, depth=2), (5,), 3)
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(30, 5)).astype(np.float32), rng.integers(0, 3, 30).astype(np.int32)
    sets = {"test": train.batch_eval_set(x, y, 16)}
    pairs = jnp.asarray([(0, 1), (2, 3)], jnp.int32)
    everything = {"all": list(jax.tree.map(lambda a: a[0], params_M))}
    layer = paths.make_path_eval(model, paths.layer_wise(everything), ALPHAS, 2)(params_M, pairs, sets)["test"][0]
    whole = paths.make_path_eval(model, paths.straight(), ALPHAS, 2)(params_M, pairs, sets)["test"][0]
    np.testing.assert_allclose(np.asarray(layer)[:, 0], np.asarray(whole), rtol=2e-5, atol=2e-6)


def test_layer_groups_must_cover_every_parameter():
    model, params_M = _members(ModelConfig(kind="transformer", width=8, depth=1, heads=2, vocab_size=7), (6,), 3)
    one = jax.tree.map(lambda a: a[0], params_M)
    assert sorted(k for keys in model.layer_groups(one).values() for k in keys) == sorted(one)
    with pytest.raises(ValueError, match="layer groups cover"):
        model.layer_groups({**one, "extra": {}})
