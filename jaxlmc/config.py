"""Typed, validated configuration.

A config is a TOML file with the sections below. Every key is typed; an unknown section or key, a value of the wrong
type, or an inconsistent combination raises `ConfigError` naming the offending key before any work is done.
Command-line overrides use ``--set section.key=value``; the value is parsed as TOML (``[1e-3, 1e-2]``, ``true``,
``"cosine"``), and a bare word is taken as a string (``--set model.kind=cnn``).
"""
from __future__ import annotations

import dataclasses
import importlib
import math
import re
import tomllib
import types
import typing
from typing import Literal

from jaxlmc import hf
from jaxlmc.labels import LABEL_MAPS
from jaxlmc.measures import PAIR_MEASURES, chosen
from jaxlmc.models import Classifier, import_failure, resolve_kind
from jaxlmc.optimizers import OPTIMIZERS, update_rule
# The sections, re-exported: the rest of jaxlmc (and a plugin) names them jaxlmc.config.FinetuneConfig and so on.
from jaxlmc.settings import (BarrierConfig, Config, DataConfig, FinetuneConfig, GridAxis, HeadPolicy, LabelMap,
                             ModelConfig, Optimizer, PluginsConfig, PretrainConfig, RunConfig, Schedule, StudyConfig,
                             TRAINING_SECTIONS, grid_axis)  # noqa: F401

# The built-in pair measures and the [barriers] keys that switch them on (the straight line always runs).
_SWITCHED_MEASURES = {"straight": "nothing (always computed)", "aligned": "barriers.align",
                      "repair": "barriers.repair", "curve": "barriers.curve_steps"}


class ConfigError(ValueError):
    """A config that cannot be used; the message names the key."""


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
    if hint is dict:  # a sub-table ([model.args]), checked against its own dataclass once its owner is known
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table, got {type(value).__name__} {value!r}")
        return dict(value)
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
    parsed = {name: _section(sections[name], raw.get(name, {}), name) for name in sections}
    parsed["model"] = _with_kind_args(parsed["model"])
    parsed.update(_with_revisions(parsed, raw.get("finetune", {})))
    cfg = Config(**parsed)
    validate(cfg)
    return cfg


def revision_step(revision: str) -> int:
    """The pretraining step a revision stands for: N of step<N> (Pythia's branch names) or of step_<N> / step_<N>k
    (thousands: MultiBERTs' step_20k)."""
    match = re.fullmatch(r"step_?(\d+)(k?)", revision)
    if match is None:
        raise ConfigError(f"finetune.pretrain_revisions: {revision!r} is not named step<N> or step_<N>k (the "
                          "pretraining step it stands for, as Pythia's and MultiBERTs' revisions are)")
    return int(match.group(1)) * (1000 if match.group(2) else 1)


def _with_revisions(parsed: dict, raw_finetune: dict) -> dict:
    """With model.pretrained, the pretraining steps the revisions stand for: the grid's starts, the kept steps."""
    model, f, p = parsed["model"], parsed["finetune"], parsed["pretrain"]
    if not model.pretrained:
        if f.pretrain_revisions:
            raise ConfigError("finetune.pretrain_revisions needs model.pretrained (the repository or directory they "
                              "belong to)")
        return {}
    if model.kind not in hf.LOADERS:
        raise ConfigError(f"model.pretrained: model.kind {model.kind!r} reads no released checkpoints (kinds that do: "
                          f"{', '.join(sorted(hf.LOADERS))})")
    if not f.pretrain_revisions:
        raise ConfigError("model.pretrained needs finetune.pretrain_revisions (e.g. [\"step0\", \"step143000\"])")
    steps = [revision_step(r) for r in f.pretrain_revisions]
    if "pretrain_steps" in raw_finetune and sorted(f.pretrain_steps) != sorted(steps):
        raise ConfigError(f"finetune.pretrain_steps {f.pretrain_steps} disagree with finetune.pretrain_revisions "
                          f"{f.pretrain_revisions}: leave pretrain_steps out, it follows from the revisions")
    return {"finetune": dataclasses.replace(f, pretrain_steps=steps),
            "pretrain": dataclasses.replace(p, steps=max(steps), save_steps=sorted(steps))}


def _with_kind_args(model):
    """The [model] section with `args` checked against, and turned into, its kind's own dataclass."""
    try:
        kind = resolve_kind(model.kind)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    raw = model.args if isinstance(model.args, dict) else dataclasses.asdict(model.args)
    if kind.args is None:
        if raw:
            raise ConfigError(f"model.args: model.kind {model.kind!r} takes no arguments of its own, got "
                              f"{', '.join(sorted(raw))}")
        return model
    args = _section(kind.args, raw, "model.args")
    # A kind's arguments may say what makes them unbuildable (an odd rotary dimension): a config error, not a crash.
    problem = getattr(args, "problem", None)
    found = problem() if callable(problem) else None
    if found:
        raise ConfigError(f"model.args: {found}")
    return dataclasses.replace(model, args=args)


def import_plugins(modules: typing.Sequence[str]) -> None:
    """Import each module (once: Python caches them), naming the one that fails."""
    for name in modules:
        try:
            importlib.import_module(name)
        except (Exception, SystemExit) as err:  # its own error (or exit) belongs to the plugin: name it in one line
            raise ConfigError(f"plugins.modules: cannot import {name!r}: {import_failure(err)}") from None


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
    for name in b.measures:
        if name in _SWITCHED_MEASURES:
            raise ConfigError(f"barriers.measures: {name!r} is switched on by {_SWITCHED_MEASURES[name]}, not named "
                              "here")
        if name not in PAIR_MEASURES:
            raise ConfigError(f"barriers.measures: {PAIR_MEASURES.unknown(name)} (register it in a plugin module)")
    try:  # what each named measure needs, as the barrier stage will give it: refused now, not after the training
        chosen(b.measures, {"line": True, "repair_x": True if b.repair else None,
                            "bezier": True if b.curve_steps else None}, aligned=bool(b.align))
    except ValueError as err:
        raise ConfigError(f"barriers.measures: {err} (barriers.align, barriers.repair or barriers.curve_steps)") \
            from None
    kind = resolve_kind(m.kind)  # (resolved when the section was read: a bad name is refused there)
    if m.depth < kind.min_depth:
        raise ConfigError(f"model.depth must be at least {kind.min_depth} for model.kind {m.kind!r}, got {m.depth}")
    if kind.sequence and kind.args is None and (m.heads < 1 or m.width % m.heads or m.vocab_size < 2):
        raise ConfigError(f"model.kind {m.kind!r} needs model.heads ≥ 1 dividing model.width and model.vocab_size ≥ 2, "
                          f"got heads {m.heads}, width {m.width}, vocab_size {m.vocab_size}")
    if m.parametrization == "mup":
        _check_mup(m, kind, {"pretrain.optimizer": p.optimizer, "finetune.optimizer": f.optimizer})
    if b.repair and kind.repair_points is None:
        raise ConfigError(f"barriers.repair: model.kind {m.kind!r} declares no REPAIR points; set barriers.repair = false")
    if b.align == "activations" and getattr(kind.module, "unit_activations", None) in (None,
                                                                                         Classifier.unit_activations):
        raise ConfigError(f'barriers.align: model.kind {m.kind!r} does not expose its units\' activations '
                          '(Classifier.unit_activations), so activation matching cannot align its members; use '
                          '"weights"')
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
    for key in ("widths", "depths", "parametrizations"):
        values = getattr(cfg.study, key)
        if len(set(values)) != len(values) or any(isinstance(v, int) and v <= 0 for v in values):
            raise ConfigError(f"study.{key} must be distinct{' positive' if key != 'parametrizations' else ''} "
                              f"values, got {values}")
    if cfg.study.depths and min(cfg.study.depths) < kind.min_depth:
        raise ConfigError(f"study.depths: model.kind {m.kind!r} needs a depth of at least {kind.min_depth}, got "
                          f"{cfg.study.depths}")
    if "mup" in cfg.study.parametrizations and m.parametrization != "mup":
        _check_mup(m, kind, {"pretrain.optimizer": p.optimizer, "finetune.optimizer": f.optimizer})
    if not 0 <= cfg.study.unfit_fraction <= 1:
        raise ConfigError(f"study.unfit_fraction must lie in [0, 1], got {cfg.study.unfit_fraction}")
    if not -1 <= cfg.study.fit_margin < 1:
        raise ConfigError(f"study.fit_margin must lie in [-1, 1) (-1: no member is unfit), got {cfg.study.fit_margin}")
    if not 0 < cfg.study.margin < 1:
        raise ConfigError(f"study.margin must lie in (0, 1) (a test error barrier), got {cfg.study.margin}")
    if cfg.study.calibration_cells < 0:
        raise ConfigError(f"study.calibration_cells must be at least 0 (0: skipped), got {cfg.study.calibration_cells}")
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
        raise ConfigError('barriers.pairs must be "within", "ring:K", "all" or the path of a pair file')
    if b.pairs.startswith("ring:") and not (b.pairs[5:].isdigit() and int(b.pairs[5:]) >= 1):
        raise ConfigError(f'barriers.pairs: {b.pairs!r}: a ring design is "ring:K" with K a positive integer (each '
                          "member paired with its next K seeds in its cell)")
    if f.save_steps != sorted(set(f.save_steps)) or any(not 0 < s < f.steps for s in f.save_steps):
        raise ConfigError(f"finetune.save_steps must increase strictly and lie strictly between 0 and finetune.steps "
                          f"({f.steps}; the last step is always kept), got {f.save_steps}")
    if f.warmup_steps > f.steps:
        raise ConfigError(f"finetune.warmup_steps ({f.warmup_steps}) exceeds finetune.steps ({f.steps})")


def _check_mup(m, kind, optimizers: dict[str, str]) -> None:
    """model.parametrization = "mup" needs a kind that applies it, a reference width it can build, and optimisers
    whose µP rates are known."""
    if not kind.mup:
        raise ConfigError(f'model.parametrization "mup": model.kind {m.kind!r} does not implement µP '
                          "(mlp and transformer do)")
    if m.base_width < 1 or (kind.sequence and m.base_width % m.heads):
        what = "a positive width dividing by model.heads" if kind.sequence else "a positive width"
        raise ConfigError(f"model.base_width must be {what}, got {m.base_width}")
    for key, name in optimizers.items():
        try:
            update_rule(name)
        except ValueError as err:
            raise ConfigError(f"{key}: {err}") from None
