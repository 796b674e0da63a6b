"""Model kinds: a registry of `ModelKind`s, one file each (mlp.py, cnn.py, transformer.py), and `build`, which turns a `[model]`
config into a `Model`. A new kind defines its module (a `Classifier`), layer order and permutation spec, and is
registered with `register_kind` — from a plugin module (`[plugins] modules`) as well as from here."""
from __future__ import annotations

from jaxlmc.models import base, cnn, mlp, transformer
from jaxlmc.models.base import (Classifier, Dropout, Model, ModelKind, PermutationSpec, UnitAxis, dropout, from_module,
                                get_path, param_count, set_path, tree_l2)
from jaxlmc.models.cnn import PatchConv

KINDS: dict[str, ModelKind] = {kind.name: kind for kind in (mlp.KIND, cnn.KIND, transformer.KIND)}

__all__ = ["KINDS", "Classifier", "Dropout", "Model", "ModelKind", "PatchConv", "PermutationSpec", "UnitAxis", "build",
           "dropout", "from_module", "get_path", "param_count", "set_path", "register_kind", "tree_l2"]


def register_kind(kind: ModelKind) -> None:
    """Make `kind.name` usable as model.kind. A name already taken is refused."""
    if kind.name in KINDS:
        raise ValueError(f"model kind {kind.name!r} is already registered")
    KINDS[kind.name] = kind


def build(cfg, input_shape, num_classes: int, per_token: bool = False) -> Model:
    """The model a `[model]` config section (jaxlmc.config.ModelConfig) describes, built abstractly; `per_token`: a
    label per position (a language-modelling task), for kinds that read sequences."""
    if cfg.kind not in KINDS:
        raise ValueError(f"model.kind: {cfg.kind!r} is not one of {sorted(KINDS)}")
    return base.build(KINDS[cfg.kind], cfg, input_shape, num_classes, per_token)
