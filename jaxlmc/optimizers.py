"""Optimisers by name (`pretrain.optimizer`, `finetune.optimizer`): a registry of factories

    factory(lr, weight_decay, momentum) -> optax.GradientTransformation

for one member, where `lr` and `weight_decay` may be traced scalars (every member its own, per step). A plugin module
(`[plugins] modules`) adds its own with `register_optimizer`; configs then name it like a built-in one.
"""
from __future__ import annotations

from typing import Callable

import optax

from jaxlmc.models import mup
from jaxlmc.registry import Registry

Factory = Callable[..., optax.GradientTransformation]


def _adamw(lr, weight_decay, momentum) -> optax.GradientTransformation:
    return optax.adamw(lr, weight_decay=weight_decay)


def _sgd(lr, weight_decay, momentum) -> optax.GradientTransformation:
    return optax.chain(optax.add_decayed_weights(weight_decay), optax.sgd(lr, momentum=momentum or None))


OPTIMIZERS: Registry[Factory] = Registry("optimizer", {"adamw": _adamw, "sgd": _sgd})
# Each optimiser's update rule ("adam": the update's size does not follow the gradient's; "sgd": it does), which
# decides µP's per-layer rates (jaxlmc.models.mup); an optimiser without one cannot train a µP model.
UPDATE_RULES: dict[str, str] = {"adamw": "adam", "sgd": "sgd"}


def register_optimizer(name: str, factory: Factory, update_rule: str | None = None) -> None:
    """Make `name` usable as pretrain.optimizer and finetune.optimizer (OPTIMIZERS.register). A name already taken
    is refused. `update_rule` ("adam" or "sgd") lets it train µP models (model.parametrization = "mup")."""
    if update_rule is not None and update_rule not in mup.UPDATE_RULES:
        raise ValueError(f"optimizer {name!r}: update_rule must be one of {list(mup.UPDATE_RULES)}, got {update_rule!r}")
    OPTIMIZERS.register(name, factory)
    if update_rule is not None:
        UPDATE_RULES[name] = update_rule


def update_rule(name: str | Factory) -> str:
    """The update rule ("adam" or "sgd") µP scales an optimiser's per-layer rates by; an error naming the optimiser
    when it has none (a factory, or a registered name without one)."""
    rule = UPDATE_RULES.get(name) if isinstance(name, str) else None
    if rule is None:
        label = name if isinstance(name, str) else getattr(name, "__name__", repr(name))
        raise ValueError(f"optimizer {label!r} has no µP update rule: model.parametrization = \"mup\" needs "
                         f"one of {sorted(UPDATE_RULES)} or an optimizer registered with update_rule=\"adam\"/\"sgd\"")
    return rule


def from_optax(make_tx: Callable[..., optax.GradientTransformation], weight_decay: bool) -> Factory:
    """A factory from any optax constructor taking the learning rate first (`optax.adamw`, `optax.sgd`,
    `functools.partial(optax.sgd, momentum=0.9)`, one's own): called with each member's rate, and with
    `weight_decay=` its decay when `weight_decay` (some member decays; the constructor must then take it)."""
    if not callable(make_tx):
        raise TypeError(f"optimizer: a registered name or an optax constructor was expected, got {make_tx!r}")

    def factory(lr, decay, momentum) -> optax.GradientTransformation:
        return make_tx(lr, weight_decay=decay) if weight_decay else make_tx(lr)

    return factory


def make(name: str | Factory, momentum: float, lr, weight_decay) -> optax.GradientTransformation:
    """One member's optimiser: a registered name's, or a factory's own (`from_optax`)."""
    if callable(name):
        return name(lr, weight_decay, momentum)
    return OPTIMIZERS.lookup(name)(lr, weight_decay, momentum)
