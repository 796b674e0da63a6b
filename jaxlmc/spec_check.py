"""Checking a permutation spec before it is used: a spec that does not describe a symmetry of the network makes weight
matching "align" members into a different function, and every aligned barrier after it is a wrong number.

`check_spec` first checks the spec's shape (a list of groups, each a list of `UnitAxis` whose paths exist, whose axes
are in range and which agree on the group's width), then checks what the spec claims: permuting any one group's units
must leave the network's outputs unchanged. The parameters are perturbed first (each leaf plus Gaussian noise of its
own scale), because at initialisation a bias or a LayerNorm's shift is often zero or constant and would hide a spec
that forgets it. A group that changes the outputs is diagnosed by trying the one-entry repairs (an axis added, moved or
dropped) and naming the first that restores the function.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxlmc import permute
from jaxlmc.models import Model, PermutationSpec, UnitAxis, get_path

# Outputs of the permuted network may differ from the original's by float32 rounding (sums in another order): far
# below this fraction of the outputs' largest magnitude, which a spec that is not a symmetry exceeds (measured: a
# forgotten bias 7e-2, a forgotten input axis 2).
RELATIVE_TOLERANCE = 1e-3
# The perturbations tried, as fractions of each leaf's own scale: smaller ones where a network's outputs are not
# finite at the first (a parameter that must stay positive, flipped).
PERTURBATIONS = (1.0, 0.1, 0.01)
MAX_REPAIR_TRIES = 256


class SpecError(ValueError):
    """A permutation spec that is malformed or does not preserve the network's function; the message names the
    group and the parameter axis."""


def _label(entry: UnitAxis) -> str:
    return f"{entry.layer}.{entry.name} axis {entry.axis}"


def _check_structure(spec, params: dict) -> list[int]:
    """Each group's width; SpecError naming the first malformed group or entry."""
    if not isinstance(spec, (list, tuple)):
        raise SpecError(f"permutation spec: a list of groups (one list of UnitAxis per hidden layer) was expected, "
                        f"got {type(spec).__name__}")
    widths = []
    for k, group in enumerate(spec):
        if isinstance(group, UnitAxis):
            raise SpecError(f"permutation spec: group {k} is a single UnitAxis ({_label(group)}): the spec is a list "
                            "of groups, each a list of UnitAxis (wrap a flat list in another list)")
        if not isinstance(group, (list, tuple)) or not group:
            raise SpecError(f"permutation spec: group {k} must be a non-empty list of UnitAxis, got {group!r}")
        width = None
        for entry in group:
            if not isinstance(entry, UnitAxis):
                raise SpecError(f"permutation spec: group {k} holds {entry!r}, not a UnitAxis")
            try:
                leaf = get_path(params, entry.path)
            except (KeyError, TypeError) as err:
                raise SpecError(f"permutation spec: group {k}: {err.args[0] if err.args else err}") from None
            shape = np.shape(leaf)
            if not -len(shape) <= entry.axis < len(shape):
                raise SpecError(f"permutation spec: group {k}: {entry.layer}.{entry.name} has {len(shape)} axes "
                                f"{shape}, axis {entry.axis} is out of range")
            size = shape[entry.axis]
            if entry.blocks < 1 or size % entry.blocks:
                raise SpecError(f"permutation spec: group {k}: {_label(entry)} has {size} entries, not a multiple "
                                f"of its {entry.blocks} blocks")
            if width is not None and size // entry.blocks != width:
                raise SpecError(f"permutation spec: group {k}: {_label(entry)} indexes {size // entry.blocks} units, "
                                f"{_label(group[0])} {width}: one group's axes must share its units")
            width = size // entry.blocks
        widths.append(width)
    return widths


def _normalised(entry: UnitAxis, params: dict) -> UnitAxis:
    """The entry with a non-negative axis (what `permute` expects)."""
    if entry.axis >= 0:
        return entry
    return UnitAxis(entry.layer, entry.name, entry.axis + np.ndim(get_path(params, entry.path)), entry.blocks)


def _perturbed(params: dict, seed: int, size: float) -> dict:
    """Every float leaf plus Gaussian noise of `size` × its root mean square (at least 0.05: zeros move too)."""
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    out = []
    for leaf, key in zip(leaves, keys):
        leaf = jnp.asarray(leaf)
        if not jnp.issubdtype(leaf.dtype, jnp.floating):
            out.append(leaf)
            continue
        scale = jnp.maximum(jnp.sqrt(jnp.mean(jnp.square(leaf.astype(jnp.float32)))), 0.05)
        out.append((leaf + size * scale * jax.random.normal(key, leaf.shape)).astype(leaf.dtype))
    return jax.tree.unflatten(treedef, out)


def _candidates(params: dict, width: int) -> list[UnitAxis]:
    """Every (leaf, axis) of `params` that holds exactly `width` entries: the axes a group of that width could index."""
    found = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        names = [str(getattr(p, "key", getattr(p, "idx", p))) for p in path]
        for axis, size in enumerate(np.shape(leaf)):
            if size == width:
                found.append(UnitAxis(".".join(names[:-1]), names[-1], axis))
    return found


def check_spec(model: Model, params: dict, x, spec: PermutationSpec | None = None, seed: int = 0) -> None:
    """Raise SpecError unless `spec` (default: the model's) is well formed for one member's `params` and each of its
    groups, permuted alone, leaves the model's outputs on the examples `x` unchanged (to float32 rounding)."""
    spec = model.permutation_spec() if spec is None else spec
    widths = _check_structure(spec, params)
    spec = [[_normalised(e, params) for e in group] for group in spec]
    apply = jax.jit(model.apply)
    x = jnp.asarray(x)
    for size in PERTURBATIONS:
        probe = _perturbed(params, seed, size)
        reference = np.asarray(apply(probe, x), np.float64)
        if np.all(np.isfinite(reference)):
            break
    else:  # the network computes no finite outputs near these parameters: nothing to compare, nothing refused
        return
    scale = max(float(np.max(np.abs(reference))), 1e-6)
    rng = np.random.default_rng(seed)

    def deviation(group: list[UnitAxis], perm) -> float:
        out = np.asarray(apply(permute.permute(probe, [perm], [group]), x), np.float64)
        return float(np.max(np.abs(out - reference))) / scale

    for k, (group, width) in enumerate(zip(spec, widths)):
        if width < 2:
            continue
        perm = jnp.asarray(np.roll(rng.permutation(width), 1))  # a derangement of a random order: every unit moves
        off = deviation(group, perm)
        if off <= RELATIVE_TOLERANCE:
            continue
        fix = _repair(group, params, width, lambda g: deviation(g, perm) <= RELATIVE_TOLERANCE)
        head = (f"permutation spec: group {k} ({width} units: {_label(group[0])}, …) changes the network's outputs "
                f"(relative max |Δ| {off:.2g})")
        raise SpecError(f"{head}: {fix}" if fix else
                        f"{head}: some parameter axis its units index is missing, extra or wrong in "
                        f"[{', '.join(_label(e) for e in group)}]")


def _repair(group: list[UnitAxis], params: dict, width: int, preserves) -> str | None:
    """The first one-entry change to `group` that makes it a symmetry, said as what is wrong; None if none does."""
    tries = 0
    listed = {(e.path, e.axis) for e in group}
    for candidate in _candidates(params, width):
        if (candidate.path, candidate.axis) in listed or tries >= MAX_REPAIR_TRIES:
            continue
        tries += 1
        moved = [e for e in group if e.path != candidate.path]
        if len(moved) < len(group) and preserves(moved + [candidate]):
            wrong = next(e for e in group if e.path == candidate.path)
            return f"{_label(wrong)} should be axis {candidate.axis}"
        if preserves(group + [candidate]):
            return f"it misses {_label(candidate)} (its units index that axis too)"
    for k, entry in enumerate(group):
        if tries >= MAX_REPAIR_TRIES:
            break
        tries += 1
        if len(group) > 1 and preserves(group[:k] + group[k + 1:]):
            return f"{_label(entry)} does not belong to it (its units do not index that axis)"
    return None
