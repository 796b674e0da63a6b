"""Every TFDS call in jaxlmc lives here.

Datasets are read with TFDS's array_record data sources, which need no TensorFlow. The embedded default,
MNIST-1D (Greydanus 2020), is a TFDS builder that generates its data locally with the published `mnist1d`
generator, so it is prepared and read like any other TFDS dataset and needs no network. Its builder configs are
distribution shifts of the default (more noise, shear, scaling) used as fine-tuning tasks and OOD sets.

A *task* is a dataset name (``name`` or ``name/config``) plus a label map; a label map that changes the label
set (``mod5``, ``parity``) defines a fine-tuning task with a new head.
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np
import tensorflow_datasets as tfds
from mnist1d.data import get_dataset_args, make_dataset

DEFAULT_DATA_DIR = os.path.expanduser(os.environ.get("JAXLMC_DATA_DIR", "~/tensorflow_datasets"))

# Generator parameters that differ from the published MNIST-1D defaults, per builder config. Each config has its
# own seed so that its signals are fresh draws, never copies of the default's.
MNIST1D_VARIANTS: dict[str, dict] = {
    "default": {},
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
    "noisy": "Stronger correlated and i.i.d. noise (OOD).",
    "sheared": "Stronger shear (OOD).",
    "scaled": "Stronger amplitude scaling (OOD).",
    "shifted": "Moderately more scaling, shear and noise: a fine-tuning distribution near the default.",
    "permuted": "The default's generator with the 40 positions in one fixed random order: far from the default.",
    "permuted_noisy": "The noisy variant with the permuted variant's position order (OOD for permuted).",
}

LABEL_MAPS = {
    "identity": None,
    "mod5": lambda y, c: (y % 5, 5),
    "parity": lambda y, c: (y % 2, 2),
    "reverse": lambda y, c: (c - 1 - y, c),
}


class Mnist1d(tfds.core.GeneratorBasedBuilder):
    """MNIST-1D, generated locally by the `mnist1d` package (no download)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Generated with mnist1d's make_dataset; one config per distribution shift."}
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
        args = get_dataset_args()
        variant = dict(MNIST1D_VARIANTS[self.builder_config.name])
        permutation_seed = variant.pop("permute_positions", None)
        for key, value in variant.items():
            setattr(args, key, value)
        data = make_dataset(args)
        if permutation_seed is not None:
            order = np.random.default_rng(permutation_seed).permutation(args.final_seq_length)
            data = {**data, "x": data["x"][:, order], "x_test": data["x_test"][:, order]}
        return {
            "train": self._generate_examples(data["x"], data["y"]),
            "test": self._generate_examples(data["x_test"], data["y_test"]),
        }

    def _generate_examples(self, signals, labels):
        for index, (signal, label) in enumerate(zip(signals, labels)):
            yield index, {"signal": signal.astype(np.float32), "label": int(label)}


@dataclasses.dataclass(frozen=True)
class Split:
    """One split of a task as host arrays: inputs x_NxF… (float32) and labels y_N (int32)."""

    x: np.ndarray
    y: np.ndarray
    num_classes: int
    name: str


def _builder(name: str, data_dir: str | None):
    try:
        return tfds.builder(name, data_dir=data_dir or DEFAULT_DATA_DIR, file_format="array_record")
    except tfds.core.registered.DatasetNotFoundError as err:
        raise ValueError(f"unknown TFDS dataset {name!r}: {err}") from None


def prepare(name: str, data_dir: str | None = None):
    """Download (real datasets) or generate (MNIST-1D) and write the array_record files, once; return the builder."""
    builder = _builder(name, data_dir)
    if not builder.is_prepared():
        tfds.display_progress_bar(False)  # jaxlmc shows its own progress; TFDS's bars would interleave
        builder.download_and_prepare(file_format="array_record")
        builder = _builder(name, data_dir)  # a fresh builder reads the split info just written
    return builder


def _read_all(name: str, split: str, data_dir: str | None) -> tuple[np.ndarray, np.ndarray, int]:
    builder = prepare(name, data_dir)
    source = builder.as_data_source(split=split)
    examples = [source[i] for i in range(len(source))]
    x_key = "signal" if "signal" in builder.info.features else "image"
    x = np.stack([np.asarray(ex[x_key]) for ex in examples])
    y = np.asarray([ex["label"] for ex in examples], dtype=np.int32)
    return x, y, builder.info.features["label"].num_classes


def load_task(name: str, label_map: str = "identity", data_dir: str | None = None,
              splits: tuple[str, ...] = ("train", "test"), stats_from: str | None = None) -> dict[str, Split]:
    """Load the splits of a task as float32 inputs and int32 labels.

    Images are scaled to [0, 1] and standardised per channel with the statistics of the first split requested, or,
    with `stats_from`, of that task's train split: an OOD set must be normalised like the task it shifts, or the
    normalisation would undo part of the shift.
    """
    if label_map not in LABEL_MAPS:
        raise ValueError(f"unknown label map {label_map!r}; choose one of {sorted(LABEL_MAPS)}")
    raw = {split: _read_all(name, split, data_dir) for split in splits}
    out = {}
    for split, (x, y, num_classes) in raw.items():
        x = x.astype(np.float32)
        if x.ndim == 4:  # images N×H×W×C in [0, 255]
            x = x / 255.0
        out[split] = (x, y, num_classes)
    if out[splits[0]][0].ndim == 4:
        train_x = out[splits[0]][0]
        if stats_from is not None:
            train_x = _read_all(stats_from, "train", data_dir)[0].astype(np.float32) / 255.0
        mean, std = train_x.mean(axis=(0, 1, 2)), train_x.std(axis=(0, 1, 2)) + 1e-6
        out = {s: ((x - mean) / std, y, c) for s, (x, y, c) in out.items()}
    result = {}
    for split, (x, y, num_classes) in out.items():
        mapping = LABEL_MAPS[label_map]
        if mapping is not None:
            y, num_classes = mapping(y, num_classes)
        result[split] = Split(x=x.astype(np.float32), y=y.astype(np.int32), num_classes=int(num_classes),
                              name=f"{name}:{split}" + ("" if label_map == "identity" else f"[{label_map}]"))
    return result
