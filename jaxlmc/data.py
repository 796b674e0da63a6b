"""Every TFDS call in jaxlmc lives here.

Datasets are read with TFDS's array_record data sources, which need no TensorFlow. The embedded default,
MNIST-1D (Greydanus 2020), is a TFDS builder that generates its data locally with the published `mnist1d`
generator, so it is prepared and read like any other TFDS dataset and needs no network. Its builder configs are
distribution shifts of the default (more noise, shear, scaling) used as fine-tuning tasks and OOD sets, and a large
draw of the default distribution for pretraining; all are standardised with the default's statistics, so a shift in
amplitude or noise is not normalised away. TinyLang, a synthetic language, is a second embedded builder (token
sequences: language modelling with the `next_token` label map, or sequence classification). Real TFDS text datasets
(tiny_shakespeare, imdb_reviews, …) are read through the same loader, tokenized as UTF-8 bytes (see TEXT_VOCAB).

A *task* is a dataset name (``name`` or ``name/config``) plus a label map or a class list; a label map that changes
the label set (``mod5``, ``parity``) defines a fine-tuning task with a new head, and a class list keeps only some
classes (a class split: pretrain on some digits, fine-tune on the others), relabelled 0 .. k-1.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import os
from typing import Callable

import numpy as np
import tensorflow_datasets as tfds
from mnist1d.data import get_dataset_args, get_templates
from mnist1d.transform import transform
from mnist1d.utils import set_seed

from jaxlmc.labels import LABEL_MAPS

DEFAULT_DATA_DIR = os.path.expanduser(os.environ.get("JAXLMC_DATA_DIR", "~/tensorflow_datasets"))

# Generator parameters that differ from the published MNIST-1D defaults, per builder config. Each config has its
# own seed so that its signals are fresh draws, never copies of the default's. Every config is generated raw and
# standardised with the default's statistics (see _mnist1d_raw), so a shift in amplitude or noise stays a shift.
# Keys that are not mnist1d generator arguments: `permute_positions` (below) and `test_size` (test examples; the
# rest of `num_samples` is the train split; without it, mnist1d's train_split of 0.8).
MNIST1D_VARIANTS: dict[str, dict] = {
    "default": {},
    # More draws of the default distribution, for a pretraining that generalises instead of memorising 4000 signals.
    "large": {"num_samples": 51000, "test_size": 1000, "seed": 8042},
    "noisy": {"corr_noise_scale": 0.6, "iid_noise_scale": 0.1, "seed": 1042},
    "sheared": {"shear_scale": 2.0, "seed": 2042},
    "scaled": {"scale_coeff": 1.0, "seed": 3042},
    "shifted": {"scale_coeff": 0.8, "shear_scale": 1.25, "corr_noise_scale": 0.35, "seed": 4042},
    # Far from the pretraining distribution: one fixed permutation of the 40 positions destroys the spatial
    # structure pretrained features rely on (an MLP can still learn it). Jaxlmc applies the permutation itself (not
    # mnist1d's shuffle_seq, whose permutation depends on the seed) so both permuted configs share it.
    "permuted": {"seed": 5042, "permute_positions": 7},
    "permuted_noisy": {"corr_noise_scale": 0.6, "iid_noise_scale": 0.1, "seed": 6042, "permute_positions": 7},
}
MNIST1D_DESCRIPTIONS = {
    "default": "The published MNIST-1D generator settings: 4000 train / 1000 test signals of length 40.",
    "large": "The default's generator settings with more draws: 50000 train / 1000 test signals.",
    "noisy": "Stronger correlated and i.i.d. noise (OOD).",
    "sheared": "Stronger shear (OOD).",
    "scaled": "Stronger amplitude scaling (OOD).",
    "shifted": "Moderately more scaling, shear and noise: a fine-tuning distribution near the default.",
    "permuted": "The default's generator with the 40 positions in one fixed random order: far from the default.",
    "permuted_noisy": "The noisy variant with the permuted variant's position order (OOD for permuted).",
}

def _mnist1d_args(variant: str):
    """mnist1d's generator arguments for a builder config, and jaxlmc's own keys (popped from the variant)."""
    args = get_dataset_args()
    params = dict(MNIST1D_VARIANTS[variant])
    own = {key: params.pop(key, None) for key in ("permute_positions", "test_size")}
    for key, value in params.items():
        if not hasattr(args, key):
            raise ValueError(f"MNIST-1D variant {variant!r}: unknown generator argument {key!r}")
        setattr(args, key, value)
    return args, own


def _mnist1d_raw(args) -> tuple[np.ndarray, np.ndarray]:
    """mnist1d's make_dataset without its final standardisation: the same seed, draws, order and shuffles, so the
    signals are the published ones before make_dataset rescales them by their own statistics."""
    templates = get_templates()
    set_seed(args.seed)
    xs, ys = [], []
    samples_per_class = args.num_samples // len(templates["y"])
    for label_ix in range(len(templates["y"])):
        for _ in range(samples_per_class):
            x, _t = transform(templates["x"][label_ix], templates["t"], args)
            xs.append(x)
            ys.append(templates["y"][label_ix])
    batch_shuffle = np.random.permutation(len(ys))
    xs, ys = np.stack(xs)[batch_shuffle], np.stack(ys)[batch_shuffle]
    if args.shuffle_seq:
        xs = xs[..., np.random.permutation(args.final_seq_length)]
    return xs, ys


@functools.cache
def mnist1d_default_stats() -> tuple[float, float]:
    """The scalar mean and std of the default config's raw signals (train and test, as make_dataset computes them):
    every config is standardised with these, so the default is exactly make_dataset's output and the others keep
    their shift in amplitude and noise relative to it."""
    xs, _ = _mnist1d_raw(_mnist1d_args("default")[0])
    return float(xs.mean()), float(xs.std())


class Mnist1d(tfds.core.GeneratorBasedBuilder):
    """MNIST-1D, generated locally by the `mnist1d` package (no download)."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {
        "1.0.0": "Generated with mnist1d's make_dataset; one config per distribution shift.",
        "1.1.0": "Every config standardised with the default config's statistics (make_dataset standardised each by "
                 "its own, normalising part of the shift away); the default's data is unchanged. New config: large.",
    }
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(name=name, description=MNIST1D_DESCRIPTIONS[name]) for name in MNIST1D_VARIANTS
    ]

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "signal": tfds.features.Tensor(shape=(40,), dtype=np.float32),
                    "label": tfds.features.ClassLabel(num_classes=10),
                }
            ),
            supervised_keys=("signal", "label"),
            homepage="https://github.com/greydanus/mnist1d",
        )

    def _split_generators(self, dl_manager):
        mean, std = mnist1d_default_stats()
        args, own = _mnist1d_args(self.builder_config.name)
        xs, ys = _mnist1d_raw(args)
        xs = (xs - mean) / std
        if own["permute_positions"] is not None:
            xs = xs[:, np.random.default_rng(own["permute_positions"]).permutation(args.final_seq_length)]
        cut = len(ys) - own["test_size"] if own["test_size"] is not None else int(len(ys) * args.train_split)
        return {
            "train": self._generate_examples(xs[:cut], ys[:cut]),
            "test": self._generate_examples(xs[cut:], ys[cut:]),
        }

    def _generate_examples(self, signals, labels):
        for index, (signal, label) in enumerate(zip(signals, labels)):
            yield index, {"signal": signal.astype(np.float32), "label": int(label)}


# --------------------------------------------------------------------------------------------- a synthetic language

# TinyLang: sequences of noisy affine recurrences modulo the vocabulary. A sequence draws a rule (a, b) and a first
# token, then each next token is (a·previous + b) mod V, replaced by a uniform token with probability `noise`. Reading
# a sequence means inferring its rule in context: a language model that does so predicts the next token almost
# surely (loss near the noise's entropy), while unigram and bigram models, which see no rule, stay near log V. The
# label of a sequence is the index of its multiplier `a` in its config's list (4 classes): sequence classification
# over the same language. Pretraining sees multipliers 1, 3, 5, 7; the far config's 9, 11, 13, 15 never occur there.
TINYLANG_VOCAB = 16
TINYLANG_LENGTH = 33  # tokens per sequence: a context of 32 and, for language modelling, 32 next-token targets
TINYLANG_VARIANTS: dict[str, dict] = {
    "pretrain": {"multipliers": (1, 3, 5, 7), "noise": 0.1, "train": 20000, "test": 2000, "seed": 11},
    "near": {"multipliers": (1, 3, 5, 7), "noise": 0.2, "train": 4000, "test": 1000, "seed": 12},
    "far": {"multipliers": (9, 11, 13, 15), "noise": 0.1, "train": 4000, "test": 1000, "seed": 13},
    "classify": {"multipliers": (1, 3, 5, 7), "noise": 0.1, "train": 4000, "test": 500, "seed": 14},
    "ood": {"multipliers": (1, 3, 5, 7), "noise": 0.3, "train": 500, "test": 500, "seed": 15},
}
TINYLANG_DESCRIPTIONS = {
    "pretrain": "The pretraining corpus: multipliers 1, 3, 5, 7, 10 % noise tokens.",
    "near": "Nearby: the pretraining rules with twice the noise.",
    "far": "Far: multipliers 9, 11, 13, 15, never seen in pretraining.",
    "classify": "Sequence classification over the pretraining language: which multiplier made the sequence.",
    "ood": "The classification task's language with 30 % noise tokens (OOD).",
}


def tinylang(variant: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{split: (tokens_NxL int32, labels_N int32)} of a TinyLang config, from its own seed."""
    spec = TINYLANG_VARIANTS[variant]
    rng = np.random.default_rng(spec["seed"])
    out = {}
    for split in ("train", "test"):
        n = spec[split]
        label = rng.integers(0, len(spec["multipliers"]), n)
        a = np.asarray(spec["multipliers"])[label]
        b = rng.integers(0, TINYLANG_VOCAB, n)
        tokens = np.empty((n, TINYLANG_LENGTH), np.int64)
        tokens[:, 0] = rng.integers(0, TINYLANG_VOCAB, n)
        noisy = rng.random((n, TINYLANG_LENGTH)) < spec["noise"]
        random_tokens = rng.integers(0, TINYLANG_VOCAB, (n, TINYLANG_LENGTH))
        for t in range(1, TINYLANG_LENGTH):
            tokens[:, t] = np.where(noisy[:, t], random_tokens[:, t], (a * tokens[:, t - 1] + b) % TINYLANG_VOCAB)
        out[split] = (tokens.astype(np.int32), label.astype(np.int32))
    return out


class TinyLang(tfds.core.GeneratorBasedBuilder):
    """TinyLang, a synthetic language generated locally (no download): see TINYLANG_VARIANTS."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Noisy affine recurrences mod 16; configs pretrain, near, far, classify, ood."}
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=name, description=TINYLANG_DESCRIPTIONS[name])
                       for name in TINYLANG_VARIANTS]

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "tokens": tfds.features.Sequence(tfds.features.ClassLabel(num_classes=TINYLANG_VOCAB),
                                                 length=TINYLANG_LENGTH),
                "label": tfds.features.ClassLabel(num_classes=len(TINYLANG_VARIANTS[self.builder_config.name][
                    "multipliers"])),
            }),
            supervised_keys=("tokens", "label"),
        )

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(*arrays) for split, arrays in tinylang(self.builder_config.name).items()}

    def _generate_examples(self, tokens, labels):
        for index, (sequence, label) in enumerate(zip(tokens, labels)):
            yield index, {"tokens": sequence, "label": int(label)}


# ---------------------------------------------------------------------------------------------- real text datasets

# Text is tokenized as UTF-8 bytes: one fixed vocabulary for every text dataset, needing no fitting, so a model
# pretrained on one corpus reads any other (character level for English text, where a byte is a character). Byte 0
# (NUL, absent from text) pads sequences shorter than the window.
TEXT_VOCAB = 256
TEXT_PAD = 0
TEXT_FEATURES = ("text", "sentence")  # the names TFDS text datasets give their text feature


def text_feature(features) -> str | None:
    """The name of a dataset's text feature (a tfds.features.Text), or None for a dataset of arrays."""
    return next((k for k in TEXT_FEATURES if k in features and isinstance(features[k], tfds.features.Text)), None)


def _as_bytes(text) -> bytes:
    return text if isinstance(text, bytes) else str(text).encode("utf-8")


def text_windows(texts, window: int) -> np.ndarray:
    """A corpus (texts without labels, e.g. tiny_shakespeare's one long text per split) as sequences_NxW: the texts
    joined by newlines, as bytes, cut into consecutive non-overlapping windows (a last partial window is dropped)."""
    corpus = np.frombuffer(b"\n".join(_as_bytes(t) for t in texts), dtype=np.uint8)
    n = len(corpus) // window
    return corpus[:n * window].reshape(n, window).astype(np.int32)


def text_sequences(texts, window: int) -> np.ndarray:
    """Labelled texts (one sequence per example, e.g. a review) as sequences_NxW: each text's first `window` bytes,
    left-padded with TEXT_PAD when shorter, so the last position — the one a classification head reads — holds the
    text's own last byte rather than padding."""
    out = np.full((len(texts), window), TEXT_PAD, dtype=np.int32)
    for i, text in enumerate(texts):
        encoded = np.frombuffer(_as_bytes(text)[:window], dtype=np.uint8)
        if len(encoded):
            out[i, window - len(encoded):] = encoded
    return out


@dataclasses.dataclass(frozen=True)
class Split:
    """One split of a task as host arrays: inputs x_NxF… (float32) and labels y_N (int32)."""

    x: np.ndarray
    y: np.ndarray
    num_classes: int
    name: str


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
DATASETS: dict[str, RegisteredDataset] = {}


def register_dataset(name: str, splits, num_classes: int, vocab: int = 0) -> None:
    """Make `name` usable wherever a config names a task, from arrays instead of TFDS. `splits` is {split: (x_N…,
    y_N)} (at least "train" and "test"), a callable returning that (called once, when the dataset is first read), or
    the path of an .npz file holding x_<split> and y_<split> arrays. Inputs are used as given (float features, or
    integer token ids below `vocab` for a sequence model); labels are integers in [0, num_classes)."""
    if name in DATASETS:
        raise ValueError(f"dataset {name!r} is already registered")
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
    DATASETS[name] = RegisteredDataset(functools.cache(read), int(num_classes), int(vocab))


def _builder(name: str, data_dir: str | None):
    base, _, config = name.partition("/")
    try:
        return tfds.builder(name, data_dir=data_dir or DEFAULT_DATA_DIR, file_format="array_record")
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


def prepare(name: str, data_dir: str | None = None):
    """Download (real datasets) or generate (MNIST-1D) and write the array_record files, once; return the builder."""
    builder = _builder(name, data_dir)
    if not builder.is_prepared():
        tfds.display_progress_bar(False)  # jaxlmc shows its own progress; TFDS's bars would interleave
        builder.download_and_prepare(file_format="array_record")
        builder = _builder(name, data_dir)  # a fresh builder reads the split info just written
    return builder


def _read_all(name: str, split: str, data_dir: str | None,
              context_length: int = 0) -> tuple[np.ndarray, np.ndarray, int]:
    """(x, y, number of classes) of one split. A text dataset becomes byte sequences of context_length + 1 (the
    context and, for language modelling, its next byte): a corpus without labels is cut into windows (y all 0 and
    no classes), a labelled set gives one sequence per example."""
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
    text_key = text_feature(features)
    if text_key is not None:
        texts = [ex[text_key] for ex in examples]
        window = context_length + 1
        x = text_sequences(texts, window) if labelled else text_windows(texts, window)
        if not len(x):
            raise ValueError(f"{name}:{split} holds fewer than {window} bytes of text: no sequence of "
                             f"context_length {context_length} + 1")
    else:
        x_key = next(k for k in ("signal", "image", "tokens") if k in features)
        x = np.stack([np.asarray(ex[x_key]) for ex in examples])
    if not labelled:
        return x, np.zeros(len(x), np.int32), 0
    y = np.asarray([ex["label"] for ex in examples], dtype=np.int32)
    return x, y, features["label"].num_classes


def vocab_size(name: str, data_dir: str | None = None) -> int:
    """The vocabulary of a token dataset (its "tokens" feature's classes, or TEXT_VOCAB bytes for a text dataset); 0
    for a dataset of signals or images."""
    if name in DATASETS:
        return DATASETS[name].vocab
    features = _builder(name, data_dir).info.features
    if text_feature(features) is not None:
        return TEXT_VOCAB
    return int(features["tokens"].feature.num_classes) if "tokens" in features else 0


def is_text(name: str, data_dir: str | None = None) -> bool:
    """Whether a dataset holds text (tokenized here as bytes, in windows of a chosen context length)."""
    if name in DATASETS:
        return False
    return text_feature(_builder(name, data_dir).info.features) is not None


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
              classes: tuple[int, ...] | list[int] = (), context_length: int = 0) -> dict[str, Split]:
    """Load the splits of a task as float32 inputs and int32 labels.

    A text dataset is read as UTF-8 byte sequences of `context_length` + 1 (required, and only allowed, for text):
    the context and its next byte, the language-modelling target; sequence classification reads the context.

    With `classes` (a class split), only the examples whose original label is in the list are kept and they are
    relabelled 0 .. k-1 in the list's order; a class list replaces a label map (the two cannot be combined).

    Images are scaled to [0, 1] and standardised per channel with the statistics of the first split requested, or,
    with `stats_from`, of that task's train split (restricted to the same classes): an OOD set must be normalised like
    the task it shifts, or the normalisation would undo part of the shift. MNIST-1D signals are stored standardised
    with the default distribution's statistics and are not rescaled here.
    """
    if label_map not in LABEL_MAPS:
        raise ValueError(f"unknown label map {label_map!r}; choose one of {sorted(LABEL_MAPS)}")
    text = is_text(name, data_dir)
    if text and context_length < 1:
        raise ValueError(f"{name} is a text dataset: set data.context_length (bytes of context per sequence)")
    if not text and context_length:
        raise ValueError(f"data.context_length ({context_length}) applies to text datasets only; {name} has "
                         "sequences or arrays of a fixed size")
    if label_map != "next_token" and not num_classes(name, data_dir):
        raise ValueError(f"{name} has no labels: it can only be a language-modelling task (label map 'next_token')")
    classes = list(classes)
    if classes:
        if label_map != "identity":
            raise ValueError(f"a class list ({classes}) and the label map {label_map!r} cannot be combined")
        check_classes(classes, num_classes(name, data_dir))
        classes = [int(c) for c in classes]

    def read(task: str, split: str):
        x, y, c = _read_all(task, split, data_dir, context_length)
        if classes:
            x, y = _keep_classes(x, y, classes, f"{task}:{split}")
            c = len(classes)
        return x, y, c

    raw = {split: read(name, split) for split in splits}
    if label_map == "next_token":  # language modelling: the context is every token but the last, the label its next
        vocab = vocab_size(name, data_dir)
        if not vocab:
            raise ValueError(f"label map 'next_token' needs a token dataset; {name!r} has no tokens")
        raw = {split: (x[:, :-1], x[:, 1:].astype(np.int32), vocab) for split, (x, y, n) in raw.items()}
    elif raw[splits[0]][0].dtype.kind in "iu" and vocab_size(name, data_dir):
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
                              name=f"{name}:{split}{suffix}")
    return result
