"""The ways two members are compared — pair measures — as entries of one registry, chosen per call: each gives its
barriers, floors and midpoints in barriers/pairs.csv a column suffix (error_barrier_test<suffix>, …), and
barriers/summary.csv, the report's table and its alignment figure pick up every one a study computed.

Built in: "straight" (the straight line, always computed, with every member's line to its start in the same pass),
"aligned" (the straight line after alignment: `align`), "repair" (REPAIR-renormalised: `repair_x`), "curve" (a
trained Bezier curve: `bezier`). One of one's own is registered (`register_pair_measure(PairMeasure(…))`,
or `PAIR_MEASURES.registered(measure.name, measure)` in a `with` block) and then named where it is wanted —
`pair_barriers(measures=[name])`, `[barriers] measures = [name]` — never computed by calls that do not ask for
it. Its curves:

    compute(model, params_K, pairs_Px2, eval_sets, alphas, chunk_pairs, mesh, perms, **options) -> {set: (loss, err)}

— P × A arrays (with a trailing [1 + R] axis for resampled sets), e.g. a `jaxlmc.paths.Path` of one's own evaluated
by `jaxlmc.paths.make_path_eval`; `perms` are the pairs' alignments (None when not aligning); `options` are the
keyword arguments it lists in `options` ("line": the compiled straight-line evaluator; "tick": a progress bar's
per-pair callback; "repair_x"; "bezier"), each of which a call must supply for it to be chosen.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxlmc import curves, paths
from jaxlmc.registry import Registry


@dataclasses.dataclass(frozen=True)
class BezierSettings:
    """A quadratic Bezier curve trained between each pair (Garipov et al. 2018): `steps` of SGD at `lr` on batches of
    `batch_size` from the training arrays `x`, `y`."""

    steps: int
    lr: float
    batch_size: int
    x: np.ndarray
    y: np.ndarray


@dataclasses.dataclass(frozen=True)
class PairMeasure:
    suffix: str  # of its columns: "" for the straight line; registered under its name, the suffix without "_"
    label: str  # its header in the report's table and its legend in the figure
    style: str = "x-"  # its line in the report's figure (matplotlib format)
    caption: str = ""  # what its line shows, a sentence of the figure's caption
    compute: Callable | None = None  # its curves (see the module's docstring); None: the straight line's own pass
    options: tuple[str, ...] = ()  # the keyword arguments `compute` takes; a call must supply each
    aligned: bool = False  # only on aligned pairs (a call that does not align cannot choose it)

    @property
    def name(self) -> str:
        return self.suffix[1:] or "straight"

    @property
    def npz_prefix(self) -> str:
        """Its arrays' prefix in barriers/curves.npz."""
        return f"{self.suffix[1:]}_" if self.suffix else ""


def _aligned(model, params_K, pairs_Px2, eval_sets, alphas, chunk_pairs, mesh, perms, *, line):
    return line(params_K, pairs_Px2, eval_sets, perms)


def _repair(model, params_K, pairs_Px2, eval_sets, alphas, chunk_pairs, mesh, perms, *, repair_x, tick):
    evaluate = paths.make_path_eval(model, paths.repaired(model, jnp.asarray(repair_x)), alphas, chunk_pairs, mesh,
                                    tick)
    return evaluate(params_K, pairs_Px2, eval_sets, perms)


def _curve(model, params_K, pairs_Px2, eval_sets, alphas, chunk_pairs, mesh, perms, *, bezier: BezierSettings):
    train_bends = curves.make_train_bends(model, bezier.steps, bezier.batch_size, bezier.lr, len(bezier.y),
                                          chunk_pairs=chunk_pairs)
    bends_P = train_bends(params_K, pairs_Px2, {"x": jnp.asarray(bezier.x), "y": jnp.asarray(bezier.y)},
                          jax.random.key(0), perms)
    evaluate = paths.make_path_eval(model, paths.bezier_curve(), alphas, chunk_pairs, mesh)
    return evaluate(params_K, pairs_Px2, eval_sets, perms, bends_P)


PAIR_MEASURES: Registry[PairMeasure] = Registry("pair measure", {m.name: m for m in (
    PairMeasure("", "naive", "o-"),
    PairMeasure("_aligned", "aligned", "s--", "Dashed: after alignment (Git Re-Basin's weight or activation matching, "
                "barriers.align): where alignment removes the barrier, the seeds share a basin up to a relabelling of "
                "hidden units, as from-scratch controls can.", _aligned, ("line",), aligned=True),
    PairMeasure("_repair", "REPAIR", "^:", "Dotted: after REPAIR renormalises the interpolated networks (on the "
                "aligned pairs when aligned): what remains once variance collapse is removed.", _repair,
                ("repair_x", "tick")),
    PairMeasure("_curve", "curve", "d-.", "Dash-dotted: along each pair's trained quadratic Bezier curve (Garipov et "
                "al. 2018): a barrier the straight line shows and a curve avoids is a bent valley, not a separate "
                "basin.", _curve, ("bezier",)),
)})


def register_pair_measure(measure: PairMeasure) -> None:
    """Add a pair measure computed by `measure.compute`, under its name (its suffix without "_"); calls then choose
    it by that name. A name already taken is refused."""
    if measure.compute is None or not measure.suffix.startswith("_"):
        raise ValueError(f"pair measure {measure.label!r}: a registered measure needs a compute function and a "
                         "suffix starting with '_'")
    PAIR_MEASURES.register(measure.name, measure)


def chosen(names, options: dict, aligned: bool) -> list[PairMeasure]:
    """The measures a call computes, in the registry's order: the straight line and `names`, each registered, each
    given its `options` (a None option is not given) and, when it compares aligned pairs, alignment."""
    wanted = {"straight", *names}
    picked = [PAIR_MEASURES.lookup(name) for name in wanted]
    for name, measure in zip(wanted, picked):
        if measure.name != name or measure.compute is None and name != "straight":
            raise ValueError(f"pair measure {name!r}: registered under another name than its own ({measure.name!r}, "
                             "from its suffix) or without a compute function: use register_pair_measure")
        missing = [option for option in measure.options if option != "tick" and options.get(option) is None]
        if missing or (measure.aligned and not aligned):
            need = ", ".join(missing) if missing else "alignment (align)"
            raise ValueError(f"pair measure {measure.name!r} needs {need}, which this call does not give")
    return [m for m in PAIR_MEASURES.values() if m.name in wanted]
