"""What every model kind shares: the `Classifier` contract, the `ModelKind` a kind registers, its permutation spec's
entries, per-member dropout, and `Model`, the static structure the training core works with.

No model uses BatchNorm: interpolated networks would carry stale batch statistics (Jordan et al. 2022, REPAIR), and BatchNorm under
vmap needs per-member running state. Every model is a `Classifier`: `features` (the body, whose output is the
penultimate representation) followed by a linear `head`, so a fine-tuning task with a new label set replaces
`params["head"]` only.

At the boundary a module is split into a graphdef and a pure dict of parameters; the training core works on those
pure pytrees (with a leading member axis) and calls `apply`.

This module does not read jaxlmc's config (the config validates against the registry, so it sits above): a kind
receives the `[model]` section as `cfg` and reads its fields (kind, width, depth, norm, kernel_size).
"""
from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

# Per-member dropout: (rate, key) of one member at one step, or None (evaluation, or no member uses dropout).
Dropout = tuple[jax.Array, jax.Array] | None


def dropout(h, drop: Dropout, layer: int):
    """Inverted dropout of hidden activations `h` with a traced per-member rate: each unit is kept with probability
    1 − rate and scaled by 1 / (1 − rate). Layer `layer` draws its own mask from the member's step key. At rate 0
    every unit is kept and scaled by exactly 1, so the result equals `h` bit for bit."""
    if drop is None:
        return h
    rate, key = drop
    keep = jax.random.uniform(jax.random.fold_in(key, layer), h.shape) >= rate
    return jnp.where(keep, h / (1.0 - rate), jnp.zeros_like(h))


class Classifier(nnx.Module):
    """A model kind's module. Each kind defines `features(x, drop=None)`, the batch's penultimate representation,
    and builds its layers and a linear `head` on those features in `__init__(cfg, input_shape, num_classes, rngs)`.

    A kind with a permutation spec also defines `unit_activations(x)` (see there), which activation matching reads.
    """

    head: nnx.Linear

    def __call__(self, x, drop: Dropout = None):
        features = self.features(x, drop)
        # µP's readout multiplier (jaxlmc.models.mup), set by kinds that support µP; 1 otherwise.
        scale = getattr(self, "readout_scale", 1.0)
        return self.head(features if scale == 1.0 else features * scale)

    def unit_activations(self, x) -> list[jax.Array]:
        """The activations of each permutation group's units on the batch `x` (no dropout), one array per group in
        the permutation spec's order, each N × units × (features…):

        * N examples: positions folded in where a kind has them, example-major (an example's positions are
          consecutive rows);
        * the units, on the axis the group's permutation reorders: unit u is the unit that the spec's parameter axes
          index at u, so permuting the parameters permutes this axis alike;
        * optional trailing features that belong to one unit as a whole (a transformer head's dimensions).

        Activation matching correlates unit u of one member with unit v of another feature by feature, and sums over
        the features."""
        raise NotImplementedError(f"{type(self).__name__} does not expose its units' activations")


@dataclasses.dataclass(frozen=True)
class UnitAxis:
    """One parameter axis indexed by a hidden layer's units: the leaf `name` of the (sub)module at the key path
    `layer` — "dense0", or dotted through nested modules, "blocks.0.mlp.fc1" — along `axis`. With `blocks` > 1 the
    axis holds `blocks` consecutive copies of the units (a CNN head's flattened positions × channels)."""

    layer: str
    name: str
    axis: int
    blocks: int = 1

    @property
    def path(self) -> tuple[str, ...]:
        return (*self.layer.split("."), self.name)


def _key(tree: dict, key: str, path: tuple[str, ...]):
    """The key of `tree` that a path element names: itself, or the integer it spells (nnx.List and list attributes
    give integer keys)."""
    if key in tree:
        return key
    if key.isdigit() and int(key) in tree:
        return int(key)
    raise KeyError(f"parameter path {'.'.join(path)!r}: no {key!r} among {sorted(map(str, tree))}")


def get_path(params: dict, path: tuple[str, ...]):
    """The leaf of a nested parameter dict at a key path (UnitAxis.path)."""
    node = params
    for key in path:
        node = node[_key(node, key, path)]
    return node


def set_path(params: dict, path: tuple[str, ...], value) -> dict:
    """A copy of `params` (copied along the path only) with the leaf at `path` replaced by `value`."""
    key = _key(params, path[0], path)
    return {**params, key: value if len(path) == 1 else set_path(params[key], path[1:], value)}


# For each hidden layer in order: every parameter axis its units index (one permutation per hidden layer).
PermutationSpec = list[list[UnitAxis]]


@dataclasses.dataclass(frozen=True)
class ModelKind:
    """A registered model kind: its module, the order of its hidden layers and its permutation spec.

    `layers(cfg)` names the hidden layers in order. `permutation_spec(cfg, input_shape)` says which parameter axes each
    hidden layer's units index (a `sequence` kind's also takes `per_token`, as its module does); a kind without one
    (None) cannot be weight-matched, and `barriers.align` on it is a config error, never a silent wrong alignment.
    """

    name: str
    module: type[Classifier]
    layers: Callable[..., list[str]]
    permutation_spec: Callable[..., PermutationSpec] | None
    min_depth: int = 1  # the least model.depth the kind accepts
    sequence: bool = False  # it reads token sequences, and can predict a label per position (per_token)
    # The units a layer-wise barrier interpolates one at a time: {name: top-level parameter keys}, in the network's
    # order. None: every top-level parameter group alone (one layer each).
    layer_groups: Callable[..., dict[str, list[str]]] | None = None
    # REPAIR (jaxlmc.repair): per renormalised layer, (parameter key, the leaf scaled per unit on its last axis); the
    # key's "bias" is shifted. The module's `preactivations(x)` gives those layers' outputs in the same order. None:
    # REPAIR does not apply.
    repair_points: Callable[..., list[tuple[str, str]]] | None = None
    dropout: bool = True  # its module's call takes a second argument, `drop` (per-member dropout while training)
    pads: bool = False  # it reads negative token ids as padding (never attended to): tokenized text
    token_types: bool = False  # it also reads inputs B×T×2, token ids and token types (sentence pairs)
    # The dataclass of its own hyperparameters, read from [model.args] (cfg.args is then an instance); None: none.
    args: type | None = None
    # Its module applies µP's own parts (jaxlmc.models.mup: the readout multiplier `readout_scale`, and a
    # transformer's attention scale) when model.parametrization is "mup"; only such kinds accept it.
    mup: bool = False


@dataclasses.dataclass(frozen=True)
class Model:
    """A model's static structure: graphdef plus the shapes it was built for. Parameters live elsewhere."""

    graphdef: nnx.GraphDef
    cfg: object  # jaxlmc.config.ModelConfig
    kind: ModelKind
    input_shape: tuple[int, ...]
    num_classes: int
    per_token: bool = False  # logits per position (B×T×C, a language model's) instead of per example (B×C)

    def init(self, key) -> dict:
        """Fresh parameters (a pure dict) from one PRNG key; vmap over keys for a member axis."""
        module = _module(self.kind, self.cfg, self.input_shape, self.num_classes, nnx.Rngs(params=key), self.per_token)
        return nnx.to_pure_dict(nnx.state(module, nnx.Param))

    def apply(self, params: dict, x_BxF, drop: Dropout = None):
        """Logits B×C (B×T×C per token) of one member's `params` on a batch (with dropout when `drop` is given:
        training only; a module is called with the batch alone otherwise, so any module mapping a batch to logits
        works)."""
        module = nnx.merge(self.graphdef, params)
        return module(x_BxF) if drop is None else module(x_BxF, drop)

    def features(self, params: dict, x_BxF):
        return nnx.merge(self.graphdef, params).features(x_BxF)

    def unit_activations(self, params: dict, x_BxF) -> list[jax.Array]:
        """One member's activations of each permutation group's units on a batch, in the spec's group order: arrays
        N × units × (features…) (`Classifier.unit_activations`). Vmap over a member axis for many members."""
        return nnx.merge(self.graphdef, params).unit_activations(x_BxF)

    def layers(self) -> list[str]:
        return self.kind.layers(self.cfg)

    def repair_points(self) -> list[tuple[str, str]]:
        if self.kind.repair_points is None:
            raise ValueError(f"model kind {self.kind.name!r} declares no REPAIR points (set barriers.repair = false)")
        return self.kind.repair_points(self.cfg)

    def preactivations(self, params: dict, x_BxF) -> list[jax.Array]:
        """One member's outputs of its repair points' layers on a batch (inputs to the nonlinearities), in the order of
        `repair_points`, each … × units."""
        return nnx.merge(self.graphdef, params).preactivations(x_BxF)

    def layer_groups(self, params: dict) -> dict[str, list[str]]:
        """{name: top-level parameter keys} of the layers (or blocks) a layer-wise barrier interpolates one at a
        time, in the network's order; `params` is one member's (only its keys are read). Every key is in exactly one
        group."""
        if self.kind.layer_groups is None:
            return {key: [key] for key in params}
        groups = self.kind.layer_groups(self.cfg)
        grouped = sorted(k for keys in groups.values() for k in keys)
        if grouped != sorted(params):
            raise ValueError(f"model kind {self.kind.name!r}: layer groups cover {grouped}, the parameters are "
                             f"{sorted(params)}")
        return groups

    def permutation_spec(self) -> PermutationSpec:
        if self.kind.permutation_spec is None:
            raise ValueError(f"model kind {self.kind.name!r} declares no permutation spec: its members cannot be "
                             "weight-matched (set barriers.align = false)")
        # As the module is built: a sequence kind is told whether its head predicts a label per position.
        extra = {"per_token": self.per_token} if self.kind.sequence else {}
        return self.kind.permutation_spec(self.cfg, self.input_shape, **extra)


def _module(kind: ModelKind, cfg, shape, num_classes: int, rngs: nnx.Rngs, per_token: bool) -> Classifier:
    if per_token and not kind.sequence:
        raise ValueError(f"model kind {kind.name!r} predicts one label per example, not one per position")
    extra = {"per_token": per_token} if kind.sequence else {}
    return kind.module(cfg, shape, num_classes, rngs=rngs, **extra)


def build(kind: ModelKind, cfg, input_shape, num_classes: int, per_token: bool = False) -> Model:
    """The graphdef of a model, built abstractly (no parameters are allocated). `per_token`: a label per position
    (language modelling), for kinds that read sequences."""
    shape = tuple(input_shape)
    abstract = nnx.eval_shape(lambda: _module(kind, cfg, shape, num_classes, nnx.Rngs(0), per_token))
    graphdef, _ = nnx.split(abstract)
    return Model(graphdef=graphdef, cfg=cfg, kind=kind, input_shape=shape, num_classes=num_classes,
                 per_token=per_token)


class _Factory:
    """A `ModelKind.module` for a user's own module: `make(rngs)` builds it; the config, shape and class count a
    registered kind reads are not its business."""

    def __init__(self, make: Callable[[nnx.Rngs], nnx.Module] | None, name: str):
        self.make, self.name = make, name

    def __call__(self, cfg, input_shape, num_classes, rngs: nnx.Rngs) -> nnx.Module:
        if self.make is None:
            raise TypeError(f"model {self.name!r} was given as a module instance: its parameters are the one start "
                            "every member shares; pass a function rngs -> module to draw an initialisation per seed")
        return self.make(rngs)


def from_module(module_or_make, input_shape, num_classes: int, permutation_spec: PermutationSpec | None = None,
                name: str = "") -> tuple[Model, dict | None]:
    """(model, params): a `Model` for any Flax NNX module whose call maps a batch to logits, and — when given a module
    instance — its parameters as a pure dict (None for a factory `rngs -> module`, whose `Model.init(key)` draws them).

    The module's state must be parameters only (nnx.Param): every member's state is a slice of one stacked pytree,
    and batch statistics or RNG state have no per-member meaning under vmap (jaxlmc.models explains why no BatchNorm).
    `permutation_spec` (UnitAxis entries, key paths through nested modules) makes its members weight-matchable.
    Per-member dropout needs a module whose call takes a second argument, `drop` (`dropout`); a `features`/`head`
    split only where a feature reads it (the linear probe, a new head)."""
    make = None if isinstance(module_or_make, nnx.Module) else module_or_make
    label = name or (type(module_or_make).__name__ if make is None else getattr(make, "__name__", "module"))
    shape = tuple(input_shape)
    abstract = module_or_make if make is None else nnx.eval_shape(lambda: make(nnx.Rngs(0)))
    if not isinstance(abstract, nnx.Module):
        raise TypeError(f"model {label!r}: a Flax NNX module or a function rngs -> module was expected, got "
                        f"{type(abstract).__name__}")
    others = [".".join(map(str, path)) + f" ({type(v).__name__})"
              for path, v in nnx.to_flat_state(nnx.state(abstract, nnx.Not(nnx.Param)))]
    if others:
        raise TypeError(f"model {label!r} holds state other than parameters: {', '.join(others[:4])}; jaxlmc vmaps "
                        "pure parameters (no BatchNorm statistics, no RNG state: dropout takes `drop`)")
    spec = None if permutation_spec is None else (lambda cfg, input_shape: permutation_spec)
    takes_drop = len(inspect.signature(type(abstract).__call__).parameters) >= 3  # (self, x, drop)
    kind = ModelKind(name=label, module=_Factory(make, label), layers=lambda cfg: [], permutation_spec=spec,
                     dropout=takes_drop)
    graphdef, state = nnx.split(abstract)
    model = Model(graphdef=graphdef, cfg=None, kind=kind, input_shape=shape, num_classes=num_classes)
    return model, (nnx.to_pure_dict(state) if make is None else None)


def block_spec(prefix: str, fc_in: str = "fc_in", fc_out: str = "fc_out") -> tuple[list[UnitAxis], list[list[UnitAxis]]]:
    """One transformer block's part of a permutation spec, its modules named `{prefix}{name}` (LayerNorms ln1, ln2;
    q, k, v projecting D → H × d; o projecting H × d → D; the MLP `fc_in`, `fc_out`): (its axes on the residual
    stream, [its MLP units, its whole heads]). Heads are permuted as wholes, so rotary dimensions stay in place."""
    def at(name):
        return f"{prefix}{name}"
    residual = [UnitAxis(at(ln), p, 0) for ln in ("ln1", "ln2") for p in ("scale", "bias")]
    residual += [UnitAxis(at(name), "kernel", 0) for name in ("q", "k", "v", fc_in)]
    residual += [UnitAxis(at("o"), "kernel", 2), UnitAxis(at("o"), "bias", 0),
                 UnitAxis(at(fc_out), "kernel", 1), UnitAxis(at(fc_out), "bias", 0)]
    mlp = [UnitAxis(at(fc_in), "kernel", 1), UnitAxis(at(fc_in), "bias", 0), UnitAxis(at(fc_out), "kernel", 0)]
    heads = [UnitAxis(at(name), p, 1 if p == "kernel" else 0) for name in "qkv" for p in ("kernel", "bias")]
    return residual, [mlp, heads + [UnitAxis(at("o"), "kernel", 0)]]


def block_activations(stream: list[jax.Array], blocks: list[tuple[jax.Array, jax.Array]]) -> list[jax.Array]:
    """The activations of `block_spec`'s groups, every position an example (N = B·T): the residual stream at each of
    its sites (B × T × D each), N × D × sites — one feature per site, so that activation matching sums per-site
    correlations rather than pooling sites of different scales — then per block its MLP units N × I and its heads
    N × H × d (`blocks`: each block's (units B × T × I, heads B × T × H × d))."""
    n = stream[0].shape[0] * stream[0].shape[1]
    acts = [jnp.stack(stream, axis=-1).reshape(n, stream[0].shape[-1], len(stream))]
    for units, heads in blocks:
        acts += [units.reshape(n, units.shape[-1]), heads.reshape(n, *heads.shape[2:])]
    return acts


def remat(block: Callable, enabled: bool) -> Callable:
    """`block`'s call, its activations recomputed in the backward pass when `enabled` (gradient checkpointing: a
    block's memory for about a third more compute)."""
    return jax.checkpoint(lambda *args: block(*args)) if enabled else block


def param_count(params: dict) -> int:
    """Number of scalars in one member's parameters (pass one member, not the stacked tree)."""
    return sum(int(math.prod(leaf.shape)) for leaf in jax.tree.leaves(params))


def tree_l2(a, b):
    """‖a − b‖₂ over all leaves of two parameter trees (one member each)."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(x - y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))))
