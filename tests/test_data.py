import numpy as np
import pytest
import tensorflow_datasets as tfds

from jaxlmc import data


def test_mnist1d_builder_generates_offline(data_dir):
    splits = data.load_task("mnist1d", data_dir=data_dir)
    train, test = splits["train"], splits["test"]
    assert train.x.shape == (4000, 40) and test.x.shape == (1000, 40)
    assert train.x.dtype == np.float32 and train.y.dtype == np.int32
    assert train.num_classes == 10 and set(np.unique(train.y)) == set(range(10))
    # The generator standardises the signals.
    assert abs(train.x.mean()) < 0.05 and 0.9 < train.x.std() < 1.1
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
    with pytest.raises(ValueError, match="unknown TFDS dataset 'mnist2d'"):
        data.load_task("mnist2d", data_dir=data_dir)


def test_permuted_variants_share_one_fixed_order_of_positions(data_dir):
    from mnist1d.data import get_dataset_args, make_dataset

    permuted = data.load_task("mnist1d/permuted", data_dir=data_dir, splits=("test",))["test"]
    args = get_dataset_args()
    args.seed = 5042
    raw = make_dataset(args)
    order = np.random.default_rng(7).permutation(40)
    expected = raw["x_test"][:, order].astype(np.float32)
    rows = lambda x: x[np.lexsort(x.T[::-1])]  # noqa: E731  (TFDS stores examples in its own order)
    np.testing.assert_allclose(rows(permuted.x), rows(expected), rtol=1e-5, atol=1e-6)
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
