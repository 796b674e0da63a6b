"""The one decision rule (jaxlmc.decide): the jackknife interval over seeds, its coverage, the equivalence verdict,
the Benjamini–Hochberg adjustment, and the summary's verdict columns; its calibration (jaxlmc.calibration)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from flax import nnx

import jaxlmc
from jaxlmc import calibration, config, data, decide, finetuning, interpolation, models, paths, planner, stats, verdicts
from jaxlmc.settings import ModelConfig


def _cell(rng, seeds, member_sd, pair_sd, mean=0.0):
    u = rng.normal(0, member_sd, seeds)
    e = rng.normal(0, pair_sd, (seeds, seeds))
    return mean + u[:, None] + u[None, :] + (e + e.T) / np.sqrt(2)


def test_the_leave_one_seed_out_values_are_the_means_without_that_seed():
    rng = np.random.default_rng(0)
    matrix = _cell(rng, 7, 1.0, 1.0)
    matrix[1, 4] = matrix[4, 1] = np.nan  # a pair left out (a member diverged in one pair's cell, say)
    est = decide.of_pairs(matrix)
    for s in range(7):
        keep = np.delete(np.arange(7), s)
        sub = matrix[np.ix_(keep, keep)][~np.eye(6, dtype=bool)]
        assert est.jack_S[s] == pytest.approx(np.nanmean(sub))
    assert est.point == pytest.approx(stats.pair_mean(matrix))
    values = rng.normal(size=9)
    lo, hi = decide.of_members(values).interval()  # a per-member mean: the jackknife is Student's t interval
    half = scipy.stats.t.ppf(0.975, 8) * values.std(ddof=1) / 3
    assert (lo, hi) == pytest.approx((values.mean() - half, values.mean() + half))


def test_the_interval_covers_at_eight_seeds_where_the_percentile_bootstrap_does_not():
    """Simulated cells with member effects (every pair of a member shares its effect): at 8 seeds the jackknife t
    interval covers the true mean 93–99 % of the time; the percentile member bootstrap, under 93 %."""
    rng = np.random.default_rng(3)
    draws = stats.seed_draws(8, 500, 1)
    jack, boot, n = 0, 0, 300
    for _ in range(n):
        matrix = _cell(rng, 8, 1.0, 0.5)
        lo, hi = decide.of_pairs(matrix).interval()
        jack += lo <= 0 <= hi
        lo, hi = stats.ci(stats.pair_replicates(matrix, draws))
        boot += lo <= 0 <= hi
    assert 0.93 <= jack / n <= 0.99, jack / n
    assert boot / n < 0.93, boot / n


def test_the_minimum_detectable_excess_is_found_four_times_in_five():
    """A cell whose true mean is its design's minimum detectable value is called above 0 in about 80 % of draws."""
    rng = np.random.default_rng(5)
    mde = np.median([decide.of_pairs(_cell(rng, 12, 1.0, 1.0)).min_detectable() for _ in range(200)])
    found = np.mean([decide.of_pairs(_cell(rng, 12, 1.0, 1.0, mean=mde)).p_above(0.0) < 0.025 for _ in range(400)])
    assert 0.7 <= found <= 0.9, found


def test_verdicts_one_basin_only_below_the_margin_separate_only_above_zero():
    def estimate(point, se):  # an estimate over 10 seeds with this point value and standard error
        jack = point + se * np.linspace(-1, 1, 10) / np.sqrt(9 / 10 * np.sum(np.linspace(-1, 1, 10) ** 2))
        return decide.Estimate(point, jack)

    assert estimate(0.01, 0.002).se == pytest.approx(0.002)
    cases = {"clearly small": (estimate(0.0, 0.001), estimate(0.005, 0.002)),
             "barrier near the margin": (estimate(0.0, 0.001), estimate(0.019, 0.002)),
             "excess above 0": (estimate(0.03, 0.005), estimate(0.035, 0.005)),
             "wide": (estimate(0.004, 0.004), estimate(0.01, 0.006)),
             "detectable but below the margin": (estimate(0.006, 0.001), estimate(0.011, 0.001))}
    found = {k: decide.verdict(*decide.p_values(*v, margin=0.02)) for k, v in cases.items()}
    assert found == {"clearly small": "one basin", "barrier near the margin": "not resolved",
                     "excess above 0": "separate basins", "wide": "not resolved",
                     "detectable but below the margin": "one basin"}
    # The margin is the researcher's: at 0.05 the barrier near 0.02 is within it.
    assert decide.verdict(*decide.p_values(*cases["barrier near the margin"], margin=0.05)) == "one basin"


def test_many_cells_are_adjusted_together():
    """Benjamini–Hochberg: one cell at p = 0.01 is "separate" alone, but not among 40 cells at p ≈ 0.5."""
    np.testing.assert_allclose(decide.adjust([0.01, 0.04, 0.03, np.nan]), [0.03, 0.04, 0.04, np.nan])
    borderline = (decide.Estimate(0.0, np.zeros(8)), None)

    def tests(n_null):
        jack = np.linspace(-1, 1, 10)
        scale = np.sqrt(9 / 10 * np.sum(jack ** 2))
        out = {"x": (decide.Estimate(0.01 * scipy.stats.t.isf(0.01, 9), 0.01 * jack / scale),
                     decide.Estimate(0.5, 0.01 * jack / scale))}
        for k in range(n_null):
            out[k] = (decide.Estimate(0.0, 0.01 * jack / scale), decide.Estimate(0.5, 0.01 * jack / scale))
        return out

    assert borderline[0].se == 0.0
    assert decide.decide_all(tests(0))["x"]["verdict"] == "separate basins"
    assert decide.decide_all(tests(40))["x"]["verdict"] == "not resolved"


def test_a_verdict_one_monte_carlo_error_of_the_null_mean_moves_is_not_resolved():
    """An excess whose interval's lower end is 0.002 above 0: separate — unless its null mean's Monte-Carlo error is
    0.003, which moves the lower end below 0; one basin (decided on the barrier) does not move."""
    jack = np.linspace(-1, 1, 8)
    se_unit = np.sqrt(7 / 8 * np.sum(jack ** 2))
    half = scipy.stats.t.ppf(0.975, 7) * 0.004
    excess = decide.Estimate(half + 0.002, 0.004 * jack / se_unit)
    barrier = decide.Estimate(0.1, 0.004 * jack / se_unit)
    inside = decide.Estimate(0.005, 0.001 * jack / se_unit)
    tests = {"edge": (excess, barrier), "within": (inside, inside)}
    plain = decide.decide_all(tests)
    assert plain["edge"]["verdict"] == "separate basins" and plain["edge"]["mc_moved"] == 0.0
    shaken = decide.decide_all(tests, shifts={"edge": 0.003, "within": 0.003})
    assert shaken["edge"]["verdict"] == "not resolved" and shaken["edge"]["mc_moved"] == 1.0
    assert shaken["within"]["verdict"] == "one basin" and shaken["within"]["mc_moved"] == 0.0
    assert decide.decide_all(tests, shifts={"edge": 0.001})["edge"]["verdict"] == "separate basins"


def test_the_summary_has_each_cells_verdict_and_detectable_excess():
    """cell_summary on pair rows with null means: the excess is barrier − null mean, its interval is the jackknife's,
    and each cell gets its verdict (here one cell in one basin, one separated)."""
    rng = np.random.default_rng(2)
    members, pairs, starts = [], [], []
    for c, (lr, bump) in enumerate(((1e-3, 0.0), (1e-2, 0.04))):
        for s in range(8):
            members.append({"member": c * 8 + s, "seed": s, "lr": lr, "diverged": False})
        for a in range(8):
            for b in range(a + 1, 8):
                null = 0.004 + 0.001 * rng.random()
                pairs.append({"i": c * 8 + a, "j": c * 8 + b, "same_cell": True, "lr": lr,
                              "error_barrier_test_lin": bump + null + 0.002 * rng.normal(),
                              "error_barrier_test_lin_null": null, "error_barrier_test_lin_floor": 2 * null})
    summary = interpolation.cell_summary(members, pairs, starts, 8, ("lr",), margin=0.02)
    assert [r["verdict"] for r in summary] == ["one basin", "separate basins"]
    for row, lr in zip(summary, (1e-3, 1e-2)):
        cell = [p for p in pairs if p["lr"] == lr]
        matrix = stats.symmetric_matrix(8, [(p["i"] % 8, p["j"] % 8) for p in cell],
                                        [p["error_barrier_test_lin"] - p["error_barrier_test_lin_null"] for p in cell])
        est = decide.of_pairs(matrix)
        assert row["error_barrier_test_lin_excess_mean"] == pytest.approx(est.point)
        assert (row["error_barrier_test_lin_excess_ci_lo"], row["error_barrier_test_lin_excess_ci_hi"]) == \
            pytest.approx(est.interval())
        assert row["error_barrier_test_lin_excess_min_detectable"] == pytest.approx(est.min_detectable())
        assert row["margin"] == 0.02


def test_the_ring_design_estimates_the_same_mean_with_seeds_as_units():
    """Each seed with its next k: k = (S − 1)/2 at odd S is every pair; a smaller k keeps every seed as a unit."""
    assert calibration.design_pairs(7, "ring:3") == calibration.design_pairs(7, "all")
    ring = calibration.design_pairs(16, "ring:2")
    assert len(ring) == 32 and all(sum(s in p for p in ring) == 4 for s in range(16))
    rng = np.random.default_rng(4)
    matrix = _cell(rng, 16, 1.0, 0.5, mean=0.3)
    values = [matrix[s, t] for s, t in ring]
    est = decide.of_pairs(stats.symmetric_matrix(16, ring, values))
    assert est.seeds == 16 and np.isfinite(est.se)
    lo, hi = est.interval()
    assert lo < 0.3 < hi


@pytest.mark.parametrize("scenario", ["none", "accuracy"])
def test_calibration_no_barrier_is_rarely_called_separate(scenario):
    """No true barrier (equally accurate members, or members of different accuracy): "separate" in at most 5 % of
    synthetic cells."""
    (row,) = calibration.rates(scenario, [0.0], cells=60, seed=7, accuracy_sd=0.02)
    assert row["separate"] <= 0.05, row


def test_calibration_a_barrier_above_the_margin_is_found_and_one_far_below_it_is_within():
    """A uniform barrier of 0.03 (above the margin 0.02) is called separate in ≥ 80 % of synthetic cells and never one
    basin; one of 0.005 is called one basin in ≥ 80 %."""
    above, below = calibration.rates("uniform", [0.03, 0.005], cells=30, seed=8)
    assert above["separate"] >= 0.8 and above["one_basin"] == 0.0, above
    assert below["one_basin"] >= 0.8, below


def test_the_generators_true_barrier_is_its_exact_expectation():
    """The expected error E[clip(level − Z, 0, 1)] matches a Monte-Carlo draw of the generator; the bump height is
    chosen so that a pair's true barrier is the one asked for, also where errors reach 0 (where the bump's own height
    would overstate it)."""
    rng = np.random.default_rng(0)
    difficulty, noise = rng.uniform(size=1_000_000), 0.2 * rng.normal(size=1_000_000)
    for level in (0.05, 0.3, 0.97):
        assert calibration.expected_error(np.array([level]), np.array([0.2]))[0] == pytest.approx(
            np.mean(difficulty + noise < level), abs=2e-3)
    alpha_A = paths.alpha_grid(25)
    shape_A = 4 * alpha_A * (1 - alpha_A)
    for barrier, error, spread in ((0.02, 0.3, 0.01), (0.02, 0.1, 0.2), (0.0, 0.8, 0.5), (0.0, 0.3, 0.15)):
        height = calibration.bump_height(barrier, error, spread, 25)
        assert calibration.true_barrier(error + height * shape_A, alpha_A, spread) == pytest.approx(barrier, abs=1e-6)
    assert calibration.bump_height(0.02, 0.1, 0.2, 25) > 0.021  # the clipped tail eats part of the bump
    assert calibration.bump_height(0.0, 0.8, 0.5, 25) < 0  # near an error of 1 no barrier takes a dip


def test_a_studys_own_calibration_names_its_rates_and_blind_spots():
    """calibrate() on one cell's parameters: every study scenario simulated; no barrier is never called separate
    here (≤ the 5 % target); a barrier at the margin is rarely one basin; one outlier member is a listed blind spot."""
    params = {"seeds": 8, "examples": 1000, "alphas": 25, "resamples": 50, "design": "ring:2", "error": 0.3,
              "spread": 0.1, "accuracy_sd": 0.01}
    found = calibration.calibrate({(0, 0.01, 0.0, "cosine", 0.0, "shared"): ("median", params)}, 0.02, 30)
    [cell] = found["cells"]
    assert [(r["scenario"], r["barrier"]) for r in cell["scenarios"]] == calibration.study_scenarios(0.02)
    assert found["false_positive_met"] and found["false_positive_max"] <= calibration.FALSE_POSITIVE_TARGET
    assert found["one_basin_at_margin_max"] <= 0.1  # nominally 2.5 %; 30 cells
    assert {"outlier"} <= {b["scenario"] for b in found["blind_spots"]}
    assert cell["cell"]["lr"] == 0.01 and cell["why"] == "median"


def test_a_ring_design_through_the_library_and_its_bad_spellings(tmp_path):
    """pair_barriers(pairs="ring:1") on 5 seeds: each member with its next seed in its cell (5 pairs per cell, every
    seed in two); a malformed ring is one line, in the library and in a config."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int32)
    members = jaxlmc.fit(lambda rngs: nnx.Linear(4, 2, rngs=rngs), (x, y), steps=5, batch_size=16, lr=[1e-2, 3e-2],
                         seeds=5)
    result = jaxlmc.pair_barriers(members, (x, y), pairs="ring:1", num_alphas=5, noise_resamples=0)
    by_lr = {}
    for p in result.pairs:
        by_lr.setdefault(p["lr"], []).append((members.table[p["i"]]["seed"], members.table[p["j"]]["seed"]))
    for seed_pairs in by_lr.values():
        assert sorted(seed_pairs) == [(0, 1), (0, 4), (1, 2), (2, 3), (3, 4)]
    with pytest.raises(ValueError, match=r'"ring:K" with K a positive integer'):
        jaxlmc.pair_barriers(members, (x, y), pairs="ring:0")
    path = tmp_path / "c.toml"
    path.write_text('[barriers]\npairs = "ring:two"\n')
    with pytest.raises(config.ConfigError, match=r"barriers.pairs: 'ring:two'"):
        config.load(str(path))
    assert jnp.isfinite(jnp.asarray([p["error_barrier_test"] for p in result.pairs])).all()


def test_probe_heads_are_fitted_once_per_process(monkeypatch):
    """The barrier and sharpness stages ask for the same probes: the second request returns the first fit, and a
    change of the bodies or the settings fits again."""
    model = models.build(ModelConfig(kind="mlp", width=8, depth=1), (6,), 3)
    rng = np.random.default_rng(0)
    split = data.Split(rng.normal(size=(40, 6)).astype(np.float32), rng.integers(0, 3, 40).astype(np.int32), 3, "train")
    params_U = jax.vmap(model.init)(jax.random.split(jax.random.key(0), 2))
    fits = []
    real = finetuning._fit_probe_heads
    monkeypatch.setattr(finetuning, "_fit_probe_heads", lambda *a: fits.append(1) or real(*a))
    first = finetuning.fit_probe_heads(model, params_U, split, 5, 1e-3)
    again = finetuning.fit_probe_heads(model, jax.tree.map(np.array, params_U), split, 5, 1e-3)
    assert len(fits) == 1
    for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(again)):
        np.testing.assert_array_equal(a, b)
    finetuning.fit_probe_heads(model, params_U, split, 6, 1e-3)
    finetuning.fit_probe_heads(model, jax.tree.map(lambda a: a + 1, params_U), split, 5, 1e-3)
    assert len(fits) == 3


def test_trends_use_the_paired_jackknife_and_are_adjusted_together():
    """H1's difference is the paired jackknife of the excess (last − first checkpoint over the same seeds), its
    p-value adjusted with H2's as one family (Benjamini–Hochberg); a difference within the noise is not resolved."""
    rng = np.random.default_rng(9)
    cells = [(step, lr, 0.0, "cosine", 0.0, "shared") for lr in (1e-3, 1e-2) for step in (0, 100)]
    base = rng.normal(0, 0.002, 8)
    jack = {c: base + rng.normal(0, 0.0005, 8) for c in cells}
    points = {cells[0]: 0.03, cells[1]: 0.0, cells[2]: 0.01, cells[3]: 0.0097}
    excess = {c: decide.Estimate(points[c], points[c] + jack[c] - jack[c].mean()) for c in cells}
    m = verdicts.Measured(cells, {"pretrain_step", "lr"}, "error_barrier_test_lin", {"barrier": ({}, {})}, excess,
                          {})
    found = verdicts.trends(m)
    (word_big, d_big, p_big), (word_small, d_small, _) = [found[("pretrain_step", a, b)]
                                                          for a, b in ((cells[0], cells[1]), (cells[2], cells[3]))]
    paired = excess[cells[1]].jack_S - excess[cells[0]].jack_S
    assert d_big.point == pytest.approx(-0.03) and np.allclose(d_big.jack_S, paired)
    assert word_big == "falls" and p_big < 0.05
    assert word_small == "not resolved"
    line = next(x for x in verdicts.pretraining(m) if "not resolved" in x)
    assert f"detects a change of ±{d_small.min_detectable():.3f} at 80 % power" in line
    h2 = [k for k in found if k[0] == "lr"]
    assert len(h2) == 2 and len(found) == 4
    raw = [d.p_two_sided() for _, d, _ in found.values()]
    np.testing.assert_allclose([p for *_, p in found.values()], decide.adjust(raw))


@pytest.mark.parametrize("member_sd, pair_sd, noise_sd", [(1.0, 1.0, 0.0), (0.3, 1.0, 0.0), (0.5, 0.5, 1.0)])
def test_the_planner_predicts_a_rerun_at_the_planned_size(member_sd, pair_sd, noise_sd):
    """Pilots of 8 seeds and all 28 pairs predict the SE the rule reports for 16 seeds in a ring:2 design on twice the
    test examples (evaluation-noise variance halved): averaged over pilots, within 15 % of the root-mean-square SE
    of simulated reruns at that size; and the SE model is exact in expectation (E[SE²] over many cells)."""
    rng = np.random.default_rng(11)

    def cell(seeds, design, noise_var):
        pairs = calibration.design_pairs(seeds, design)
        u = rng.normal(0, member_sd, seeds)
        x = [u[a] + u[b] + rng.normal(0, pair_sd) + rng.normal(0, np.sqrt(noise_var)) for a, b in pairs]
        return pairs, np.array(x)

    predicted = []
    for _ in range(100):
        pairs, x = cell(8, "all", noise_sd ** 2)
        found = planner.components(pairs, x, np.full(len(x), noise_sd), 8)
        predicted.append(found.se(16, 4, examples_factor=2.0))
    rerun = [decide.of_pairs(stats.symmetric_matrix(16, *cell(16, "ring:2", noise_sd ** 2 / 2))).se ** 2
             for _ in range(800)]
    assert abs(np.mean(predicted) / np.sqrt(np.mean(rerun)) - 1) < 0.15, (np.mean(predicted), np.sqrt(np.mean(rerun)))
    exact = planner.Components(member_sd ** 2, pair_sd ** 2, noise_sd ** 2).se(16, 4, examples_factor=2.0)
    assert np.sqrt(np.mean(rerun)) == pytest.approx(exact, rel=0.05)


def test_the_plan_orders_designs_that_reach_the_target_by_cost():
    found = {("a",): planner.Components(member=1e-5, pair=1e-4, evaluation=1e-4)}
    rows = planner.plan(found, target=0.004, steps=1000, alphas=25)
    reach = [r for r in rows if r["reaches"]]
    assert reach and all(r["min_detectable"] <= 0.004 for r in reach)
    assert [r["member_steps"] for r in reach] == sorted(r["member_steps"] for r in reach)
    assert all(r["min_detectable"] > 0.004 for r in rows[len(reach):])
    eight = [r for r in rows if r["seeds"] == 8 and r["pairs"] == "ring:2" and r["test_examples"] == "×1"][0]
    assert eight["min_detectable"] == pytest.approx(found[("a",)].min_detectable(8, 4))
