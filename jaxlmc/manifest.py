"""A saved checkpoint's file list and its quarantine.

Each step directory gets a file list (`MANIFEST`: every file's size and CRC32) once Orbax has committed it; `problem`
compares the files with it, so a truncated, deleted or changed file is found before Orbax reads it (Orbax itself
does not notice a flipped bit). A step that fails is moved aside (never deleted) by `set_aside`, and reported in
one line (`CorruptCheckpointInfo.line`). jaxlmc.ckpt decides when; this module only lists, checks and moves files.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
import zlib

from jaxlmc import files

MANIFEST = "jaxlmc_files.json"
_CRC_BLOCK = 1 << 22


def _crc32(path: str) -> int:
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(_CRC_BLOCK):
            crc = zlib.crc32(block, crc)
    return crc


def _files(directory: str) -> list[str]:
    return sorted(os.path.relpath(os.path.join(root, name), directory)
                  for root, _, names in os.walk(directory) for name in names if name != MANIFEST)


def write(directory: str, root: str) -> None:
    """Write the file list of a committed step directory (atomically; `root`: the run directory, see jaxlmc.files)."""
    listing = {name: [os.path.getsize(os.path.join(directory, name)), _crc32(os.path.join(directory, name))]
               for name in _files(directory)}
    files.write_atomic(os.path.join(directory, MANIFEST), json.dumps(listing), root)


def problem(directory: str) -> str | None:
    """What is wrong with the files of a step directory, compared with its file list; None when nothing is. A step
    without a list is not trusted (a kill between Orbax's commit and the list, or a deleted list: nothing would check
    its bytes), so it is set aside and recomputed like a corrupt one."""
    path = os.path.join(directory, MANIFEST)
    if not os.path.lexists(path):
        return f"it has no file list {MANIFEST} (an unfinished save, or a deleted list): its files cannot be checked"
    try:
        with open(path) as f:
            listing = json.load(f)
    except (OSError, ValueError) as err:
        return f"its file list {MANIFEST} is unreadable ({err})"
    for name, (size, crc) in listing.items():
        file = os.path.join(directory, name)
        if not os.path.exists(file):
            return f"file {name} is missing"
        actual = os.path.getsize(file)
        if actual != size:
            return f"file {name} has {actual} bytes, {size} were saved ({'truncated' if actual < size else 'grown'})"
        if _crc32(file) != crc:
            return f"file {name} changed since it was saved (CRC32 mismatch)"
    return None


@dataclasses.dataclass(frozen=True)
class CorruptCheckpointInfo:
    directory: str
    step: int
    problem: str
    moved_to: str

    def line(self) -> str:
        return (f"checkpoint step {self.step} in {self.directory} is corrupt: {self.problem}; moved aside to "
                f"{self.moved_to}")


def aside_target(aside: str, step: int, root: str) -> str:
    """Where a corrupt step goes in `aside` (created): <aside>/<step>, with a time suffix for a second copy."""
    files.make_dirs(aside, root)
    target = os.path.join(aside, str(step))
    if os.path.exists(target):
        target += time.strftime(".%Y%m%d-%H%M%S")
    return target


def move(step_dir: str, target: str) -> None:
    shutil.move(step_dir, target)
