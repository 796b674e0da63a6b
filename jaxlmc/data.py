"""Every TFDS read in jaxlmc lives here (the embedded builders: jaxlmc.builders), and the datasets registered from
arrays.

Datasets are read with TFDS's array_record data sources, which need no TensorFlow. The embedded default,
MNIST-1D (Greydanus 2020), is a TFDS builder that generates its data locally with the published `mnist1d`
generator, so it is prepared and read like any other TFDS dataset and needs no network. Its builder configs are
distribution shifts of the default (more noise, shear, scaling) used as fine-tuning tasks and OOD sets, and a large
draw of the default distribution for pretraining; all are standardised with the default's statistics, so a shift in
amplitude or noise is not normalised away. TinyLang, a synthetic language, is a second embedded builder (token
sequences: language modelling with the `next_token` label map, or sequence classification). Real TFDS text datasets
(tiny_shakespeare, imdb_reviews, …) are read through the same loader, tokenized as UTF-8 bytes (tokens.TEXT_VOCAB), or
as a checkpoint's tokens (jaxlmc.tokens). A dataset of text pairs (GLUE's MRPC, RTE, MNLI, QQP, QNLI; SNLI: see
TEXT_PAIRS) is read as token ids and token types, N×T×2, for a model kind that reads token types (bert).

A *task* is a dataset name (``name`` or ``name/config``) plus a label map or a class list; a label map that changes
the label set (``mod5``, ``parity``) defines a fine-tuning task with a new head, and a class list keeps only some
classes (a class split: pretrain on some digits, fine-tune on the others), relabelled 0 .. k-1.
"""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import logging
import os
import sys
from typing import Callable

import numpy as np

from jaxlmc import lazy, tokens
from jaxlmc.labels import LABEL_MAPS, LANGUAGE_MODELLING
from jaxlmc.registry import Registry

tfds = lazy.module("tensorflow_datasets")  # imported when a TFDS dataset is first named
# Modules whose import registers TFDS builders, loaded before a builder is looked up: TFDS's older text builders
# (GLUE among them) and jaxlmc's embedded MNIST-1D and TinyLang builders.
_TFDS_BUILDERS = (lazy.module("tensorflow_datasets.text"), lazy.module("jaxlmc.builders"))


def default_data_dir() -> str:
    """Where TFDS data are kept when a config names no data.data_dir: $JAXLMC_DATA_DIR, else ~/tensorflow_datasets
    (read when a dataset is read, so a notebook may set it after `import jaxlmc`)."""
    return os.path.expanduser(os.environ.get("JAXLMC_DATA_DIR", "~/tensorflow_datasets"))


# ---------------------------------------------------------------------------------------------- real text datasets

TEXT_FEATURES = ("text", "sentence")  # the names TFDS text datasets give their text feature
# The names TFDS sentence-pair datasets give their two texts, first segment first (GLUE's MRPC, RTE, WNLI, STS-B and
# PAWS; MNLI, SNLI; QQP; QNLI): chosen before a single text feature, so QNLI is its question and sentence.
TEXT_PAIRS = (("sentence1", "sentence2"), ("premise", "hypothesis"), ("question1", "question2"),
              ("question", "sentence"))
ARRAY_FEATURES = ("signal", "image", "tokens")  # the names of the array features read as they are


def text_features(features) -> tuple[str, ...]:
    """The text features (tfds.features.Text) a dataset's examples are read from: a pair's two names (sentence pairs,
    read as token ids and types), one name, or () for a dataset of arrays."""
    texts = {k for k in features if isinstance(features[k], tfds.features.Text)}
    pair = next((p for p in TEXT_PAIRS if set(p) <= texts), None)
    if pair is not None:
        return pair
    return tuple(k for k in TEXT_FEATURES if k in texts)[:1]


def _input_features(name: str, features) -> tuple[str, ...]:
    """`text_features`, or () for a dataset of arrays; a dataset of neither is one line naming what it holds."""
    keys = text_features(features)
    if keys or any(k in features for k in ARRAY_FEATURES):
        return keys
    raise ValueError(f"{name} has no input feature jaxlmc reads (it has {', '.join(sorted(features))}): text "
                     f"({' or '.join(TEXT_FEATURES)}), a text pair ({', '.join(' + '.join(p) for p in TEXT_PAIRS)}) "
                     f"or arrays ({', '.join(ARRAY_FEATURES)})")


@dataclasses.dataclass(frozen=True)
class Split:
    """One split of a task as host arrays: inputs x_NxF… (float32) and labels y_N (int32)."""

    x: np.ndarray
    y: np.ndarray
    num_classes: int
    name: str
    token_types: bool = False  # x is N×T×2: token ids and token types (text pairs, jaxlmc.tokens.token_pairs)


@dataclasses.dataclass(frozen=True)
class RegisteredDataset:
    """A dataset given as arrays rather than by TFDS (`register_dataset`)."""

    read: Callable[[], dict]  # () -> {split: (x, y)}, cached after the first call
    num_classes: int
    vocab: int = 0

    def split(self, name: str, split: str) -> tuple[np.ndarray, np.ndarray]:
        splits = self.read()
        if split not in splits:
            raise ValueError(f"dataset {name!r} has no split {split!r} (it has {', '.join(sorted(splits))})")
        x, y = splits[split]
        return np.asarray(x), np.asarray(y, np.int32)


# Datasets registered from arrays, by name: read before TFDS is asked (register_dataset).
DATASETS: Registry[RegisteredDataset] = Registry("dataset")


def register_dataset(name: str, splits, num_classes: int, vocab: int = 0) -> None:
    """Make `name` usable wherever a config names a task, from arrays instead of TFDS. `splits` is {split: (x_N…,
    y_N)} (at least "train" and "test"), a callable returning that (called once, when the dataset is first read), or
    the path of an .npz file holding x_<split> and y_<split> arrays. Inputs are used as given (float features, or
    integer token ids below `vocab` for a sequence model); labels are integers in [0, num_classes)."""
    if isinstance(splits, (str, os.PathLike)):
        path = os.fspath(splits)

        def from_npz() -> dict:
            with np.load(path) as archive:
                names = {k[2:] for k in archive.files if k.startswith("x_")}
                return {s: (archive[f"x_{s}"], archive[f"y_{s}"]) for s in names}
        read = from_npz
    elif callable(splits):
        read = splits
    else:
        read = lambda: splits  # noqa: E731
    DATASETS.register(name, RegisteredDataset(functools.cache(read), int(num_classes), int(vocab)))


def _builder(name: str, data_dir: str | None):
    base, _, config = name.partition("/")
    try:
        return _tfds_builder(name, data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        # TFDS's own message lists its whole catalogue (hundreds of lines): name the closest few instead.
        close = difflib.get_close_matches(base, tfds.list_builders(with_community_datasets=False), n=3, cutoff=0.6)
        hint = f"; closest: {', '.join(close)}" if close else "; tfds.list_builders() lists them all"
        raise ValueError(f"unknown TFDS dataset {name!r}{hint}") from None
    except ValueError:
        if not config:
            raise
        configs = [c.name for c in tfds.builder_cls(base).BUILDER_CONFIGS]
        if config in configs:
            raise
        close = difflib.get_close_matches(config, configs, n=3, cutoff=0.5) or configs
        raise ValueError(f"unknown TFDS dataset {name!r}: {base} has no config {config!r}; closest: "
                         f"{', '.join(f'{base}/{c}' for c in close)}") from None


class _NoVariantNotice(logging.Filter):
    """TFDS warns "Variant folder … has no dataset_info.json" for every dataset it has not prepared yet: a first
    run's normal state, not a problem (the preparation that follows is announced on stderr)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Variant folder")


@contextlib.contextmanager
def _quiet_tfds():
    """TFDS's notice of an unprepared dataset left out, for the duration only (the process's logging is left alone)."""
    notice, logger = _NoVariantNotice(), logging.getLogger("absl")
    logger.addFilter(notice)
    try:
        yield
    finally:
        logger.removeFilter(notice)


def _tfds_builder(name: str, data_dir: str | None):
    lazy.load(*_TFDS_BUILDERS)
    with _quiet_tfds():
        return tfds.builder(name, data_dir=data_dir or default_data_dir(), file_format="array_record")


def prepare(name: str, data_dir: str | None = None):
    """Download (real datasets) or generate (MNIST-1D) and write the array_record files, once; return the builder."""
    builder = _builder(name, data_dir)
    with _quiet_tfds():
        prepared = builder.is_prepared()
    if not prepared:
        tfds.display_progress_bar(False)  # jaxlmc shows its own progress; TFDS's bars would interleave
        # TFDS announces the preparation on stdout; it is progress, not a result: stdout stays the caller's.
        with contextlib.redirect_stdout(sys.stderr), _quiet_tfds():
            builder.download_and_prepare(file_format="array_record")
        builder = _builder(name, data_dir)  # a fresh builder reads the split info just written
    return builder


def _read_all(name: str, split: str, data_dir: str | None, context_length: int = 0,
              tokenizer_path: str = "", as_corpus: bool = False) -> tuple[np.ndarray, np.ndarray, int]:
    """(x, y, number of classes) of one split. A text dataset becomes sequences of context_length + 1 bytes (the
    context and, for language modelling, its next byte) — or tokens of `tokenizer_path`: a corpus without labels (or
    any text, `as_corpus`) is cut into windows (y all 0 and no classes), a labelled set gives one sequence per
    example."""
    if name in DATASETS:
        x, y = DATASETS[name].split(name, split)
        return x, y, DATASETS[name].num_classes
    builder = prepare(name, data_dir)
    source = builder.as_data_source(split=split)
    try:  # one batched read: 5× faster than example by example (50,000 MNIST-1D signals: 1.3 s instead of 6 s)
        examples = list(source.__getitems__(range(len(source))))
    except (AttributeError, TypeError):  # a source without batched reads (tfds.testing.mock_data's)
        examples = [source[i] for i in range(len(source))]
    features = builder.info.features
    labelled = "label" in features
    text_keys = _input_features(name, features)
    if len(text_keys) == 2:  # labelled pairs (load_task refuses them as a corpus, or without a tokenizer)
        first, second = ([ex[k] for ex in examples] for k in text_keys)
        pairs = tokens.token_pairs(first, second, tokens.tokenizer(tokenizer_path), context_length)
        # As for one text: a padding column (token type 0) for the next token that sequence classification drops.
        column = np.broadcast_to(np.asarray([tokens.TOKEN_PAD, tokens.TYPE_PAD], np.int32), (len(pairs), 1, 2))
        x = np.concatenate([pairs, column], axis=1)
    elif text_keys:
        texts = [ex[text_keys[0]] for ex in examples]
        window = context_length + 1
        if tokenizer_path and (as_corpus or not labelled):
            x = tokens.token_windows(texts, tokens.tokenizer(tokenizer_path), window)
        elif tokenizer_path:
            # The context itself, closed by the tokenizer's special tokens ([SEP] kept however long the text); one
            # padding column stands for the next token that sequence classification drops.
            x = np.pad(tokens.token_sequences(texts, tokens.tokenizer(tokenizer_path), context_length),
                       ((0, 0), (0, 1)), constant_values=tokens.TOKEN_PAD)
        else:
            x = tokens.text_sequences(texts, window) if labelled else tokens.text_windows(texts, window)
        if not len(x):
            raise ValueError(f"{name}:{split} holds fewer than {window} bytes of text: no sequence of "
                             f"context_length {context_length} + 1")
    else:
        x_key = next(k for k in ARRAY_FEATURES if k in features)
        x = np.stack([np.asarray(ex[x_key]) for ex in examples])
    if not labelled:
        return x, np.zeros(len(x), np.int32), 0
    y = np.asarray([ex["label"] for ex in examples], dtype=np.int32)
    return x, y, features["label"].num_classes


def vocab_size(name: str, data_dir: str | None = None, tokenizer_path: str = "") -> int:
    """The vocabulary of a token dataset (its "tokens" feature's classes; for a text dataset tokens.TEXT_VOCAB bytes, or
    the tokenizer's vocabulary); 0 for a dataset of signals or images."""
    if name in DATASETS:
        return DATASETS[name].vocab
    features = _builder(name, data_dir).info.features
    if text_features(features):
        return tokens.tokenizer(tokenizer_path).get_vocab_size() if tokenizer_path else tokens.TEXT_VOCAB
    return int(features["tokens"].feature.num_classes) if "tokens" in features else 0


def is_text(name: str, data_dir: str | None = None) -> bool:
    """Whether a dataset holds text (tokenized here as bytes, in windows of a chosen context length), or text pairs;
    a dataset of neither text nor arrays jaxlmc reads is one line naming its features."""
    if name in DATASETS:
        return False
    return bool(_input_features(name, _builder(name, data_dir).info.features))


def is_pair(name: str, data_dir: str | None = None) -> bool:
    """Whether a dataset holds text pairs (TEXT_PAIRS): read as token ids and token types, N×T×2."""
    if name in DATASETS:
        return False
    return len(text_features(_builder(name, data_dir).info.features)) == 2


def num_classes(name: str, data_dir: str | None = None) -> int:
    """The number of classes of a dataset, from its builder's info (nothing is downloaded or written); 0 for a
    dataset without labels (a text corpus, usable only for language modelling)."""
    if name in DATASETS:
        return DATASETS[name].num_classes
    features = _builder(name, data_dir).info.features
    return int(features["label"].num_classes) if "label" in features else 0


def check_classes(classes, n_classes: int) -> None:
    """A class list must name at least two distinct classes of a dataset with `n_classes` classes."""
    classes = list(classes)
    bad = [c for c in classes if isinstance(c, bool) or not isinstance(c, (int, np.integer)) or not 0 <= c < n_classes]
    if bad:
        raise ValueError(f"classes {bad} are not classes of the dataset (0 .. {n_classes - 1})")
    if len(set(classes)) != len(classes):
        raise ValueError(f"classes {classes} has repeated values")
    if len(classes) < 2:
        raise ValueError(f"classes {classes}: a task needs at least two classes")


def _keep_classes(x: np.ndarray, y: np.ndarray, classes: list[int], what: str) -> tuple[np.ndarray, np.ndarray]:
    """The examples whose label is in `classes`, relabelled 0 .. k-1 in the list's order."""
    keep = np.isin(y, classes)
    if not keep.any():
        raise ValueError(f"{what} has no examples of classes {classes}")
    relabel = np.full(max(max(classes), int(y.max())) + 1, -1, dtype=np.int32)
    relabel[classes] = np.arange(len(classes), dtype=np.int32)
    return x[keep], relabel[y[keep]]


def load_task(name: str, label_map: str = "identity", data_dir: str | None = None,
              splits: tuple[str, ...] = ("train", "test"), stats_from: str | None = None,
              classes: tuple[int, ...] | list[int] = (), context_length: int = 0,
              tokenizer_path: str = "") -> dict[str, Split]:
    """Load the splits of a task as float32 inputs and int32 labels.

    A text dataset is read as UTF-8 byte sequences of `context_length` + 1 (required, and only allowed, for text):
    the context and its next byte, the language-modelling target; sequence classification reads the context.

    With `classes` (a class split), only the examples whose original label is in the list are kept and they are
    relabelled 0 .. k-1 in the list's order; a class list replaces a label map (the two cannot be combined).

    Images are scaled to [0, 1] and standardised per channel with the statistics of the first split requested, or,
    with `stats_from`, of that task's train split (restricted to the same classes): an OOD set must be normalised like
    the task it shifts, or the normalisation would undo part of the shift. MNIST-1D signals are stored standardised
    with the default distribution's statistics and are not rescaled here. With `tokenizer_path` (a tokenizer.json)
    text is read as its tokens instead of bytes (`token_windows`, `token_sequences`), and a dataset of text pairs
    (TEXT_PAIRS; a tokenizer needed) as token ids and token types N×`context_length`×2 (`token_pairs`).
    """
    if label_map not in LABEL_MAPS:
        raise ValueError(f"unknown label map {label_map!r}; choose one of {sorted(LABEL_MAPS)}")
    text = is_text(name, data_dir)
    if text and context_length < 1:
        raise ValueError(f"{name} is a text dataset: set data.context_length (bytes of context per sequence)")
    if not text and context_length:
        raise ValueError(f"data.context_length ({context_length}) applies to text datasets only; {name} has "
                         "sequences or arrays of a fixed size")
    if label_map not in LANGUAGE_MODELLING and not num_classes(name, data_dir):
        raise ValueError(f"{name} has no labels: it can only be a language-modelling task (label map 'next_token' "
                         "or 'masked_token')")
    masked = label_map == "masked_token"
    pairs = text and is_pair(name, data_dir)
    if pairs and not tokenizer_path:
        first, second = text_features(_builder(name, data_dir).info.features)
        raise ValueError(f"{name} holds text pairs ({first} and {second}): read them with a tokenizer "
                         "(data.tokenizer), as token ids and token types")
    if pairs and label_map in LANGUAGE_MODELLING:
        raise ValueError(f"{name} holds labelled text pairs, not a corpus: label map {label_map!r} (language "
                         "modelling) cannot read it")
    if masked and not (text and tokenizer_path):
        raise ValueError(f"label map 'masked_token' needs text read by a tokenizer with a mask token "
                         f"(data.tokenizer); {name} is {'text read as bytes' if text else 'not text'}")
    classes = list(classes)
    if classes:
        if label_map != "identity":
            raise ValueError(f"a class list ({classes}) and the label map {label_map!r} cannot be combined")
        check_classes(classes, num_classes(name, data_dir))
        classes = [int(c) for c in classes]

    def read(task: str, split: str):
        # Masked language modelling reads windows of the context itself (nothing beyond it to predict).
        x, y, c = _read_all(task, split, data_dir, context_length - masked, tokenizer_path,
                            as_corpus=label_map in LANGUAGE_MODELLING)
        if classes:
            x, y = _keep_classes(x, y, classes, f"{task}:{split}")
            c = len(classes)
        return x, y, c

    raw = {split: read(name, split) for split in splits}
    if label_map == "next_token":  # language modelling: the context is every token but the last, the label its next
        vocab = vocab_size(name, data_dir, tokenizer_path)
        if not vocab:
            raise ValueError(f"label map 'next_token' needs a token dataset; {name!r} has no tokens")
        raw = {split: (x[:, :-1], x[:, 1:].astype(np.int32), vocab) for split, (x, y, n) in raw.items()}
    elif masked:  # the same positions of a split masked in every run (jaxlmc.tokens.mask_tokens)
        tok, vocab = tokens.tokenizer(tokenizer_path), vocab_size(name, data_dir, tokenizer_path)
        raw = {split: (*tokens.mask_tokens(x, tok, f"{name}:{split}"), vocab) for split, (x, y, n) in raw.items()}
    elif raw[splits[0]][0].dtype.kind in "iu" and vocab_size(name, data_dir, tokenizer_path):
        # Sequence classification: the same context as the language model (the last token dropped).
        raw = {split: (x[:, :-1], y, n) for split, (x, y, n) in raw.items()}
    out = {}
    for split, (x, y, n) in raw.items():
        x = x.astype(np.float32)
        if x.ndim == 4 and name not in DATASETS:  # TFDS images N×H×W×C in [0, 255]
            x = x / 255.0
        out[split] = (x, y, n)
    if out[splits[0]][0].ndim == 4 and name not in DATASETS:
        train_x = out[splits[0]][0]
        if stats_from is not None:
            train_x = read(stats_from, "train")[0].astype(np.float32) / 255.0
        mean, std = train_x.mean(axis=(0, 1, 2)), train_x.std(axis=(0, 1, 2)) + 1e-6
        out = {s: ((x - mean) / std, y, n) for s, (x, y, n) in out.items()}
    suffix = f"[classes {','.join(map(str, classes))}]" if classes else (
        "" if label_map == "identity" else f"[{label_map}]")
    result = {}
    for split, (x, y, n) in out.items():
        mapping = LABEL_MAPS[label_map]
        if mapping is not None:
            y, n = mapping(y, n)
        result[split] = Split(x=x.astype(np.float32), y=y.astype(np.int32), num_classes=int(n),
                              name=f"{name}:{split}{suffix}", token_types=bool(pairs))
    return result
