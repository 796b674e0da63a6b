"""The run directory's layout: the path of every file in it and the typed columns of every table, and how a table's
rows become CSV text and back. jaxlmc.rundir reads and writes them; no other module names a path inside a run
directory. A run directory (``--out``) holds

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
    barriers/summary.csv         BARRIER_SUMMARY: per grid cell, mean, std and 95 % interval of every measure, the
                                 excess over the null mean, the verdict and the minimum detectable excess
    barriers/curves.npz          CURVES: the interpolation curves
    barriers/settings.json       the barrier settings, chunk size, timings, pairs left out
    barriers/by_step/*.csv       STEP_*: members, pairs, to_start and summary at every kept fine-tuning step
                                 (finetune.save_steps and the last), with a finetune_step column
    critical.csv                 CRITICAL: the critical learning rate per start and fine-tuning length
    soups.csv                    SOUPS: soups, ensemble, best and mean member per cell
    similarity.csv, basins.csv   SIMILARITY, BASINS: spread, disagreement, CKA, basins per cell; each member's basin
    similarity.npz               SIMILARITY_ARRAYS: the per-cell matrices
    barriers/calibration.json    CALIBRATION: how often the verdicts err, simulated with this study's own cells
    summary.csv                  SUMMARY: the report's one row per cell
    figures/*.png, report.html   the report
    stages/STAGE.json            a study stage's marker: the settings it ran with (written last)
    width<W>/                    a whole run directory per width of a scaling trend
    scaling.csv, scaling.html    SCALING: the scaling trend
    scaling_fits.csv             SCALING_FITS: per cell, the barrier's power law against width, exponent interval
    scaling_critical.csv         SCALING_CRITICAL: the critical learning rate's slope against width, from brackets

CSV columns have declared types, and reading converts them: an int column reads as int (None where empty), a float
column as float (NaN where empty), a bool column as bool.
"""
from __future__ import annotations

import csv
import dataclasses
import io

from jaxlmc import grid, lock

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
                                              ("test_loss", float), ("test_acc", float), ("diverged", bool),
                                              ("revision", str)))  # (a released revision's name: model.pretrained)
MEMBERS = Table("members.csv", (("member", int), *((a.column, a.type) for a in grid.AXES), *_METRICS,
                                ("dist_from_init", float), ("diverged", bool), ("unfit", bool),
                                ("seed_varies", str)))
PAIRS = Table("barriers/pairs.csv", (("i", int), ("j", int), *_cells(), ("same_cell", bool), ("pretrain_step_j", int),
                                     ("lr_j", float), ("dist", float), ("update_cos", float)), rest=float)
TO_START = Table("barriers/to_start.csv", (("member", int), *_cells(), ("seed", int), ("dist", float)), rest=float)
_COUNTS = (("members", int), ("members_used", int), ("pairs", int))
_VERDICTS = (("verdict", str), ("start_verdict", str))  # jaxlmc.decide's verdict of each cell
BARRIER_SUMMARY = Table("barriers/summary.csv", _cells(*_COUNTS, *_VERDICTS), rest=float)
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
SUMMARY = Table("summary.csv", _cells(*_COUNTS, *_VERDICTS, ("basins", int), ("basin_sizes", str), ("best_member", int),
                                      ("greedy_size", int), ("greedy_members", str)), rest=float)
# A scaling study (jaxlmc.size_axes, jaxlmc.scaling): one row per size × cell; the trends, one row per series (the
# axis it runs along, the other axes' values, 0 on its own axis) and cell, start or cost.
_SIZE = (("width", int), ("depth", int), ("parametrization", str))
_SERIES = (("axis", str), *_SIZE, ("sizes", int))
SCALING = Table("scaling.csv", (*_SIZE, *_cells()), rest=float)
SCALING_FITS = Table("scaling_fits.csv", (*_SERIES, *_cells(("measure", str), ("replicates", int))), rest=float)
SCALING_COST = Table("scaling_cost.csv", (*_SERIES, ("quantity", str)), rest=float)


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
SCALING_CRITICAL = Table("scaling_critical.csv", (*_SERIES, *CRITICAL.columns, ("consistent", bool)), rest=float)

# The refinement rounds (jaxlmc.refine): the rates each added and why, its members (and how many diverged or are
# unfit) and time.
REFINE_ROUNDS = Table("refine/rounds.csv", (("round", int), ("lrs", str), ("reasons", str), ("members", int),
                                            ("seconds", float), ("unusable", int)))  # diverged or unfit members

# Other files, relative to the run directory.
CONFIG = "config.json"
CURVES = "barriers/curves.npz"
BARRIER_SETTINGS = "barriers/settings.json"
SIMILARITY_ARRAYS = "similarity.npz"
CALIBRATION = "barriers/calibration.json"
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

# The directory of a checkpointed jaxlmc.fit: what the call was (a rerun must match it), its Orbax checkpoints and
# its training curves.
FIT_SETTINGS = "fit.json"
FIT_CHECKPOINTS = "checkpoints"
FIT_CURVES = "curves.npz"


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
