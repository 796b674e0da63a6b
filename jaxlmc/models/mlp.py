"""The MLP kind: `depth` hidden layers of `width` units (ReLU, optional LayerNorm), then the head. Depth 0 is
logistic regression on the flattened input."""
from __future__ import annotations

import math

import jax
from flax import nnx

from jaxlmc.models import mup
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
        if cfg.depth:
            mup.init_readout(self.head, cfg)
        self.readout_scale = mup.readout_scale(cfg) if cfg.depth else 1.0  # µP's (1 under the standard one)

    def _body(self, x, drop: Dropout):
        """(features, every hidden layer's output after its nonlinearity and dropout, and its input to the
        nonlinearity)."""
        h = x.reshape(x.shape[0], -1)
        hidden, pre = [], []
        for i in range(self.depth):
            h = getattr(self, f"dense{i}")(h)
            if self.use_norm:
                h = getattr(self, f"norm{i}")(h)
            pre.append(h)
            h = dropout(jax.nn.relu(h), drop, i)
            hidden.append(h)
        return h, hidden, pre

    def features(self, x, drop: Dropout = None):
        return self._body(x, drop)[0]

    def unit_activations(self, x) -> list[jax.Array]:
        """Hidden layer k's units: its post-ReLU outputs (after its LayerNorm, if any), B × width."""
        return self._body(x, None)[1]

    def preactivations(self, x) -> list[jax.Array]:
        """Hidden layer k's input to its ReLU (after its LayerNorm, if any), B × width: what REPAIR renormalises."""
        return self._body(x, None)[2]


def repair_points(cfg) -> list[tuple[str, str]]:
    """Per hidden layer, the per-unit affine parameters that produce its ReLU's input: its LayerNorm's scale (and
    bias) when it has one, else its kernel (output axis) and bias."""
    return [(f"norm{i}", "scale") if cfg.norm == "layernorm" else (name, "kernel") for i, name in enumerate(layers(cfg))]


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


KIND = ModelKind("mlp", MLP, layers, permutation_spec, min_depth=0, repair_points=repair_points,
                mup=True)
