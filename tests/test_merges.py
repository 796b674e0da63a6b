"""Model merges (task arithmetic, TIES, Model Stock) against plain references and hand-made cases whose answer is
known, and hyperparameter selection on a validation set."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlmc import analysis, merges, models, train
from jaxlmc.config import ModelConfig

# Members as flat vectors of D = 10 coordinates, split into a tree {"a": 2×3, "b": 4}; jax flattens a dict's leaves in
# key order, each row-major, so coordinate d of the flat vector is the same coordinate in the merges' flattening.
D = 10


def tree(flat_MxD):
    flat = jnp.asarray(np.asarray(flat_MxD, np.float32))
    return {"a": flat[:, :6].reshape(-1, 2, 3), "b": flat[:, 6:]}


def flat(tree_one):
    return np.concatenate([np.asarray(tree_one["a"]).reshape(-1), np.asarray(tree_one["b"]).reshape(-1)])


def flat_M(tree_M):
    return np.concatenate([np.asarray(tree_M["a"]).reshape(len(tree_M["b"]), -1), np.asarray(tree_M["b"])], axis=1)


def ties_reference(update_MxD, base_D, weights_M, density, scale):
    """TIES by the paper's steps, one member and one coordinate at a time (weighted election and mean, which are the
    paper's rule for 0/1 weights)."""
    num_members, num = update_MxD.shape
    k = int(np.round(density * num))
    trimmed = np.zeros_like(update_MxD, dtype=np.float64)
    for m in range(num_members):
        ranked = sorted(range(num), key=lambda d: (-abs(update_MxD[m, d]), d))  # ties: lower index first
        for d in ranked[:k]:
            trimmed[m, d] = update_MxD[m, d]
    merged = np.zeros(num)
    for d in range(num):
        taking_part = [m for m in range(num_members) if weights_M[m] > 0]
        elected = np.sign(sum(weights_M[m] * trimmed[m, d] for m in taking_part))
        agree = [m for m in taking_part if trimmed[m, d] != 0 and np.sign(trimmed[m, d]) == elected]
        if agree:
            merged[d] = sum(weights_M[m] * trimmed[m, d] for m in agree) / sum(weights_M[m] for m in agree)
    return base_D + scale * merged


# --------------------------------------------------------------------------------------------- TIES


def test_ties_hand_made_trim_election_and_disjoint_mean():
    update = np.array([
        [3.0, -1.0, 0.5, 2.0, 0.0, 0.0, 1.0, 0.0, 0.0, -4.0],  # top 3: -4 (9), 3 (0), 2 (3)
        [-1.0, -2.0, 0.5, 2.0, 2.0, 2.0, 0.1, 0.0, 0.0, 0.0],  # four of magnitude 2: keeps 1, 3, 4 and drops 5
        [-1.5, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 3.0, -2.5],  # top 3: 3 (8), -2.5 (9), -1.5 (0)
        [-10.0] * D,  # weight 0: would flip every elected sign if it took part
    ])
    start = np.tile(0.25 * np.arange(D) - 1.0, (4, 1))  # quarters: start + update and back are exact in float32
    weights = jnp.asarray([1.0, 1.0, 1.0, 0.0])
    merged = merges.ties(tree(start + update), tree(start), weights, 0.3, 1.0)
    # Coordinate 0: 3 − 1.5 elects +, so only member 0 counts (3); 9: −4 and −2.5 agree (−3.25); 2 and 5: all trimmed.
    expected_update = np.array([3.0, -2.0, 0.0, 2.0, 2.0, 0.0, 0.0, 0.0, 3.0, -3.25])
    np.testing.assert_allclose(flat(merged), start[0] + expected_update, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(flat(merged), ties_reference(update, start[0], np.asarray(weights), 0.3, 1.0),
                               rtol=1e-6, atol=1e-6)
    scaled = merges.ties(tree(start + update), tree(start), weights, 0.3, 0.5)
    np.testing.assert_allclose(flat(scaled), start[0] + 0.5 * expected_update, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("density", [0.2, 0.5, 1.0])
def test_ties_matches_reference_on_random_updates(density):
    rng = np.random.default_rng(1)
    start = rng.normal(size=(5, D))  # a start per member: updates are per member, the base is member 1's start
    update = rng.normal(size=(5, D)) * rng.choice([0.1, 1.0, 3.0], size=(5, D))
    update[2, :4] = update[2, 4:8]  # equal magnitudes inside one member
    weights = np.array([0.0, 1.0, 0.5, 2.0, 1.0], np.float32)
    params_M, start_M = tree((start + update).astype(np.float32)), tree(start.astype(np.float32))
    merged = merges.ties(params_M, start_M, jnp.asarray(weights), density, 1.3)
    exact_update = flat_M(params_M).astype(np.float64) - flat_M(start_M)
    expected = ties_reference(exact_update, flat_M(start_M)[1], weights, density, 1.3)
    np.testing.assert_allclose(flat(merged), expected, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------- task arithmetic


def test_task_arithmetic_sums_updates_and_one_over_k_is_the_uniform_soup():
    rng = np.random.default_rng(2)
    start = np.tile(rng.normal(size=(1, D)), (4, 1)).astype(np.float32)  # one shared start, as in a grid cell
    params = (start + 0.1 * rng.normal(size=(4, D))).astype(np.float32)
    weights = jnp.asarray([1.0, 0.0, 1.0, 1.0])
    merged = merges.task_arithmetic(tree(params), tree(start), weights, 0.7)
    update = params.astype(np.float64) - start
    np.testing.assert_allclose(flat(merged), start[0] + 0.7 * update[[0, 2, 3]].sum(0), rtol=1e-6, atol=1e-6)
    soup = analysis.soup(tree(params), weights)
    np.testing.assert_allclose(flat(merges.task_arithmetic(tree(params), tree(start), weights, 1.0 / 3.0)),
                               flat(soup), rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------- Model Stock


def test_model_stock_two_updates_at_sixty_degrees():
    start = np.tile(np.arange(D, dtype=np.float64) / D, (3, 1))
    update = np.zeros((3, D))
    update[0, 0] = 2.0
    update[1, 0], update[1, 1] = 3.0 * 0.5, 3.0 * np.sqrt(3.0) / 2.0  # 60° from member 0, another length
    update[2] = np.linspace(-5.0, 5.0, D)  # not in the group
    params = start + update
    merged, t, cos = merges.model_stock(tree(params), tree(start), jnp.asarray([1.0, 1.0, 0.0]))
    assert float(cos) == pytest.approx(0.5, abs=1e-6)
    assert float(t) == pytest.approx(2.0 / 3.0, abs=1e-6)  # N cos / (1 + (N − 1) cos) = 1 / 1.5
    expected = 2.0 / 3.0 * params[:2].mean(0) + 1.0 / 3.0 * start[0]
    np.testing.assert_allclose(flat(merged), expected, rtol=1e-6, atol=1e-6)


def test_model_stock_three_members_and_a_single_member():
    rng = np.random.default_rng(3)
    start = np.tile(rng.normal(size=(1, D)), (4, 1))
    shared = rng.normal(size=(1, D))
    update = shared + 0.7 * rng.normal(size=(4, D))  # positively correlated updates
    params = start + update
    merged, t, cos = merges.model_stock(tree(params), tree(start), jnp.asarray([1.0, 0.0, 1.0, 1.0]))
    unit = update[[0, 2, 3]] / np.linalg.norm(update[[0, 2, 3]], axis=1, keepdims=True)
    cos_ref = np.mean([unit[0] @ unit[1], unit[0] @ unit[2], unit[1] @ unit[2]])
    t_ref = 3 * cos_ref / (1 + 2 * cos_ref)
    assert float(cos) == pytest.approx(cos_ref, abs=1e-5)
    assert float(t) == pytest.approx(t_ref, abs=1e-5)
    np.testing.assert_allclose(flat(merged), t_ref * params[[0, 2, 3]].mean(0) + (1 - t_ref) * start[0],
                               rtol=1e-5, atol=1e-5)
    # One member: no angle (NaN), t = 1, the member itself.
    alone, t1, cos1 = merges.model_stock(tree(params), tree(start), jnp.asarray([0.0, 1.0, 0.0, 0.0]))
    assert np.isnan(float(cos1)) and float(t1) == 1.0
    np.testing.assert_allclose(flat(alone), params[1], rtol=1e-6, atol=1e-6)


def test_mean_update_cosine_against_numpy_with_padding():
    rng = np.random.default_rng(4)
    start = (100.0 + rng.normal(size=(6, D))).astype(np.float32)  # large weights, small updates
    params = (start + 0.01 * rng.normal(size=(6, D))).astype(np.float32)
    params[5] = start[5]  # a zero update
    idx = np.array([[0, 2, -1], [1, 3, 4], [2, -1, -1], [0, 5, -1]])
    cos = np.asarray(merges.mean_update_cosine(tree(params), tree(start), jnp.asarray(idx)))
    update = params.astype(np.float64) - start.astype(np.float64)

    def reference(members):
        unit = update[members] / np.linalg.norm(update[members], axis=1, keepdims=True)
        return np.mean([unit[i] @ unit[j] for i in range(len(members)) for j in range(i + 1, len(members))])

    np.testing.assert_allclose(cos[:2], [reference([0, 2]), reference([1, 3, 4])], rtol=1e-5, atol=1e-6)
    assert np.isnan(cos[2]) and np.isnan(cos[3])  # one member; a zero update


# --------------------------------------------------------------------------------------------- groups


def test_padded_groups_merge_like_their_members_alone():
    rng = np.random.default_rng(5)
    start = np.tile(rng.normal(size=(1, D)), (5, 1)).astype(np.float32)
    params = (start + rng.normal(size=(5, D)) + 0.5).astype(np.float32)
    idx = np.array([[0, 2, -1], [1, 3, 4]])
    weights_GxM = analysis.group_weights(idx, 5)
    cases = [("task_arithmetic", {"scale": 0.5}), ("ties", {"density": 0.3, "scale": 1.2}), ("model_stock", {})]
    for method, hyper in cases:
        merged_G, aux_G = merges.merge_groups(tree(params), tree(start), weights_GxM, method, hyper)
        for g, row in enumerate(idx):
            members = row[row >= 0]
            sub, ones = tree(params[members]), jnp.ones(len(members))
            if method == "task_arithmetic":
                alone = merges.task_arithmetic(sub, tree(start[members]), ones, 0.5)
            elif method == "ties":
                alone = merges.ties(sub, tree(start[members]), ones, 0.3, 1.2)
            else:
                alone, t, cos = merges.model_stock(sub, tree(start[members]), ones)
                assert float(aux_G["t"][g]) == pytest.approx(float(t), abs=1e-6)
                assert float(aux_G["cos"][g]) == pytest.approx(float(cos), abs=1e-6)
            np.testing.assert_allclose(flat(jax.tree.map(lambda a, g=g: a[g], merged_G)), flat(alone),
                                       rtol=1e-6, atol=1e-6, err_msg=f"{method}, group {g}")


# --------------------------------------------------------------------------------------------- selection


@pytest.fixture(scope="module")
def tiny():
    """Four members of a tiny MLP around one start: members 0, 1 each move half-way to a target model (their sum of
    updates reaches it), members 2, 3 a quarter of the way (twice their sum reaches it). Labels are the target's."""
    model = models.build(ModelConfig(kind="mlp", width=8, depth=1), (4,), 3)
    inits = jax.vmap(model.init)(jax.random.split(jax.random.key(0), 4))
    start = jax.tree.map(lambda a: a[0], inits)
    target = jax.tree.map(lambda a: 3.0 * a[1], inits)  # a larger move than the init scale
    wiggle = jax.tree.map(lambda a: 0.02 * a[2], inits)  # members of a group differ; their sum does not
    fractions, signs = jnp.asarray([0.5, 0.5, 0.25, 0.25]), jnp.asarray([1.0, -1.0, 1.0, -1.0])

    def member(s, t, w):
        shape = (4,) + (1,) * s.ndim
        return s[None] + fractions.reshape(shape) * (t - s)[None] + signs.reshape(shape) * w[None]

    params_M = jax.tree.map(member, start, target, wiggle)
    start_M = jax.tree.map(lambda a: jnp.broadcast_to(a, (4, *a.shape)), start)
    rng = np.random.default_rng(6)
    x = rng.normal(size=(400, 4)).astype(np.float32) * 2.0
    y = np.asarray(model.apply(target, jnp.asarray(x))).argmax(-1).astype(np.int32)
    return model, params_M, start_M, start, target, x, y


def test_choose_on_validation_picks_the_best_scale_per_group(tiny):
    model, params_M, start_M, start, target, x, y = tiny
    val_set, test_set = train.batch_eval_set(x[:300], y[:300], 128), train.batch_eval_set(x[300:], y[300:], 128)
    idx = np.array([[0, 1, -1], [2, 3, -1], [-1, -1, -1]])  # padded groups and an empty one
    grid = merges.hyper_grid(scale=[0.25, 0.5, 1.0, 1.5, 2.0])
    merged_eval = merges.make_merged_eval(model)
    choice = merges.choose_on_validation(model, params_M, start_M, idx, val_set, "task_arithmetic", grid,
                                         merged_eval)
    # Ground truth: every merge of the grid evaluated one at a time.
    evaluate = jax.jit(lambda p, s: train.loss_and_error(model, p, s))
    manual = np.array([[1.0 - float(evaluate(merges.task_arithmetic(params_M, start_M, w, h["scale"]), val_set)[1])
                        for h in grid] for w in jnp.asarray(analysis.group_weights(idx[:2], 4))])
    np.testing.assert_allclose(choice["val_acc_GxH"][:2], manual, atol=1e-6)
    np.testing.assert_array_equal(choice["index_G"], [2, 4, -1])  # scale 1 reaches the target, and 2 for halves
    np.testing.assert_array_equal(choice["index_G"][:2], manual.argmax(axis=1))
    assert manual[0, 2] > np.delete(manual[0], 2).max() and manual[1, 4] > manual[1, :4].max()
    np.testing.assert_allclose(choice["hyper"]["scale"][:2], [1.0, 2.0])
    assert np.isnan(choice["hyper"]["scale"][2]) and np.isnan(choice["val_acc_GxH"][2]).all()

    # Test accuracy afterwards, at the chosen scales only.
    out = merges.evaluate_chosen(model, params_M, start_M, idx, "task_arithmetic", choice, {"test": test_set},
                                 merged_eval)
    loss_G, acc_G = out["test"]
    for g, scale in enumerate([1.0, 2.0]):
        w = jnp.asarray(analysis.group_weights(idx[g:g + 1], 4)[0])
        ref_loss, ref_err = evaluate(merges.task_arithmetic(params_M, start_M, w, scale), test_set)
        assert acc_G[g] == pytest.approx(1.0 - float(ref_err), abs=1e-6)
        assert loss_G[g] == pytest.approx(float(ref_loss), rel=1e-5)
    assert np.isnan(acc_G[2])

    # The choice follows the validation labels: labelled by the model half-way to the target, group 0 picks 0.5.
    halfway = jax.tree.map(lambda s, t: s + 0.5 * (t - s), start, target)
    y_half = np.asarray(model.apply(halfway, jnp.asarray(x[:300]))).argmax(-1).astype(np.int32)
    again = merges.choose_on_validation(model, params_M, start_M, idx, train.batch_eval_set(x[:300], y_half, 128),
                                        "task_arithmetic", grid, merged_eval)
    assert again["index_G"][0] == 1


def test_choose_on_validation_breaks_ties_by_grid_order_and_runs_every_method(tiny):
    model, params_M, start_M, _, _, x, y = tiny
    val_set = train.batch_eval_set(x[:300], y[:300], 128)
    idx = np.array([[0, 1, -1], [2, 3, -1]])
    merged_eval = merges.make_merged_eval(model)
    # Equal settings tie exactly: the first one wins.
    grid = [{"scale": 1.0}, {"scale": 1.0}, {"scale": 0.25}]
    choice = merges.choose_on_validation(model, params_M, start_M, idx, val_set, "task_arithmetic", grid,
                                         merged_eval)
    assert choice["val_acc_GxH"][0, 0] == choice["val_acc_GxH"][0, 1]
    np.testing.assert_array_equal(choice["index_G"], [0, 0])
    # TIES's default grid and Model Stock: accuracies of each group's merges, chosen as the first maximum.
    for method in ("ties", "model_stock"):
        choice = merges.choose_on_validation(model, params_M, start_M, idx, val_set, method,
                                             merged_eval=merged_eval)
        acc = choice["val_acc_GxH"]
        assert acc.shape == (2, len(merges.DEFAULT_GRIDS[method])) and np.isfinite(acc).all()
        np.testing.assert_array_equal(choice["index_G"], acc.argmax(axis=1))
    # TIES at density 1 and scale 1 with two members keeps all of both updates: where they agree in sign, their
    # mean; the evaluator must give the accuracy of exactly that merge.
    w = jnp.asarray([1.0, 1.0, 0.0, 0.0])
    ref = merges.ties(params_M, start_M, w, 1.0, 1.0)
    _, ref_err = train.loss_and_error(model, ref, val_set)
    _, acc = merged_eval(params_M, start_M, w[None], val_set, "ties", {"density": [[1.0]], "scale": [[1.0]]})
    assert float(acc[0, 0]) == pytest.approx(1.0 - float(ref_err), abs=1e-6)
