"""Activation matching (Git Re-Basin §3.1): the kinds' unit activations follow their permutation specs, the costs are
Pearson correlations, and a known permutation is recovered exactly — the same one weight matching finds."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlmc import models, paths, permute, stats, train
from jaxlmc.config import ModelConfig

MODELS = {"mlp": (ModelConfig(kind="mlp", width=16, depth=2), (10,)),
          "mlp-layernorm": (ModelConfig(kind="mlp", width=16, depth=2, norm="layernorm"), (10,)),
          "cnn": (ModelConfig(kind="cnn", width=8, depth=2), (40,)),
          "transformer": (ModelConfig(kind="transformer", width=16, depth=2, heads=4, vocab_size=11), (6,))}


def _inputs(cfg, shape, n, seed):
    key = jax.random.key(seed)
    if cfg.kind == "transformer":
        return jax.random.randint(key, (n, *shape), 0, cfg.vocab_size).astype(jnp.float32)
    return jax.random.normal(key, (n, *shape))


def _widths(params, spec):
    return [params[e[0].layer][e[0].name].shape[e[0].axis] // e[0].blocks for e in spec]


def _shuffled(name):
    """(model, member A, its spec, the random permutations, member B = A with its units permuted)."""
    cfg, shape = MODELS[name]
    model = models.build(cfg, shape, 3)
    params = model.init(jax.random.key(0))
    spec = model.permutation_spec()
    rng = np.random.default_rng(1)
    perms = [rng.permutation(w) for w in _widths(params, spec)]
    for p in perms:
        assert not np.array_equal(p, np.arange(len(p)))
    return model, params, spec, perms, permute.permute(params, [jnp.asarray(p) for p in perms], spec)


@pytest.mark.parametrize("name", MODELS)
def test_unit_activations_follow_the_permutation_spec(name):
    """One array per group, units on axis 1 in the spec's order: permuting the parameters by P permutes the
    activations' unit axis by P (unit u of B is unit P[u] of A)."""
    model, params, spec, perms, shuffled = _shuffled(name)
    cfg, shape = MODELS[name]
    x = _inputs(cfg, shape, 5, 2)
    acts_a = model.unit_activations(params, x)
    acts_b = model.unit_activations(shuffled, x)
    assert len(acts_a) == len(spec)
    assert [a.shape[1] for a in acts_a] == _widths(params, spec)
    positions = {"mlp": 1, "cnn": None, "transformer": shape[0]}[cfg.kind]
    for a, b, p in zip(acts_a, acts_b, perms):
        if positions is not None:
            assert a.shape[0] == 5 * positions
        np.testing.assert_allclose(b, np.take(np.asarray(a), p, axis=1), rtol=1e-4, atol=1e-5)
        assert not np.allclose(b, a, atol=1e-3)  # the check sees the order
    if cfg.kind == "cnn":  # stride 2, SAME: 20 then 10 positions per example
        assert [a.shape for a in acts_a] == [(5 * 20, 8), (5 * 10, 8)]
    if cfg.kind == "transformer":  # residual × (2·depth + 1) sites; MLP units; heads × head dims
        assert [a.shape[1:] for a in acts_a] == [(16, 5), (64,), (4, 4), (64,), (4, 4)]


@pytest.mark.parametrize("name", [pytest.param(name, marks=[pytest.mark.slow] if name == "transformer" else [])
                                  for name in MODELS])
def test_activation_matching_recovers_a_known_permutation_as_weight_matching_does(name):
    model, params, spec, perms, shuffled = _shuffled(name)
    cfg, shape = MODELS[name]
    pair = jax.tree.map(lambda a, b: jnp.stack([a, b]), params, shuffled)
    xs = _inputs(cfg, shape, 40, 3)
    # Batches of 16 over 40 examples: the statistics span three batches, the last one short.
    found = permute.match_activations(model, pair, [(0, 1), (1, 0)], xs, batch_size=16)
    assert [f.shape for f in found] == [(2, w) for w in _widths(params, spec)]
    for f, p in zip(found, perms):
        np.testing.assert_array_equal(f[0], np.argsort(p))  # B onto A: the inverse
        np.testing.assert_array_equal(f[1], p)  # A onto B: the permutation itself
    aligned = permute.permute(shuffled, [jnp.asarray(f[0]) for f in found], spec)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(aligned)):
        np.testing.assert_array_equal(a, b)  # B aligned back is A, bit for bit

    weights = permute.match_pairs(model, pair, [(0, 1), (1, 0)])
    for f, w in zip(found, weights):
        np.testing.assert_array_equal(f, w)  # one convention for both methods

    ys = np.asarray(model.apply(params, xs)).argmax(-1).astype(np.int32)
    fn = paths.make_path_eval(model, paths.straight(), paths.alpha_grid(5), 1)
    sets = {"t": train.batch_eval_set(np.asarray(xs), ys, 20)}
    ij = jnp.asarray([[0, 1]], jnp.int32)
    naive = fn(pair, ij, sets)["t"][0]
    after = fn(pair, ij, sets, [jnp.asarray(f[:1]) for f in found])["t"][0]
    assert stats.barrier_endpoint_mean(after)[0] == pytest.approx(0.0, abs=1e-5)  # one function all along
    assert stats.barrier_endpoint_mean(naive)[0] > 0.01


@pytest.mark.parametrize("name", ["mlp", "transformer"])
def test_the_costs_are_pearson_correlations_summed_over_a_units_features(name):
    """Against numpy on two independent members, one with a dead unit: batching changes nothing, a dead unit
    correlates 0 (no NaN), and a unit's features (the residual stream's sites, a head's dimensions) are correlated
    one by one and summed."""
    cfg, shape = MODELS[name]
    model = models.build(cfg, shape, 3)
    params_M = jax.vmap(model.init)(jax.random.split(jax.random.key(0), 2))
    if cfg.kind == "mlp":  # unit 3 of member 1's first layer never fires
        params_M["dense0"]["bias"] = params_M["dense0"]["bias"].at[1, 3].set(-1e3)
    xs = _inputs(cfg, shape, 30, 4)
    pairs = [(0, 1), (1, 1)]
    got = permute.activation_correlations(model, params_M, pairs, xs, batch_size=7)
    whole = permute.activation_correlations(model, params_M, pairs, xs, batch_size=1000)
    members = [jax.tree.map(lambda a, m=m: a[m], params_M) for m in range(2)]
    acts = [[np.asarray(a, np.float64) for a in model.unit_activations(member, xs)] for member in members]
    for k, (g, w) in enumerate(zip(got, whole)):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)
        for p, (i, j) in enumerate(pairs):
            a, b = (acts[m][k].reshape(*acts[m][k].shape[:2], -1) for m in (i, j))
            features = a.shape[2]
            want = sum(_corr(a[:, :, f], b[:, :, f]) for f in range(features))
            np.testing.assert_allclose(g[p], want, rtol=1e-4, atol=1e-4)
        self_corr = np.asarray(g[1])  # member 1 with itself: Σ_f 1 on the diagonal, dead units 0
        live = np.asarray(acts[1][k].reshape(*acts[1][k].shape[:2], -1).std(0) > 0).all(1)
        np.testing.assert_allclose(np.diag(self_corr)[live], features, rtol=1e-4)
        assert np.isfinite(self_corr).all()
    if cfg.kind == "mlp":
        assert not np.asarray(acts[1][0][:, 3]).any()
        np.testing.assert_array_equal(np.asarray(got[0][:, :, 3][0]), 0.0)  # the dead unit: 0, not NaN


def _corr(a, b):
    """Pearson correlations of a's columns with b's (columns of no variance: 0)."""
    za = (a - a.mean(0)) / np.where(a.std(0) > 0, a.std(0), 1.0)
    zb = (b - b.mean(0)) / np.where(b.std(0) > 0, b.std(0), 1.0)
    return za.T @ zb / len(a)


def test_a_kind_without_a_permutation_spec_cannot_be_activation_matched(monkeypatch):
    mlp = models.KINDS["mlp"]
    monkeypatch.setitem(models.KINDS, "plain", dataclasses.replace(mlp, name="plain", permutation_spec=None))
    model = models.build(ModelConfig(kind="plain", width=8, depth=1), (6,), 3)
    params_M = jax.vmap(model.init)(jax.random.split(jax.random.key(0), 2))
    with pytest.raises(ValueError, match="'plain' declares no permutation spec"):
        permute.match_activations(model, params_M, [(0, 1)], np.zeros((4, 6), np.float32))
