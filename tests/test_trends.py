"""Trend fits on synthetic series whose exponents and slopes are known."""
import dataclasses

import numpy as np
import pytest

from bench.bench_scaling_cost import growth
from jaxlmc import config, rundir, scaling, size_axes, stats, trends
from jaxlmc.size_axes import Size

SIZES = [32, 64, 128, 256, 512]
DEPTHS = [2, 4, 8, 16]  # the width series runs at depth 2: the depth series shares that size


def _seed_matrices(exponent: float, seeds: int, noise: float, rng) -> list[np.ndarray]:
    """Per size, a seed-pair matrix of a barrier 0.5·size^exponent with a multiplicative effect per seed and per pair
    (the seeds of a size share the first; every size draws its own seeds)."""
    out = []
    for size in SIZES:
        seed_effect = np.exp(noise * rng.normal(size=seeds))
        pairs = [(a, b) for a in range(seeds) for b in range(a + 1, seeds)]
        values = [0.5 * size ** exponent * np.sqrt(seed_effect[a] * seed_effect[b]) * np.exp(noise * rng.normal())
                  for a, b in pairs]
        out.append(stats.symmetric_matrix(seeds, pairs, values))
    return out


def _fit(matrices):
    point = [stats.pair_mean(m) for m in matrices]
    return trends.power_law(SIZES, point, trends.seed_matrix_replicates(matrices, resamples=400))


def test_a_power_law_recovers_its_exponent_and_its_interval_covers_it():
    rng = np.random.default_rng(0)
    for exponent in (-0.5, 0.3):
        fit = _fit(_seed_matrices(exponent, seeds=8, noise=0.2, rng=rng))
        assert fit.exponent == pytest.approx(exponent, abs=0.06)
        assert fit.ci_lo < exponent < fit.ci_hi and fit.excludes_zero()
        assert fit.replicates == 400 and fit.prefactor == pytest.approx(0.5, rel=0.4)
    flat = _fit(_seed_matrices(0.0, seeds=8, noise=0.2, rng=np.random.default_rng(1)))
    assert flat.ci_lo < 0 < flat.ci_hi and not flat.excludes_zero()


def test_a_power_law_of_a_value_that_is_not_positive_is_not_fitted():
    fit = trends.power_law(SIZES, [0.1, 0.05, 0.0, 0.02, 0.01], np.full((5, 10), 0.1))
    assert np.isnan(fit.exponent) and fit.replicates == 0
    with pytest.raises(ValueError, match="two distinct positive sizes"):
        trends.power_law([64, 64], [0.1, 0.1], np.ones((2, 3)))


def _brackets(slope: float, grid: np.ndarray, sizes=SIZES):
    """Per size, the ×2 grid's highest rate below the critical rate 0.01·(size/sizes[0])^slope and its lowest at or
    above it: what a study's per-rate verdicts would bracket."""
    critical = 0.01 * (np.asarray(sizes) / sizes[0]) ** slope
    stay = np.array([grid[grid < c].max() if (grid < c).any() else np.nan for c in critical])
    leave = np.array([grid[grid >= c].min() if (grid >= c).any() else np.inf for c in critical])
    return stay, leave


def test_the_critical_rate_trend_from_brackets_covers_the_true_slope():
    grid = 0.001 * 2.0 ** np.arange(12)
    for slope in (-0.75, 0.5):
        fit = trends.censored_slope(SIZES, *_brackets(slope, grid))
        assert fit.consistent and fit.lo <= slope <= fit.hi and fit.lo <= fit.central <= fit.hi
        assert fit.excludes_zero()  # a ×16 range of sizes and a ×2 grid resolve a slope this steep
    flat = trends.censored_slope(SIZES, *_brackets(0.0, grid))
    assert flat.lo <= 0 <= flat.hi and not flat.excludes_zero()


def test_one_sided_inconsistent_and_empty_brackets():
    # Every size stays up to the grid's top: the slope has a lower end only if some size leaves.
    only_stays = trends.censored_slope(SIZES, [0.1] * 5, [np.inf] * 5)
    assert only_stays.consistent and only_stays.lo == -np.inf and only_stays.hi == np.inf
    # High, low, high: no straight line passes through all three brackets.
    broken = trends.censored_slope([32, 64, 128], [0.1, 0.001, 0.1], [0.2, 0.002, 0.2])
    assert not broken.consistent and np.isnan(broken.lo) and not broken.excludes_zero()
    with pytest.raises(ValueError, match="two or more distinct sizes"):
        trends.censored_slope([32, 64], [np.nan, 0.1], [np.inf, np.nan])


def test_critical_slopes_come_from_each_sizes_brackets_along_each_series(tmp_path):
    """scaling.critical_slopes reads each size's critical.csv and fits every start's brackets along each series: the
    widths at one depth, and the depths at one width (a cross), never mixing the two."""
    grid_rates = 0.001 * 2.0 ** np.arange(12)
    stay, leave = _brackets(0.5, grid_rates)
    depth_stay, depth_leave = _brackets(-0.7, grid_rates, sizes=DEPTHS)
    runs = {}

    def write(size, stay_lr, leave_lr):
        run = rundir.RunDir(str(tmp_path / f"w{size.width}_d{size.depth}"))
        rows = [{"pretrain_step": step, "weight_decay": 0.0, "schedule": "constant", "dropout": 0.0, "head": "shared",
                 "finetune_step": 100, "stay_lr": stay_lr if step >= 0 else np.nan,
                 "leave_lr": leave_lr if step >= 0 else 0.001} for step in (-1, 1000)]
        run.write_csv(rundir.CRITICAL, rows)
        runs[size] = run

    for k, width in enumerate(SIZES):
        write(Size(width, 2, "standard"), stay[k], leave[k])
    for k, depth in enumerate(DEPTHS):
        if depth != 2:
            write(Size(SIZES[0], depth, "standard"), depth_stay[k], depth_leave[k])
    found = scaling.critical_slopes(runs)
    slopes = {(r["axis"], r["pretrain_step"]): r for r in found}
    assert len(found) == 4  # two series × two starts
    expected = trends.censored_slope(SIZES, stay, leave)
    along_width = slopes[("width", 1000)]
    assert along_width["consistent"] and along_width["sizes"] == len(SIZES) and along_width["depth"] == 2
    assert (along_width["slope_lo"], along_width["slope_hi"]) == pytest.approx((expected.lo, expected.hi))
    assert along_width["slope_lo"] <= 0.5 <= along_width["slope_hi"]
    along_depth = slopes[("depth", 1000)]
    assert along_depth["width"] == SIZES[0] and along_depth["sizes"] == len(DEPTHS)
    assert along_depth["slope_lo"] <= -0.7 <= along_depth["slope_hi"] and along_depth["slope_hi"] < 0
    # The scratch row leaves at the grid's bottom at every size: bounded above only, no slope resolved.
    assert slopes[("width", -1)]["slope_lo"] == -np.inf and slopes[("width", -1)]["slope_hi"] == np.inf


def test_size_axes_product_cross_directories_and_series():
    cfg = config.Config()
    cross = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, width=64, depth=2),
                                study=dataclasses.replace(cfg.study, widths=[32, 64, 128], depths=[1, 2, 4],
                                                          parametrizations=["standard", "mup"], size_grid="cross"))
    found = size_axes.sizes(cross)
    assert len(found) == (3 + 2) * 2  # the widths at depth 2, the other depths at width 64, under each
    assert size_axes.directory(cross, found[0]) == "width32_depth2_standard"
    product = dataclasses.replace(cross, study=dataclasses.replace(cross.study, size_grid="product",
                                                                   parametrizations=[]))
    assert len(size_axes.sizes(product)) == 9
    assert size_axes.directory(product, size_axes.sizes(product)[0]) == "width32_depth1"
    lines = size_axes.series(found, "width")
    assert set(lines) == {(2, "standard"), (2, "mup")} and [s.width for s in lines[(2, "mup")]] == [32, 64, 128]
    assert {key: len(line) for key, line in size_axes.series(found, "depth").items()} == {
        (64, "standard"): 3, (64, "mup"): 3}
    one = size_axes.config_at(cross, found[-1])
    assert (one.model.width, one.model.depth, one.model.parametrization) == (64, 4, "mup")
    assert not size_axes.given_axes(one)
    widths_only = dataclasses.replace(cfg, study=dataclasses.replace(cfg.study, widths=[8, 16]))
    assert [size_axes.directory(widths_only, s) for s in size_axes.sizes(widths_only)] == ["width8", "width16"]


def test_the_cost_benchmark_fits_the_growth_it_is_given():
    """bench.bench_scaling_cost.growth: exponents of member-steps/s against width and members, and of the barrier
    pass against width and pairs, recovered from a synthetic cost with known exponents."""
    widths, members = [32, 64, 128, 256], [8, 32, 128]
    rows = [{"width": w, "members": n, "pairs": n * (n - 1) // 2, "member_steps_per_s": 1e4 * w ** -0.8 * n ** 0.1,
             "barrier_seconds": 1e-3 * w ** 0.9 * (n * (n - 1) // 2)} for w in widths for n in members]
    fits = growth(rows, widths, members)
    by = {(f["quantity"], f["against"], f.get("members", f.get("width"))): f["exponent"] for f in fits}
    assert by[("member_steps_per_s", "width", 32)] == pytest.approx(-0.8)
    assert by[("barrier_seconds", "width", 128)] == pytest.approx(0.9)
    assert by[("member_steps_per_s", "members", 64)] == pytest.approx(0.1)
    assert by[("barrier_seconds", "pairs", 256)] == pytest.approx(1.0)
    assert len(fits) == 2 * len(members) + 2 * len(widths)
