"""The run directory: its layout, its file schemas, and every read and write of its result files.

No other module builds a path inside a run directory or parses one of its files. A run directory (``--out``) holds

    config.json                  the resolved config, library versions and devices (provenance)
    pretrain/checkpoints/STEP    Orbax: the pretraining state at each of pretrain.save_steps (and the latest)
    pretrain/checkpoints.csv     PRETRAIN: loss and accuracy of each pretraining checkpoint
    pretrain/baselines.csv       BASELINES: unigram and bigram test loss of a language-modelling pretraining task
    checkpoints/STEP             Orbax: the stacked fine-tuning state (params_M, opt_M, data order, diverged_M, step)
    parts/partK/STEP             Orbax: members trained in parts, until they are stacked into checkpoints/
    corrupt/…/STEP               checkpoints that failed their check, moved aside (never deleted) under their path
    training/pretrain.npz        PRETRAIN_CURVES: train loss and accuracy at every chunk boundary of pretraining
    training/finetune.npz        FINETUNE_CURVES: the same per fine-tuned member (step_K, loss_KxM, acc_KxM)
    .lock                        the writing process (pid, host, command) while a command writes the directory
    superseded/TIME/             what a run that finished nothing left when a corrected config replaced it
    members.csv                  MEMBERS: one row per fine-tuned member
    barriers/pairs.csv           PAIRS: one row per member pair (barriers, midpoints, geometry)
    barriers/to_start.csv        TO_START: one row per member, the same measures to its starting point
    barriers/summary.csv         BARRIER_SUMMARY: per grid cell, mean, std and bootstrap CI of every measure
    barriers/curves.npz          CURVES: the interpolation curves
    barriers/nulls.npz           NULLS: per pair (member), each verdict barrier's null value at every resampling
    barriers/settings.json       the barrier settings, chunk size, timings, pairs left out
    barriers/by_step/*.csv       STEP_*: members, pairs, to_start and summary at every kept fine-tuning step
                                 (finetune.save_steps and the last), with a finetune_step column
    critical.csv                 CRITICAL: the critical learning rate per start and fine-tuning length
    soups.csv                    SOUPS: soups, ensemble, best and mean member per cell
    similarity.csv, basins.csv   SIMILARITY, BASINS: spread, disagreement, CKA, basins per cell; each member's basin
    similarity.npz               SIMILARITY_ARRAYS: the per-cell matrices
    summary.csv                  SUMMARY: the report's one row per cell
    figures/*.png, report.html   the report
    stages/STAGE.json            a study stage's marker: the settings it ran with (written last)
    width<W>/                    a whole run directory per width of a scaling trend
    scaling.csv, scaling.html    SCALING: the scaling trend

Every file is written atomically (a temporary file renamed into place), so a kill at any moment leaves the previous
version or the new one, and never through a link or into a non-regular file below the root (jaxlmc.files). CSV
columns have declared types, and reading converts them: an int column reads as int (None where empty), a float
column as float (NaN where empty), a bool column as bool.
"""
from __future__ import annotations

import csv
import dataclasses
import functools
import glob
import io
import json
import os
import shutil
import time
from importlib import metadata

import jax
import numpy as np

from jaxlmc import ckpt, faults, files, grid, lock, shard
from jaxlmc.config import TRAINING_SECTIONS, Config, ConfigError, from_dict, parse_override

# --------------------------------------------------------------------------------------------- tables


@dataclasses.dataclass(frozen=True)
class Table:
    """A CSV file: its path in the run directory, its declared columns (in order) and the type of any further
    columns (`rest`: measure columns, written in the order the rows give them); with `rest` None no other column
    may appear."""

    path: str
    columns: tuple[tuple[str, type], ...]
    rest: type | None = None

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.columns]

    def types(self) -> dict[str, type]:
        return dict(self.columns)


def _cells(*extra: tuple[str, type]) -> tuple[tuple[str, type], ...]:
    return tuple((a.column, a.type) for a in grid.AXES if a.cell) + extra


_METRICS = tuple((f"{split}_{m}", float) for split in ("train", "test", "ood", "val") for m in ("loss", "acc"))

# A pretraining that diverged (jaxlmc.pretraining) adds a row at the step where it did, diverged True, metrics empty.
PRETRAIN = Table("pretrain/checkpoints.csv", (("step", int), ("train_loss", float), ("train_acc", float),
                                              ("test_loss", float), ("test_acc", float), ("diverged", bool)))
MEMBERS = Table("members.csv", (("member", int), *((a.column, a.type) for a in grid.AXES), *_METRICS,
                                ("dist_from_init", float), ("diverged", bool), ("unfit", bool),
                                ("seed_varies", str)))
PAIRS = Table("barriers/pairs.csv", (("i", int), ("j", int), *_cells(), ("same_cell", bool), ("pretrain_step_j", int),
                                     ("lr_j", float), ("dist", float), ("update_cos", float)), rest=float)
TO_START = Table("barriers/to_start.csv", (("member", int), *_cells(), ("seed", int), ("dist", float)), rest=float)
_COUNTS = (("members", int), ("members_used", int), ("pairs", int))
BARRIER_SUMMARY = Table("barriers/summary.csv", _cells(*_COUNTS), rest=float)
# Layer-wise barriers (barriers.layerwise): one row per member pair and layer group, and their per-cell summary.
LAYERWISE = Table("barriers/layerwise.csv", (("i", int), ("j", int), *_cells(), ("layer", str), ("layer_index", int)),
                  rest=float)
LAYERWISE_SUMMARY = Table("barriers/layerwise_summary.csv", _cells(("layer", str), ("layer_index", int),
                                                                    ("pairs", int)), rest=float)
# A language-modelling pretraining task's unigram and bigram baselines (analysis.ngram_baselines).
BASELINES = Table("pretrain/baselines.csv", (("model", str), ("test_loss", float), ("test_acc", float)))
SOUPS = Table("soups.csv", _cells(
    ("members", int), ("members_used", int), ("best_member", int), ("best_val_acc", float), ("best_test_acc", float),
    ("best_ood_acc", float), ("mean_test_acc", float), ("mean_ood_acc", float), ("uniform_val_acc", float),
    ("uniform_test_acc", float), ("uniform_ood_acc", float), ("greedy_size", int), ("greedy_members", str),
    ("greedy_val_acc", float), ("greedy_test_acc", float), ("greedy_ood_acc", float), ("ensemble_test_acc", float),
    ("ensemble_ood_acc", float), ("uniform_gain", float), ("greedy_gain", float), ("ensemble_gain", float)))
SIMILARITY = Table("similarity.csv", _cells(
    ("members_used", int), ("test_acc_std", float), ("test_acc_range", float), ("ood_acc_std", float),
    ("ood_acc_range", float), ("disagreement_test", float), ("disagreement_ood", float), ("cka_mean", float),
    ("cka_min", float), ("basin_threshold", float), ("basins", int), ("basin_sizes", str),
    ("largest_basin_fraction", float)))
# Merges per cell (jaxlmc.merges): task arithmetic, TIES and Model Stock with their hyperparameters chosen on the
# validation split, the mean cosine between the members' updates and Model Stock's t.
MERGES = Table("merges.csv", _cells(("members", int), ("members_used", int)), rest=float)
# Sharpness (jaxlmc.sharpness): the top Hessian eigenvalue of the training loss of every member, and of every start
# (a pretraining checkpoint's body, or a scratch seed's initialisation — seed -1 for a checkpoint —, with the probe
# head the barrier stage measures to-start barriers against).
SHARPNESS = Table("sharpness/members.csv", (("member", int), *_cells(), ("seed", int), ("diverged", bool),
                                            ("unfit", bool), ("sharpness", float), ("sharpness_residual", float)))
START_SHARPNESS = Table("sharpness/starts.csv", (("pretrain_step", int), ("seed", int), ("sharpness", float),
                                                 ("sharpness_residual", float)))
BASINS = Table("basins.csv", (("member", int), *_cells(), ("basin", int)))
SUMMARY = Table("summary.csv", _cells(*_COUNTS, ("basins", int), ("basin_sizes", str), ("best_member", int),
                                      ("greedy_size", int), ("greedy_members", str)), rest=float)
SCALING = Table("scaling.csv", (("width", int), *_cells()), rest=float)


def _by_step(table: Table, name: str) -> Table:
    return Table(f"barriers/by_step/{name}", (("finetune_step", int), *table.columns), table.rest)


# The same tables at every kept fine-tuning step (finetune.save_steps and the last), a finetune_step column first.
STEP_MEMBERS = _by_step(MEMBERS, "members.csv")
STEP_PAIRS = _by_step(PAIRS, "pairs.csv")
STEP_TO_START = _by_step(TO_START, "to_start.csv")
STEP_SUMMARY = _by_step(BARRIER_SUMMARY, "summary.csv")
BY_STEP = (STEP_MEMBERS, STEP_PAIRS, STEP_TO_START, STEP_SUMMARY)
# The critical learning rate per start (the cell keys but the rate) and fine-tuning length (jaxlmc.noreturn).
CRITICAL = Table("critical.csv", (*((a.column, a.type) for a in grid.AXES if a.cell and a.column != "lr"),
                                  ("finetune_step", int)), rest=float)

# The refinement rounds (jaxlmc.refine): the rates each added and why, its members and time.
REFINE_ROUNDS = Table("refine/rounds.csv", (("round", int), ("lrs", str), ("reasons", str), ("members", int),
                                            ("seconds", float)))

# Other files, relative to the run directory.
CONFIG = "config.json"
CURVES = "barriers/curves.npz"
NULLS = "barriers/nulls.npz"
BARRIER_SETTINGS = "barriers/settings.json"
SIMILARITY_ARRAYS = "similarity.npz"
REPORT = "report.html"
SCALING_PAGE = "scaling.html"
PRETRAIN_CHECKPOINTS = "pretrain/checkpoints"
CHECKPOINTS = "checkpoints"
PARTS = "parts"
CORRUPT = "corrupt"
PRETRAIN_CURVES = "training/pretrain.npz"
FINETUNE_CURVES = "training/finetune.npz"
LOCK = lock.LOCK
SUPERSEDED = "superseded"
STAGES = "stages"
REFINE = "refine"


def _parse(text: str, kind: type):
    if kind is bool:
        return text == "True"
    if kind is str:
        return text
    if text == "":
        return None if kind is int else float("nan")
    return kind(text)


def rows_to_csv(table: Table, rows: list[dict]) -> str:
    """The CSV text of `rows` under `table`'s columns."""
    if table.rest is None:
        unknown = sorted({k for r in rows for k in r} - set(table.names))
        if unknown:
            raise ValueError(f"{table.path} declares no column {unknown[0]!r}")
        columns = table.names
    else:
        columns = list(dict.fromkeys([k for r in rows for k in r] or table.names))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def csv_to_rows(table: Table, text: str) -> list[dict]:
    types = table.types()
    return [{k: _parse(v, types.get(k, table.rest or str)) for k, v in row.items()}
            for row in csv.DictReader(io.StringIO(text, newline=""))]


# --------------------------------------------------------------------------------------------- the directory


def write_atomic(path: str, content: str | bytes, root: str) -> None:
    """Write a whole file or nothing below the run directory `root` (jaxlmc.files: never through a link). With several
    processes the primary one writes and the others wait for it."""
    if shard.is_primary():
        files.write_atomic(path, content, root)
    shard.sync(f"write {path}")


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

    def width(self, width: int) -> RunDir:
        path = self.path(f"width{width}")
        files.check_path(path, self.root)  # a width's run directory is never a link planted in this one
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
        if os.path.exists(target):
            return
        files.make_dirs(os.path.dirname(target), self.root)
        staging = f"{target}.tmp"
        shutil.rmtree(staging, ignore_errors=True)

        def link(src: str, dst: str) -> None:
            try:
                os.link(src, dst)
            except OSError:
                shutil.copy2(src, dst)
        try:
            shutil.copytree(self.path(PRETRAIN_CHECKPOINTS), staging, copy_function=link)
            os.replace(staging, target)
        except OSError as err:
            shutil.rmtree(staging, ignore_errors=True)
            raise faults.WriteFailed(target, err.strerror or str(err)) from None

    def remove_rounds_from(self, k: int) -> None:
        """Remove refinement round k and every round after it."""
        for path in glob.glob(os.path.join(glob.escape(self.path(REFINE)), "round*")):
            suffix = os.path.basename(path).removeprefix("round")
            if suffix.isdigit() and int(suffix) >= k:
                files.check_path(path, self.root)
                shutil.rmtree(path)

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
            saved = self.read_json(CONFIG)["config"]
            mine, defaults = json.loads(cfg.to_json()), json.loads(Config().to_json())
            diffs = [f"{section}.{key}: {before!r} -> {value!r}"
                     for section in TRAINING_SECTIONS for key, value in mine[section].items()
                     if (before := saved.get(section, {}).get(key, defaults[section][key])) != value
                     and (section, key) != ("data", "data_dir")]
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

    def config(self, overrides=()) -> Config:
        """The config the directory was trained with, with overrides of the measuring sections only."""
        if not self.exists(CONFIG):
            raise ConfigError(f"{self.root} is not a run directory (no config.json); run `jaxlmc finetune` first")
        raw = self.read_json(CONFIG)["config"]
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


