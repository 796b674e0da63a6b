"""The critical learning rate (jaxlmc.stats.critical_rate) on synthetic barrier tables with a known boundary."""
import numpy as np

from jaxlmc import noreturn, stats


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


# --------------------------------------------------------------------------------------------- the point of no return

LRS = [0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0]
CHECKPOINTS = [0, 100, 1000]
SEEDS = 6


def by_step_tables(boundary: dict, fails_from: float = np.inf, length: int = 50, seed: int = 0, too_slow=()):
    """Synthetic barrier-stage tables at one fine-tuning length: at checkpoint c a member at rate ≥ boundary[c] has
    its barriers (to the other seeds and to its start) 0.05 above their floors, below it 0.02 under them, with a
    little per-member noise; members at rates ≥ `fails_from` (and at the rates `too_slow`) are unfit, yet carry huge
    barriers in the tables."""
    rng = np.random.default_rng(seed)
    members, pairs, starts = [], [], []
    for c in CHECKPOINTS:
        for lr in LRS:
            cell = {"pretrain_step": c, "lr": lr, "weight_decay": 0.0, "schedule": "constant", "dropout": 0.0,
                    "head": "shared"}
            ids = []
            for s in range(SEEDS):
                unfit = lr >= fails_from or lr in too_slow
                excess = 10.0 if unfit else (0.05 if lr >= boundary[c] else -0.02) + 0.004 * rng.normal()
                members.append({"finetune_step": length, "member": len(members), "seed": s, **cell,
                                "diverged": False, "unfit": unfit})
                starts.append({"finetune_step": length, "member": len(members) - 1, "seed": s, **cell,
                               "error_barrier_test": 0.1 + excess, "error_barrier_test_floor": 0.1})
                ids.append((len(members) - 1, excess))
            for a in range(SEEDS):
                for b in range(a + 1, SEEDS):
                    (i, ei), (j, ej) = ids[a], ids[b]
                    pairs.append({"finetune_step": length, "i": i, "j": j, **cell, "same_cell": True,
                                  "error_barrier_test": 0.1 + (ei + ej) / 2, "error_barrier_test_floor": 0.1})
    return members, pairs, starts


def analysed(*tables_per_length):
    members, pairs, starts = ([row for tables in tables_per_length for row in tables[k]] for k in range(3))
    return noreturn.analyse_tables(members, pairs, starts)


def test_the_critical_rate_of_each_checkpoint_lies_at_its_boundary():
    boundary = {0: 0.003, 100: 0.03, 1000: 0.3}
    rows, _ = analysed(by_step_tables(boundary))
    for r in rows:
        below = LRS[LRS.index(boundary[r["pretrain_step"]]) - 1]
        # The statistic steps from −0.02 to +0.05 between the rate below the boundary and the boundary itself.
        assert below < r["critical_lr"] < boundary[r["pretrain_step"]]
        assert below <= r["critical_lr_ci_lo"] <= r["critical_lr"] <= r["critical_lr_ci_hi"] <= boundary[
            r["pretrain_step"]]
        assert r["failing_lr"] == np.inf and r["highest_trained_lr"] == 1.0 and r["members_used"] == 42


def test_a_point_of_no_return_is_found_and_unfit_members_never_count_as_leaving():
    # From step 1000 on no rate that trains leaves; the unfit members at rates ≥ 0.3 have huge barriers. The lowest
    # rate is unfit too (too slow to fit), which is not where training fails.
    rows, reps = analysed(by_step_tables({0: 0.003, 100: 0.03, 1000: np.inf}, fails_from=0.3, too_slow=(0.001,)))
    last = next(r for r in rows if r["pretrain_step"] == 1000)
    assert last["critical_lr"] == np.inf and last["failing_lr"] == 0.3 and last["highest_trained_lr"] == 0.1
    assert last["unfit"] == 3 * SEEDS and last["members_used"] == 4 * SEEDS
    [sentence] = noreturn.verdicts(rows, reps)
    assert "Point of no return: from step 1000 (95 % CI: step 1000 – step 1000) on" in sentence, sentence


def test_a_rising_critical_rate_without_a_point_of_no_return():
    rows, reps = analysed(by_step_tables({0: 0.003, 100: 0.03, 1000: 0.3}))
    [sentence] = noreturn.verdicts(rows, reps)
    assert "the critical LR rises" in sentence and "keeps rising" in sentence, sentence
    assert "no point of no return within the grid" in sentence, sentence
    # Saturation: the last two checkpoints share their boundary.
    rows, reps = analysed(by_step_tables({0: 0.003, 100: 0.1, 1000: 0.1}))
    [sentence] = noreturn.verdicts(rows, reps)
    assert "rises" in sentence and "saturates" in sentence, sentence


def test_each_fine_tuning_length_gets_its_own_curve_longest_first():
    rows, reps = analysed(by_step_tables({0: 0.003, 100: 0.03, 1000: 0.3}, length=30),
                          by_step_tables({0: 0.001, 100: 0.01, 1000: np.inf}, length=300, seed=1))
    assert sorted({r["finetune_step"] for r in rows}) == [30, 300]
    first, second = noreturn.verdicts(rows, reps)
    assert first.startswith("300 fine-tuning steps") and "Point of no return" in first
    assert second.startswith("30 fine-tuning steps") and "no point of no return" in second


def test_no_leaving_at_any_checkpoint_places_no_point_of_no_return():
    rows, reps = analysed(by_step_tables({0: np.inf, 100: np.inf, 1000: np.inf}, fails_from=0.3))
    [sentence] = noreturn.verdicts(rows, reps)
    assert "the grid places no point of no return — it lies at or before step 0" in sentence, sentence
