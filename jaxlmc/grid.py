"""The fine-tuning grid: its axes, its members, its cells, and the per-member constants of the training step.

Every per-member hyperparameter is declared once, as a `GridAxis` on the `FinetuneConfig` field that lists its values
(jaxlmc.config). Everything else follows from those declarations: the member grid (every combination, in field
order, seeds innermost), members.csv's columns (jaxlmc.rundir), the cell keys, the per-member constants the step vmaps
over, and the columns of every table and report.
"""
from __future__ import annotations

import dataclasses
import itertools
import typing

import jax.numpy as jnp
import numpy as np

from jaxlmc import train
from jaxlmc.settings import Config, FinetuneConfig, GridAxis


Axis = GridAxis  # a declaration with its `field` and `type` filled in


def values(axis: Axis, f: FinetuneConfig) -> list:
    """The values an axis takes in the grid of `f`."""
    value = getattr(f, axis.field)
    if isinstance(value, int):  # a count (seeds): the values 0 .. count-1
        return list(range(value))
    if axis.field == "pretrain_steps" and f.scratch:
        return [-1] + list(value)  # -1: the from-scratch control row, before the checkpoints
    return list(value)


def axis_size(axis: Axis, f: FinetuneConfig) -> int:
    """How many values an axis takes, without listing them (finetune.seeds may be any size)."""
    value = getattr(f, axis.field)
    if isinstance(value, int):
        return value
    return len(value) + (axis.field == "pretrain_steps" and f.scratch)


def _value_type(hint) -> type:
    """int, float or str: the type of one value of a field typed list[T], Literal[...] or int."""
    if typing.get_origin(hint) is list:
        hint = typing.get_args(hint)[0]
    if typing.get_origin(hint) is typing.Literal:
        return type(typing.get_args(hint)[0])
    return hint


def _axes() -> tuple[Axis, ...]:
    hints = typing.get_type_hints(FinetuneConfig)
    return tuple(dataclasses.replace(f.metadata["grid"], field=f.name, type=_value_type(hints[f.name]))
                 for f in dataclasses.fields(FinetuneConfig) if "grid" in f.metadata)


AXES: tuple[Axis, ...] = _axes()
CELL_KEYS: tuple[str, ...] = tuple(a.column for a in AXES if a.cell)  # the fields that define a grid cell


def member_grid(cfg: Config) -> list[dict]:
    """One row per member: {"member": index, <axis column>: value, …}, every combination of the axes' values in
    field order (the first axis outermost, seeds innermost)."""
    f = cfg.finetune
    combos = itertools.product(*[values(a, f) for a in AXES])
    return [{"member": i, **dict(zip((a.column for a in AXES), combo))} for i, combo in enumerate(combos)]


def cell(row: dict) -> tuple:
    """A member's (or a result row's) grid cell: its values of CELL_KEYS."""
    return tuple(row[k] for k in CELL_KEYS)


def seed_varies(member: dict, new_head: bool) -> str:
    """Which sources of randomness a member's seed changes, e.g. "data order+head init": the data order always; the
    body's initialisation in the scratch row; the head's initialisation with a new per_seed head; dropout masks when
    it drops units. Recorded in members.csv, so a reader of any table knows what "another seed" meant."""
    sources = ["data order"]
    if member["pretrain_step"] < 0:
        sources.append("body init")
    if new_head and member["head"] == "per_seed":
        sources.append("head init")
    if member.get("dropout", 0.0) > 0:
        sources.append("dropout masks")
    return "+".join(sources)


def usable(member: dict) -> bool:
    """Whether a member enters barriers, soups and basins: it neither diverged nor failed to fit (members.csv's
    `diverged` and `unfit`; a run directory written before `unfit` existed has none)."""
    return not (member["diverged"] or member.get("unfit"))


def cell_groups(members: list[dict]) -> dict[tuple, list[int]]:
    """{cell: [member, ...]} in grid order (every member, diverged or not)."""
    groups: dict = {}
    for m in members:
        groups.setdefault(cell(m), []).append(m["member"])
    return groups


def member_consts(f: FinetuneConfig, rows: list[dict]) -> dict:
    """The per-member constants of the training step (jaxlmc.train) for the members in `rows`.

    lr_MxT comes from each member's peak rate and schedule; every axis declared with `const` gives a float32 vector
    under that name, left out when every member has the axis's neutral value (the step then compiles without it);
    each member's seed gives its data-order key stream, and its noise stream when a constant that draws noise is
    there.
    """
    keys = train.member_keys([r["seed"] for r in rows], f.seed_offset)
    consts = {
        "lr": jnp.asarray(train.lr_table([r["lr"] for r in rows], [r["schedule"] for r in rows], f.steps,
                                         f.warmup_steps)),
        "data_key": keys["data"],
    }
    for axis in AXES:
        if not axis.const:
            continue
        values = [r[axis.column] for r in rows]
        if not (axis.neutral is not None and all(v == axis.neutral for v in values)):
            consts[axis.const] = jnp.asarray(values, jnp.float32)
    if any(axis.noise and axis.const in consts for axis in AXES):
        consts["noise_key"] = keys["noise"]
    return consts


def shown(rows: list[dict], cells_only: bool = False) -> list[Axis]:
    """The axes a table of `rows` shows: those declared always shown and those the rows vary (so that tables fit 80
    columns when most axes are fixed); with `cells_only`, the cell axes alone."""
    return [a for a in AXES if (a.cell or not cells_only)
            and (a.always_shown or len({r[a.column] for r in rows}) > 1)]


def varied_names(rows: list[dict], besides: tuple[str, ...]) -> list[str]:
    """The config field names of the cell axes other than `besides` that the rows vary (for "averaged over …")."""
    return [a.field.replace("_", " ") for a in AXES
            if a.cell and a.column not in besides and len({r[a.column] for r in rows}) > 1]


def step_label(step: int) -> str:
    """A pretraining step as the report names it: the scratch control (step −1) is "scratch"."""
    return "scratch" if step < 0 else str(step)


def unfit_flags(rows: list[dict], fraction: float, chance: float = 0.0, margin: float = -1.0,
                start_keys: tuple[str, ...] = ("pretrain_step", "head")) -> list[bool]:
    """Which members failed to train: not diverged, but with a train accuracy not above `chance` + `margin` (the
    absolute rule: study.fit_margin), or — when `fraction` > 0 (study.unfit_fraction) — below `fraction` of the best
    train accuracy any non-diverged member reached from the same start (`start_keys`: pretraining checkpoint and head
    policy; the library's `fit` uses the absolute rule alone). Such
    a member has large barriers to everything for a trivial reason: a failed fit, not a basin. A member that trains
    well above chance but loses what pretraining gave has left the basin and stays in."""
    start = lambda r: tuple(r[k] for k in start_keys)  # noqa: E731
    best: dict = {}
    for r in rows:
        if not r["diverged"] and np.isfinite(r["train_acc"]):
            best[start(r)] = max(best.get(start(r), -np.inf), r["train_acc"])
    return [bool(not r["diverged"] and (not r["train_acc"] > chance + margin
                                        or r["train_acc"] < fraction * best[start(r)])) for r in rows]


def chance_accuracy(labels) -> float:
    """The accuracy of always predicting the most frequent of `labels` (per token for a language model's)."""
    labels = np.asarray(labels).ravel()
    return float(np.bincount(labels).max() / labels.size) if labels.size else 0.0
