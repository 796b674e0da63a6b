"""The critical learning rate (jaxlmc.noreturn) on synthetic barrier tables with a known boundary: per-rate verdicts
by jaxlmc.decide's rule, brackets of grid rates, the point of no return and refinement."""
import numpy as np

from jaxlmc import noreturn, refine, stats

S, L, N = "stays", "leaves", "not resolved"


def test_a_bracket_names_the_highest_rate_shown_to_stay_below_the_lowest_shown_to_leave():
    lrs = [1e-4, 1e-3, 1e-2, 1e-1]
    found = noreturn.bracket(lrs, [S, S, S, L], [0.001, 0.002, 0.003, 0.5], [0.9, 0.8, 0.7, 0.004])
    assert (found["stay_lr"], found["leave_lr"], found["stay_p"], found["leave_p"]) == (1e-2, 1e-1, 0.003, 0.004)
    assert (found["rates_staying"], found["rates_leaving"], found["rates_unresolved"]) == (3, 1, 0)
    # An unresolved rate between them widens the bracket and is counted, never read as staying or leaving.
    found = noreturn.bracket(lrs, [S, N, L, L])
    assert (found["stay_lr"], found["leave_lr"], found["rates_unresolved"]) == (1e-4, 1e-2, 1)
    found = noreturn.bracket(lrs, [N, L, L, L])  # leaves from 1e-3; nothing below shown to stay
    assert np.isnan(found["stay_lr"]) and found["leave_lr"] == 1e-3
    found = noreturn.bracket(lrs, [L, L, L, L])  # even the lowest rate leaves: below the grid
    assert (found["stay_lr"], found["leave_lr"]) == (0.0, 1e-4)
    found = noreturn.bracket(lrs, [S, S, N, S])  # none leaves: stays up to the highest shown to stay
    assert (found["stay_lr"], found["leave_lr"], found["rates_unresolved"]) == (1e-1, np.inf, 1)
    found = noreturn.bracket(lrs, [N, N, N, N])
    assert np.isnan(found["stay_lr"]) and found["leave_lr"] == np.inf and found["rates_unresolved"] == 4
    assert noreturn.bracket_text({**found, "stay_p": np.nan, "leave_p": np.nan}) == \
        "no rate shown to stay or to leave; 4 rates not resolved"


def test_rates_without_usable_members_are_skipped_not_counted_as_leaving():
    lrs = [1e-4, 1e-3, 1e-2, 1e-1]
    p = [0.01, 0.02, 0.03, np.nan]
    with_gap = noreturn.bracket(lrs, [S, S, L, None], p, p)  # the largest rate: every member unfit or diverged
    assert with_gap == noreturn.bracket(lrs[:3], [S, S, L], p[:3], p[:3])
    assert noreturn.bracket(lrs[::-1], [None, L, S, S], p[::-1], p[::-1]) == with_gap  # the rates' order: no matter
    nothing = noreturn.bracket(lrs, [None] * 4)
    assert np.isnan(nothing["stay_lr"]) and np.isnan(nothing["leave_lr"])
    assert noreturn.bracket_text(nothing) == "no rate with enough usable members"


# --------------------------------------------------------------------------------------------- the point of no return

LRS = [0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0]
EDGE_LRS = [0.001, 0.01, 0.1, 0.13, 0.2]  # a grid that reaches the edge of trainability within ×1.5
CHECKPOINTS = [0, 100, 1000]
SEEDS = 6


def by_step_tables(boundary: dict, fails_from: float = np.inf, length: int = 50, seed: int = 0, too_slow=(),
                   lrs=LRS, start_boundary: dict | None = None, accuracy: dict | None = None, noise: float = 0.002):
    """Synthetic barrier-stage tables at one fine-tuning length: at checkpoint c (-1: scratch) a member at rate
    ≥ boundary[c] has its linear-baseline barrier to the other seeds 0.05 above its null mean (0.005), below it
    0.005 (the null mean: within the margin), with a little per-member noise; its barrier to its start does the same
    at start_boundary[c] (default: the same boundary); on the training set as on the test set. Members at rates
    ≥ `fails_from` (and at the rates `too_slow`) are unfit, yet carry huge barriers in the tables. Test accuracy per
    checkpoint: accuracy[c] (default 0.8). `noise`: the SD of each member's barrier."""
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
                jitter = noise * rng.normal()
                excess = 10.0 if unfit else (0.05 if lr >= boundary[c] else 0.0) + jitter
                start_excess = 10.0 if unfit else (0.05 if lr >= start_boundary[c] else 0.0) + jitter
                members.append({"finetune_step": length, "member": len(members), "seed": s, **cell,
                                "diverged": False, "unfit": unfit,
                                "test_acc": accuracy.get(c, 0.8) + 0.01 * rng.normal()})
                starts.append({"finetune_step": length, "member": len(members) - 1, "seed": s, **cell,
                               "start_error_test": 1 - accuracy.get(c, 0.8) + 0.1,
                               **{f"error_barrier_{split}_lin{suffix}": 0.005 + (start_excess if not suffix else 0)
                                  for split in ("test", "train") for suffix in ("", "_null")},
                               "error_barrier_test": 99.0, "error_barrier_test_null": 0.0})  # (endpoint-mean: unused)
                ids.append((len(members) - 1, excess))
            for a in range(SEEDS):
                for b in range(a + 1, SEEDS):
                    (i, ei), (j, ej) = ids[a], ids[b]
                    pairs.append({"finetune_step": length, "i": i, "j": j, **cell, "same_cell": True,
                                  **{f"error_barrier_{split}_lin{suffix}": 0.005 + ((ei + ej) / 2 if not suffix
                                                                                   else 0)
                                     for split in ("test", "train") for suffix in ("", "_null")},
                                  "error_barrier_test": 99.0, "error_barrier_test_null": 0.0})  # (endpoint-mean)
    return members, pairs, starts


def analysed(*tables_per_length):
    members, pairs, starts = ([row for tables in tables_per_length for row in tables[k]] for k in range(3))
    return noreturn.analyse_tables(members, pairs, starts)


def test_the_critical_bracket_of_each_checkpoint_holds_its_boundary():
    boundary = {0: 0.003, 100: 0.03, 1000: 0.3}
    rows, _ = analysed(by_step_tables(boundary))
    for r in rows:
        below = LRS[LRS.index(boundary[r["pretrain_step"]]) - 1]
        # Every rate below the boundary is shown within the margin, every rate from it on separate: the bracket is
        # [the rate below, the boundary], both ends decided (adjusted p below 0.025), no rate unresolved.
        assert (r["stay_lr"], r["leave_lr"]) == (below, boundary[r["pretrain_step"]])
        assert r["stay_p"] < 0.025 and r["leave_p"] < 0.025 and r["rates_unresolved"] == 0
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
    assert "Point of no return: from step 1000 on every rate that trains (up to 0.1" in sentence, sentence
    assert "Test accuracy, probed start / best fine-tuned: scratch 0.500 / 0.6" in sentence, sentence


def test_staying_must_be_shown_an_underpowered_design_names_no_point_of_no_return():
    """The design of the detectable point of no return above, but each member's barrier scatters by 0.03: the rates
    that do not leave are within the margin on average, yet no interval shows it — not resolved, not "stays"."""
    boundary = {-1: 0.01, 0: 0.01, 100: 0.1, 1000: np.inf}
    rows, reps = analysed(by_step_tables(boundary, fails_from=0.13, lrs=EDGE_LRS, too_slow=(0.001,), noise=0.03,
                                         accuracy={-1: 0.6, 0: 0.6, 100: 0.8, 1000: 0.9}))
    last = next(r for r in rows if r["pretrain_step"] == 1000)
    assert last["rates_staying"] < 3 and last["rates_unresolved"] > 0 and last["rates_leaving"] == 0
    [sentence] = noreturn.verdicts(rows, reps)
    assert "Point of no return" not in sentence and "not resolved" in sentence, sentence


def test_a_task_without_transfer_cannot_detect_a_point_of_no_return():
    boundary = {-1: 0.01, 0: 0.01, 100: 0.1, 1000: np.inf}
    rows, reps = analysed(by_step_tables(boundary, fails_from=0.13, lrs=EDGE_LRS))  # every start: accuracy 0.8
    [sentence] = noreturn.verdicts(rows, reps)
    assert "From step 1000 on every rate that trains is shown to stay, but the design cannot detect a point of no " \
           "return" in sentence
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
    assert "no point of no return is shown within the grid" in sentence, sentence
    rows, reps = analysed(by_step_tables({0: 0.03, 100: 0.03, 1000: 0.03}))
    [sentence] = noreturn.verdicts(rows, reps)
    assert "does not move resolvably from step 0 to step 1000" in sentence, sentence


def test_each_fine_tuning_length_gets_its_own_curve_longest_first():
    rows, reps = analysed(by_step_tables({0: 0.003, 100: 0.03, 1000: 0.3}, length=30),
                          by_step_tables({0: 0.001, 100: 0.01, 1000: np.inf}, length=300, seed=1))
    assert sorted({r["finetune_step"] for r in rows}) == [30, 300]
    first, second = noreturn.verdicts(rows, reps)
    assert first.startswith("300 fine-tuning steps") and "From step 1000 on every rate that trains is shown" in first
    assert second.startswith("30 fine-tuning steps") and "no point of no return" in second


def test_no_leaving_at_any_checkpoint_is_not_a_point_of_no_return():
    rows, reps = analysed(by_step_tables({0: np.inf, 100: np.inf, 1000: np.inf}, fails_from=0.3))
    [sentence] = noreturn.verdicts(rows, reps)
    assert "From step 0 on every rate that trains is shown to stay, but the design cannot detect" in sentence, sentence
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
        assert r["trains_lr"] < fails_from <= r["failing_lr"] <= r["trains_lr"] * stats.BRACKET_FACTOR
    # The first round bisects each decade that holds a boundary or the edge: log-midpoints, in writable digits.
    assert added[0] == [0.00316, 0.0316, 0.316]
    reasons = refine.proposals(analysed(by_step_tables(boundary, fails_from=fails_from))[0])
    assert "step 1000 shared: 0.1 → 0.3 (combined, seeds, start, train)" in reasons[0.173]
    assert "step 0 shared: 0.3 → 1 (trainability)" in reasons[0.548]
