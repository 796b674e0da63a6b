"""Weight matching: permutation specs derived from the models, recovery of a known permutation, aligned barriers."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlmc import config, models, paths, permute, stats, train
from jaxlmc.config import ModelConfig

MODELS = [(ModelConfig(kind="mlp", width=16, depth=2), (6,)),
          (ModelConfig(kind="mlp", width=16, depth=3, norm="layernorm"), (6,)),
          (ModelConfig(kind="cnn", width=8, depth=2, kernel_size=3), (12,)),
          pytest.param(ModelConfig(kind="cnn", width=8, depth=2, kernel_size=3, norm="layernorm"), (8, 8, 1),
                       marks=pytest.mark.slow)]


@pytest.mark.parametrize("cfg, shape", MODELS)
def test_a_permuted_copy_computes_the_same_function_and_is_recovered(cfg, shape):
    model = models.build(cfg, shape, 3)
    params = model.init(jax.random.key(0))
    spec = permutation_spec = model.permutation_spec()
    assert len(permutation_spec) == cfg.depth  # one permutation per hidden layer, found from the parameters
    rng = np.random.default_rng(1)
    perms = [jnp.asarray(rng.permutation(cfg.width)) for _ in spec]
    shuffled = permute.permute(params, perms, spec)
    x = jax.random.normal(jax.random.key(2), (7, *shape))
    np.testing.assert_allclose(model.apply(shuffled, x), model.apply(params, x), rtol=1e-5, atol=1e-5)
    assert not np.allclose(shuffled[spec[0][0].layer]["kernel"], params[spec[0][0].layer]["kernel"])

    pair = jax.tree.map(lambda a, b: jnp.stack([a, b]), params, shuffled)
    found = permute.match_pairs(model, pair, [(0, 1)])
    aligned = permute.permute(shuffled, [jnp.asarray(f[0]) for f in found], spec)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(aligned)):
        np.testing.assert_array_equal(a, b)  # the exact permutation back

    xs = np.asarray(jax.random.normal(jax.random.key(3), (40, *shape)))
    ys = np.asarray(model.apply(params, jnp.asarray(xs))).argmax(-1).astype(np.int32)
    fn = paths.make_path_eval(model, paths.straight(), paths.alpha_grid(5), 1)
    sets = {"t": train.batch_eval_set(xs, ys, 20)}
    naive = fn(pair, jnp.asarray([[0, 1]], jnp.int32), sets)["t"][0]
    after = fn(pair, jnp.asarray([[0, 1]], jnp.int32), sets, [jnp.asarray(f) for f in found])["t"][0]
    assert stats.barrier_endpoint_mean(after)[0] == pytest.approx(0.0, abs=1e-5)  # one function all along
    assert stats.barrier_endpoint_mean(naive)[0] > 0.01


def test_members_that_share_their_start_align_to_near_identity():
    """Two short fine-tunes of one network: weight matching leaves (almost) every unit where it is."""
    model = models.build(ModelConfig(kind="mlp", width=32, depth=2), (6,), 3)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 6)).astype(np.float32)
    y = x[:, :3].argmax(1).astype(np.int32)
    start = model.init(jax.random.key(0))
    params_M = jax.tree.map(lambda a: jnp.stack([a, a]), start)
    state = train.init_state(params_M, "adamw", 0.9, 400)
    consts = {"lr": jnp.full((2, 50), 3e-3, jnp.float32), "wd": jnp.zeros(2),
              "data_key": train.member_keys([0, 1])["data"]}
    chunk = train.make_train_chunk(model, "adamw", 0.9, 20, 400, 50)
    state, _, _ = chunk(state, consts, {"x": jnp.asarray(x), "y": jnp.asarray(y)}, 50)
    found = permute.match_pairs(model, state["params"], [(0, 1)])
    for perm in found:
        assert np.mean(perm[0] == np.arange(perm.shape[1])) >= 0.9


def test_a_kind_without_a_permutation_spec_cannot_be_aligned(monkeypatch):
    """A registered kind that declares no spec: barriers.align is a config error naming the kind, and weight
    matching refuses it, never aligning by guesswork."""
    mlp = models.KINDS["mlp"]
    monkeypatch.setitem(models.KINDS, "plain", dataclasses.replace(mlp, name="plain", permutation_spec=None))
    config.load(None, ["model.kind=plain", "barriers.align=false"])  # usable without alignment
    with pytest.raises(config.ConfigError, match="barriers.align: model.kind 'plain' declares no permutation spec"):
        config.load(None, ["model.kind=plain", "barriers.align=true"])
    model = models.build(ModelConfig(kind="plain", width=8, depth=1), (6,), 3)
    params_M = jax.vmap(model.init)(jax.random.split(jax.random.key(0), 2))
    with pytest.raises(ValueError, match="'plain' declares no permutation spec"):
        permute.match_pairs(model, params_M, [(0, 1)])


@pytest.mark.parametrize("cfg, shape", MODELS)
def test_the_spec_covers_every_hidden_layer_in_the_kinds_order(cfg, shape):
    model = models.build(cfg, shape, 3)
    params = model.init(jax.random.key(0))
    spec = model.permutation_spec()
    assert [entries[0].layer for entries in spec] == model.layers() == [k for k in params if k != "head"
                                                                        and not k.startswith("norm")]
    for entries in spec:  # every entry names a real parameter axis of the layer's width (times its blocks)
        for e in entries:
            assert params[e.layer][e.name].shape[e.axis] == cfg.width * e.blocks
