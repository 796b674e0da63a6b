"""The critical learning rate (jaxlmc.stats.critical_rate) on synthetic barrier tables with a known boundary."""
import numpy as np

from jaxlmc import stats


def table(lrs, boundary, slope=0.05, noise=0.004, resamples=400, seed=0):
    """Excess (barrier − floor) per rate: −0.01 below `boundary`, rising linearly in log-rate above it; replicates
    scatter around it like a member bootstrap would."""
    rng = np.random.default_rng(seed)
    x = np.log10(lrs)
    excess = np.where(x < np.log10(boundary), -0.01, -0.01 + slope * (x - np.log10(boundary)))
    return excess, excess[:, None] + noise * rng.normal(size=(len(lrs), resamples))


def test_a_known_boundary_is_found_inside_its_interval():
    lrs = np.logspace(-4, -1, 10)
    excess, reps = table(lrs, boundary=3e-3)
    rate, lo, hi = stats.critical_rate(lrs, excess, reps)
    # The excess crosses 0 a fifth of a decade above the boundary (−0.01 + 0.05·Δ = 0 at Δ = 0.2).
    expected = 3e-3 * 10 ** 0.2
    assert abs(np.log10(rate) - np.log10(expected)) < 0.05
    assert lo <= rate <= hi and hi / lo < 10 ** 0.5


def test_no_boundary_in_the_grid_is_said_so():
    lrs = np.logspace(-4, -2, 6)
    excess, reps = table(lrs, boundary=1.0)  # every rate stays in the basin
    rate, lo, hi = stats.critical_rate(lrs, excess, reps)
    assert rate == np.inf and hi == np.inf
    excess, reps = table(lrs, boundary=1e-6)  # every rate leaves
    rate, lo, hi = stats.critical_rate(lrs, excess, reps)
    assert rate == 0.0 and lo == 0.0  # 10 ** −inf: below the grid


def test_rates_without_usable_members_are_skipped_not_counted_as_leaving():
    lrs = np.logspace(-4, -1, 7)
    excess, reps = table(lrs, boundary=1e-2)
    excess[-1], reps[-1] = np.nan, np.nan  # the largest rate: every member unfit or diverged
    with_gap = stats.critical_rate(lrs, excess, reps)
    without = stats.critical_rate(lrs[:-1], excess[:-1], reps[:-1])
    assert with_gap == without
    assert np.isnan(stats.crossing(np.log10(lrs), np.full(7, np.nan)))  # nothing measured: no estimate
    assert stats.crossing(np.log10(lrs), np.full(7, 1.0)) == -np.inf  # everything measured leaves
