"""Soups, ensembles and similarity measures against cases whose answer is known."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import squareform

from jaxlmc import analysis, models, train
from jaxlmc.config import ModelConfig


@pytest.fixture(scope="module")
def members():
    """Four logistic-regression members: three good ones near one solution and one bad one (weights negated)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 5)).astype(np.float32)
    w_true = rng.normal(size=(5, 3)).astype(np.float32)
    y = (x @ w_true).argmax(1).astype(np.int32)
    model = models.build(ModelConfig(kind="mlp", depth=0), (5,), 3)
    kernels = [w_true + 0.3 * rng.normal(size=w_true.shape).astype(np.float32) for _ in range(3)] + [-w_true]
    params_M = {"head": {"kernel": jnp.asarray(np.stack(kernels)), "bias": jnp.zeros((4, 3))}}
    return model, params_M, x, y


def accuracy(model, params, x, y):
    return float((np.asarray(model.apply(params, jnp.asarray(x))).argmax(-1) == y).mean())


def test_soup_weights_average_parameters(members):
    model, params_M, x, y = members
    mean = analysis.soup(params_M, jnp.asarray([1.0, 1.0, 0.0, 0.0]))
    np.testing.assert_allclose(mean["head"]["kernel"], np.asarray(params_M["head"]["kernel"][:2]).mean(0), rtol=1e-6)
    weights = analysis.group_weights(np.array([[0, 2, -1], [3, -1, -1]]), 4)
    np.testing.assert_array_equal(weights, [[1, 0, 1, 0], [0, 0, 0, 1]])
    acc = analysis.make_soup_accuracy(model)(params_M, jnp.asarray(weights), train.batch_eval_set(x, y, 64))
    assert acc[1] == pytest.approx(accuracy(model, jax.tree.map(lambda a: a[3], params_M), x, y), abs=1e-6)


def test_greedy_soup_keeps_helpful_members_and_rejects_the_bad_one(members):
    model, params_M, x, y = members
    val_set = train.batch_eval_set(x[:150], y[:150], 64)
    val_acc = np.array([accuracy(model, jax.tree.map(lambda a, m=m: a[m], params_M), x[:150], y[:150])
                        for m in range(4)])
    weights = analysis.greedy_soup(model, params_M, np.array([[0, 1, 2, 3]]), val_set, val_acc)
    assert weights[0, 3] == 0  # the negated member would wreck the soup
    assert weights[0, int(np.argmax(val_acc))] == 1  # the soup starts from the best member
    soup_acc = analysis.make_soup_accuracy(model)(params_M, jnp.asarray(weights), val_set)
    assert float(soup_acc[0]) >= val_acc.max()  # by construction: never worse than the best on validation


def test_greedy_soup_reads_only_the_validation_set(members):
    """Its choice is a function of the validation data: shuffling every other example leaves it unchanged."""
    model, params_M, x, y = members
    val_acc = np.array([0.9, 0.8, 0.7, 0.1])
    val_set = train.batch_eval_set(x[:150], y[:150], 64)
    first = analysis.greedy_soup(model, params_M, np.array([[0, 1, 2, 3], [3, 1, -1, -1]]), val_set, val_acc)
    rng = np.random.default_rng(1)
    x_other = x.copy()
    x_other[150:] = rng.normal(size=x_other[150:].shape)
    again = analysis.greedy_soup(model, params_M, np.array([[0, 1, 2, 3], [3, 1, -1, -1]]),
                                 train.batch_eval_set(x_other[:150], y[:150], 64), val_acc)
    np.testing.assert_array_equal(first, again)
    assert first[1].sum() >= 1 and first[1, [0, 2]].sum() == 0  # a padded group only uses its own members


def test_ensemble_and_disagreement():
    logits = np.array([[[2.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [0.0, 3.0]]])  # 2 members × 2 examples × 2 classes
    assert analysis.ensemble_accuracy(logits, np.array([0, 1])) == 1.0  # mean logits: [1, .5], [0, 2]
    d = analysis.disagreement(np.array([[0, 1, 1, 0], [0, 1, 0, 1], [0, 1, 1, 0]]))
    np.testing.assert_allclose(d, [[0, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0]])


def test_linear_cka_invariances():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 6))
    rotation, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    feats = np.stack([a, 3.0 * a @ rotation + 1.0, rng.normal(size=(200, 6))]).astype(np.float32)
    cka = np.asarray(analysis.linear_cka(jnp.asarray(feats)))
    np.testing.assert_allclose(np.diag(cka), 1.0, rtol=1e-5)
    assert cka[0, 1] == pytest.approx(1.0, rel=1e-4)  # rotation, scaling and shift do not change CKA
    assert cka[0, 2] < 0.2 and cka[0, 2] == pytest.approx(cka[2, 0], rel=1e-5)


def test_basins_from_a_block_barrier_matrix():
    b = np.full((5, 5), 0.3)
    b[np.ix_([0, 2, 4], [0, 2, 4])] = 0.005
    b[1, 3] = b[3, 1] = 0.01
    np.fill_diagonal(b, 0.0)
    labels = analysis.basins(b, threshold=0.02)
    np.testing.assert_array_equal(labels, [0, 1, 0, 1, 0])  # the larger basin is basin 0
    assert set(analysis.basins(b, threshold=0.5)) == {0}
    assert len(set(analysis.basins(b, threshold=0.001))) == 5
    b[0, 2] = b[2, 0] = np.nan  # a pair not measured (a ring design) is left out of the mean, not counted as far
    np.testing.assert_array_equal(analysis.basins(b, threshold=0.02), [0, 1, 0, 1, 0])
    b[np.ix_([1, 3], [0, 2, 4])] = b[np.ix_([0, 2, 4], [1, 3])] = np.nan  # no pair between the groups: never merged
    assert set(analysis.basins(b, threshold=0.5)) == {0, 1}


def test_basins_with_every_pair_measured_are_scipys_average_linkage():
    rng = np.random.default_rng(0)
    for k in (2, 5, 9):
        points = rng.normal(size=(k, 3))
        b = np.sqrt(((points[:, None] - points[None]) ** 2).sum(-1))
        threshold = float(np.median(b[np.triu_indices(k, 1)]))
        tree = linkage(squareform(b, checks=False), method="average")
        expected = fcluster(tree, t=threshold, criterion="distance")
        found = analysis.basins(b, threshold)
        same = expected[:, None] == expected[None, :]
        np.testing.assert_array_equal(found[:, None] == found[None, :], same)  # the same partition
