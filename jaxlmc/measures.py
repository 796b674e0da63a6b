"""The ways two members are compared, as registered entries: each pair measure gives its barriers, floors and
midpoints in barriers/pairs.csv a column suffix (error_barrier_test<suffix>, …), and barriers/summary.csv, the
report's table and its alignment figure pick every registered one up.

The built-in measures are computed by jaxlmc.interpolation.pair_curves when the [barriers] section asks for them
(the naive straight line always; `align`, `repair`, `curve_steps`). A measure registered from outside computes its
own curves, for every study and `pair_barriers` call while it is registered:

    compute(model, params_K, pairs_Px2, eval_sets, alphas, chunk_pairs, mesh, perms) -> {set: (loss, err)}

— P × A arrays (with a trailing [1 + R] axis for resampled sets), e.g. a `jaxlmc.paths.Path` of one's own evaluated
by `jaxlmc.paths.make_path_eval`; `perms` are the pairs' alignments (None when the study does not align).
"""
from __future__ import annotations

import dataclasses
from typing import Callable


@dataclasses.dataclass(frozen=True)
class PairMeasure:
    suffix: str  # of its columns: "" for the naive straight line
    label: str  # its header in the report's table and its legend in the figure
    style: str = "x-"  # its line in the report's figure (matplotlib format)
    caption: str = ""  # what its line shows, a sentence of the figure's caption
    field: str = ""  # the jaxlmc.interpolation.Curves field a built-in measure fills
    compute: Callable | None = None  # a registered measure's own curves (see the module's docstring)


PAIR_MEASURES: dict[str, PairMeasure] = {m.suffix: m for m in (
    PairMeasure("", "naive", "o-", field="pairs"),
    PairMeasure("_aligned", "aligned", "s--", "Dashed: after alignment (Git Re-Basin's weight or activation matching, "
                "barriers.align): where alignment removes the barrier, the seeds share a basin up to a relabelling of "
                "hidden units, as from-scratch controls can.", field="aligned"),
    PairMeasure("_repair", "REPAIR", "^:", "Dotted: after REPAIR renormalises the interpolated networks (on the "
                "aligned pairs when aligned): what remains once variance collapse is removed.", field="repaired"),
    PairMeasure("_curve", "curve", "d-.", "Dash-dotted: along each pair's trained quadratic Bezier curve (Garipov et "
                "al. 2018): a barrier the straight line shows and a curve avoids is a bent valley, not a separate "
                "basin.", field="curved"),
)}


def register_pair_measure(measure: PairMeasure) -> None:
    """Add a pair measure computed by `measure.compute`. A suffix already taken is refused."""
    if measure.suffix in PAIR_MEASURES:
        raise ValueError(f"pair measure suffix {measure.suffix!r} is already registered")
    if measure.compute is None or not measure.suffix.startswith("_"):
        raise ValueError(f"pair measure {measure.label!r}: a registered measure needs a compute function and a "
                         "suffix starting with '_'")
    PAIR_MEASURES[measure.suffix] = measure
