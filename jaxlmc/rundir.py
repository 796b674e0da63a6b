"""The run directory (its layout and schemas: jaxlmc.layout): every read and write of its result files, its config,
markers, members, checkpoints and lock.

Every file is written atomically (a temporary file renamed into place), so a kill at any moment leaves the previous
version or the new one, and never through a link or into a non-regular file below the root (jaxlmc.files).
"""
from __future__ import annotations

import dataclasses
import functools
import glob
import io
import json
import os
import shutil
import sys
import time
from importlib import metadata

import jax
import numpy as np

from jaxlmc import ckpt, faults, files, lock, loop, shard
from jaxlmc.config import TRAINING_SECTIONS, Config, ConfigError, from_dict, parse_override
# The layout's names, re-exported: the rest of jaxlmc names a file as rundir.MEMBERS, rundir.CURVES and so on.
from jaxlmc.layout import (BARRIER_SETTINGS, BARRIER_SUMMARY, BASELINES, BASINS, BY_STEP, CALIBRATION, CHECKPOINTS,
                           CONFIG, CORRUPT, CRITICAL, CURVES, FINETUNE_CURVES, LAYERWISE, LAYERWISE_SUMMARY, LOCK,
                           MEMBERS, MERGES, PAIRS, PARTS, PRETRAIN, PRETRAIN_CHECKPOINTS, PRETRAIN_CURVES, REFINE,
                           REFINE_ROUNDS, REPORT, SCALING, SCALING_COST, SCALING_CRITICAL, SCALING_FITS, SCALING_PAGE,
                           SHARPNESS, SIMILARITY, SIMILARITY_ARRAYS, SOUPS, STAGES, START_SHARPNESS, STEP_MEMBERS,
                           STEP_PAIRS, STEP_SUMMARY, STEP_TO_START, SUMMARY, SUPERSEDED, TO_START, Table, csv_to_rows,
                           rows_to_csv)  # noqa: F401


# --------------------------------------------------------------------------------------------- the directory


def write_atomic(path: str, content: str | bytes, root: str) -> None:
    """Write a whole file or nothing below the run directory `root` (jaxlmc.files: never through a link). With several
    processes the primary one writes and the others wait for it."""
    if shard.is_primary():
        files.write_atomic(path, content, root)
    shard.sync(f"write {path}")


def settings_changes(saved: dict, current: dict, defaults: dict | None = None) -> list[str]:
    """"key: before -> now" for every setting of `current` that `saved` holds otherwise; a key `saved` lacks (a
    directory from before the key existed) stands for its value in `defaults`. The one fingerprint check behind
    resuming: a study's training sections (RunDir.open) and a checkpointed `fit`'s arguments."""
    missing = object()
    changes = []
    for key, value in current.items():
        before = saved.get(key, (defaults or {}).get(key, missing))
        if before != value:
            changes.append(f"{key}: {'(none)' if before is missing else repr(before)} -> {value!r}")
    return changes


def _versions() -> dict:
    names = ["jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "tensorflow-datasets", "mnist1d", "numpy"]
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


@dataclasses.dataclass(frozen=True)
class RunDir:
    """One run directory. Paths are absolute (Orbax's tensorstore layer refuses relative ones)."""

    root: str

    def __post_init__(self):
        object.__setattr__(self, "root", os.path.abspath(self.root))

    def path(self, name: str | Table) -> str:
        return os.path.join(self.root, name.path if isinstance(name, Table) else name)

    def exists(self, name: str | Table) -> bool:
        return os.path.exists(self.path(name))

    # Layout that takes an argument.
    def part(self, k: int) -> str:
        return f"{PARTS}/part{k}"

    def part_curves(self, k: int) -> str:
        return f"{PARTS}/training{k}.npz"

    def checkpoints(self, name: str, **options) -> ckpt.Checkpoints:
        """The Orbax checkpoints in `name` (CHECKPOINTS, PRETRAIN_CHECKPOINTS or a part), whose corrupt steps go to
        corrupt/<name>/ (outside parts/, which is removed when the parts are stacked)."""
        return ckpt.Checkpoints(self.path(name), aside=self.path(f"{CORRUPT}/{name}"), root=self.root, **options)

    def restore_params(self, name: str, step: int | None = None) -> dict:
        """The params of the state saved in `name` at `step` (default: the latest), as host arrays."""
        return ckpt.restore_params(self.path(name), step, aside=self.path(f"{CORRUPT}/{name}"), root=self.root)

    def restore_fields(self, name: str, step: int | None, fields) -> dict:
        return ckpt.restore_fields(self.path(name), step, fields, aside=self.path(f"{CORRUPT}/{name}"),
                                   root=self.root)

    def figure(self, name: str) -> str:
        return self.path(f"figures/{name}")

    def marker(self, stage: str) -> str:
        return self.path(f"{STAGES}/{stage}.json")

    def size(self, name: str) -> RunDir:
        """One size's run directory in a scaling study (jaxlmc.size_axes.directory names it)."""
        path = self.path(name)
        files.check_path(path, self.root)  # a size's run directory is never a link planted in this one
        return RunDir(path)

    def refine_round(self, k: int) -> RunDir:
        """Refinement round k's run directory (its members at the rates round k added, every start)."""
        path = self.path(f"{REFINE}/round{k}")
        files.check_path(path, self.root)
        return RunDir(path)

    def refined_rounds(self, upto: int | None = None) -> list[RunDir]:
        """The finished refinement rounds (those with their marker), in order, none after a missing one; with `upto`,
        at most the first `upto`."""
        rounds, k = [], 1
        while (upto is None or k <= upto) and (one := self.refine_round(k)).read_marker(REFINE) is not None:
            rounds.append(one)
            k += 1
        return rounds

    def share_pretraining(self, other: RunDir) -> None:
        """Give `other` (a refinement round's directory below this one) this directory's pretraining checkpoints, as
        hard links (a copy across file systems): checkpoint files are never changed once written. Whole or nothing."""
        target = other.path(PRETRAIN_CHECKPOINTS)
        if shard.is_primary() and not os.path.exists(target):
            self._link_tree(self.path(PRETRAIN_CHECKPOINTS), target)
        shard.sync(f"shared pretraining {target}")

    def _link_tree(self, source: str, target: str) -> None:
        files.make_dirs(os.path.dirname(target), self.root)
        staging = f"{target}.tmp"
        shutil.rmtree(staging, ignore_errors=True)

        def link(src: str, dst: str) -> None:
            try:
                os.link(src, dst)
            except OSError:
                shutil.copy2(src, dst)
        try:
            shutil.copytree(source, staging, copy_function=link)
            os.replace(staging, target)
        except OSError as err:
            shutil.rmtree(staging, ignore_errors=True)
            raise faults.WriteFailed(target, err.strerror or str(err)) from None

    def remove_rounds_from(self, k: int) -> None:
        """Remove refinement round k and every round after it."""
        for path in glob.glob(os.path.join(glob.escape(self.path(REFINE)), "round*")) if shard.is_primary() else []:
            suffix = os.path.basename(path).removeprefix("round")
            if suffix.isdigit() and int(suffix) >= k:
                files.check_path(path, self.root)
                shutil.rmtree(path)
        shard.sync(f"removed rounds {self.root} {k}")

    def step_tables(self, upto: int | None = None) -> tuple[list[dict], list[dict], list[dict]]:
        """(members, pairs, to_start): the BY_STEP tables of the grid and of its finished refinement rounds (the
        first `upto`; default all), one numbering of members (a round's follow the grid's and earlier rounds')."""
        members, pairs, to_start = [], [], []
        offset = 0
        for run in [self, *self.refined_rounds(upto)]:
            own = run.read_csv(STEP_MEMBERS)
            members += [{**m, "member": m["member"] + offset} for m in own]
            pairs += [{**p, "i": p["i"] + offset, "j": p["j"] + offset} for p in run.read_csv(STEP_PAIRS)]
            to_start += [{**s, "member": s["member"] + offset} for s in run.read_csv(STEP_TO_START)]
            offset += len({m["member"] for m in own})
        return members, pairs, to_start

    # Reading and writing.
    def write_text(self, name: str, content: str | bytes) -> str:
        path = self.path(name)
        write_atomic(path, content, self.root)
        return path

    def write_csv(self, table: Table, rows: list[dict]) -> None:
        write_atomic(self.path(table), rows_to_csv(table, rows), self.root)

    def write_by_step(self, by_step: dict) -> None:
        """The BY_STEP tables from {finetune step: (members, pair rows, to-start rows, summary rows)}."""
        for k, table in enumerate(BY_STEP):
            self.write_csv(table, [{"finetune_step": step, **row} for step, tables in by_step.items()
                                   for row in tables[k]])

    def read_csv(self, table: Table) -> list[dict]:
        with open(self.path(table), newline="") as f:
            return csv_to_rows(table, f.read())

    def write_json(self, name: str, value) -> None:
        write_atomic(self.path(name), json.dumps(value, indent=2), self.root)

    def read_json(self, name: str):
        with open(self.path(name)) as f:
            return json.load(f)

    def write_npz(self, name: str, arrays: dict) -> None:
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **arrays)
        write_atomic(self.path(name), buffer.getvalue(), self.root)

    def read_npz(self, name: str) -> dict[str, np.ndarray]:
        with np.load(self.path(name)) as archive:
            return dict(archive)

    def curves_file(self, name: str) -> loop.CurvesFile:
        """The training curves kept in `name` (an .npz), for jaxlmc.trainer."""
        return loop.CurvesFile(lambda: self.read_npz(name) if self.exists(name) else None,
                               lambda arrays: self.write_npz(name, arrays))

    def write_figure(self, name: str, image: bytes) -> None:
        write_atomic(self.figure(name), image, self.root)

    def read_figure(self, name: str) -> bytes:
        with open(self.figure(name), "rb") as f:
            return f.read()

    def make_marker_dir(self) -> None:
        if shard.is_primary():
            files.make_dirs(self.path(STAGES), self.root)

    def write_marker(self, stage: str, value: dict) -> None:
        write_atomic(self.marker(stage), json.dumps(value, indent=2), self.root)

    def remove_marker(self, stage: str) -> None:
        if os.path.lexists(self.marker(stage)):
            os.remove(self.marker(stage))

    def read_marker(self, stage: str) -> dict | None:
        try:
            with open(self.marker(stage)) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    # One writer at a time.
    def writing(self):
        """A context that holds the directory's lock (LOCK) while inside (jaxlmc.lock): a second process that tries
        to write it meanwhile gets faults.RunLocked at once, naming this one. Re-entrant within a process. A directory
        that does not exist yet is created and locked on entry, and removed again if the call fails before its
        config.json is written, so bad input leaves nothing behind."""
        return lock.holding(self.root, CONFIG)

    # The config.
    def open(self, cfg: Config) -> None:
        """Create the directory with its config.json, or check that an existing one was trained with the same config.

        Only the training sections must agree (and not data.data_dir, which says where the data is, not what it is);
        reporting and measuring settings may change from one invocation to the next. A key the saved config lacks
        (a directory from before the key existed) stands for its default.

        A directory in which nothing has finished (no stage, no pretraining table without divergence, no members)
        accepts a corrected config: what it holds (the unfinished training of the old config, say a pretraining that
        diverged) is moved to superseded/<time>/, never deleted, and one line says so.
        """
        path = self.path(CONFIG)
        shard.sync(f"open {self.root}")
        exists = os.path.exists(path)
        shard.sync(f"opened {self.root}")  # every process decided on the directory before any of them writes to it
        if exists:
            training = lambda config: {f"{section}.{key}": value  # noqa: E731
                                       for section in TRAINING_SECTIONS
                                       for key, value in config.get(section, {}).items()
                                       if (section, key) != ("data", "data_dir")}
            diffs = settings_changes(training(self.read_json(CONFIG)["config"]), training(json.loads(cfg.to_json())),
                                     training(json.loads(Config().to_json())))
            if not diffs:
                return
            finished = self.finished()
            if finished:
                raise ConfigError(f"run directory {self.root} was made with a different config ({'; '.join(diffs)}) "
                                  f"and holds finished results ({finished}); use a new --out, or the same config to "
                                  "resume")
            moved = self._supersede()
            faults.notify(f"{self.root} had nothing finished; its config changes ({'; '.join(diffs)}), and what the "
                          f"old one left is moved to {moved}")
        if shard.is_primary():
            files.make_dirs(self.root, self.root)
        write_atomic(path, json.dumps({"config": cfg.to_dict(), "versions": _versions(),
                                       "devices": [str(d) for d in jax.devices()]}, indent=2, allow_nan=False),
                     self.root)

    def finished(self) -> str | None:
        """The first finished result in the directory (or a width's), named; None when nothing has finished."""
        for run in [self, *(RunDir(p) for p in sorted(glob.glob(os.path.join(glob.escape(self.root), "width*"))))]:
            for name in (MEMBERS, CRITICAL, SUMMARY):
                if run.exists(name):
                    return os.path.relpath(run.path(name), self.root)
            if run.exists(PRETRAIN) and not any(r.get("diverged") for r in run.read_csv(PRETRAIN)):
                return os.path.relpath(run.path(PRETRAIN), self.root)
            markers = sorted(glob.glob(os.path.join(glob.escape(run.path(STAGES)), "*.json")))
            if markers:
                return os.path.relpath(markers[0], self.root)
        return None

    def _supersede(self) -> str:
        """Move everything but the lock into superseded/<time>/ (earlier superseded runs stay where they are)."""
        target = self.path(f"{SUPERSEDED}/{time.strftime('%Y%m%d-%H%M%S')}")
        while os.path.lexists(target):
            target += "+"
        if shard.is_primary():
            files.make_dirs(target, self.root)
            for name in sorted(os.listdir(self.root)):
                if name not in (LOCK, SUPERSEDED):
                    os.rename(self.path(name), os.path.join(target, name))
        shard.sync(f"superseded {self.root}")
        return target

    def config(self, overrides=(), imports=()) -> Config:
        """The config the directory was trained with, with overrides of the measuring sections only.

        A run directory may have come from someone else, so it does not choose what code runs: the plugin modules
        its config names (plugins.modules, a model.kind "module:attribute") must be imported already or be among
        `imports` (the command's --import), else a ConfigError names them."""
        if not self.exists(CONFIG):
            raise ConfigError(f"{self.root} is not a run directory (no config.json); run `jaxlmc finetune` first")
        raw = self.read_json(CONFIG)["config"]
        kind = str(raw.get("model", {}).get("kind", ""))
        named = [*raw.get("plugins", {}).get("modules", []), *([kind.partition(":")[0]] if ":" in kind else [])]
        unallowed = [m for m in dict.fromkeys(named) if m not in sys.modules and m not in imports]
        if unallowed:
            raise ConfigError(f"{self.root} was made with plugin module(s) {', '.join(unallowed)}, whose code a run "
                              "directory cannot choose to run: allow it with "
                              f"{' '.join('--import ' + m for m in unallowed)}")
        for text in overrides:
            section, key, value = parse_override(text)
            if section in TRAINING_SECTIONS and (section, key) != ("data", "data_dir"):
                raise ConfigError(f"{section}.{key} decides how the members in {self.root} were trained and cannot "
                                  "be overridden here; only [run], [barriers] and data.data_dir can")
            raw.setdefault(section, {})[key] = value
        return from_dict(raw)

    def members(self) -> list[dict]:
        """members.csv, typed; a clear error when fine-tuning has not finished."""
        if not self.exists(MEMBERS):
            raise ConfigError(f"{self.root} has no finished fine-tuning (no members.csv); run `jaxlmc finetune` first")
        return self.read_csv(MEMBERS)


def exclusive(fn):
    """Decorate an API function `fn(cfg, out, …)` that writes the run directory `out`: it runs inside
    RunDir(out).writing()."""
    @functools.wraps(fn)
    def locked(cfg, out, *args, **kwargs):
        with RunDir(out).writing():
            return fn(cfg, out, *args, **kwargs)
    return locked


