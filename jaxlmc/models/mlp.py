"""The MLP kind: `depth` hidden layers of `width` units (ReLU, optional LayerNorm), then the head. Depth 0 is
logistic regression on the flattened input."""
from __future__ import annotations

import math

import jax
from flax import nnx

from jaxlmc.models.base import Classifier, Dropout, ModelKind, PermutationSpec, UnitAxis, dropout


def layers(cfg) -> list[str]:
    return [f"dense{i}" for i in range(cfg.depth)]


class MLP(Classifier):
    def __init__(self, cfg, input_shape: tuple[int, ...], num_classes: int, rngs: nnx.Rngs):
        self.depth = cfg.depth
        self.use_norm = cfg.norm == "layernorm"
        fan_in = math.prod(input_shape)
        # Layers are created in this order (dense0, norm0, dense1, …, head): it fixes which key each one draws.
        for i, name in enumerate(layers(cfg)):
            setattr(self, name, nnx.Linear(fan_in, cfg.width, rngs=rngs))
            if self.use_norm:
                setattr(self, f"norm{i}", nnx.LayerNorm(cfg.width, rngs=rngs))
            fan_in = cfg.width
        self.head = nnx.Linear(fan_in, num_classes, rngs=rngs)

    def features(self, x, drop: Dropout = None):
        h = x.reshape(x.shape[0], -1)
        for i in range(self.depth):
            h = getattr(self, f"dense{i}")(h)
            if self.use_norm:
                h = getattr(self, f"norm{i}")(h)
            h = dropout(jax.nn.relu(h), drop, i)
        return h


def permutation_spec(cfg, input_shape) -> PermutationSpec:
    """Hidden layer k's units: its kernel's output axis and bias, its LayerNorm, the next layer's kernel input axis."""
    names = layers(cfg)
    spec = []
    for k, name in enumerate(names):
        entries = [UnitAxis(name, "kernel", 1), UnitAxis(name, "bias", 0)]
        if cfg.norm == "layernorm":
            entries += [UnitAxis(f"norm{k}", "bias", 0), UnitAxis(f"norm{k}", "scale", 0)]
        following = names[k + 1] if k + 1 < len(names) else "head"
        spec.append(entries + [UnitAxis(following, "kernel", 0)])
    return spec


KIND = ModelKind("mlp", MLP, layers, permutation_spec, min_depth=0)
