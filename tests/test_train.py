"""The vectorised core: vmapped members equal lone runs; hyperparameters, data order and divergence are per member."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax import nnx

from jaxlmc import models, train
from jaxlmc.config import ModelConfig

N_TRAIN, FEATURES, CLASSES, BATCH, STEPS = 200, 12, 3, 20, 25


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N_TRAIN, FEATURES)).astype(np.float32)
    y = (x[:, :CLASSES].argmax(1)).astype(np.int32)
    model = models.build(ModelConfig(kind="mlp", width=16, depth=2), (FEATURES,), CLASSES)
    return model, {"x": jnp.asarray(x), "y": jnp.asarray(y)}


def make_members(model, seeds, lrs, wds, kinds=None, init_seeds=None, opt="adamw"):
    init_seeds = init_seeds or [0] * len(seeds)
    params_M = jax.vmap(model.init)(jax.vmap(jax.random.key)(jnp.asarray(init_seeds)))
    consts = {"lr": jnp.asarray(train.lr_table(lrs, kinds or ["constant"] * len(lrs), STEPS, 0)),
              "wd": jnp.asarray(wds, jnp.float32), "data_key": train.member_keys(seeds)["data"]}
    return train.init_state(params_M, opt, 0.9, N_TRAIN), consts


def run(model, data, state, consts, steps=STEPS, chunk=10, opt="adamw", group=0, metrics=None):
    chunk_fn = train.make_train_chunk(model, opt, 0.9, BATCH, N_TRAIN, chunk, member_group=group)
    done = 0
    while done < steps:
        n = min(chunk, steps - done)
        state, loss, acc = chunk_fn(state, consts, data, n)
        if metrics is not None:
            metrics.append((np.asarray(loss)[:n], np.asarray(acc)[:n]))
        done += n
    return state


def take(tree, i):
    return jax.tree.map(lambda a: a[i:i + 1], tree)


@pytest.mark.slow
@pytest.mark.parametrize("opt", ["adamw", "sgd"])
def test_member_of_ensemble_equals_member_trained_alone(problem, opt):
    model, data = problem
    seeds, lrs, wds = [0, 1, 2, 3], [1e-3, 3e-3, 1e-2, 3e-2], [0.0, 1e-2, 0.0, 1e-1]
    state, consts = make_members(model, seeds, lrs, wds, init_seeds=[5, 6, 7, 8], opt=opt)
    ensemble = run(model, data, state, consts, opt=opt)
    for k in range(4):
        alone_state, alone_consts = make_members(model, [seeds[k]], [lrs[k]], [wds[k]], init_seeds=[5 + k],
                                                 opt=opt)
        alone = run(model, data, alone_state, alone_consts, opt=opt)
        for a, b in zip(jax.tree.leaves(take(ensemble["params"], k)), jax.tree.leaves(alone["params"])):
            np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)


@pytest.mark.slow
def test_member_groups_do_not_change_results(problem):
    """Training the 6 members group after group (2 or 3 at a time, every step of a chunk before the next group) gives
    bit for bit the states and the per-step metrics (in member order) of training all 6 together."""
    model, data = problem
    members = ([0, 1, 2, 3, 4, 5], [1e-3, 3e-3, 1e-2, 3e-2, 1e-2, 1e-3], [0.0, 1e-2, 0.0, 1e-1, 0.0, 0.0])
    results = {}
    for group in (6, 2, 3):
        metrics = []
        state = run(model, data, *make_members(model, *members, init_seeds=[5, 6, 7, 8, 9, 10]), chunk=10,
                    group=group, metrics=metrics)
        results[group] = (state, metrics)
    for group in (2, 3):
        for x, y in zip(jax.tree.leaves(results[6]), jax.tree.leaves(results[group])):
            np.testing.assert_array_equal(x, y)
    assert train.member_group_size(6, 10, requested=4) == 3 and train.member_group_size(7, 10, requested=4) == 1


def test_chunking_does_not_change_results(problem):
    model, data = problem
    a = run(model, data, *make_members(model, [0, 1], [1e-2, 1e-2], [0.0, 0.0]), chunk=7)
    b = run(model, data, *make_members(model, [0, 1], [1e-2, 1e-2], [0.0, 0.0]), chunk=25)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)


def test_per_member_learning_rate_and_weight_decay_take_effect(problem):
    model, data = problem
    # Same seed and start: only the hyperparameters differ.
    state, consts = make_members(model, [0, 0, 0, 0], [0.0, 1e-2, 1e-2, 3e-2], [0.0, 0.0, 0.5, 0.0])
    start = jax.tree.map(jnp.copy, state["params"])
    final = run(model, data, state, consts)
    dist = np.asarray(train.distance_from(final["params"], start))
    assert dist[0] == 0.0  # lr = 0: the member does not move
    assert dist[3] > dist[1] > 0  # a larger rate moves further
    norm = lambda p, i: float(sum(jnp.sum(leaf[i] ** 2) for leaf in jax.tree.leaves(p)))  # noqa: E731
    assert norm(final["params"], 2) < norm(final["params"], 1)  # weight decay shrinks the weights
    assert not np.allclose(jax.tree.leaves(final["params"])[0][1], jax.tree.leaves(final["params"])[0][2])


def test_schedules_follow_optax():
    table = train.lr_table([1.0, 1.0, 1.0], ["constant", "cosine", "linear"], steps=100, warmup_steps=10)
    assert table.shape == (3, 100)
    np.testing.assert_allclose(table[:, 0], 0.0)  # linear warm-up starts at 0
    np.testing.assert_allclose(table[:, 10], 1.0, rtol=1e-6)  # and reaches the peak
    np.testing.assert_allclose(table[0, 10:], 1.0, rtol=1e-6)
    assert table[1, 99] < 0.01 and table[2, 99] < 0.02  # decays to ~0
    assert table[1, 55] == pytest.approx(0.5, abs=0.02)  # cosine is at half-way in the middle of its decay


def test_data_order_is_per_seed(problem):
    model, data = problem
    state, consts = make_members(model, [3, 3, 4], [1e-3] * 3, [0.0] * 3)
    state = run(model, data, state, consts, steps=1)
    perm = np.asarray(state["perm"])
    np.testing.assert_array_equal(perm[0], perm[1])  # same seed, same order
    assert not np.array_equal(perm[0], perm[2])  # different seed, different order
    assert sorted(perm[2].tolist()) == list(range(N_TRAIN))  # a permutation: every example once per epoch
    # A new epoch draws a new order.
    later = run(model, data, state, consts, steps=N_TRAIN // BATCH)
    assert not np.array_equal(np.asarray(later["perm"])[0], perm[0])


def test_divergent_member_is_frozen_and_flagged_and_others_unharmed(problem):
    model, data = problem
    seeds, lrs = [0, 1, 2], [1e-2, 1e12, 1e-2]
    state, consts = make_members(model, seeds, lrs, [0.0] * 3, opt="sgd")
    final = run(model, data, state, consts, opt="sgd")
    diverged = np.asarray(final["diverged"])
    assert diverged.tolist() == [False, True, False]
    for leaf in jax.tree.leaves(final["params"]):
        assert np.isfinite(np.asarray(leaf[1])).all()  # frozen at its last finite state
    # The healthy members equal an ensemble run without the divergent one.
    ref_state, ref_consts = make_members(model, [0, 2], [1e-2, 1e-2], [0.0] * 2, opt="sgd")
    ref = run(model, data, ref_state, ref_consts, opt="sgd")
    for a, b in zip(jax.tree.leaves(final["params"]), jax.tree.leaves(ref["params"])):
        np.testing.assert_allclose(np.asarray(a)[[0, 2]], b, rtol=2e-5, atol=2e-6)


def test_evaluate_matches_direct_computation(problem):
    model, data = problem
    state, _ = make_members(model, [0, 1], [1e-3] * 2, [0.0] * 2, init_seeds=[1, 2])
    eval_set = train.batch_eval_set(data["x"], data["y"], batch_size=64)  # 200 = 3×64 + 8: exercises padding
    loss_M, acc_M = train.make_evaluate(model)(state["params"], eval_set)
    for k in range(2):
        logits = model.apply(jax.tree.map(lambda a: a[k], state["params"]), data["x"])
        loss = train.cross_entropy(logits, data["y"]).mean()
        acc = (logits.argmax(-1) == data["y"]).mean()
        assert float(loss_M[k]) == pytest.approx(float(loss), rel=1e-5)
        assert float(acc_M[k]) == pytest.approx(float(acc))


@pytest.mark.parametrize("kind, shape", [("mlp", (40,)), ("cnn", (40,)), ("cnn", (8, 8, 3))])
@pytest.mark.parametrize("norm", ["none", "layernorm"])
def test_models_build_vmap_and_count(kind, shape, norm):
    cfg = ModelConfig(kind=kind, width=8, depth=2, norm=norm)
    model = models.build(cfg, shape, 5)
    params_M = jax.vmap(model.init)(jax.random.split(jax.random.key(0), 3))
    logits = jax.vmap(model.apply, in_axes=(0, None))(params_M, jnp.ones((4, *shape)))
    assert logits.shape == (3, 4, 5)
    one = jax.tree.map(lambda a: a[0], params_M)
    assert models.param_count(one) == sum(int(np.prod(a.shape)) for a in jax.tree.leaves(one))
    assert ("norm0" in one) == (norm == "layernorm")
    assert one["head"]["kernel"].shape[-1] == 5


@pytest.mark.parametrize("kernel, shape", [((5,), (4, 40, 3)), ((3, 3), (4, 9, 9, 3))])
def test_patch_conv_equals_nnx_conv(kernel, shape):
    from flax import nnx

    reference = nnx.Conv(3, 8, kernel, strides=2, padding="SAME", rngs=nnx.Rngs(0))
    patched = models.PatchConv(3, 8, kernel, strides=2, padding="SAME", rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), shape)
    np.testing.assert_allclose(patched(x), reference(x), atol=1e-5)


def test_dropout_is_per_member_from_the_noise_stream_and_rate_zero_changes_nothing(problem):
    """Members 0–3 share their data order; their dropout rates are 0, 0.5, 0.5, 0.5 and their noise streams come
    from seeds 0, 0, 0, 1. A member at rate 0 trains exactly as without dropout; equal rates and streams give equal
    members; another stream or rate gives another member; evaluation never drops."""
    model, data = problem
    state, consts = make_members(model, [0] * 4, [1e-2] * 4, [0.0] * 4)
    plain = run(model, data, *make_members(model, [0], [1e-2], [0.0]))
    consts = {**consts, "dropout": jnp.asarray([0.0, 0.5, 0.5, 0.5]), "noise_key": train.member_keys([0, 0, 0, 1])["noise"]}
    dropped = run(model, data, state, consts)
    leaves = [np.asarray(leaf) for leaf in jax.tree.leaves(dropped["params"])]
    for a, b in zip(leaves, jax.tree.leaves(plain["params"])):
        np.testing.assert_array_equal(a[0], np.asarray(b)[0])  # rate 0: bit for bit the run without dropout
        np.testing.assert_array_equal(a[1], a[2])  # same rate, same stream
    assert not np.allclose(leaves[0][1], leaves[0][0])  # the rate takes effect
    assert not np.allclose(leaves[0][3], leaves[0][2])  # another noise stream, other masks
    params = jax.tree.map(lambda a: a[1], dropped["params"])
    x = data["x"][:8]
    np.testing.assert_array_equal(model.apply(params, x), model.apply(params, x))


@pytest.mark.parametrize("kind, shape", [("mlp", (FEATURES,)), ("cnn", (FEATURES,))])
def test_dropout_keeps_units_at_one_minus_the_rate_and_rescales_them(kind, shape):
    model = models.build(ModelConfig(kind=kind, width=64, depth=1), shape, CLASSES)
    params = model.init(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (256, *shape))
    clean = np.asarray(model.features(params, x))
    merged = nnx.merge(model.graphdef, params)
    dropped = np.asarray(merged.features(x, (jnp.float32(0.25), jax.random.key(2))))
    live = clean != 0
    kept = dropped[live] != 0
    assert abs(kept.mean() - 0.75) < 0.02  # units kept with probability 1 − rate
    np.testing.assert_allclose(dropped[live][kept], clean[live][kept] / 0.75, rtol=1e-6)
