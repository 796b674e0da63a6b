"""µP's coordinate check (Yang et al. 2021): after a few Adam steps at one rate, the change of the hidden features
grows with width under the standard parametrisation and stays flat under µP (work in progress: the logits' change
under µP still falls with width — the readout's initialisation is not settled; see the branch's commit)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlmc
from jaxlmc import models
from jaxlmc.settings import ModelConfig

WIDTHS = (64, 256, 1024)


def _feature_change(parametrization: str) -> list[float]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(512, 40)).astype(np.float32)
    y = rng.integers(0, 10, 512).astype(np.int32)
    out = []
    for width in WIDTHS:
        model = models.build(ModelConfig(kind="mlp", width=width, depth=3, parametrization=parametrization,
                                         base_width=64), (40,), 10)
        members = jaxlmc.fit(model, (x, y), lr=3e-3, seeds=1, steps=5, batch_size=64, chunk_steps=5, fit_margin=-1)
        start, end = (jax.tree.map(lambda a: a[0], p) for p in (members.start, members.params))
        out.append(float(jnp.sqrt(jnp.mean((model.features(end, x) - model.features(start, x)) ** 2))))
    return out


@pytest.mark.slow
def test_hidden_features_move_alike_at_every_width_under_mup_and_grow_under_standard():
    standard, mup = _feature_change("standard"), _feature_change("mup")
    assert standard[-1] / standard[0] > 2.5
    assert 0.7 < mup[-1] / mup[0] < 1.3
    assert mup[0] == pytest.approx(standard[0])  # at the base width µP is the standard parametrisation
