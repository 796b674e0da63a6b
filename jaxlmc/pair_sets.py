"""Which member pairs are interpolated: the named designs ("within" each cell, "ring:K", "all") and explicit pair
lists (a file, or (i, j) given in a call), each checked in one line."""
from __future__ import annotations

import csv
import itertools
import os


def pairs_all(members) -> list[tuple[int, int]]:
    return list(itertools.combinations(sorted(members), 2))


def pairs_within(groups: dict) -> list[tuple[int, int]]:
    """All pairs inside each group ({key: [member, ...]})."""
    return [pair for members in groups.values() for pair in pairs_all(members)]


def pairs_ring(groups: dict, k: int) -> list[tuple[int, int]]:
    """Inside each group ({key: [member, ...]}, in seed order), each member with its next k, cyclically: every member
    sits in 2k pairs (all pairs once k ≥ (n − 1)/2), so seeds stay the units at O(n·k) pairs instead of O(n²)."""
    out = []
    for members in groups.values():
        n = len(members)
        ring = {tuple(sorted((members[s], members[(s + d) % n]))) for s in range(n)
                for d in range(1, min(k, n - 1) + 1)}
        out += sorted(ring)
    return out


def pair_design(spec: str, groups: dict, num_members: int) -> list[tuple[int, int]] | None:
    """The pairs of a named design — "within" (all pairs inside each group), "ring:K" (`pairs_ring`) or "all" —, or
    None when `spec` names none."""
    if spec == "within":
        return pairs_within(groups)
    if spec == "all":
        return pairs_all(range(num_members))
    if spec.startswith("ring:"):
        k = spec[len("ring:"):]
        if not k.isdigit() or int(k) < 1:
            raise ValueError(f'pairs: {spec!r}: a ring design is "ring:K" with K a positive integer (each member '
                             "paired with its next K seeds in its cell)")
        return pairs_ring(groups, int(k))
    return None


def read_pairs(path: str, num_members: int) -> list[tuple[int, int]]:
    """An explicit pair list: a CSV file with columns i and j, or two integers per line (comma or space separated)."""
    with open(path, newline="") as f:
        text = f.read()
    lines = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if lines and not lines[0].replace(",", " ").split()[0].lstrip("-").isdigit():
        rows = list(csv.DictReader(lines))
        if not rows or not {"i", "j"} <= set(rows[0]):
            raise ValueError(f"pair file {path}: a header must name columns i and j")
        raw = [(row["i"], row["j"]) for row in rows]
    else:
        raw = [tuple(line.replace(",", " ").split()[:2]) for line in lines]
    pairs = []
    for number, (i, j) in enumerate(raw, 1):
        try:
            pair = (int(i), int(j))
        except (TypeError, ValueError):
            raise ValueError(f"pair file {path}, pair {number}: {i!r}, {j!r} are not member indices") from None
        pairs.append(pair)
    if not pairs:
        raise ValueError(f"pair file {path} lists no pairs")
    return check_pairs(pairs, num_members, f"pair file {path}, ")


def check_pairs(pairs: list[tuple[int, int]], num_members: int, where: str = "") -> list[tuple[int, int]]:
    """`pairs`, refused in one line (ValueError; `where` prefixes it) when one names a member out of range, pairs a
    member with itself, or repeats an earlier pair, either way round (the straight line between (i, j) is that of
    (j, i) reversed: one barrier, and a repeated pair would count twice in a cell's mean)."""
    seen: dict = {}
    for number, pair in enumerate(pairs, 1):
        bad = [m for m in pair if not 0 <= m < num_members]
        if bad:
            raise ValueError(f"{where}pair {number}: member {bad[0]} out of range (there are {num_members} members)")
        if pair[0] == pair[1]:
            raise ValueError(f"{where}pair {number}: {pair} pairs member {pair[0]} with itself")
        key = tuple(sorted(pair))
        if key in seen:
            raise ValueError(f"{where}pair {number}: {pair} repeats pair {seen[key]} (the same two members"
                             f"{' the other way round' if pair != pairs[seen[key] - 1] else ''})")
        seen[key] = number
    return pairs


def select_pairs(spec, table: list[dict], cell_keys: tuple[str, ...], usable) -> tuple[list[tuple[int, int]], int]:
    """(kept, left out): the pairs `spec` requests among the members of `table` (rows with "member", "seed" and the
    `cell_keys`) — a named design over the cells (members that differ only in their seed), the path of a pair file,
    or a list of (i, j) —, those whose members are both `usable(row)`, and how many requested pairs were left out.
    A bad spec is a ValueError starting "pairs:"."""
    cells: dict = {}
    for row in sorted(table, key=lambda r: r.get("seed", 0)):
        cells.setdefault(tuple(row[k] for k in cell_keys), []).append(row["member"])
    if isinstance(spec, str):
        requested = pair_design(spec, cells, len(table))
        if requested is None and not os.path.isfile(spec):
            raise ValueError(f'pairs: {spec!r} is neither "within", "ring:K", "all", a list of (i, j) nor an existing '
                             "pair file")
        if requested is None:
            requested = read_pairs(spec, len(table))
    else:
        requested = check_pairs([(int(i), int(j)) for i, j in spec], len(table), "pairs: ")
    kept = [p for p in requested if usable(table[p[0]]) and usable(table[p[1]])]
    return kept, len(requested) - len(kept)
