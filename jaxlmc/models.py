"""Flax NNX models: an MLP and a small CNN (1-D signals or 2-D images), with no normalisation or LayerNorm.

No model here uses BatchNorm: interpolated networks would carry stale batch statistics (BRIEF §2), and BatchNorm
under vmap needs per-member running state. Every model is a `Classifier`: `features` (the body, whose output is the
penultimate representation) followed by a linear `head`, so a fine-tuning task with a new label set replaces
`params["head"]` only.

At the boundary a module is split into a graphdef and a pure dict of parameters; the training core works on those
pure pytrees (with a leading member axis) and calls `apply`.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlmc.config import ModelConfig


class PatchConv(nnx.Conv):
    """nnx.Conv (same parameters, same initialisation, SAME padding) computed as patches @ kernel.

    XLA:CPU runs small convolutions, and the grouped convolutions that vmap over members turns them into, an order
    of magnitude slower than the equivalent matmul; as patches (im2col) @ kernel the member axis becomes a batched
    matmul on every backend. Tested equal to nnx.Conv.
    """

    def __call__(self, x):
        kernel = self.kernel[...]  # (k..., in, out)
        spatial = "HW"[: kernel.ndim - 2] if kernel.ndim == 4 else "W"
        dims = ("N" + spatial + "C", spatial + "IO", "N" + spatial + "C")
        strides = (self.strides,) * (kernel.ndim - 2) if isinstance(self.strides, int) else tuple(self.strides)
        patches = jax.lax.conv_general_dilated_patches(x, kernel.shape[:-2], strides, "SAME",
                                                       dimension_numbers=dims)
        # Patch features are ordered (in, k...): move the kernel's input axis first to match.
        weight = jnp.moveaxis(kernel, -2, 0).reshape(-1, kernel.shape[-1])
        out = patches @ weight
        return out + self.bias[...].reshape((1,) * (out.ndim - 1) + (-1,))


class Classifier(nnx.Module):
    def __init__(self, cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int, rngs: nnx.Rngs):
        self.kind = cfg.kind
        self.depth = cfg.depth
        self.use_norm = cfg.norm == "layernorm"
        if cfg.kind == "mlp":
            fan_in = math.prod(input_shape)
            for i in range(cfg.depth):
                setattr(self, f"dense{i}", nnx.Linear(fan_in, cfg.width, rngs=rngs))
                if self.use_norm:
                    setattr(self, f"norm{i}", nnx.LayerNorm(cfg.width, rngs=rngs))
                fan_in = cfg.width
            feature_dim = fan_in  # depth 0: logistic regression on the flattened input
        else:
            # A 1-D signal of length L is a 1-channel sequence; an image H×W×C keeps its channels.
            spatial = input_shape[:1] if len(input_shape) == 1 else input_shape[:-1]
            channels = 1 if len(input_shape) == 1 else input_shape[-1]
            kernel = (cfg.kernel_size,) * len(spatial)
            for i in range(cfg.depth):
                # Stride 2 halves each spatial size, as in Greydanus's MNIST-1D CNN.
                setattr(self, f"conv{i}", PatchConv(channels, cfg.width, kernel, strides=2, padding="SAME",
                                                    rngs=rngs))
                if self.use_norm:
                    setattr(self, f"norm{i}", nnx.LayerNorm(cfg.width, rngs=rngs))
                channels = cfg.width
                spatial = tuple(-(-s // 2) for s in spatial)
            feature_dim = math.prod(spatial) * cfg.width
        self.head = nnx.Linear(feature_dim, num_classes, rngs=rngs)

    def features(self, x):
        """Penultimate representation of one example (no batch axis handled here: callers vmap or batch)."""
        if self.kind == "mlp":
            h = x.reshape(x.shape[0], -1)
            for i in range(self.depth):
                h = getattr(self, f"dense{i}")(h)
                if self.use_norm:
                    h = getattr(self, f"norm{i}")(h)
                h = jax.nn.relu(h)
            return h
        h = x[..., None] if x.ndim == 2 else x  # B×L → B×L×1
        for i in range(self.depth):
            h = getattr(self, f"conv{i}")(h)
            if self.use_norm:
                h = getattr(self, f"norm{i}")(h)
            h = jax.nn.relu(h)
        return h.reshape(h.shape[0], -1)

    def __call__(self, x):
        return self.head(self.features(x))


@dataclasses.dataclass(frozen=True)
class Model:
    """A model's static structure: graphdef plus the shapes it was built for. Parameters live elsewhere."""

    graphdef: nnx.GraphDef
    cfg: ModelConfig
    input_shape: tuple[int, ...]
    num_classes: int

    def init(self, key) -> dict:
        """Fresh parameters (a pure dict) from one PRNG key; vmap over keys for a member axis."""
        return init_params(self.cfg, self.input_shape, self.num_classes, key)

    def apply(self, params: dict, x_BxF):
        """Logits B×C of one member's `params` on a batch."""
        return nnx.merge(self.graphdef, params)(x_BxF)

    def features(self, params: dict, x_BxF):
        return nnx.merge(self.graphdef, params).features(x_BxF)


def init_params(cfg: ModelConfig, input_shape, num_classes: int, key) -> dict:
    model = Classifier(cfg, tuple(input_shape), num_classes, rngs=nnx.Rngs(params=key))
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def build(cfg: ModelConfig, input_shape, num_classes: int) -> Model:
    """The graphdef of a model, built abstractly (no parameters are allocated)."""
    abstract = nnx.eval_shape(lambda: Classifier(cfg, tuple(input_shape), num_classes, rngs=nnx.Rngs(0)))
    graphdef, _ = nnx.split(abstract)
    return Model(graphdef=graphdef, cfg=cfg, input_shape=tuple(input_shape), num_classes=num_classes)


def param_count(params: dict) -> int:
    """Number of scalars in one member's parameters (pass one member, not the stacked tree)."""
    return sum(int(math.prod(leaf.shape)) for leaf in jax.tree.leaves(params))


def tree_l2(a, b):
    """‖a − b‖₂ over all leaves of two parameter trees (one member each)."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(x - y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))))
