"""REPAIR (Jordan et al. 2023): renormalised interpolations, against a hand-built pair whose variance collapse is
known and against a plain loop."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlmc import models, paths, repair, train
from jaxlmc.config import ModelConfig


def _one_layer_pair():
    """Two MLPs 2 → 2 → 2 whose hidden units read x₁ and x₂ in swapped order: averaged, each unit reads (x₁ + x₂)/2,
    whose standard deviation is 1/√2 of the endpoints' for independent standard-normal inputs — a known collapse."""
    model = models.build(ModelConfig(kind="mlp", width=2, depth=1), (2,), 2)
    base = model.init(jax.random.key(0))
    a = {**base, "dense0": {"kernel": jnp.eye(2), "bias": jnp.zeros(2)}}
    b = {**base, "dense0": {"kernel": jnp.asarray([[0.0, 1.0], [1.0, 0.0]]), "bias": jnp.zeros(2)}}
    return model, a, b


def test_repair_undoes_a_known_variance_collapse():
    model, a, b = _one_layer_pair()
    x = jax.random.normal(jax.random.key(1), (20000, 2))
    mid = paths.lerp(a, b, 0.5)
    (mean, std), = repair.unit_stats(model, mid, x)
    np.testing.assert_allclose(std, 1 / np.sqrt(2), rtol=0.02)  # the collapse: ½(x₁ + x₂)
    stats_a, stats_b = repair.unit_stats(model, a, x), repair.unit_stats(model, b, x)
    fixed = repair.repair(model, mid, stats_a, stats_b, 0.5, x)
    # Plain reference: the targets and the interpolated unit's statistics, by numpy.
    xs = np.asarray(x)
    target_std = 0.5 * xs.std(axis=0)[[0, 1]] + 0.5 * xs.std(axis=0)[[1, 0]]
    target_mean = 0.5 * xs.mean(axis=0)[[0, 1]] + 0.5 * xs.mean(axis=0)[[1, 0]]
    z = xs @ np.asarray(mid["dense0"]["kernel"])
    gain = target_std / z.std(axis=0)
    np.testing.assert_allclose(fixed["dense0"]["kernel"], np.asarray(mid["dense0"]["kernel"]) * gain, rtol=1e-5)
    np.testing.assert_allclose(fixed["dense0"]["bias"], -z.mean(axis=0) * gain + target_mean, atol=1e-5)
    np.testing.assert_allclose(gain, np.sqrt(2), rtol=0.02)
    (mean_r, std_r), = repair.unit_stats(model, fixed, x)
    np.testing.assert_allclose(std_r, target_std, rtol=1e-4)
    np.testing.assert_allclose(mean_r, target_mean, atol=1e-5)
    # The head is untouched; at an endpoint REPAIR changes nothing.
    np.testing.assert_array_equal(fixed["head"]["kernel"], mid["head"]["kernel"])
    same = repair.repair(model, a, stats_a, stats_b, 0.0, x)
    np.testing.assert_allclose(same["dense0"]["kernel"], a["dense0"]["kernel"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cfg, shape, tokens", [
    (ModelConfig(kind="mlp", width=8, depth=3), (5,), False),
    (ModelConfig(kind="mlp", width=8, depth=2, norm="layernorm"), (5,), False),
    (ModelConfig(kind="cnn", width=4, depth=2), (12,), False),
    (ModelConfig(kind="transformer", width=8, depth=2, heads=2, vocab_size=7), (6,), True)])
def test_every_repaired_layer_has_the_target_statistics_layer_after_layer(cfg, shape, tokens):
    """Deep networks: each layer is renormalised with the earlier ones already repaired, so every layer of the final
    network carries its target statistics (a one-shot correction of all layers would not)."""
    model = models.build(cfg, shape, 3)
    a, b = (model.init(jax.random.key(k)) for k in (2, 3))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.integers(0, 7, (64, *shape)).astype(np.float32) if tokens
                    else rng.normal(size=(64, *shape)).astype(np.float32))
    stats_a, stats_b = repair.unit_stats(model, a, x), repair.unit_stats(model, b, x)
    fixed = repair.repair(model, paths.lerp(a, b, 0.3), stats_a, stats_b, 0.3, x)
    for (mean, std), (ma, sa), (mb, sb) in zip(repair.unit_stats(model, fixed, x), stats_a, stats_b):
        np.testing.assert_allclose(std, 0.7 * sa + 0.3 * sb, rtol=2e-3, atol=1e-5)
        np.testing.assert_allclose(mean, 0.7 * ma + 0.3 * mb, atol=2e-4 * (1 + float(jnp.abs(ma).max())))


def test_the_compiled_pass_with_repair_matches_a_plain_loop():
    model = models.build(ModelConfig(kind="mlp", width=8, depth=2), (5,), 3)
    params_M = jax.vmap(model.init)(jax.random.split(jax.random.key(4), 3))
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(50, 5)).astype(np.float32), rng.integers(0, 3, 50).astype(np.int32)
    stats_x = jnp.asarray(rng.normal(size=(40, 5)).astype(np.float32))
    alphas = np.linspace(0, 1, 5, dtype=np.float32)
    pairs = [(0, 1), (2, 1)]
    fn = paths.make_path_eval(model, paths.repaired(model, stats_x), alphas, 2)
    loss = np.asarray(fn(params_M, jnp.asarray(pairs, jnp.int32), {"test": train.batch_eval_set(x, y, 16)})["test"][0])
    for p, (i, j) in enumerate(pairs):
        p_i, p_j = (jax.tree.map(lambda v, m=m: v[m], params_M) for m in (i, j))
        s_i, s_j = repair.unit_stats(model, p_i, stats_x), repair.unit_stats(model, p_j, stats_x)
        for k, alpha in enumerate(alphas):
            params = repair.repair(model, paths.lerp(p_i, p_j, float(alpha)), s_i, s_j, float(alpha), stats_x)
            expected = float(train.cross_entropy(model.apply(params, x), y).mean())
            assert loss[p, k] == pytest.approx(expected, rel=1e-4, abs=1e-5)
    plain = np.asarray(paths.make_path_eval(model, paths.straight(), alphas, 2)(params_M, jnp.asarray(pairs, jnp.int32),
                                                               {"test": train.batch_eval_set(x, y, 16)})["test"][0])
    np.testing.assert_allclose(loss[:, [0, -1]], plain[:, [0, -1]], rtol=1e-6)  # the endpoints are the members
    assert not np.allclose(loss[:, 1:-1], plain[:, 1:-1])  # the interior points were renormalised
