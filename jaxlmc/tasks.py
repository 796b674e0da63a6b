"""Tasks and evaluation sets: the pretraining and fine-tuning tasks a config names (through jaxlmc.data, the one home
of TFDS), the validation split held out of fine-tuning, and the evaluation sets batched on the device once per run."""
from __future__ import annotations

import dataclasses
import os

from jaxlmc import data, hf, train
from jaxlmc.config import Config, ConfigError
from jaxlmc.labels import LANGUAGE_MODELLING
from jaxlmc.models import resolve_kind


@dataclasses.dataclass(frozen=True)
class Task:
    train: data.Split
    test: data.Split
    ood: data.Split | None = None
    val: data.Split | None = None  # held out from the training split: never trained on, never the test set

    @property
    def input_shape(self):
        return self.train.x.shape[1:]

    @property
    def token_shape(self):
        """The input shape without the token-type channel of text pairs (inputs N×T×2): the shape a task of single
        texts (N×T) shares with it, so that a model pretrained on one fine-tunes on the other."""
        return self.input_shape[:-1] if self.train.token_types else self.input_shape

    @property
    def per_token(self) -> bool:
        """A label per position (language modelling): labels N×T instead of N."""
        return self.train.y.ndim > 1


def tokenizer_of(cfg: Config) -> str:
    """The tokenizer file that data.tokenizer names ("" for bytes): a path, or "pretrained" for model.pretrained's
    own (beside its config.json: the first revision's directory, or the hub's snapshot of it): its tokenizer.json,
    or BERT's vocab.txt."""
    name = cfg.data.tokenizer
    if name != "pretrained":
        if name and not os.path.isfile(name):
            raise ConfigError(f"data.tokenizer: {name} is not a file (a tokenizer.json, or \"pretrained\")")
        return name
    if not cfg.model.pretrained:
        raise ConfigError('data.tokenizer = "pretrained" needs model.pretrained (whose tokenizer.json it reads)')
    revision = cfg.finetune.pretrain_revisions[0]
    try:
        directory = hf.snapshot(*hf.revision_source(cfg.model.pretrained, revision))
    except hf.CheckpointError as err:
        raise ConfigError(f"data.tokenizer: {err}") from None
    for name in hf.TOKENIZER_FILES:  # a tokenizer.json, or BERT's vocab.txt (jaxlmc.tokens.tokenizer)
        if os.path.exists(os.path.join(directory, name)):
            return os.path.join(directory, name)
    raise ConfigError(f"data.tokenizer: model.pretrained's revision {revision} has no "
                      f"{' or '.join(hf.TOKENIZER_FILES)} ({directory})")


def _load(cfg: Config, key: str, name: str, label_map: str, splits=("train", "test"), stats_from=None,
          classes: tuple[str, list[int]] = ("", [])) -> dict:
    """Load a task; a bad dataset, label map or class list is a config error naming the key (the classes' key for a
    class list the dataset does not have), raised before anything is written."""
    classes_key, class_list = classes
    data_dir = cfg.data.data_dir
    kind = resolve_kind(cfg.model.kind)
    tokenizer_path = tokenizer_of(cfg)
    if tokenizer_path and not kind.pads:
        raise ConfigError(f"data.tokenizer: model.kind {kind.name!r} does not read padding (negative token ids), which "
                          "tokenized text has; use a kind that does (gpt_neox)")
    try:
        if data.is_pair(name, data_dir or None) and not kind.token_types:
            raise ConfigError(f"{key} {name!r} holds text pairs, read as token ids and token types; model.kind "
                              f"{kind.name!r} reads one segment (bert reads token types)")
        if class_list:
            n_classes = data.num_classes(name, data_dir or None)
            try:
                data.check_classes(class_list, n_classes)
            except ValueError as err:
                raise ConfigError(f"{classes_key}: {err} ({key} = {name!r})") from None
        loaded = data.load_task(name, label_map, data_dir or None, splits=splits, stats_from=stats_from,
                                classes=class_list, context_length=cfg.data.context_length,
                                tokenizer_path=tokenizer_path)
    except ConfigError:
        raise
    except ValueError as err:  # an unknown dataset or label map is a config error: name the key
        raise ConfigError(f"{key}: {err}") from None
    vocab = data.vocab_size(name, data_dir or None, tokenizer_path)
    if kind.sequence and not vocab:
        # Real values used as token ids would be cast and gathered silently: refuse instead.
        raise ConfigError(f"model.kind {kind.name!r} reads integer token ids, but {key} {name!r} has no tokens "
                          f"(real-valued inputs of shape {next(iter(loaded.values())).x.shape[1:]}); use a text or "
                          "token dataset, or a model kind for real-valued inputs")
    # A kind with its own arguments declares its vocabulary there (model.args.vocab_size).
    model_vocab, vocab_key = ((cfg.model.args.vocab_size, "model.args.vocab_size")
                              if hasattr(cfg.model.args, "vocab_size") else (cfg.model.vocab_size, "model.vocab_size"))
    if kind.sequence and vocab > model_vocab:
        # Token ids past the embedding table would be silently clamped by the gather: refuse instead.
        raise ConfigError(f"{vocab_key} {model_vocab} is smaller than {key} {name!r}'s vocabulary ({vocab} tokens)")
    if kind.sequence and label_map in LANGUAGE_MODELLING and vocab < model_vocab:
        # A language model's logits cover its whole embedding table (Pythia pads its tokenizer's 50,277 tokens to
        # 50,304 rows): the task's classes are the model's tokens.
        loaded = {split: dataclasses.replace(s, num_classes=model_vocab) for split, s in loaded.items()}
    return loaded


def check_pretrained(cfg: Config) -> None:
    """Every released revision model.pretrained names is there — a local directory, or the hub's snapshot of it —
    checked before any dataset is prepared (by the commands that import them: jaxlmc.pretraining.check_sources): one
    ConfigError line naming the revision and what is missing."""
    for revision in cfg.finetune.pretrain_revisions if cfg.model.pretrained else []:
        try:
            hf.snapshot(*hf.revision_source(cfg.model.pretrained, revision))
        except hf.CheckpointError as err:
            raise ConfigError(f"model.pretrained, revision {revision}: {err}") from None


def load_pretrain_task(cfg: Config) -> Task:
    d = cfg.data
    splits = _load(cfg, "data.pretrain_task", d.pretrain_task, d.pretrain_labels,
                   classes=("data.pretrain_classes", d.pretrain_classes))
    return Task(splits["train"], splits["test"])


def load_finetune_task(cfg: Config) -> Task:
    d = cfg.data
    classes = ("data.finetune_classes", d.finetune_classes)
    splits = _load(cfg, "data.finetune_task", d.finetune_task, d.finetune_labels, splits=("train", d.test_split),
                   classes=classes)
    ood = None
    if d.ood_task:
        ood = _load(cfg, "data.ood_task", d.ood_task, d.finetune_labels, splits=(d.ood_split,),
                    stats_from=d.finetune_task, classes=classes)[d.ood_split]
        if ood.x.shape[1:] != splits["train"].x.shape[1:]:
            raise ConfigError(f"data.ood_task {d.ood_task} has inputs {ood.x.shape[1:]}, the fine-tuning task "
                              f"{splits['train'].x.shape[1:]}")
    full = splits["train"]
    n_val = d.validation_size
    if n_val >= len(full.y):
        raise ConfigError(f"data.validation_size {n_val} leaves no training examples ({d.finetune_task} has "
                          f"{len(full.y)})")
    # The last examples of the training split are held out; TFDS splits are shuffled at preparation.
    cut = len(full.y) - n_val
    train_split = dataclasses.replace(full, x=full.x[:cut], y=full.y[:cut])
    val = dataclasses.replace(full, x=full.x[cut:], y=full.y[cut:], name=full.name + "[validation]") if n_val else None
    return Task(train_split, splits[d.test_split], ood, val)


def eval_sets(cfg: Config, task: Task, validation: bool = False, resamples: int = 0) -> dict[str, tuple]:
    """The fixed train subset, test, (if any) OOD and (if asked and held out) validation sets, batched on the device
    once per run. With `resamples` > 0 each set carries that many bootstrap resamplings of its examples (a fixed draw
    per set), and evaluating it also gives the reweighted means (the barrier pass's noise floors, jaxlmc.stats)."""
    return train.eval_sets(eval_arrays(cfg, task, validation), cfg.run.eval_batch_size, resamples)


def eval_arrays(cfg: Config, task: Task, validation: bool = False) -> dict[str, tuple]:
    """{name: (x, y)} of the sets `eval_sets` batches: the fixed train subset (data.train_eval_size), test, OOD (if
    any) and validation (if asked and held out)."""
    n = cfg.data.train_eval_size
    named = {"train": (task.train.x[:n], task.train.y[:n]), "test": (task.test.x, task.test.y)}
    if task.ood is not None:
        named["ood"] = (task.ood.x, task.ood.y)
    if validation and task.val is not None:
        named["val"] = (task.val.x, task.val.y)
    return named
