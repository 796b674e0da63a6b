"""Typed, validated configuration.

A config is a TOML file with the sections below. Every key is typed; an unknown section or key, a value of the wrong
type, or an inconsistent combination raises `ConfigError` naming the offending key before any work is done.
Command-line overrides use ``--set section.key=value``; the value is parsed as TOML (``[1e-3, 1e-2]``, ``true``,
``"cosine"``), and a bare word is taken as a string (``--set model.kind=cnn``).
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import math
import tomllib
import types
import typing
from typing import Callable, Literal

from jaxlmc.labels import LABEL_MAPS
from jaxlmc.models import KINDS
from jaxlmc.optimizers import OPTIMIZERS

Schedule = Literal["constant", "cosine", "linear"]
# Registered names, checked by `validate`: jaxlmc.optimizers.OPTIMIZERS and jaxlmc.labels.LABEL_MAPS (built-ins and
# whatever a plugin module registers).
Optimizer = str
LabelMap = str
# How a member's new head starts (jaxlmc.finetuning.start_params): its seed's own random draw, one random draw shared
# by every seed (only the data order then differs between seeds: Frankle's instability analysis), zeros, or a linear
# probe fitted on the frozen starting body's features (LP-FT, Kumar et al. 2022; deterministic, so also shared).
HeadPolicy = Literal["per_seed", "shared", "zero", "probe"]


class ConfigError(ValueError):
    """A config that cannot be used; the message names the key."""


@dataclasses.dataclass(frozen=True)
class GridAxis:
    """A per-member hyperparameter of the fine-tuning grid, declared once, on the FinetuneConfig field that lists its
    values. From this declaration follow the member grid (jaxlmc.grid), the per-member constants of the training step,
    members.csv's columns, the cell keys and every table and report that shows the grid."""

    column: str  # its name in member rows, members.csv and the cell keys
    header: str  # short table header
    cell: bool = True  # members that differ in it belong to different cells (the seed does not: it is replicated)
    always_shown: bool = False  # a column in tables even when the grid does not vary it
    const: str | None = None  # the name of its per-member float32 constant in the training step, if it is one
    neutral: float | None = None  # a value that does nothing: when every member has it, the step compiles without it
    noise: bool = False  # it draws random numbers from the member's seed's "noise" key stream (consts["noise_key"])
    check: tuple[str, Callable] | None = None  # (what every value must be, the test): "be positive", v > 0
    # Filled in by jaxlmc.grid from the field the axis is declared on:
    field: str = ""  # the FinetuneConfig field
    type: type = object  # the type of one value (int, float or str)


def grid_axis(column: str, header: str, default: list, **kwargs):
    """A FinetuneConfig field holding the values of one grid axis."""
    return dataclasses.field(default_factory=lambda: list(default),
                             metadata={"grid": GridAxis(column, header, **kwargs)})


@dataclasses.dataclass(frozen=True)
class DataConfig:
    pretrain_task: str = "mnist1d"  # TFDS name or name/config
    pretrain_labels: LabelMap = "identity"  # how the pretraining task's labels are mapped (jaxlmc.data.LABEL_MAPS)
    finetune_task: str = "mnist1d/shifted"  # TFDS name or name/config
    finetune_labels: LabelMap = "mod5"  # how the fine-tuning task's labels are mapped
    ood_task: str = "mnist1d/noisy"  # "" for none; read with the fine-tuning label map
    data_dir: str = ""  # "" means $JAXLMC_DATA_DIR or ~/tensorflow_datasets
    train_eval_size: int = 1000  # fixed subset of the training split used for train loss / accuracy
    validation_size: int = 500  # held out from the end of the fine-tuning train split (greedy soups, best member)
    # Class splits: keep only the examples of these original classes, relabelled 0 .. k-1 in this order ([]: all).
    # Exclusive with a label map other than "identity"; the OOD set uses finetune_classes.
    pretrain_classes: list[int] = dataclasses.field(default_factory=list)
    finetune_classes: list[int] = dataclasses.field(default_factory=list)  # its class split ([]: all)
    # Text datasets (tiny_shakespeare, imdb_reviews, …) only: bytes of context per sequence (the window read is one
    # longer, for the next-byte targets of language modelling); 0 for datasets of fixed-size inputs.
    context_length: int = 0


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    kind: str = "mlp"  # a registered model kind (jaxlmc.models.KINDS)
    width: int = 256  # hidden units (MLP) or channels (CNN)
    depth: int = 2  # hidden layers (MLP; 0 is logistic regression) or conv layers (CNN)
    norm: Literal["none", "layernorm"] = "none"  # LayerNorm before each hidden nonlinearity, or none
    kernel_size: int = 3  # CNN only
    heads: int = 4  # transformer only: attention heads (width must be a multiple)
    vocab_size: int = 0  # transformer only: token ids lie in [0, vocab_size)


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    steps: int = 3000  # updates
    batch_size: int = 100  # examples per update
    lr: float = 1e-2  # peak learning rate
    optimizer: Optimizer = "adamw"  # AdamW (decoupled weight decay) or SGD with momentum
    momentum: float = 0.9  # sgd only
    weight_decay: float = 0.0  # decoupled weight decay
    schedule: Schedule = "constant"  # learning-rate schedule after the warm-up
    warmup_steps: int = 0  # linear warm-up from 0 to lr
    # The kept Orbax checkpoints: the starts fine-tuning can use.
    save_steps: list[int] = dataclasses.field(default_factory=lambda: [0, 10, 30, 100, 300, 1000, 3000])
    seed: int = 0  # the pretraining's init and data-order keys


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    # The grid: every combination of these values is a cell, and every cell has `seeds` members. The nesting order of
    # the grid (and of members.csv's columns) is the order of the fields here.
    pretrain_steps: list[int] = grid_axis("pretrain_step", "pretrain", [0, 100, 300, 3000], always_shown=True)
    lrs: list[float] = grid_axis("lr", "lr", [1e-3, 1e-2], always_shown=True, check=("be positive", lambda v: v > 0))
    weight_decays: list[float] = grid_axis("weight_decay", "wd", [0.0], const="wd",
                                           check=("be non-negative", lambda v: v >= 0))
    schedules: list[Schedule] = grid_axis("schedule", "sched", ["cosine"])
    # Per-member dropout of hidden units while fine-tuning (never at evaluation), masks from the seed's noise stream.
    dropouts: list[float] = grid_axis("dropout", "drop", [0.0], const="dropout", neutral=0.0, noise=True,
                                      check=("lie in [0, 1)", lambda v: 0 <= v < 1))
    # How each member's new head starts (HeadPolicy). Which sources of randomness vary with the seed follows from it:
    # per_seed varies the head's initialisation and the data order, the others the data order alone.
    heads: list[HeadPolicy] = grid_axis("head", "head", ["per_seed"], always_shown=True)
    warmup_steps: int = 0  # every member's linear warm-up from 0 to its rate
    seeds: int = dataclasses.field(default=8, metadata={"grid": GridAxis("seed", "seed", cell=False,
                                                                          always_shown=True)})  # 0 .. seeds-1
    # Added to every fine-tuning seed's key (data order, heads, scratch bodies, dropout; the shared head's too): a
    # replicate of a study with a fresh seed stream is the same config with another offset (and pretrain.seed).
    seed_offset: int = 0
    steps: int = 1000  # updates per member
    # The amount of fine-tuning as an axis: the members are also kept at these steps (each in (0, steps)), and the
    # barrier stage measures them there too. With a constant schedule the state at step t is exactly a t-step
    # fine-tuning; with a decaying one it is a point along the longer run.
    save_steps: list[int] = dataclasses.field(default_factory=list)
    batch_size: int = 100  # examples per update and member
    optimizer: Optimizer = "adamw"  # AdamW (decoupled weight decay) or SGD with momentum
    momentum: float = 0.9  # sgd only
    new_head: bool = True  # forced when the fine-tuning task has a different number of classes
    scratch: bool = False  # add a control row (pretrain_step -1): every seed from its own random initialisation
    # The linear probe (head "probe", and the start every member's barrier to the start is measured against): full-
    # batch L-BFGS on the frozen body's features of the fine-tuning training split, with an L2 penalty on its weights.
    probe_steps: int = 100
    probe_l2: float = 1e-3  # the linear probe's L2 penalty


@dataclasses.dataclass(frozen=True)
class RunConfig:
    chunk_steps: int = 100  # steps per compiled scan; metrics reach the host once per chunk
    checkpoint_every: int = 500  # steps between Orbax saves (and always at the end)
    eval_batch_size: int = 1000  # examples per evaluation batch
    max_members: int = 0  # members per compiled program; 0: all that fit in memory (then as few parts as possible)
    # Members trained together, all steps of a chunk, before the next group (jaxlmc.train.member_group_size); the
    # results do not depend on it. 0: automatic (8 on a CPU, fewer for a large model; all on an accelerator).
    member_group: int = 0


@dataclasses.dataclass(frozen=True)
class BarrierConfig:
    alphas: int = 25  # points on the α grid, ends included (Git Re-Basin uses 25)
    pairs: str = "within"  # "within" (pairs inside each grid cell), "all", or a file of pairs (columns i, j)
    chunk_pairs: int = 0  # pairs evaluated together; 0 picks the largest that fits memory_fraction of free memory
    memory_fraction: float = 0.5  # of free device memory the automatic chunk_pairs may use
    bootstrap: int = 1000  # seed resamples for the member-bootstrap CIs of the per-cell means (jaxlmc.stats); 0: none
    # Also the barriers after aligning member j of each pair onto member i (Git Re-Basin), columns with the suffix
    # _aligned: "weights" (weight matching; true means the same) or "activations" (activation matching on training
    # examples); false: no alignment.
    align: bool | Literal["weights", "activations"] = False
    # Also the layer-wise barriers (Adilova et al. 2024) of every member pair on the test set: one layer group (a layer,
    # or a transformer block's attention or MLP) interpolated at a time, the rest kept at member i; aligned too with
    # `align`. Costs (layer groups) × the member pairs' share of the pass.
    layerwise: bool = False
    # Also the barriers of REPAIR-renormalised interpolations (Jordan et al. 2023; jaxlmc.repair), on the aligned pairs
    # with `align`, else on the naive ones: columns with the suffix _repair. Statistics from the first
    # `repair_examples` of the fixed train-evaluation subset.
    repair: bool = False
    repair_examples: int = 500  # examples whose activation statistics REPAIR matches
    # Also each member pair's quadratic Bezier curve (Garipov et al. 2018; jaxlmc.curves): its bend trained for this
    # many Adam steps at `curve_lr` on the fine-tuning training data (batches of finetune.batch_size, t ~ U(0, 1)),
    # all pairs at once, on the aligned pairs with `align`; columns with the suffix _curve. 0: no curves.
    curve_steps: int = 0
    curve_lr: float = 1e-3  # Adam's rate when fitting a Bezier curve between two members
    # Bootstrap resamples of the evaluation examples, evaluated inside the same pass: each pair's noise floor (the
    # barrier evaluation noise alone would show, see jaxlmc.stats) comes from them. 0: no noise floors.
    noise_resamples: int = 100


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    # A member is "unfit" (left out of barriers, soups and basins like a diverged one, and counted) when its train
    # accuracy is not above chance (the most frequent label's share of the train-evaluation subset) by this margin:
    # it failed to train. A member that trains but loses what pretraining gave has left the basin, not failed.
    fit_margin: float = 0.05
    # Optionally also unfit (0: off): a train accuracy below this fraction of the best one reached from the same start
    # (checkpoint and head) — a relative rule whose verdicts the report compares with the absolute one's.
    unfit_fraction: float = 0.0
    similarity_examples: int = 1000  # test examples for prediction disagreement and CKA
    # Sharpness: the top Hessian eigenvalue of the training loss of every member and of every start, by this many
    # power-iteration steps (Hessian-vector products, all members at once) on this many training examples (the first
    # of the fixed train-evaluation subset). 0 iterations: not measured.
    sharpness_iterations: int = 20
    sharpness_examples: int = 500  # training examples the Hessian-vector products use
    widths: list[int] = dataclasses.field(default_factory=list)  # a scaling trend: one study per model width
    # Refinement (jaxlmc.refine): after the grid's barriers, up to this many rounds each adding, for every start, the
    # log-midpoint of every stay → leave and trains → fails bracket wider than stats.BRACKET_FACTOR (0: none).
    refine_rounds: int = 0


@dataclasses.dataclass(frozen=True)
class PluginsConfig:
    # Python modules imported before the rest of the config is read: they register model kinds, datasets, label maps,
    # optimisers or study stages (jaxlmc.models.register_kind, jaxlmc.data.register_dataset, …) that the config then
    # names. Also `--import MODULE` on the command line.
    modules: list[str] = dataclasses.field(default_factory=list)


# The sections that decide what a run directory's checkpoints contain; the others (how often to report, how to
# measure) may change between invocations on the same directory.
TRAINING_SECTIONS = ("data", "model", "pretrain", "finetune")


@dataclasses.dataclass(frozen=True)
class Config:
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    pretrain: PretrainConfig = dataclasses.field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = dataclasses.field(default_factory=FinetuneConfig)
    run: RunConfig = dataclasses.field(default_factory=RunConfig)
    barriers: BarrierConfig = dataclasses.field(default_factory=BarrierConfig)
    study: StudyConfig = dataclasses.field(default_factory=StudyConfig)
    plugins: PluginsConfig = dataclasses.field(default_factory=PluginsConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, allow_nan=False)


def _check_value(value, hint, key: str):
    """Return `value` converted to `hint`, or raise ConfigError naming `key`."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):  # the first alternative the value is
        errors = []
        for alternative in typing.get_args(hint):
            try:
                return _check_value(value, alternative, key)
            except ConfigError as err:
                errors.append(str(err).removeprefix(f"{key}: "))
        raise ConfigError(f"{key}: {value!r} is none of: " + "; ".join(errors))
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {list(choices)}")
        return value
    if origin is list:
        (item_hint,) = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        return [_check_value(v, item_hint, f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {type(value).__name__} {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {type(value).__name__} {value!r}")
        if not math.isfinite(value):  # (every later bound check, `value <= 0` say, would let NaN through)
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {type(value).__name__} {value!r}")
        return value
    raise TypeError(f"unsupported config type {hint} for {key}")  # a bug in this module, not in the config


def _section(cls, raw: dict, name: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"[{name}] must be a table, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(raw) - set(hints))
    if unknown:
        raise ConfigError(f"unknown key {name}.{unknown[0]} (known keys of [{name}]: {', '.join(sorted(hints))})")
    values = {k: _check_value(v, hints[k], f"{name}.{k}") for k, v in raw.items()}
    return cls(**values)


def from_dict(raw: dict) -> Config:
    sections = typing.get_type_hints(Config)
    unknown = sorted(set(raw) - set(sections))
    if unknown:
        raise ConfigError(f"unknown section [{unknown[0]}] (known sections: {', '.join(sorted(sections))})")
    plugins = _section(sections["plugins"], raw.get("plugins", {}), "plugins")
    import_plugins(plugins.modules)  # before the sections that name what they register are checked
    cfg = Config(**{name: _section(sections[name], raw.get(name, {}), name) for name in sections})
    validate(cfg)
    return cfg


def import_plugins(modules: typing.Sequence[str]) -> None:
    """Import each module (once: Python caches them), naming the one that fails."""
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as err:  # its own error, whatever it is, belongs to the plugin: name it in one line
            raise ConfigError(f"plugins.modules: cannot import {name!r}: {type(err).__name__}: {err}") from None


def parse_override(text: str) -> tuple[str, str, object]:
    """Parse ``section.key=value`` into (section, key, value)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form section.key=value")
    path, raw_value = text.split("=", 1)
    parts = path.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"override {text!r}: the key must be section.key, got {path!r}")
    try:
        value = tomllib.loads(f"v = {raw_value}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw_value.strip()  # a bare word: take it as a string
    return parts[0], parts[1], value


def load(path: str | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Read a TOML config (or the defaults when `path` is None) and apply ``section.key=value`` overrides."""
    raw: dict = {}
    if path is not None:
        try:
            with open(path, "rb") as f:
                raw = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except IsADirectoryError:
            raise ConfigError(f"config file {path} is a directory, not a TOML file") from None
        except OSError as err:
            raise ConfigError(f"config file {path} cannot be read: {err.strerror or err}") from None
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"config file {path} is not valid TOML: {err}") from None
    for text in overrides:
        section, key, value = parse_override(text)
        table = raw.setdefault(section, {})
        if not isinstance(table, dict):
            raise ConfigError(f"override {text!r}: [{section}] is not a table")
        table[key] = value
    return from_dict(raw)


def validate(cfg: Config) -> None:
    """Checks that span keys, or bound values; types were checked on reading."""
    m, p, f, r, b = cfg.model, cfg.pretrain, cfg.finetune, cfg.run, cfg.barriers
    positive = {
        "model.width": m.width, "model.kernel_size": m.kernel_size,
        "pretrain.batch_size": p.batch_size, "pretrain.lr": p.lr, "finetune.steps": f.steps,
        "finetune.batch_size": f.batch_size, "finetune.seeds": f.seeds, "run.chunk_steps": r.chunk_steps,
        "run.checkpoint_every": r.checkpoint_every, "run.eval_batch_size": r.eval_batch_size,
        "data.train_eval_size": cfg.data.train_eval_size, "study.sharpness_examples": cfg.study.sharpness_examples,
        "barriers.repair_examples": cfg.barriers.repair_examples, "barriers.curve_lr": cfg.barriers.curve_lr,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key} must be positive, got {value}")
    non_negative = {"pretrain.steps": p.steps, "pretrain.weight_decay": p.weight_decay,
                    "pretrain.warmup_steps": p.warmup_steps, "finetune.warmup_steps": f.warmup_steps,
                    "pretrain.momentum": p.momentum, "finetune.momentum": f.momentum,
                    "data.context_length": cfg.data.context_length,
                    "study.sharpness_iterations": cfg.study.sharpness_iterations,
                    "study.refine_rounds": cfg.study.refine_rounds, "finetune.seed_offset": f.seed_offset,
                    "barriers.curve_steps": cfg.barriers.curve_steps}
    for key, value, registry, where in (("pretrain.optimizer", p.optimizer, OPTIMIZERS, "jaxlmc.optimizers"),
                                        ("finetune.optimizer", f.optimizer, OPTIMIZERS, "jaxlmc.optimizers"),
                                        ("data.pretrain_labels", cfg.data.pretrain_labels, LABEL_MAPS, "jaxlmc.labels"),
                                        ("data.finetune_labels", cfg.data.finetune_labels, LABEL_MAPS, "jaxlmc.labels")):
        if value not in registry:
            raise ConfigError(f"{key}: {value!r} is not one of {sorted(registry)} (more are registered in {where})")
    if m.kind not in KINDS:
        raise ConfigError(f"model.kind: {m.kind!r} is not one of {sorted(KINDS)}")
    kind = KINDS[m.kind]
    if m.depth < kind.min_depth:
        raise ConfigError(f"model.depth must be at least {kind.min_depth} for model.kind {m.kind!r}, got {m.depth}")
    if kind.sequence and (m.heads < 1 or m.width % m.heads or m.vocab_size < 2):
        raise ConfigError(f"model.kind {m.kind!r} needs model.heads ≥ 1 dividing model.width and model.vocab_size ≥ 2, "
                          f"got heads {m.heads}, width {m.width}, vocab_size {m.vocab_size}")
    if b.repair and kind.repair_points is None:
        raise ConfigError(f"barriers.repair: model.kind {m.kind!r} declares no REPAIR points; set barriers.repair = false")
    if b.align and kind.permutation_spec is None:
        raise ConfigError(f"barriers.align: model.kind {m.kind!r} declares no permutation spec, so matching cannot "
                          "align its members; set barriers.align = false")
    for key, value in non_negative.items():
        if value < 0:
            raise ConfigError(f"{key} must be non-negative, got {value}")
    lists = {f"finetune.{field.name}": (getattr(f, field.name), field.metadata["grid"].check)
             for field in dataclasses.fields(f) if "grid" in field.metadata and isinstance(getattr(f, field.name), list)}
    lists["pretrain.save_steps"] = (p.save_steps, None)
    for key, (values, check) in lists.items():
        if not values:
            raise ConfigError(f"{key} must not be empty")
        if len(set(values)) != len(values):
            raise ConfigError(f"{key} has repeated values: {values}")
        if check is not None and not all(check[1](v) for v in values):
            raise ConfigError(f"{key} must {check[0]}, got {values}")
    bad_saves = [s for s in p.save_steps if not 0 <= s <= p.steps]
    if bad_saves:
        raise ConfigError(f"pretrain.save_steps {bad_saves} lie outside [0, pretrain.steps={p.steps}]")
    missing = sorted(set(f.pretrain_steps) - set(p.save_steps) - {p.steps})
    if missing:
        raise ConfigError(f"finetune.pretrain_steps {missing} are not saved by pretraining "
                          f"(pretrain.save_steps = {p.save_steps})")
    if p.warmup_steps > p.steps:
        raise ConfigError(f"pretrain.warmup_steps ({p.warmup_steps}) exceeds pretrain.steps ({p.steps})")
    if r.max_members < 0:
        raise ConfigError(f"run.max_members must be non-negative (0: automatic), got {r.max_members}")
    if r.member_group < 0:
        raise ConfigError(f"run.member_group must be non-negative (0: automatic), got {r.member_group}")
    if cfg.data.validation_size < 0:
        raise ConfigError(f"data.validation_size must be non-negative, got {cfg.data.validation_size}")
    for which in ("pretrain", "finetune"):  # that the classes exist in the dataset is checked when it is loaded
        classes, labels = getattr(cfg.data, f"{which}_classes"), getattr(cfg.data, f"{which}_labels")
        if not classes:
            continue
        if any(c < 0 for c in classes) or len(set(classes)) != len(classes) or len(classes) < 2:
            raise ConfigError(f"data.{which}_classes must be at least two distinct non-negative classes, got {classes}")
        if labels != "identity":
            raise ConfigError(f"data.{which}_classes and data.{which}_labels = {labels!r} cannot be combined: a class "
                              f"list relabels the classes 0 .. k-1 itself; set data.{which}_labels = \"identity\"")
    if any(w <= 0 for w in cfg.study.widths) or len(set(cfg.study.widths)) != len(cfg.study.widths):
        raise ConfigError(f"study.widths must be distinct positive widths, got {cfg.study.widths}")
    if not 0 <= cfg.study.unfit_fraction <= 1:
        raise ConfigError(f"study.unfit_fraction must lie in [0, 1], got {cfg.study.unfit_fraction}")
    if not -1 <= cfg.study.fit_margin < 1:
        raise ConfigError(f"study.fit_margin must lie in [-1, 1) (-1: no member is unfit), got {cfg.study.fit_margin}")
    if cfg.study.similarity_examples < 2:
        raise ConfigError(f"study.similarity_examples must be at least 2, got {cfg.study.similarity_examples}")
    if b.noise_resamples < 0 or b.noise_resamples == 1:
        raise ConfigError(f"barriers.noise_resamples must be 0 (none) or at least 2, got {b.noise_resamples}")
    if f.probe_steps < 1 or f.probe_l2 < 0:
        raise ConfigError(f"finetune.probe_steps must be positive and finetune.probe_l2 non-negative, got "
                          f"{f.probe_steps} and {f.probe_l2}")
    if not f.new_head and f.heads != ["per_seed"]:
        raise ConfigError(f"finetune.heads {f.heads} needs a new head: with finetune.new_head = false the pretrained "
                          "head is kept (set finetune.new_head = true, or finetune.heads = [\"per_seed\"])")
    if b.alphas < 3:
        raise ConfigError(f"barriers.alphas must be at least 3 (both ends and a point between), got {b.alphas}")
    if b.chunk_pairs < 0 or b.bootstrap < 0:
        raise ConfigError(f"barriers.chunk_pairs and barriers.bootstrap must be non-negative, got "
                          f"{b.chunk_pairs} and {b.bootstrap}")
    if not 0 < b.memory_fraction <= 1:
        raise ConfigError(f"barriers.memory_fraction must lie in (0, 1], got {b.memory_fraction}")
    if not b.pairs:
        raise ConfigError('barriers.pairs must be "within", "all" or the path of a pair file')
    if f.save_steps != sorted(set(f.save_steps)) or any(not 0 < s < f.steps for s in f.save_steps):
        raise ConfigError(f"finetune.save_steps must increase strictly and lie strictly between 0 and finetune.steps "
                          f"({f.steps}; the last step is always kept), got {f.save_steps}")
    if f.warmup_steps > f.steps:
        raise ConfigError(f"finetune.warmup_steps ({f.warmup_steps}) exceeds finetune.steps ({f.steps})")
