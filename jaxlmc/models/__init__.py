"""Model kinds: a registry of `ModelKind`s, one file each (mlp.py, cnn.py, transformer.py), and `build`, which turns a `[model]`
config into a `Model`. A new kind defines its module (a `Classifier`), layer order and permutation spec, and is
registered with `register_kind` — from a plugin module (`[plugins] modules`) as well as from here."""
from __future__ import annotations

import dataclasses
import importlib

from jaxlmc.models import base, bert, cnn, gpt_neox, mlp, transformer
from jaxlmc.models.base import (Classifier, Dropout, Model, ModelKind, PermutationSpec, UnitAxis, dropout, from_module,
                                get_path, param_count, set_path, tree_l2)
from jaxlmc.models.cnn import PatchConv
from jaxlmc.registry import Registry

KINDS: Registry[ModelKind] = Registry("model kind", {kind.name: kind for kind in (
    mlp.KIND, cnn.KIND, transformer.KIND, gpt_neox.KIND, bert.KIND)})

__all__ = ["KINDS", "Classifier", "Dropout", "Model", "ModelKind", "PatchConv", "PermutationSpec", "UnitAxis", "build",
           "dropout", "from_module", "get_path", "import_failure", "param_count", "set_path", "register_kind",
           "resolve_kind", "tree_l2"]


def register_kind(kind: ModelKind) -> None:
    """Make `kind.name` usable as model.kind (KINDS.register). A name already taken is refused."""
    KINDS.register(kind.name, kind)


def import_failure(err: BaseException) -> str:
    """What went wrong importing a module, in a few words: its exception, or the exit it asked for."""
    if isinstance(err, SystemExit):
        return f"importing it called sys.exit({err.code!r})"
    return f"{type(err).__name__}: {err}"


def resolve_kind(name: str) -> ModelKind:
    """The kind `name` names: a registered one, or an import path "package.module:attribute" to a `ModelKind` or a
    `Classifier` subclass (with an optional static `permutation_spec(cfg, input_shape)`), registered under that
    path the first time it is named."""
    if name in KINDS:
        return KINDS[name]
    if ":" not in name:
        raise ValueError(f"model.kind: {name!r} is not one of {KINDS.names()} (nor a module:attribute import path)")
    module_name, _, attribute = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except (Exception, SystemExit) as err:  # the module's own error (or exit), whatever it is: name it in one line
        raise ValueError(f"model.kind: cannot import {module_name!r}: {import_failure(err)}") from None
    target = getattr(module, attribute, None)
    if isinstance(target, ModelKind):
        kind = dataclasses.replace(target, name=name)
    elif target is Classifier or (isinstance(target, type) and issubclass(target, Classifier)
                                  and not callable(getattr(target, "features", None))):
        raise ValueError(f"model.kind: {module_name}.{attribute} does not define features(x, drop): name a "
                         "Classifier subclass that builds its layers and a head (jaxlmc.models.Classifier is their "
                         "abstract base)")
    elif isinstance(target, type) and issubclass(target, Classifier):
        kind = ModelKind(name, target, lambda cfg: [], getattr(target, "permutation_spec", None))
    else:
        raise ValueError(f"model.kind: {module_name}.{attribute} is {'missing' if target is None else type(target).__name__}"
                         ", not a ModelKind or a jaxlmc.models.Classifier subclass")
    return KINDS.register(name, kind)


def build(cfg, input_shape, num_classes: int, per_token: bool = False) -> Model:
    """The model a `[model]` config section (jaxlmc.config.ModelConfig) describes, built abstractly; `per_token`: a
    label per position (a language-modelling task), for kinds that read sequences."""
    return base.build(resolve_kind(cfg.kind), cfg, input_shape, num_classes, per_token)
