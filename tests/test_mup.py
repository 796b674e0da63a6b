"""µP (jaxlmc.models.mup): the coordinate check of Yang et al. 2021 — after a few steps at one rate, how far the
hidden features and the logits move grows with the width under the standard parametrisation and stays flat under µP,
for Adam and for SGD — and the parts it is made of: which parameters count as hidden matrices, equality with the
standard parametrisation at the base width, and the refusals."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
import pytest

import jaxlmc
from jaxlmc import models, optimizers
from jaxlmc.config import ConfigError, load
from jaxlmc.models import mup
from jaxlmc.settings import ModelConfig

WIDTHS = (256, 1024, 4096)


def _changes(parametrization: str, optimizer: str, lr: float) -> np.ndarray:
    """Per width, the RMS change of the last hidden layer's features and of the logits after 5 steps (widths × 2)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(512, 40)).astype(np.float32)
    y = rng.integers(0, 10, 512).astype(np.int32)
    out = []
    for width in WIDTHS:
        model = models.build(ModelConfig(kind="mlp", width=width, depth=3, parametrization=parametrization,
                                         base_width=64), (40,), 10)
        members = jaxlmc.fit(model, (x, y), lr=lr, seeds=1, steps=5, batch_size=64, chunk_steps=5, fit_margin=-1,
                             optimizer=optimizer)
        start, end = (jax.tree.map(lambda a: a[0], p) for p in (members.start, members.params))
        out.append([float(jnp.sqrt(jnp.mean((f(end, x) - f(start, x)) ** 2))) for f in (model.features, model.apply)])
    return np.asarray(out)


@pytest.mark.slow
@pytest.mark.parametrize("optimizer,lr", [("adamw", 3e-3), ("sgd", 0.05)])
def test_coordinate_check_features_and_logits_flat_under_mup_and_growing_under_standard(optimizer, lr):
    standard, mu = _changes("standard", optimizer, lr), _changes("mup", optimizer, lr)
    assert np.all(standard[-1] / standard[0] > 1.5), standard  # 16× the width: the change grows
    assert np.all(standard[-1, 1] / standard[0, 1] > 4.0), standard
    assert np.all(mu.max(axis=0) / mu.min(axis=0) < 1.3), mu  # flat within 30 % over 16× the width


def _mlp(width: int, parametrization: str = "mup") -> models.Model:
    return models.build(ModelConfig(kind="mlp", width=width, depth=3, parametrization=parametrization,
                                    base_width=64), (40,), 10)


def test_hidden_matrices_train_at_rate_over_m_under_adam_and_vectors_at_rate_times_m_under_sgd():
    model = _mlp(256)  # m = 4
    grow = mup.growing_dims(model)
    assert grow["dense0"] == {"kernel": 1, "bias": 1} and grow["dense2"] == {"kernel": 2, "bias": 1}
    assert grow["head"] == {"kernel": 1, "bias": 0}
    adam, sgd = mup.update_factors(model, "adam"), mup.update_factors(model, "sgd")
    assert adam["dense1"]["kernel"] == 0.25 and adam["dense0"]["kernel"] == adam["head"]["kernel"] == 1.0
    assert sgd["dense1"]["kernel"] == 1.0 and sgd["dense0"]["kernel"] == sgd["head"]["kernel"] == 4.0
    assert sgd["head"]["bias"] == 1.0 and sgd["dense1"]["bias"] == 4.0
    assert mup.update_factors(_mlp(256, "standard"), "adam") is None and mup.update_factors(_mlp(64), "adam") is None


def test_transformer_projections_are_hidden_matrices_and_embeddings_vectors():
    model = models.build(ModelConfig(kind="transformer", width=64, depth=1, heads=4, vocab_size=16,
                                     parametrization="mup", base_width=32), (8,), 5)
    grow = mup.growing_dims(model)
    assert all(grow[f"b0_{name}"]["kernel"] == 2 for name in ("q", "k", "v", "o", "fc1", "fc2"))
    assert grow["embed"]["embedding"] == grow["pos"]["embedding"] == grow["head"]["kernel"] == 1
    assert grow["b0_ln1"]["scale"] == 1 and grow["head"]["bias"] == 0


@pytest.mark.parametrize("kind", ["mlp", pytest.param("transformer", marks=pytest.mark.slow)])
def test_mup_at_its_base_width_is_the_standard_parametrisation_bit_for_bit(kind):
    extra = {"heads": 4, "vocab_size": 16} if kind == "transformer" else {}
    shape = (8,) if kind == "transformer" else (40,)
    rng = np.random.default_rng(1)
    x = (rng.integers(0, 16, (64, 8)) if kind == "transformer" else rng.normal(size=(64, 40))).astype(np.float32)
    y = rng.integers(0, 5, 64).astype(np.int32)
    runs = []
    for parametrization in ("standard", "mup"):
        model = models.build(ModelConfig(kind=kind, width=32, depth=2, parametrization=parametrization,
                                         base_width=32, **extra), shape, 5)
        runs.append(jaxlmc.fit(model, (x, y), lr=1e-2, seeds=2, steps=4, batch_size=16, chunk_steps=4,
                               fit_margin=-1).params)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(runs[0]), jax.tree.leaves(runs[1])))


def test_mup_head_reads_features_over_m_with_a_sqrt_m_wider_kernel():
    standard, mu = _mlp(256, "standard"), _mlp(256)
    key = jax.random.key(3)
    p_std, p_mup = standard.init(key), mu.init(key)
    np.testing.assert_allclose(p_mup["head"]["kernel"], 2.0 * p_std["head"]["kernel"], rtol=1e-6)
    x = np.random.default_rng(0).normal(size=(4, 40)).astype(np.float32)
    np.testing.assert_allclose(mu.apply(p_mup, x), standard.apply(p_std, x) / 2.0, rtol=1e-4, atol=1e-6)


def test_mup_refused_where_it_is_not_defined(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[model]\nkind = "cnn"\nparametrization = "mup"\n')
    with pytest.raises(ConfigError, match="does not implement µP"):
        load(str(path))
    path.write_text('[model]\nparametrization = "mup"\nbase_width = 0\n')
    with pytest.raises(ConfigError, match="model.base_width"):
        load(str(path))
    with pytest.raises(ValueError, match="no µP update rule"):
        optimizers.update_rule(lambda lr: None)
    with pytest.raises(ValueError, match="update_rule must be one of"):
        optimizers.register_optimizer("lion_mup", optimizers.OPTIMIZERS["sgd"], update_rule="lion")
    assert "lion_mup" not in optimizers.OPTIMIZERS
    x = np.zeros((32, 40), np.float32)
    with pytest.raises(ValueError, match="no µP update rule"):
        jaxlmc.fit(_mlp(128), (x, np.zeros(32, np.int32)), lr=1e-2, seeds=1, steps=1, batch_size=8,
                   optimizer=optimizers.from_optax(optax.sgd, weight_decay=False))


def _transformer_changes(parametrization: str) -> np.ndarray:
    """Per width (32, 128, 512; base 32), the RMS change of the residual stream, the last block's MLP units and the
    logits after 10 Adam steps at a small rate (the coordinate check's linear regime) (widths × 3)."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 32, size=(256, 16)).astype(np.float32)
    y = rng.integers(0, 10, 256).astype(np.int32)
    out = []
    for width in (32, 128, 512):
        model = models.build(ModelConfig(kind="transformer", width=width, depth=2, heads=4, vocab_size=32,
                                         parametrization=parametrization, base_width=32), (16,), 10)
        members = jaxlmc.fit(model, (x, y), lr=3e-5, seeds=1, steps=10, batch_size=32, chunk_steps=10, fit_margin=-1)
        start, end = (jax.tree.map(lambda a: a[0], p) for p in (members.start, members.params))

        def sites(params):
            _, stream, blocks = nnx.merge(model.graphdef, params)._run(x)
            return stream[-1], blocks[-1][0], model.apply(params, x)

        out.append([float(jnp.sqrt(jnp.mean((a - b) ** 2))) for a, b in zip(sites(end), sites(start))])
    return np.asarray(out)


@pytest.mark.slow
def test_transformer_coordinate_check():
    standard, mu = _transformer_changes("standard"), _transformer_changes("mup")
    assert np.all(standard[-1] / standard[0] > 2.5), standard  # 16× the width: every site's change grows
    # Under µP each site's change stays within a factor 1.7 (measured 2026-12-04: stream 0.078, 0.098, 0.071; MLP
    # units 0.040, 0.049, 0.034; logits 0.111, 0.113, 0.070 — the logits' finite-width drop is the largest).
    assert np.all(mu.max(axis=0) / mu.min(axis=0) < 1.7), mu
