"""A scaling study's model sizes (`study.widths`, `study.depths`, `study.parametrizations`): which sizes run, the
run directory each gets, the config each runs, and the series a trend is fitted along.

The sizes are the product of the given axes (`study.size_grid = "product"`), or a cross through the `[model]`
section's own size (`"cross"`: every width at model.depth, every depth at model.width) — a series per axis at a
fraction of the product's cost. Every size is a whole study of its own: its own seeds, its own run directory
(named by the axes given: `width64/`, `width64_depth2/`, `width64_depth2_mup/`), resumable on its own.
"""
from __future__ import annotations

import dataclasses
import itertools

AXES = ("width", "depth", "parametrization")
NUMERIC_AXES = ("width", "depth")  # the axes a power law is fitted along


@dataclasses.dataclass(frozen=True, order=True)
class Size:
    width: int
    depth: int
    parametrization: str

    def value(self, axis: str):
        return getattr(self, axis)


def given_axes(cfg) -> list[str]:
    """The axes the `[study]` section varies, in AXES order."""
    s = cfg.study
    return [axis for axis, values in zip(AXES, (s.widths, s.depths, s.parametrizations)) if values]


def sizes(cfg) -> list[Size]:
    """Every size the study runs, in order (widths, then depths, then parametrizations vary slowest to fastest);
    one — the `[model]` section's — without size axes."""
    s, m = cfg.study, cfg.model
    widths, depths, params = s.widths or [m.width], s.depths or [m.depth], s.parametrizations or [m.parametrization]
    if s.size_grid == "cross" and s.widths and s.depths:
        pairs = [(w, m.depth) for w in widths] + [(m.width, d) for d in depths if d != m.depth or m.width not in widths]
    else:
        pairs = list(itertools.product(widths, depths))
    return [Size(w, d, p) for (w, d), p in itertools.product(pairs, params)]


def directory(cfg, size: Size) -> str:
    """The size's run directory, relative to the study's: its value on every axis the study varies."""
    parts = {"width": f"width{size.width}", "depth": f"depth{size.depth}", "parametrization": size.parametrization}
    return "_".join(parts[axis] for axis in given_axes(cfg))


def config_at(cfg, size: Size):
    """The config of one size's study: the `[model]` section at that size, no size axes of its own."""
    model = dataclasses.replace(cfg.model, width=size.width, depth=size.depth, parametrization=size.parametrization)
    study = dataclasses.replace(cfg.study, widths=[], depths=[], parametrizations=[])
    return dataclasses.replace(cfg, model=model, study=study)


def series(found: list[Size], axis: str) -> dict[tuple, list[Size]]:
    """{the other axes' values: the sizes along `axis`, ascending} for every line of two or more sizes that differ
    only in `axis` — what one trend is fitted through."""
    others = [a for a in AXES if a != axis]
    lines: dict[tuple, list[Size]] = {}
    for size in sorted(found, key=lambda s: s.value(axis)):
        lines.setdefault(tuple(size.value(a) for a in others), []).append(size)
    return {key: line for key, line in lines.items() if len(line) >= 2}
