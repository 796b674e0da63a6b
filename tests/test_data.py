import logging

import numpy as np
import pytest
import tensorflow_datasets as tfds
from mnist1d.data import get_dataset_args, make_dataset

from jaxlmc import builders, config, data, tasks


def _rows(x, y=None):
    """Examples in a canonical order (TFDS stores them in its own), labels as a leading column when given."""
    x = x.reshape(len(x), -1).astype(np.float64)
    if y is not None:
        x = np.concatenate([np.asarray(y, np.float64)[:, None], x], axis=1)
    return x[np.lexsort(x.T[::-1])]


def _mnist1d_reference(**variant):
    """mnist1d's make_dataset for a variant's generator settings: standardised by the variant's own statistics."""
    args = get_dataset_args()
    for key, value in variant.items():
        setattr(args, key, value)
    return make_dataset(args)


def test_mnist1d_builder_generates_offline(data_dir):
    splits = data.load_task("mnist1d", data_dir=data_dir)
    train, test = splits["train"], splits["test"]
    assert train.x.shape == (4000, 40) and test.x.shape == (1000, 40)
    assert train.x.dtype == np.float32 and train.y.dtype == np.int32
    assert train.num_classes == 10 and set(np.unique(train.y)) == set(range(10))
    # The default config is standardised by its own statistics: it is exactly mnist1d's make_dataset output.
    assert abs(train.x.mean()) < 0.05 and 0.9 < train.x.std() < 1.1
    ref = make_dataset(get_dataset_args())
    for split, x, y in ((train, ref["x"], ref["y"]), (test, ref["x_test"], ref["y_test"])):
        np.testing.assert_array_equal(_rows(split.x, split.y), _rows(x.astype(np.float32), y))
    builder = tfds.builder("mnist1d", data_dir=data_dir)
    assert builder.is_prepared() and builder.info.splits["train"].num_examples == 4000
    # Reading again gives the same data (prepared once, read from array_record).
    again = data.load_task("mnist1d", data_dir=data_dir)["train"]
    np.testing.assert_array_equal(again.x, train.x)


def test_ood_variants_are_fresh_and_shifted(data_dir):
    default = data.load_task("mnist1d", data_dir=data_dir, splits=("test",))["test"]
    noisy = data.load_task("mnist1d/noisy", data_dir=data_dir, splits=("test",))["test"]
    assert noisy.x.shape == default.x.shape
    assert not np.allclose(noisy.x, default.x)
    # More i.i.d. noise means rougher signals: larger mean squared first difference.
    rough = lambda x: np.mean(np.diff(x, axis=1) ** 2)  # noqa: E731
    assert rough(noisy.x) > 1.3 * rough(default.x)


def test_label_maps_define_new_tasks(data_dir):
    base = data.load_task("mnist1d", data_dir=data_dir, splits=("test",))["test"]
    mod5 = data.load_task("mnist1d", "mod5", data_dir=data_dir, splits=("test",))["test"]
    parity = data.load_task("mnist1d", "parity", data_dir=data_dir, splits=("test",))["test"]
    assert mod5.num_classes == 5 and parity.num_classes == 2
    np.testing.assert_array_equal(mod5.y, base.y % 5)
    np.testing.assert_array_equal(parity.y, base.y % 2)
    with pytest.raises(ValueError, match="unknown label map"):
        data.load_task("mnist1d", "odd", data_dir=data_dir)


@pytest.mark.parametrize("name, shape", [("mnist", (28, 28, 1)), ("fashion_mnist", (28, 28, 1)),
                                         ("cifar10", (32, 32, 3)), ("cifar100", (32, 32, 3))])
def test_real_tfds_datasets_through_the_same_loader(name, shape, tmp_path):
    with tfds.testing.mock_data(num_examples=48):
        splits = data.load_task(name, data_dir=str(tmp_path))
    train = splits["train"]
    assert train.x.shape == (48, *shape) and train.x.dtype == np.float32
    assert train.num_classes == (100 if name == "cifar100" else 10)
    assert train.y.min() >= 0 and train.y.max() < train.num_classes
    # Standardised per channel with the train split's statistics.
    np.testing.assert_allclose(train.x.mean(axis=(0, 1, 2)), 0.0, atol=1e-3)
    np.testing.assert_allclose(train.x.std(axis=(0, 1, 2)), 1.0, atol=1e-2)


def test_unknown_dataset_is_a_clear_error(data_dir):
    with pytest.raises(ValueError, match="unknown TFDS dataset 'mnist2d'") as err:
        data.load_task("mnist2d", data_dir=data_dir)
    # A short line naming the closest datasets, not TFDS's catalogue of hundreds.
    assert "closest: " in str(err.value) and "mnist" in str(err.value) and len(str(err.value).splitlines()) == 1
    with pytest.raises(ValueError, match="mnist1d has no config 'permutd'; closest: mnist1d/permuted") as err:
        data.load_task("mnist1d/permutd", data_dir=data_dir)
    assert len(str(err.value).splitlines()) == 1


def test_variants_keep_their_shift_in_scale(data_dir):
    """Every variant is standardised with the default's statistics, not its own: the noisy variant's signals are
    mnist1d's (self-standardised) noisy signals scaled back up by their raw std relative to the default's."""
    default = data.load_task("mnist1d", data_dir=data_dir)
    noisy = data.load_task("mnist1d/noisy", data_dir=data_dir)
    default_x, noisy_x = (np.concatenate([splits["train"].x, splits["test"].x]) for splits in (default, noisy))
    assert abs(default_x.std() - 1) < 1e-3  # the default is still standardised
    scale, offset = noisy_x.std(), noisy_x.mean()
    assert scale > 1.3  # more noise, larger amplitude: not re-standardised to 1
    ref = _mnist1d_reference(**builders.MNIST1D_VARIANTS["noisy"])
    np.testing.assert_allclose(_rows(noisy["test"].x), _rows(ref["x_test"] * scale + offset), rtol=1e-4, atol=1e-5)
    # The statistics are those of the default's raw signals, computed by generating them.
    mean, std = builders.mnist1d_default_stats()
    raw_default = builders._mnist1d_raw(get_dataset_args())[0]
    assert (mean, std) == (raw_default.mean(), raw_default.std())


def test_large_variant_is_the_default_distribution_with_more_draws(tmp_path, monkeypatch):
    """The large config's split by test_size and its normalisation, on a small stand-in (the real one is 51,000
    signals: 13 s to generate)."""
    assert builders.MNIST1D_VARIANTS["large"] == {"num_samples": 51000, "test_size": 1000, "seed": 8042}
    monkeypatch.setitem(builders.MNIST1D_VARIANTS, "large", {"num_samples": 1200, "test_size": 200, "seed": 8042})
    large = data.load_task("mnist1d/large", data_dir=str(tmp_path))
    assert large["train"].x.shape == (1000, 40) and large["test"].x.shape == (200, 40)
    x = np.concatenate([large["train"].x, large["test"].x])
    assert abs(x.mean()) < 0.05 and 0.93 < x.std() < 1.07  # the default's statistics fit a draw of its distribution
    assert abs(x.std() - 1) > 1e-4  # ... but are not this draw's own
    ref = _mnist1d_reference(num_samples=1200, seed=8042)
    np.testing.assert_allclose(_rows(x), _rows(np.concatenate([ref["x"], ref["x_test"]]) * x.std() + x.mean()),
                               rtol=1e-4, atol=1e-5)


def test_permuted_variants_share_one_fixed_order_of_positions(data_dir):
    permuted = data.load_task("mnist1d/permuted", data_dir=data_dir)
    raw = _mnist1d_reference(seed=5042)
    order = np.random.default_rng(7).permutation(40)
    expected = raw["x_test"][:, order]
    # mnist1d standardised this draw by its own statistics, jaxlmc by the default's: an affine map apart.
    all_x = np.concatenate([permuted["train"].x, permuted["test"].x])
    np.testing.assert_allclose(_rows(permuted["test"].x), _rows(expected * all_x.std() + all_x.mean()),
                               rtol=1e-4, atol=1e-5)
    assert not np.array_equal(order, np.arange(40))
    # The noisy OOD set uses the same order: its signals are as smooth as the noisy variant's under that order and
    # rough in the natural order.
    noisy_perm = data.load_task("mnist1d/permuted_noisy", data_dir=data_dir, splits=("test",))["test"]
    unpermuted = np.empty_like(noisy_perm.x)
    unpermuted[:, order] = noisy_perm.x
    rough = lambda x: np.mean(np.diff(x, axis=1) ** 2)  # noqa: E731
    assert rough(unpermuted) < 0.5 * rough(noisy_perm.x)


def test_ood_images_are_normalised_like_the_task_they_shift(tmp_path):
    with tfds.testing.mock_data(num_examples=48):
        own = data.load_task("cifar10", data_dir=str(tmp_path), splits=("test",))["test"]
        shifted = data.load_task("cifar10", data_dir=str(tmp_path), splits=("test",), stats_from="cifar100")["test"]
    np.testing.assert_allclose(own.x.mean(axis=(0, 1, 2)), 0.0, atol=1e-3)
    assert not np.allclose(shifted.x, own.x)  # cifar100's train statistics, not the set's own


def test_class_split_of_mnist1d(data_dir):
    """Pretrain on digits 0-4, fine-tune on 5-9: each task keeps its classes, relabelled 0 .. 4 in the list's order."""
    cfg = config.load(None, [f'data.data_dir="{data_dir}"', "data.pretrain_classes=[0, 1, 2, 3, 4]",
                             "data.finetune_classes=[5, 6, 7, 8, 9]", "data.finetune_labels=identity",
                             "data.validation_size=100"])
    pre, fine = tasks.load_pretrain_task(cfg), tasks.load_finetune_task(cfg)
    full = {name: data.load_task(name, data_dir=data_dir) for name in ("mnist1d", "mnist1d/shifted", "mnist1d/noisy")}
    fine_train = np.concatenate([fine.train.y, fine.val.y]), np.concatenate([fine.train.x, fine.val.x])
    cases = [(pre.train.y, pre.train.x, full["mnist1d"]["train"], [0, 1, 2, 3, 4]),
             (pre.test.y, pre.test.x, full["mnist1d"]["test"], [0, 1, 2, 3, 4]),
             (*fine_train, full["mnist1d/shifted"]["train"], [5, 6, 7, 8, 9]),
             (fine.test.y, fine.test.x, full["mnist1d/shifted"]["test"], [5, 6, 7, 8, 9]),
             (fine.ood.y, fine.ood.x, full["mnist1d/noisy"]["test"], [5, 6, 7, 8, 9])]
    for y, x, whole, classes in cases:
        keep = np.isin(whole.y, classes)
        assert set(np.unique(y)) == set(range(5)) and len(y) == keep.sum() < len(whole.y)
        np.testing.assert_array_equal(x, whole.x[keep])  # the same examples, in the same order
        np.testing.assert_array_equal(np.asarray(classes)[y], whole.y[keep])  # originally in the list
    assert pre.train.num_classes == fine.train.num_classes == fine.ood.num_classes == 5
    assert fine.train.name == "mnist1d/shifted:train[classes 5,6,7,8,9]"
    # The list's order is the new labels' order.
    rev = data.load_task("mnist1d", data_dir=data_dir, splits=("test",), classes=[9, 3])["test"]
    keep = np.isin(full["mnist1d"]["test"].y, [9, 3])
    np.testing.assert_array_equal(rev.y, np.where(full["mnist1d"]["test"].y[keep] == 9, 0, 1))


def test_class_split_of_any_tfds_dataset(tmp_path):
    with tfds.testing.mock_data(num_examples=48):
        whole = data.load_task("mnist", data_dir=str(tmp_path))
        split = data.load_task("mnist", data_dir=str(tmp_path), classes=[7, 3, 5])
    for name in ("train", "test"):
        keep = np.isin(whole[name].y, [7, 3, 5])
        assert 0 < keep.sum() < 48 and split[name].x.shape == (keep.sum(), 28, 28, 1)
        np.testing.assert_array_equal(np.asarray([7, 3, 5])[split[name].y], whole[name].y[keep])
        assert split[name].num_classes == 3
    # Images are standardised with the kept training examples' statistics.
    np.testing.assert_allclose(split["train"].x.mean(axis=(0, 1, 2)), 0.0, atol=1e-3)


@pytest.mark.parametrize("overrides, match", [
    (["data.pretrain_classes=[0, -1]"], "data.pretrain_classes must be at least two distinct non-negative"),
    (["data.pretrain_classes=[2, 2]"], "data.pretrain_classes must be at least two distinct non-negative"),
    (["data.pretrain_classes=[4]"], "data.pretrain_classes must be at least two distinct non-negative"),
    (["data.pretrain_classes=[0, 1]", "data.pretrain_labels=parity"], "data.pretrain_classes and data.pretrain_labels"),
    (["data.finetune_classes=[5, 6]"], "data.finetune_classes and data.finetune_labels = 'mod5'"),
])
def test_class_lists_are_validated_with_the_config(overrides, match):
    with pytest.raises(config.ConfigError, match=match):
        config.load(None, overrides)


def test_classes_the_dataset_lacks_are_a_config_error_before_anything_is_written(tmp_path):
    cfg = config.load(None, [f'data.data_dir="{tmp_path}"', "data.pretrain_classes=[0, 10]",
                             "data.finetune_classes=[3, 12]", "data.finetune_labels=identity"])
    with pytest.raises(config.ConfigError, match=r"data.pretrain_classes: classes \[10\] are not classes"):
        tasks.load_pretrain_task(cfg)
    with pytest.raises(config.ConfigError, match=r"data.finetune_classes: classes \[12\]"):
        tasks.load_finetune_task(cfg)
    assert not list(tmp_path.iterdir())  # nothing generated or written
    with pytest.raises(ValueError, match="cannot be combined"):
        data.load_task("mnist1d", "mod5", data_dir=str(tmp_path), classes=[0, 1])
    with tfds.testing.mock_data(num_examples=8), \
            pytest.raises(ValueError, match=r"classes \[10\] are not classes of the dataset \(0 .. 9\)"):
            data.load_task("mnist", data_dir=str(tmp_path), classes=[1, 10])


def test_the_test_split_is_chosen_in_tfds_split_syntax():
    """data.test_split: a fixed subset of the fine-tuning task's test split (or another split, where its test labels
    are hidden); the OOD set's own split likewise."""
    cfg = config.load(None, ['data.test_split="test[:100]"', 'data.ood_split="test[:50]"'])
    task = tasks.load_finetune_task(cfg)
    full = tasks.load_finetune_task(config.load(None, []))
    assert len(task.test.y) == 100 and len(task.ood.y) == 50
    np.testing.assert_array_equal(task.test.x, full.test.x[:100])


def test_preparing_a_dataset_leaves_stdout_to_the_caller(tmp_path, capsys, caplog):
    """TFDS announces a preparation on stdout: jaxlmc sends it to stderr, so a script's printed results stay clean;
    its "Variant folder … has no dataset_info.json" warning (every first run's normal state) is left out, and the
    absl logger is left as it was."""
    with caplog.at_level(logging.WARNING):
        data.prepare("mnist1d", str(tmp_path))
    captured = capsys.readouterr()
    assert captured.out == "" and "mnist1d" in captured.err
    assert not [r for r in caplog.records if "Variant folder" in r.getMessage()], caplog.text
    assert not logging.getLogger("absl").filters
