"""The study's controls: head policies, unfit members, disjoint key streams, the member bootstrap and the noise
floor (jaxlmc.stats), and evaluation under resampled examples."""
import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlmc import (api, barrier_stage, config, decide, finetuning, grid, models, rundir, stats, study, tasks, train,
                    verdicts)
from conftest import TINY


@pytest.fixture(scope="module")
def heads_run(build_once, data_dir):
    cfg = config.load("configs/mnist1d.toml", TINY + [
        f'data.data_dir="{data_dir}"', 'finetune.heads=["per_seed", "shared", "zero", "probe"]', "finetune.seeds=3",
        "finetune.lrs=[0.01]", "finetune.scratch=true", "barriers.alphas=5", "data.validation_size=300",
        "study.sharpness_iterations=0"])  # (sharpness: tests/test_sharpness.py and the tiny study)
    out, _ = build_once("heads", lambda path: study.study(cfg, path, progress=False))
    return cfg, out


@pytest.mark.slow
def test_head_policies_start_where_they_say(heads_run):
    cfg, out = heads_run
    members = rundir.RunDir(out).members()
    task = tasks.load_finetune_task(cfg)
    model = models.build(cfg.model, task.input_shape, task.train.num_classes)
    start_M = api.start_params(cfg, out, model, members, task.train)
    kernel = np.asarray(start_M["head"]["kernel"])
    cell = lambda step, head: [m["member"] for m in members if (m["pretrain_step"], m["head"]) == (step, head)]  # noqa

    for step in (0, 60):
        shared, zero, probe, own = cell(step, "shared"), cell(step, "zero"), cell(step, "probe"), cell(step, "per_seed")
        for ids in (shared, zero, probe):  # every seed starts bit-identical: only the data order differs
            assert len(ids) == 3 and all(np.array_equal(kernel[ids[0]], kernel[i]) for i in ids)
        assert not np.allclose(kernel[own[0]], kernel[own[1]])  # a random head per seed
        assert not np.any(kernel[zero[0]]) and not np.any(np.asarray(start_M["head"]["bias"])[zero[0]])
    # One shared head for every checkpoint; the probe is fitted per body, so it differs between checkpoints.
    np.testing.assert_array_equal(kernel[cell(0, "shared")[0]], kernel[cell(60, "shared")[0]])
    assert not np.allclose(kernel[cell(0, "probe")[0]], kernel[cell(60, "probe")[0]])
    # Scratch: each seed its own body, so its own probe.
    scratch_probe = cell(-1, "probe")
    assert not np.allclose(kernel[scratch_probe[0]], kernel[scratch_probe[1]])

    # finetune.seed_offset k: seed s starts as seed s + k did (its head, its scratch body); the shared head is new.
    offset = dataclasses.replace(cfg, finetune=dataclasses.replace(cfg.finetune, seed_offset=1))
    moved_M = api.start_params(offset, out, model, members, task.train)
    moved = np.asarray(moved_M["head"]["kernel"])
    for step in (-1, 60):
        own = cell(step, "per_seed")
        np.testing.assert_array_equal(moved[own[0]], kernel[own[1]])
        assert not np.allclose(moved[own[2]], kernel[own[2]])
    scratch = cell(-1, "per_seed")
    np.testing.assert_array_equal(np.asarray(moved_M["dense0"]["kernel"])[scratch[0]],
                                  np.asarray(start_M["dense0"]["kernel"])[scratch[1]])
    assert not np.allclose(moved[cell(0, "shared")[0]], kernel[cell(0, "shared")[0]])
    keys = [grid.member_consts(f, members[:2])["data_key"] for f in (offset.finetune, cfg.finetune)]
    assert jax.random.key_data(keys[0][0]).tolist() == jax.random.key_data(keys[1][1]).tolist()

    # The probe head works: its start is far better than chance (a random head's), on the training data it was fit on
    evaluate = train.make_evaluate(model)
    sets = tasks.eval_sets(cfg, task)
    _, acc_M = evaluate(start_M, sets["train"])
    acc_M = np.asarray(acc_M)
    probe_60, own_60 = cell(60, "probe"), cell(60, "per_seed")
    assert acc_M[probe_60].mean() > acc_M[own_60].mean() + 0.15
    assert acc_M[probe_60].mean() > 1.5 / task.train.num_classes


@pytest.mark.slow
def test_head_policy_is_recorded_and_the_report_separates_the_sources(heads_run):
    cfg, out = heads_run
    members = rundir.RunDir(out).members()
    assert {m["head"] for m in members} == {"per_seed", "shared", "zero", "probe"}
    varies = {(m["pretrain_step"] < 0, m["head"]): m["seed_varies"] for m in members}
    assert varies[(False, "per_seed")] == "data order+head init" and varies[(True, "per_seed")] == \
        "data order+body init+head init"
    assert varies[(False, "shared")] == varies[(False, "probe")] == varies[(False, "zero")] == "data order"
    html = open(f"{out}/report.html").read()
    assert "Sources of randomness" in html and "with one shared head" in html.lower()
    assert os.path.exists(os.path.join(out, "figures", "sources.png"))
    summary = rundir.RunDir(out).read_csv(rundir.BARRIER_SUMMARY)
    assert all(np.isfinite(r["error_barrier_test_floor_mean"]) for r in summary if r["pairs"])


@pytest.mark.slow
def test_the_start_barrier_is_measured_to_the_probe_start(heads_run):
    cfg, out = heads_run
    members = rundir.RunDir(out).members()
    task = tasks.load_finetune_task(cfg)
    model = models.build(cfg.model, task.input_shape, task.train.num_classes)
    probe_M = api.start_params(cfg, out, model, members, task.train, heads="probe")
    own_M = api.start_params(cfg, out, model, members, task.train)
    is_probe = np.array([m["head"] == "probe" for m in members])
    same = np.all(np.asarray(probe_M["head"]["kernel"]) == np.asarray(own_M["head"]["kernel"]), axis=(1, 2))
    np.testing.assert_array_equal(same, is_probe)  # probe members' own start is the probe start; others' is not
    # The to-start curve's α = 0 end is the start: its test error is the probe start's, not chance.
    curves = rundir.RunDir(out).read_npz(rundir.CURVES)
    start_err = curves["start_error_test"][:, -1]  # pairs are (member, start): α = 1 is the start
    assert np.all(start_err < 1 - 1.5 / task.train.num_classes)


def test_unfit_members_are_flagged_and_left_out():
    rows = [{"member": i, "pretrain_step": step, "head": "per_seed", "train_acc": acc, "diverged": div}
            for i, (step, acc, div) in enumerate([(0, 0.95, False), (0, 0.90, False), (0, 0.50, False),
                                                  (0, 0.99, True), (-1, 0.60, False), (-1, 0.58, False)])]
    # 0.9 × the best non-diverged train accuracy from the same start (0.95 at step 0, 0.60 from scratch).
    assert grid.unfit_flags(rows, 0.9) == [False, False, True, False, False, False]
    assert grid.unfit_flags(rows, 0.0) == [False] * 6
    members = [{**r, "lr": 0.1, "weight_decay": 0.0, "schedule": "cosine", "dropout": 0.0, "seed": i % 3,
                "unfit": u} for i, (r, u) in enumerate(zip(rows, grid.unfit_flags(rows, 0.9)))]
    pairs, left_out = barrier_stage.select_pairs("all", members)
    assert all(2 not in p and 3 not in p for p in pairs) and left_out == 15 - len(pairs) == 9


def test_failure_is_absolute_and_members_that_lose_the_pretraining_left():
    """Unfit: train accuracy not above chance + margin (here 0.2 + 0.05), whatever the best from the same start; a
    member that trains (0.55) but ends below its probed start's test accuracy is reported as having left."""
    rows = [{"member": i, "pretrain_step": 0, "head": "shared", "train_acc": acc, "diverged": div}
            for i, (acc, div) in enumerate([(0.99, False), (0.55, False), (0.24, False), (0.10, True)])]
    assert grid.unfit_flags(rows, 0.0, chance=0.2, margin=0.05) == [False, False, True, False]
    assert grid.unfit_flags(rows, 0.8, chance=0.2, margin=0.05) == [False, True, True, False]  # + relative
    members = [{**r, "lr": 0.01, "weight_decay": 0.0, "schedule": "cosine", "dropout": 0.0, "seed": r["member"],
                "test_acc": 0.6, "unfit": u}
               for r, u in zip(rows, grid.unfit_flags(rows, 0.0, chance=0.2, margin=0.05))]
    starts = [{"member": m, "start_error_test": 0.3} for m in (0, 1)]  # probed start: 0.7 test accuracy
    failed, left = verdicts.failures(members, starts)
    assert failed.startswith("1 members diverged and 1 did not train") and left.startswith(
        "2 members trained but ended below their probed start's test accuracy"), (failed, left)
    stricter = verdicts.relative_unfit(members)
    assert [m["unfit"] for m in stricter] == [False, True, True, False]


def test_chance_is_the_most_frequent_labels_share(data_dir):
    """The default config's absolute rule: chance is the most frequent label's share of the train-evaluation subset."""
    cfg = config.load("configs/mnist1d.toml", [f'data.data_dir="{data_dir}"', "data.pretrain_task=mnist1d"])
    task = tasks.load_finetune_task(cfg)
    chance = finetuning.chance_accuracy(cfg, task)
    labels = task.train.y[:cfg.data.train_eval_size]
    assert chance == max(np.mean(labels == c) for c in range(task.train.num_classes)) and 0.15 < chance < 0.3
    assert cfg.study.fit_margin == 0.05 and cfg.study.unfit_fraction == 0.0


@pytest.mark.slow
def test_unfit_members_in_a_real_run(data_dir, tmp_path):
    cfg = config.load("configs/mnist1d.toml", TINY + [
        f'data.data_dir="{data_dir}"', "study.unfit_fraction=0.9", "finetune.lrs=[0.001, 3.0]",
        "finetune.pretrain_steps=[60]", "finetune.seeds=2", "barriers.alphas=3"])
    out = str(tmp_path / "run")
    members = api.finetune(cfg, out)
    bad = [m for m in members if m["lr"] == 3.0]
    assert all(m["unfit"] or m["diverged"] for m in bad)
    assert not any(m["unfit"] for m in members if m["lr"] == 0.001 and m["train_acc"] >= 0.9 * max(
        x["train_acc"] for x in members if not x["diverged"]))
    result = api.barriers_of_run(cfg, out)
    used = {r["member"] for r in result["to_start"]}
    assert used == {m["member"] for m in members if not (m["unfit"] or m["diverged"])}
    assert result["settings"]["unfit_members"] == sum(m["unfit"] for m in members)


def test_pretraining_and_fine_tuning_key_streams_are_disjoint():
    seeds = [0, 1, 2, 3]
    keys = [k for phase in train.STREAMS for k in train.stream_keys(phase, seeds).values()]
    data = np.concatenate([np.asarray(jax.random.key_data(k)).reshape(len(seeds), -1) for k in keys])
    assert len({tuple(row) for row in data}) == len(data)
    # Pretraining with seed 0 no longer draws fine-tuning seed 0's head or data order.
    pre, fine = train.stream_keys("pretrain", [0]), train.member_keys([0])
    for a in pre.values():
        for b in fine.values():
            assert not np.array_equal(jax.random.key_data(a), jax.random.key_data(b))


def test_evaluation_under_resampled_examples():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(130, 4)).astype(np.float32), rng.integers(0, 3, 130)
    model = models.build(config.ModelConfig(width=8, depth=1), (4,), 3)
    params = model.init(jax.random.key(0))
    counts = train.resample_counts(130, 7)
    assert counts.shape == (7, 130) and np.all(counts.sum(1) == 130)
    plain = train.loss_and_error(model, params, train.batch_eval_set(x, y, 32))
    both = train.loss_and_error(model, params, train.batch_eval_set(x, y, 32, counts))
    np.testing.assert_allclose(both[0][0], plain[0], rtol=1e-6)
    np.testing.assert_allclose(both[1][0], plain[1], rtol=1e-6)
    logits = np.asarray(model.apply(params, jnp.asarray(x)))
    wrong = (logits.argmax(-1) != y).astype(np.float64)
    np.testing.assert_allclose(both[1][1:], counts @ wrong / 130, rtol=1e-5)


def test_member_bootstrap_resamples_seeds_not_pairs():
    rng = np.random.default_rng(0)
    num_seeds = 8
    effect = rng.normal(size=num_seeds)  # a per-member effect: pairs that share a member are correlated
    matrix = effect[:, None] + effect[None, :] + 0.05 * rng.normal(size=(num_seeds, num_seeds))
    matrix = (matrix + matrix.T) / 2
    np.fill_diagonal(matrix, np.nan)
    draws = stats.seed_draws(num_seeds, 2000)
    # A draw of every seed once gives the plain mean over pairs; a seed drawn twice never pairs with itself.
    np.testing.assert_allclose(stats.pair_replicates(matrix, np.arange(num_seeds)[None]), stats.pair_mean(matrix))
    assert np.isnan(stats.pair_replicates(matrix, np.zeros((1, num_seeds), int)))[0]
    member_lo, member_hi = stats.ci(stats.pair_replicates(matrix, draws))
    values = matrix[np.triu_indices(num_seeds, 1)]
    pair_means = values[rng.integers(0, values.size, (2000, values.size))].mean(1)
    pair_lo, pair_hi = np.quantile(pair_means, [0.025, 0.975])
    assert member_hi - member_lo > 1.5 * (pair_hi - pair_lo)  # dependent pairs: the honest interval is wider


def _curves(rng, num_pairs, num_alphas, n, bump, resamples):
    """Error curves of pairs whose α models each make independent errors at rate 0.3 (+ bump at the middle)."""
    alphas = np.linspace(0, 1, num_alphas)
    p = 0.3 + bump * np.sin(np.pi * alphas)
    wrong_PxAxN = (rng.random((num_pairs, num_alphas, n)) < p[None, :, None]).astype(np.float64)
    counts = train.resample_counts(n, resamples, seed=1)
    plain = wrong_PxAxN.mean(-1)
    resampled = wrong_PxAxN @ counts.T / n
    return alphas, np.concatenate([plain[..., None], resampled], axis=-1)


def test_noise_floor_is_calibrated_and_a_model_against_itself_is_one_basin():
    rng = np.random.default_rng(0)
    alphas, flat = _curves(rng, 300, 11, 400, 0.0, 200)
    barrier = stats.barrier(flat[..., 0], alphas)
    floor = stats.noise_floor(flat, alphas)
    assert barrier.mean() > 0.02  # a flat curve's measured barrier is positive: the max picks noise
    assert 0.01 < np.mean(barrier > floor) < 0.12  # ≈ 5 % of truly flat pairs exceed their 95 % floor
    for form in stats.FORMS:
        lin_floor = stats.noise_floor(flat, alphas, form)
        assert np.all(lin_floor > 0)
    _, bumped = _curves(rng, 100, 11, 400, 0.15, 200)
    assert np.mean(stats.barrier(bumped[..., 0], alphas) > stats.noise_floor(bumped, alphas)) > 0.95
    # A model against itself: the same per-example errors at every α, so barrier 0, floor 0, one basin.
    wrong = (rng.random(400) < 0.3).astype(np.float64)
    counts = train.resample_counts(400, 50)
    curve = np.broadcast_to(np.concatenate([[wrong.mean()], counts @ wrong / 400]), (1, 11, 51))
    assert stats.barrier(curve[..., 0], alphas)[0] == 0 and stats.noise_floor(curve, alphas)[0] == 0
    null = stats.null_barriers(curve, alphas, "_lin").mean(axis=1)
    assert null[0] == 0 and stats.barrier(curve[..., 0], alphas, "_lin")[0] == 0
    self_cell = decide.Estimate(0.0, np.zeros(8))  # eight members each against itself: excess and barrier 0
    assert decide.verdict(*decide.p_values(self_cell, self_cell)) == "one basin"

