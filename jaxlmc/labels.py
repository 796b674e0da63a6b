"""Label maps by name (`data.pretrain_labels`, `data.finetune_labels`): functions (labels_N, num_classes) ->
(new labels_N, new num_classes) applied to every split of a task. "identity", "next_token" and "masked_token" (language
modelling: every position predicts the next token; some positions, masked, predict themselves: handled by
jaxlmc.data) map nothing themselves. A plugin module adds its own
with `register_label_map`."""
from __future__ import annotations

from typing import Callable

import numpy as np

from jaxlmc.registry import Registry

LabelMap = Callable[[np.ndarray, int], tuple[np.ndarray, int]]

LABEL_MAPS: Registry[LabelMap | None] = Registry("label map", {
    "identity": None,
    "mod5": lambda y, c: (y % 5, 5),
    "parity": lambda y, c: (y % 2, 2),
    "reverse": lambda y, c: (c - 1 - y, c),
    "next_token": None,
    "masked_token": None,
})
LANGUAGE_MODELLING = ("next_token", "masked_token")  # label maps of a task without labels: a label per position


def register_label_map(name: str, mapping: LabelMap) -> None:
    """Make `name` usable as a label map (LABEL_MAPS.register). A name already taken is refused."""
    LABEL_MAPS.register(name, mapping)
