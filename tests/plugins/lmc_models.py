"""Model kinds that a config names by import path (`model.kind = "lmc_models:SCALED_TANH"`), with hyperparameters
of their own in [model.args], checked against the kind's dataclass."""
import dataclasses

import jax
import numpy as np
from flax import nnx

from jaxlmc import data, models
from jaxlmc.models import Classifier, ModelKind, UnitAxis


def _points(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Three classes of 12-dimensional points, by which of three fixed directions they lie closest to."""
    directions = np.random.default_rng(0).normal(size=(12, 3))
    x = np.random.default_rng(seed).normal(size=(n, 12)).astype(np.float32)
    return x, (x @ directions).argmax(1).astype(np.int32)


data.register_dataset("points", lambda: {"train": _points(1, 1000), "test": _points(2, 300)}, 3)


@dataclasses.dataclass(frozen=True)
class TanhArgs:
    hidden: int = 16  # tanh units
    gain: float = 1.0  # the pre-activation's scale


class ScaledTanh(Classifier):
    def __init__(self, cfg, input_shape, num_classes, rngs: nnx.Rngs):
        self.gain = cfg.args.gain
        self.hidden = nnx.Linear(int(np.prod(input_shape)), cfg.args.hidden, rngs=rngs)
        self.head = nnx.Linear(cfg.args.hidden, num_classes, rngs=rngs)

    def features(self, x, drop=None):
        return models.dropout(jax.nn.tanh(self.gain * self.hidden(x.reshape(x.shape[0], -1))), drop, 0)


def permutation_spec(cfg, input_shape):
    return [[UnitAxis("hidden", "kernel", 1), UnitAxis("hidden", "bias", 0), UnitAxis("head", "kernel", 0)]]


SCALED_TANH = ModelKind("scaled_tanh", ScaledTanh, lambda cfg: ["hidden"], permutation_spec, min_depth=0,
                        args=TanhArgs)
