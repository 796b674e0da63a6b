"""Bezier mode connectivity curves: the vmapped bend training against its per-pair loop, a barrier that a trained
curve removes, and the curve's ends."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxlmc import curves, models, paths, permute, stats, train
from jaxlmc.config import ModelConfig


def _tree_close(a, b, **tol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **tol)


@pytest.fixture(scope="module")
def tiny():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 5)).astype(np.float32)
    y = rng.integers(0, 3, size=60).astype(np.int32)
    model = models.build(ModelConfig(kind="mlp", width=8, depth=2), (5,), 3)
    params_M = jax.vmap(model.init)(jax.random.split(jax.random.key(0), 4))
    return model, params_M, x, y


def _random_perms(model, num_pairs, seed):
    rng = np.random.default_rng(seed)
    widths = [8 for _ in model.permutation_spec()]
    return [jnp.asarray(np.stack([rng.permutation(w) for _ in range(num_pairs)]), jnp.int32) for w in widths]


@pytest.mark.slow
@pytest.mark.parametrize("aligned", [False, True])
def test_vmapped_bends_equal_the_per_pair_loop(tiny, aligned):
    model, params_M, x, y = tiny
    pairs = [(0, 1), (2, 3), (1, 3)]  # 3 pairs in chunks of 2: the last chunk is a remainder
    steps, batch, lr = 15, 16, 1e-2
    key = jax.random.key(7)
    perms = _random_perms(model, len(pairs), 1) if aligned else None
    fn = curves.make_train_bends(model, steps, batch, lr, len(y), chunk_pairs=2)
    bends_P = fn(params_M, jnp.asarray(pairs, jnp.int32), {"x": jnp.asarray(x), "y": jnp.asarray(y)}, key, perms)
    for p, (i, j) in enumerate(pairs):
        p_i = jax.tree.map(lambda a: a[i], params_M)
        p_j = jax.tree.map(lambda a: a[j], params_M)
        if aligned:
            p_j = permute.permute(p_j, [q[p] for q in perms], model.permutation_spec())
        ref = curves.reference_train_bend(model, p_i, p_j, x, y, steps, batch, lr, jax.random.fold_in(key, p))
        got = jax.tree.map(lambda a: a[p], bends_P)
        _tree_close(got, ref, rtol=1e-4, atol=1e-5)
        # the bend really moved off its starting point, the midpoint
        moved = max(float(jnp.abs(a - b).max()) for a, b in
                    zip(jax.tree.leaves(got), jax.tree.leaves(curves.midpoint(p_i, p_j))))
        assert moved > 10 * lr


def test_untrained_bend_is_the_straight_line(tiny):
    """steps = 0 leaves every bend at its midpoint, where the Bezier curve is the linear interpolation."""
    model, params_M, x, y = tiny
    pairs = jnp.asarray([(0, 1), (2, 3), (3, 0)], jnp.int32)
    bends_P = curves.make_train_bends(model, 0, 8, 1e-2, len(y))(params_M, pairs, {"x": jnp.asarray(x),
                                                                                    "y": jnp.asarray(y)},
                                                                   jax.random.key(0))
    ts = np.linspace(0.0, 1.0, 5, dtype=np.float32)
    sets = {"train": train.batch_eval_set(x, y, 25)}
    curve = paths.make_path_eval(model, paths.bezier_curve(), ts, chunk_pairs=2)(params_M, pairs, sets, None,
                                                                                 bends_P)["train"]
    line = paths.make_path_eval(model, paths.straight(), ts, 2)(params_M, pairs, sets)["train"]
    np.testing.assert_allclose(curve[0], line[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(curve[1], line[1], atol=1e-6)


def test_trained_curve_removes_the_straight_line_barrier():
    """Two independently trained networks on an XOR of signs: the line between them climbs to high loss, while a
    trained Bezier curve between the same endpoints stays low (Garipov et al. 2018)."""
    rng = np.random.default_rng(0)
    n = 400
    x = rng.uniform(-1, 1, size=(n, 2)).astype(np.float32)
    y = (x[:, 0] * x[:, 1] > 0).astype(np.int32)
    model = models.build(ModelConfig(kind="mlp", width=16, depth=1), (2,), 2)
    tx = optax.adam(1e-2)
    xj, yj = jnp.asarray(x), jnp.asarray(y)

    @jax.jit
    def fit(params_M):  # full-batch Adam, each member from its own initialisation
        def member(params):
            def step(carry, _):
                params, opt = carry
                grads = jax.grad(lambda p: train.cross_entropy(model.apply(p, xj), yj).mean())(params)
                updates, opt = tx.update(grads, opt, params)
                return (optax.apply_updates(params, updates), opt), None

            return jax.lax.scan(step, (params, tx.init(params)), None, length=400)[0][0]

        return jax.vmap(member)(params_M)

    params_M = fit(jax.vmap(model.init)(jax.random.split(jax.random.key(1), 2)))
    pairs = jnp.asarray([[0, 1]], jnp.int32)
    ts = np.linspace(0.0, 1.0, 11, dtype=np.float32)
    sets = {"train": train.batch_eval_set(x, y, n)}
    line = np.asarray(paths.make_path_eval(model, paths.straight(), ts, 1)(params_M, pairs, sets)["train"][0])
    bends_P = curves.make_train_bends(model, 400, 64, 1e-2, n)(params_M, pairs, {"x": xj, "y": yj},
                                                                jax.random.key(5))
    curve = np.asarray(paths.make_path_eval(model, paths.bezier_curve(), ts, 1)(params_M, pairs, sets, None,
                                                                              bends_P)["train"][0])
    assert line[0, 0] < 0.1 and line[0, -1] < 0.1  # both members fit the task
    np.testing.assert_allclose(curve[0, [0, -1]], line[0, [0, -1]], rtol=1e-5)  # same endpoints
    line_barrier = stats.barrier_endpoint_mean(line)[0]
    curve_barrier = stats.barrier_endpoint_mean(curve)[0]
    assert line_barrier > 0.4
    assert curve_barrier < 0.25 * line_barrier


@pytest.mark.slow
def test_curve_ends_are_the_members(tiny):
    model, params_M, x, y = tiny
    p_i, p_j = (jax.tree.map(lambda a, m=m: a[m], params_M) for m in (0, 1))
    bend = jax.tree.map(lambda a: a + 1.0, jax.tree.map(lambda a: a[2], params_M))  # any bend
    for fn in (curves.bezier, jax.jit(curves.bezier)):
        for a, b in zip(jax.tree.leaves(fn(p_i, bend, p_j, 0.0)), jax.tree.leaves(p_i)):
            np.testing.assert_array_equal(a, b)
        for a, b in zip(jax.tree.leaves(fn(p_i, bend, p_j, 1.0)), jax.tree.leaves(p_j)):
            np.testing.assert_array_equal(a, b)

    # Through training and evaluation, with and without an alignment: the curve's ends compute members i and j.
    pairs = jnp.asarray([(0, 1), (2, 3)], jnp.int32)
    data = {"x": jnp.asarray(x), "y": jnp.asarray(y)}
    sets = {"train": train.batch_eval_set(x, y, 25)}
    ts = np.linspace(0.0, 1.0, 3, dtype=np.float32)
    member_loss, member_acc = train.make_evaluate(model)(params_M, sets["train"])
    perms = _random_perms(model, 2, 3)
    spec = model.permutation_spec()
    for perm_arg in (None, perms):
        bends_P = curves.make_train_bends(model, 5, 16, 1e-2, len(y))(params_M, pairs, data, jax.random.key(2),
                                                                       perm_arg)
        loss, err = paths.make_path_eval(model, paths.bezier_curve(), ts, chunk_pairs=1)(params_M, pairs, sets,
                                                                                          perm_arg, bends_P)["train"]
        for p, (i, j) in enumerate(np.asarray(pairs)):
            assert loss[p, 0] == pytest.approx(float(member_loss[i]), rel=1e-5)
            assert loss[p, -1] == pytest.approx(float(member_loss[j]), rel=1e-5)
            assert err[p, 0] == pytest.approx(1.0 - float(member_acc[i]), abs=1e-6)
            assert err[p, -1] == pytest.approx(1.0 - float(member_acc[j]), abs=1e-6)
        if perm_arg is not None:  # φ(1) is member j's aligned copy: other weights, same function
            bend = jax.tree.map(lambda a: a[1], bends_P)
            aligned = permute.permute(jax.tree.map(lambda a: a[3], params_M), [q[1] for q in perms], spec)
            end = curves.bezier(jax.tree.map(lambda a: a[2], params_M), bend, aligned, 1.0)
            assert not np.allclose(end["dense0"]["kernel"], params_M["dense0"]["kernel"][3])
            np.testing.assert_allclose(model.apply(end, jnp.asarray(x)),
                                       model.apply(jax.tree.map(lambda a: a[3], params_M), jnp.asarray(x)),
                                       rtol=1e-5, atol=1e-5)


def test_resample_weights_keep_their_axis(tiny):
    model, params_M, x, y = tiny
    pairs = jnp.asarray([(0, 1), (1, 2)], jnp.int32)
    bends_P = jax.vmap(curves.midpoint)(*(jax.tree.map(lambda a, k=k: a[pairs[:, k]], params_M) for k in (0, 1)))
    counts = train.resample_counts(len(y), 4)
    sets = {"plain": train.batch_eval_set(x, y, 25), "boot": train.batch_eval_set(x, y, 25, counts)}
    ts = np.linspace(0.0, 1.0, 5, dtype=np.float32)
    out = paths.make_path_eval(model, paths.bezier_curve(), ts, chunk_pairs=2)(params_M, pairs, sets, None, bends_P)
    assert out["plain"][0].shape == (2, 5)
    assert out["boot"][0].shape == (2, 5, 5) and out["boot"][1].shape == (2, 5, 5)
    np.testing.assert_allclose(out["boot"][0][..., 0], out["plain"][0], rtol=1e-6)
    with pytest.raises(ValueError):
        paths.make_path_eval(model, paths.bezier_curve(), np.array([0.0, 0.5]), 1)
