"""The CNN kind, for 1-D signals (length L, one channel) and 2-D images (H×W×C): `depth` stride-2 convolutions of
`width` channels (ReLU, optional LayerNorm over channels), flattened, then the head. Convolutions run as
patches @ kernel (`PatchConv`)."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlmc.models.base import Classifier, Dropout, ModelKind, PermutationSpec, UnitAxis, dropout


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


def layers(cfg) -> list[str]:
    return [f"conv{i}" for i in range(cfg.depth)]


def _geometry(input_shape) -> tuple[tuple[int, ...], int]:
    """(spatial shape, channels) of an input: a 1-D signal of length L is a 1-channel sequence; an image H×W×C keeps
    its channels."""
    if len(input_shape) == 1:
        return tuple(input_shape), 1
    return tuple(input_shape[:-1]), input_shape[-1]


def _halved(spatial: tuple[int, ...], times: int) -> tuple[int, ...]:
    for _ in range(times):  # stride 2 halves each spatial size (rounding up), as in Greydanus's MNIST-1D CNN
        spatial = tuple(-(-s // 2) for s in spatial)
    return spatial


class CNN(Classifier):
    def __init__(self, cfg, input_shape: tuple[int, ...], num_classes: int, rngs: nnx.Rngs):
        self.depth = cfg.depth
        self.use_norm = cfg.norm == "layernorm"
        spatial, channels = _geometry(input_shape)
        kernel = (cfg.kernel_size,) * len(spatial)
        for i, name in enumerate(layers(cfg)):
            setattr(self, name, PatchConv(channels, cfg.width, kernel, strides=2, padding="SAME", rngs=rngs))
            if self.use_norm:
                setattr(self, f"norm{i}", nnx.LayerNorm(cfg.width, rngs=rngs))
            channels = cfg.width
        self.head = nnx.Linear(math.prod(_halved(spatial, cfg.depth)) * cfg.width, num_classes, rngs=rngs)

    def _body(self, x, drop: Dropout):
        """(the last conv layer's output B × positions… × channels, every conv layer's output after its
        nonlinearity and dropout)."""
        h = x[..., None] if x.ndim == 2 else x  # B×L → B×L×1
        hidden, pre = [], []
        for i in range(self.depth):
            h = getattr(self, f"conv{i}")(h)
            if self.use_norm:
                h = getattr(self, f"norm{i}")(h)
            pre.append(h)
            h = dropout(jax.nn.relu(h), drop, i)
            hidden.append(h)
        return h, hidden, pre

    def features(self, x, drop: Dropout = None):
        h = self._body(x, drop)[0]
        return h.reshape(h.shape[0], -1)

    def unit_activations(self, x) -> list[jax.Array]:
        """Conv layer k's channels: its post-ReLU outputs (after its LayerNorm, if any) with every position an
        example of its own, (B · positions) × width."""
        return [h.reshape(-1, h.shape[-1]) for h in self._body(x, None)[1]]

    def preactivations(self, x) -> list[jax.Array]:
        """Conv layer k's input to its ReLU (after its LayerNorm, if any), B × positions… × channels: what REPAIR
        renormalises, per channel over examples and positions."""
        return self._body(x, None)[2]


def repair_points(cfg) -> list[tuple[str, str]]:
    """Per conv layer, the per-channel affine parameters that produce its ReLU's input: its LayerNorm's scale (and
    bias) when it has one, else its kernel (output axis) and bias."""
    return [(f"norm{i}", "scale") if cfg.norm == "layernorm" else (name, "kernel") for i, name in enumerate(layers(cfg))]


def permutation_spec(cfg, input_shape) -> PermutationSpec:
    """Conv layer k's channels: its kernel's output axis and bias, its LayerNorm, the next kernel's input axis; after
    the last conv, the head's rows, flattened (positions × channels)."""
    spatial, _ = _geometry(input_shape)
    kernel_ndim = len(spatial) + 2  # (k…, in, out)
    names = layers(cfg)
    spec = []
    for k, name in enumerate(names):
        entries = [UnitAxis(name, "kernel", kernel_ndim - 1), UnitAxis(name, "bias", 0)]
        if cfg.norm == "layernorm":
            entries += [UnitAxis(f"norm{k}", "bias", 0), UnitAxis(f"norm{k}", "scale", 0)]
        if k + 1 < len(names):
            entries.append(UnitAxis(names[k + 1], "kernel", kernel_ndim - 2))
        else:
            entries.append(UnitAxis("head", "kernel", 0, blocks=math.prod(_halved(spatial, cfg.depth))))
        spec.append(entries)
    return spec


KIND = ModelKind("cnn", CNN, layers, permutation_spec, min_depth=1, repair_points=repair_points)
