"""The embedded TFDS builders: MNIST-1D (Greydanus 2020), generated locally with the published `mnist1d` generator,
with builder configs that are distribution shifts of the default (and a large draw of it, for pretraining); and
TinyLang, a synthetic language of token sequences. Importing this module registers both with TFDS; jaxlmc.data
imports it, so every TFDS read can name them.
"""
from __future__ import annotations

import functools

import numpy as np
import tensorflow_datasets as tfds
from mnist1d.data import get_dataset_args, get_templates
from mnist1d.transform import transform
from mnist1d.utils import set_seed


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
    # The same shift with enough draws that fine-tuning adapts instead of memorising, and a test set whose noise
    # floor is below the barriers that matter.
    "shifted_large": {"scale_coeff": 0.8, "shear_scale": 1.25, "corr_noise_scale": 0.35, "seed": 4043,
                      "num_samples": 22000, "test_size": 2000},
    # The same training draws' distribution with a test set four times larger, for designs that spend their power on
    # test examples (jaxlmc plan); a study takes the first N with data.test_split = "test[:N]".
    "shifted_xl": {"scale_coeff": 0.8, "shear_scale": 1.25, "corr_noise_scale": 0.35, "seed": 4044,
                   "num_samples": 28000, "test_size": 8000},
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
    "shifted_large": "The shifted variant with more draws: 20000 train / 2000 test signals.",
    "shifted_xl": "The shifted variant with a large test set: 20000 train / 8000 test signals.",
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
