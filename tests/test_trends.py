"""Trend fits on synthetic series whose exponents and slopes are known."""
import numpy as np
import pytest

from jaxlmc import rundir, scaling, stats, trends

SIZES = [32, 64, 128, 256, 512]


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


def _brackets(slope: float, grid: np.ndarray):
    """Per size, the ×2 grid's highest rate below the critical rate 0.01·(size/32)^slope and its lowest at or
    above it: what a study's per-rate verdicts would bracket."""
    critical = 0.01 * (np.asarray(SIZES) / 32.0) ** slope
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


def test_a_width_series_critical_slopes_come_from_each_widths_brackets(tmp_path):
    """scaling.critical_slopes reads each width's critical.csv and fits every start's brackets across widths."""
    grid_rates = 0.001 * 2.0 ** np.arange(12)
    stay, leave = _brackets(0.5, grid_rates)
    runs = {}
    for k, width in enumerate(SIZES):
        run = rundir.RunDir(str(tmp_path / f"width{width}"))
        rows = [{"pretrain_step": step, "weight_decay": 0.0, "schedule": "constant", "dropout": 0.0, "head": "shared",
                 "finetune_step": 100, "stay_lr": stay[k] if step >= 0 else np.nan,
                 "leave_lr": leave[k] if step >= 0 else 0.001} for step in (-1, 1000)]
        run.write_csv(rundir.CRITICAL, rows)
        runs[width] = run
    slopes = {r["pretrain_step"]: r for r in scaling.critical_slopes(runs)}
    expected = trends.censored_slope(SIZES, stay, leave)
    assert slopes[1000]["consistent"] and slopes[1000]["widths"] == len(SIZES)
    assert (slopes[1000]["slope_lo"], slopes[1000]["slope_hi"]) == pytest.approx((expected.lo, expected.hi))
    assert slopes[1000]["slope_lo"] <= 0.5 <= slopes[1000]["slope_hi"]
    # The scratch row leaves at the grid's bottom at every width: bounded above only, no slope resolved.
    assert slopes[-1]["slope_lo"] == -np.inf and slopes[-1]["slope_hi"] == np.inf
