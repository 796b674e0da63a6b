"""jaxlmc: fine-tune many members of one pretrained model at once with jax.vmap, and measure whether they stay
in one loss basin (linear mode connectivity).

The library on one's own model and arrays (docs/api.md):

    fit(model, (x, y), lr=[...], seeds=32, steps=..., batch_size=...)  -> Members  (stacked params, curves, table)
    pair_barriers(members, {"test": (x, y)}, align="weights")          -> Barriers (pairs.csv rows; .summary())
    format_table(rows, columns)                                          a plain-text table

Seams (each a jaxlmc.registry.Registry that a plugin module fills): models.KINDS, data.DATASETS, labels.LABEL_MAPS,
optimizers.OPTIMIZERS, measures.PAIR_MEASURES, hf.LOADERS, study.STAGES (docs/api.md). Importing jaxlmc loads none of
TFDS, Orbax, the Hugging Face hub or matplotlib until a call needs them. The run-directory API behind the `jaxlmc`
command is jaxlmc.api.
"""
from jaxlmc.library import Barriers, Members, fit, format_table, member_rows, pair_barriers
from jaxlmc.models import UnitAxis, from_module

__version__ = "0.1.0"

__all__ = ["Barriers", "Members", "UnitAxis", "fit", "format_table", "from_module", "member_rows", "pair_barriers"]
