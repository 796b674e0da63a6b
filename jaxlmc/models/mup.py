"""The maximal-update parametrisation (µP; Yang et al. 2021, Tensor Programs V, after its Table 8 and the `mup`
package): a rate means the same at every width, so sizes can be compared at "the same" rate.

Relative to a reference width `base_width` (m = width / base_width; at m = 1 µP is the standard parametrisation):

* the head reads its features divided by m (the readout multiplier; `readout_scale`), its kernel drawn √m times the
  standard scale (`mup`'s rescaling: the effective readout's variance falls as 1 / width², Tensor Programs V's
  Table 3);
* a transformer's attention divides its scores by d instead of √d (scaled to equal √d at the base width);
* each parameter's update is scaled by how many of its dimensions grow with the width (found by building the model
  at the base width and comparing shapes, as `mup`'s base shapes do):

  | optimiser | both dims grow (hidden matrices) | one grows (input kernel, biases, norms, embeddings, head) | none |
  |---|---|---|---|
  | Adam-family | 1 / m | 1 | 1 |
  | SGD | 1 | m | 1 |

Initialisation stays each kind's own (variance 1 / fan-in for the dense layers), as in `mup`'s default.
"""
from __future__ import annotations

import dataclasses

import jax

# How an optimiser's update depends on the gradient's scale, which decides µP's per-layer rates.
UPDATE_RULES = ("adam", "sgd")


def width_ratio(cfg) -> float:
    """m = width / base_width under µP; 1 under the standard parametrisation (or for a config without one)."""
    if getattr(cfg, "parametrization", "standard") != "mup":
        return 1.0
    return cfg.width / cfg.base_width


def readout_scale(cfg) -> float:
    """The factor on the features the head reads: 1 / m."""
    return 1.0 / width_ratio(cfg)


def init_readout(head, cfg) -> None:
    """µP's readout initialisation: the head's kernel (drawn at the standard scale) times √m."""
    m = width_ratio(cfg)
    if m != 1.0:
        head.kernel[...] = head.kernel[...] * m ** 0.5


def growing_dims(model) -> dict:
    """Per parameter leaf, how many of its dimensions grow with the width: its shape at `model.cfg.width` against the
    same model at `base_width` (at twice the width when the two are equal), shapes only."""
    cfg = model.cfg
    other = cfg.base_width if cfg.base_width != cfg.width else 2 * cfg.width
    at_other = dataclasses.replace(model, cfg=dataclasses.replace(cfg, width=other))  # its init reads only cfg
    shapes, other_shapes = (jax.eval_shape(m.init, jax.random.key(0)) for m in (model, at_other))
    return jax.tree.map(lambda a, b: int(sum(x != y for x, y in zip(a.shape, b.shape))), shapes, other_shapes)


def update_factors(model, rule: str) -> dict | None:
    """Per parameter leaf, the factor on the optimiser's update under µP for an optimiser of update rule `rule`
    ("adam" or "sgd"); None under the standard parametrisation or at the base width (every factor 1)."""
    m = width_ratio(model.cfg)
    if m == 1.0:
        return None
    if rule not in UPDATE_RULES:
        raise ValueError(f"µP's per-layer rates are known for update rules {list(UPDATE_RULES)}, not {rule!r}")
    grow = growing_dims(model)
    if rule == "adam":
        return jax.tree.map(lambda g: 1.0 / m if g >= 2 else 1.0, grow)
    return jax.tree.map(lambda g: m if g == 1 else 1.0, grow)
