"""The critical learning rate (jaxlmc.stats.critical_rate) on synthetic barrier tables with a known boundary."""
import numpy as np

from jaxlmc import noreturn, refine, stats


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


def test_a_bracket_names_its_ends_and_interpolates_only_when_narrow():
    """Rates a decade apart: the bracket is [the rate below the boundary, the boundary's rate] with its supports, and
    no interpolated number; rates ×1.2 apart: the crossing is interpolated, inside the bracket."""
    wide = np.array([1e-4, 1e-3, 1e-2, 1e-1])
    excess, reps = table(wide, boundary=1e-2)  # the excess: −0.01 up to 1e-2, +0.04 at 1e-1
    found = stats.bracket(wide, excess, reps)
    assert found["stay_lr"] == 1e-2 and found["leave_lr"] == 1e-1 and np.isnan(found["critical_lr"])
    assert found["stay_support"] > 0.95 and found["leave_support"] == 1.0
    excess, reps = table(wide, boundary=5e-3)  # +0.005 at 1e-2, little above the replicates' noise (0.004)
    found = stats.bracket(wide, excess, reps)
    assert (found["stay_lr"], found["leave_lr"]) == (1e-3, 1e-2) and 0.7 < found["leave_support"] < 0.98
    narrow = 3e-3 * 1.2 ** np.arange(8)
    excess, reps = table(narrow, boundary=4e-3)
    found = stats.bracket(narrow, excess, reps)
    assert found["leave_lr"] / found["stay_lr"] <= stats.BRACKET_FACTOR
    assert found["stay_lr"] <= found["critical_lr"] <= found["leave_lr"]
    assert found["critical_lr_ci_lo"] <= found["critical_lr"] <= found["critical_lr_ci_hi"]
    excess, reps = table(wide, boundary=1.0)  # nothing leaves: stays up to the highest measured rate
    found = stats.bracket(wide, excess, reps)
    assert found["stay_lr"] == 1e-1 and found["leave_lr"] == np.inf
    excess, reps = table(wide, boundary=1e-6)  # everything leaves: below the grid
    found = stats.bracket(wide, excess, reps)
    assert found["stay_lr"] == 0 and found["leave_lr"] == 1e-4


# --------------------------------------------------------------------------------------------- the point of no return

LRS = [0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0]
EDGE_LRS = [0.001, 0.01, 0.1, 0.13, 0.2]  # a grid that reaches the edge of trainability within ×1.5
CHECKPOINTS = [0, 100, 1000]
SEEDS = 6


def by_step_tables(boundary: dict, fails_from: float = np.inf, length: int = 50, seed: int = 0, too_slow=(),
                   lrs=LRS, start_boundary: dict | None = None, accuracy: dict | None = None):
    """Synthetic barrier-stage tables at one fine-tuning length: at checkpoint c (-1: scratch) a member at rate
    ≥ boundary[c] has its barrier to the other seeds 0.05 above its floor, below it 0.02 under it, with a little
    per-member noise; its linear-baseline barrier to its start does the same at start_boundary[c] (default: the same
    boundary); on the training set as on the test set. Members at rates ≥ `fails_from` (and at the rates `too_slow`)
    are unfit, yet carry huge barriers in the tables. Test accuracy per checkpoint: accuracy[c] (default 0.8)."""
    rng = np.random.default_rng(seed)
    start_boundary = start_boundary or boundary
    accuracy = accuracy or {}
    members, pairs, starts = [], [], []
    for c in boundary:
        for lr in lrs:
            cell = {"pretrain_step": c, "lr": lr, "weight_decay": 0.0, "schedule": "constant", "dropout": 0.0,
                    "head": "shared"}
            ids = []
            for s in range(SEEDS):
                unfit = lr >= fails_from or lr in too_slow
                noise = 0.004 * rng.normal()
                excess = 10.0 if unfit else (0.05 if lr >= boundary[c] else -0.02) + noise
                start_excess = 10.0 if unfit else (0.05 if lr >= start_boundary[c] else -0.02) + noise
                members.append({"finetune_step": length, "member": len(members), "seed": s, **cell,
                                "diverged": False, "unfit": unfit,
                                "test_acc": accuracy.get(c, 0.8) + 0.01 * rng.normal()})
                starts.append({"finetune_step": length, "member": len(members) - 1, "seed": s, **cell,
                               "start_error_test": 1 - accuracy.get(c, 0.8) + 0.1,
                               **{f"error_barrier_{split}_lin{suffix}": 0.1 + (start_excess if not suffix else 0)
                                  for split in ("test", "train") for suffix in ("", "_floor")},
                               "error_barrier_test": 99.0, "error_barrier_test_floor": 0.0})  # (endpoint-mean: unused)
                ids.append((len(members) - 1, excess))
            for a in range(SEEDS):
                for b in range(a + 1, SEEDS):
                    (i, ei), (j, ej) = ids[a], ids[b]
                    pairs.append({"finetune_step": length, "i": i, "j": j, **cell, "same_cell": True,
                                  **{f"error_barrier_{split}{suffix}": 0.1 + ((ei + ej) / 2 if not suffix else 0)
                                     for split in ("test", "train") for suffix in ("", "_floor")}})
    return members, pairs, starts


def analysed(*tables_per_length):
    members, pairs, starts = ([row for tables in tables_per_length for row in tables[k]] for k in range(3))
    return noreturn.analyse_tables(members, pairs, starts)


def test_the_critical_bracket_of_each_checkpoint_holds_its_boundary():
    boundary = {0: 0.003, 100: 0.03, 1000: 0.3}
    rows, _ = analysed(by_step_tables(boundary))
    for r in rows:
        below = LRS[LRS.index(boundary[r["pretrain_step"]]) - 1]
        # The statistic steps from −0.02 to +0.05 between the rate below the boundary and the boundary itself: a
        # bracket ×3 wide, too wide to place an interpolated number in.
        assert (r["stay_lr"], r["leave_lr"]) == (below, boundary[r["pretrain_step"]]) and np.isnan(r["critical_lr"])
        assert r["stay_support"] == 1.0 and r["leave_support"] == 1.0
        assert (r["seeds_leave_lr"], r["start_leave_lr"], r["train_leave_lr"]) == (boundary[r["pretrain_step"]],) * 3
        assert r["failing_lr"] == np.inf and r["highest_trained_lr"] == 1.0 and r["members_used"] == 42


def test_seeds_and_start_are_judged_separately():
    """Seeds that stay together but all leave their start: the rate leaves the basin (no min over the two), and the
    separate brackets say which."""
    rows, _ = analysed(by_step_tables({0: np.inf, 100: np.inf, 1000: np.inf},
                                      start_boundary={0: 0.01, 100: 0.01, 1000: 0.01}))
    for r in rows:
        assert r["seeds_leave_lr"] == np.inf and r["start_leave_lr"] == 0.01 and r["leave_lr"] == 0.01


def test_a_detectable_point_of_no_return_is_named():
    """From step 1000 on no rate that trains leaves; the grid reaches the edge of trainability within ×1.3 (0.1
    trains, 0.13 fails); scratch leaves from 0.01; pretraining transfers (0.9 against 0.6)."""
    boundary = {-1: 0.01, 0: 0.01, 100: 0.1, 1000: np.inf}
    rows, reps = analysed(by_step_tables(boundary, fails_from=0.13, lrs=EDGE_LRS, too_slow=(0.001,),
                                         accuracy={-1: 0.6, 0: 0.6, 100: 0.8, 1000: 0.9}))
    last = next(r for r in rows if r["pretrain_step"] == 1000)
    assert last["leave_lr"] == np.inf and last["failing_lr"] == 0.13 and last["highest_trained_lr"] == 0.1
    assert last["unfit"] == 3 * SEEDS and last["members_used"] == 2 * SEEDS
    assert abs(last["best_test_acc"] - 0.9) < 0.01 and abs(last["probe_test_acc"] - 0.8) < 1e-6
    [sentence] = noreturn.verdicts(rows, reps)
    assert "Point of no return: from step 1000 on (95 % CI step 1000 – step 1000)" in sentence, sentence
    assert "Test accuracy, probed start / best fine-tuned: scratch 0.500 / 0.6" in sentence, sentence


def test_a_task_without_transfer_cannot_detect_a_point_of_no_return():
    boundary = {-1: 0.01, 0: 0.01, 100: 0.1, 1000: np.inf}
    rows, reps = analysed(by_step_tables(boundary, fails_from=0.13, lrs=EDGE_LRS))  # every start: accuracy 0.8
    [sentence] = noreturn.verdicts(rows, reps)
    assert "From step 1000 on no rate that trains leaves, but the design cannot detect a point of no return" in sentence
    assert "pretraining does not measurably transfer" in sentence and "Point of no return:" not in sentence, sentence


def test_an_edge_of_trainability_far_from_the_staying_rates_cannot_detect_one():
    """Training fails from 0.3 and 0.1 trains: leaving could happen in between, where the grid has no rate."""
    boundary = {-1: 0.001, 0: 0.003, 100: 0.03, 1000: np.inf}
    rows, reps = analysed(by_step_tables(boundary, fails_from=0.3, accuracy={-1: 0.5, 1000: 0.9}))
    [sentence] = noreturn.verdicts(rows, reps)
    assert "more than ×1.5: refine the grid there" in sentence and "Point of no return:" not in sentence, sentence
    # Without a control, and with every rate training, the design cannot detect one either.
    rows, reps = analysed(by_step_tables({100: 0.03, 1000: np.inf}))
    [sentence] = noreturn.verdicts(rows, reps)
    assert "no rate in the grid fails to train" in sentence and "no control" in sentence, sentence


def test_rising_and_unresolved_critical_rates_without_a_point_of_no_return():
    rows, reps = analysed(by_step_tables({0: 0.003, 100: 0.03, 1000: 0.3}))
    [sentence] = noreturn.verdicts(rows, reps)
    assert "The critical rate rises from step 0 to step 1000 (brackets [0.001, 0.003] → [0.1, 0.3] do not " \
           "overlap)" in sentence, sentence
    assert "no point of no return within the grid" in sentence, sentence
    rows, reps = analysed(by_step_tables({0: 0.03, 100: 0.03, 1000: 0.03}))
    [sentence] = noreturn.verdicts(rows, reps)
    assert "does not move resolvably from step 0 to step 1000" in sentence, sentence


def test_each_fine_tuning_length_gets_its_own_curve_longest_first():
    rows, reps = analysed(by_step_tables({0: 0.003, 100: 0.03, 1000: 0.3}, length=30),
                          by_step_tables({0: 0.001, 100: 0.01, 1000: np.inf}, length=300, seed=1))
    assert sorted({r["finetune_step"] for r in rows}) == [30, 300]
    first, second = noreturn.verdicts(rows, reps)
    assert first.startswith("300 fine-tuning steps") and "From step 1000 on no rate that trains leaves" in first
    assert second.startswith("30 fine-tuning steps") and "no point of no return" in second


def test_no_leaving_at_any_checkpoint_is_not_a_point_of_no_return():
    rows, reps = analysed(by_step_tables({0: np.inf, 100: np.inf, 1000: np.inf}, fails_from=0.3))
    [sentence] = noreturn.verdicts(rows, reps)
    assert "From step 0 on no rate that trains leaves, but the design cannot detect" in sentence, sentence
    assert "the control (step 0) does not leave" in sentence, sentence


# --------------------------------------------------------------------------------------------- refinement


def test_bisection_brackets_a_synthetic_boundary_within_the_factor():
    """A decade-spaced grid brackets each checkpoint's boundary (and the trainability edge) ×10 wide; each round adds
    the log-midpoints refine.proposals names, for every start, until every bracket is within stats.BRACKET_FACTOR."""
    boundary, fails_from = {0: 0.0047, 100: 0.047, 1000: 0.21}, 0.45
    lrs, added = [0.001, 0.01, 0.1, 1.0], []
    for _ in range(4):
        rows, _ = analysed(by_step_tables(boundary, fails_from=fails_from, lrs=lrs))
        wanted = refine.proposals(rows)
        if not wanted:
            break
        assert not set(wanted) & set(lrs) and all(reasons for reasons in wanted.values())
        added.append(sorted(wanted))
        lrs = sorted(lrs + list(wanted))
    assert not wanted and len(added) == 3, added  # ×10 → ×3.2 → ×1.8 → ×1.33
    for r in rows:
        assert r["stay_lr"] < boundary[r["pretrain_step"]] <= r["leave_lr"] <= r["stay_lr"] * stats.BRACKET_FACTOR
        assert np.isfinite(r["critical_lr"])  # narrow enough now to interpolate
        assert r["trains_lr"] < fails_from <= r["failing_lr"] <= r["trains_lr"] * stats.BRACKET_FACTOR
    # The first round bisects each decade that holds a boundary or the edge: log-midpoints, in writable digits.
    assert added[0] == [0.00316, 0.0316, 0.316]
    reasons = refine.proposals(analysed(by_step_tables(boundary, fails_from=fails_from))[0])
    assert "step 1000 shared: 0.1 → 0.3 (combined, seeds, start, train)" in reasons[0.173]
    assert "step 0 shared: 0.3 → 1 (trainability)" in reasons[0.548]
