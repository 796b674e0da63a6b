"""Optimisers by name (`pretrain.optimizer`, `finetune.optimizer`): a registry of factories

    factory(lr, weight_decay, momentum) -> optax.GradientTransformation

for one member, where `lr` and `weight_decay` may be traced scalars (every member its own, per step). A plugin module
(`[plugins] modules`) adds its own with `register_optimizer`; configs then name it like a built-in one.
"""
from __future__ import annotations

from typing import Callable

import optax

Factory = Callable[..., optax.GradientTransformation]


def _adamw(lr, weight_decay, momentum) -> optax.GradientTransformation:
    return optax.adamw(lr, weight_decay=weight_decay)


def _sgd(lr, weight_decay, momentum) -> optax.GradientTransformation:
    return optax.chain(optax.add_decayed_weights(weight_decay), optax.sgd(lr, momentum=momentum or None))


OPTIMIZERS: dict[str, Factory] = {"adamw": _adamw, "sgd": _sgd}


def register_optimizer(name: str, factory: Factory) -> None:
    """Make `name` usable as pretrain.optimizer and finetune.optimizer. A name already taken is refused."""
    if name in OPTIMIZERS:
        raise ValueError(f"optimizer {name!r} is already registered")
    OPTIMIZERS[name] = factory


def make(name: str, momentum: float, lr, weight_decay) -> optax.GradientTransformation:
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; registered: {sorted(OPTIMIZERS)}")
    return OPTIMIZERS[name](lr, weight_decay, momentum)
