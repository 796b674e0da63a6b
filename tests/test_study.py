"""`jaxlmc study` end to end on a tiny grid: stages, resume after interruption in each stage, greedy soups that never
see test data, and the report rendered by a real headless browser."""
import csv
import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jaxlmc import (api, barrier_stage, calibration, ckpt, cli, config, data, decide, grid, noreturn, refine, rundir,
                    study, tasks, trends)

from conftest import TINY

pytestmark = pytest.mark.slow  # every test here runs whole studies or several processes


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


STUDY = ["finetune.seeds=3", "finetune.scratch=true", "barriers.alphas=5", "barriers.chunk_pairs=4",
         "data.validation_size=300", "barriers.align=true", "finetune.save_steps=[20]",
         "study.sharpness_iterations=5", "study.sharpness_examples=100"]
FIGURES = ["critical_rate.png", "barrier_vs_finetune_steps.png", "phase_diagram.png", "barrier_vs_pretraining.png", "aligned_barrier.png", "interpolation_curves.png",
           "basins.png", "soup_gain.png", "ood_spread.png", "sharpness.png",
           "training_curves.png"]


def tiny(data_dir, *extra):
    return config.load("configs/mnist1d.toml", TINY + [f'data.data_dir="{data_dir}"', *STUDY, *extra])


@pytest.fixture(scope="module")
def reference(build_once, data_dir):
    """The tiny study, run once per test session (a private copy per worker)."""
    cfg = tiny(data_dir)
    out, ran = build_once("study", lambda path: study.study(cfg, path, progress=False))
    return cfg, out, ran


def test_a_tiny_study_end_to_end(reference):
    cfg, out, ran = reference
    assert ran == list(study.STAGES)
    summary = read_csv(os.path.join(out, "summary.csv"))
    # scratch, 0 and 60 pretraining steps × 2 LRs.
    assert [(r["pretrain_step"], r["lr"]) for r in summary] == [(s, lr) for s in ("-1", "0", "60")
                                                               for lr in ("0.001", "0.01")]
    for row in summary:
        for key in ("error_barrier_test_mean", "error_barrier_test_ci_lo", "uniform_test_acc", "greedy_test_acc",
                    "ensemble_test_acc", "best_test_acc", "ood_acc_std", "disagreement_test", "cka_mean", "basins",
                    "error_barrier_test_floor_mean", "start_error_barrier_test_floor_mean", "unfit"):
            assert row[key] not in ("", "nan"), key
        assert 0.0 <= float(row["cka_mean"]) <= 1.0 + 1e-6
        assert 1 <= int(row["basins"]) <= 3
        # Every cell's verdict by jaxlmc.decide, with what it could have detected.
        assert row["verdict"] in decide.VERDICTS and row["start_verdict"] in decide.VERDICTS
        assert float(row["error_barrier_test_lin_excess_min_detectable"]) > 0 and float(row["margin"]) == 0.02
        assert float(row["mc_moved"]) in (0.0, 1.0)  # a verdict the null mean's Monte-Carlo error moves: not resolved
    pair_rows = read_csv(os.path.join(out, "barriers", "pairs.csv"))
    assert all(0 < float(p["error_barrier_test_lin_null_se"]) < 0.05 for p in pair_rows)
    page = open(os.path.join(out, "report.html")).read()
    verdicts_in_table = page[page.index("<h2>Per cell</h2>"):]
    assert sum(verdicts_in_table.count(f"<td>{v}</td>") for v in decide.VERDICTS) == 2 * len(summary)
    assert page.count("<img src='data:image/png;base64,") == len(FIGURES) and "<script" not in page
    for section in ("H3 — is there a point of no return?", "Failed fits", "H1 — does the seeds", "Same basin?",
                    "95 % CI", "Critical learning rate", "How often would these verdicts be wrong?"):
        assert section in page, section
    assert page.index("H3 — is there a point of no return?") < page.index("Failed fits")  # the report's first answer
    assert sorted(os.listdir(os.path.join(out, "figures"))) == sorted(FIGURES)
    # The study's own calibration: three of its cells (3 seeds each), every scenario, its false-positive rate.
    run = rundir.RunDir(out)
    calibrated = run.read_json(rundir.CALIBRATION)
    assert 1 <= len(calibrated["cells"]) <= 3 and calibrated["synthetic_cells"] == cfg.study.calibration_cells
    assert all(c["parameters"]["seeds"] == 3 and len(c["scenarios"]) == 6 for c in calibrated["cells"])
    assert calibrated["false_positive_max"] <= calibration.FALSE_POSITIVE_TARGET
    # The barrier stage measured the members kept at step 20 as well as the final ones (step 40).
    by_step = run.read_csv(rundir.STEP_MEMBERS)
    final = run.read_csv(rundir.MEMBERS)
    assert [m["finetune_step"] for m in by_step] == [20] * len(final) + [40] * len(final)
    assert [{k: v for k, v in m.items() if k != "finetune_step"} for m in by_step[len(final):]] == final
    assert all(a["test_loss"] != b["test_loss"] for a, b in zip(by_step, final))  # re-evaluated at step 20
    assert {p["finetune_step"] for p in run.read_csv(rundir.STEP_PAIRS)} == {20, 40}
    critical = run.read_csv(rundir.CRITICAL)
    assert [(r["pretrain_step"], r["finetune_step"]) for r in critical] == [(s, n) for n in (20, 40)
                                                                           for s in (-1, 0, 60)]
    for r in critical:
        assert r["lowest_lr"] == 0.001 and r["highest_lr"] == 0.01 and r["members"] == 6
        # A bracket of the grid's rates (0: below the grid, NaN: none shown to stay, +inf: none shown to leave), every
        # rate with enough usable members judged once.
        assert (np.isnan(r["stay_lr"]) or r["stay_lr"] in (0.0, 0.001, 0.01)) and r["leave_lr"] in (0.001, 0.01, np.inf)
        assert not r["stay_lr"] >= r["leave_lr"] and r["margin"] == decide.MARGIN
        assert r["rates_staying"] + r["rates_leaving"] + r["rates_unresolved"] <= 2
    # Seeds from different random initialisations (scratch) are closer after weight matching.
    scratch = [r for r in summary if r["pretrain_step"] == "-1"]
    assert np.mean([float(r["loss_barrier_test_aligned_mean"]) for r in scratch]) < np.mean(
        [float(r["loss_barrier_test_mean"]) for r in scratch])
    soups = read_csv(os.path.join(out, "soups.csv"))
    members = read_csv(os.path.join(out, "members.csv"))
    for row in soups:
        cell = [m["member"] for m in members if (m["pretrain_step"], m["lr"]) == (row["pretrain_step"], row["lr"])]
        assert set(row["greedy_members"].split()) <= set(cell) and row["best_member"] in row["greedy_members"].split()
        assert float(row["greedy_val_acc"]) >= float(row["best_val_acc"]) - 1e-9
    # Merges: every cell has each method's validation-chosen merge, Model Stock's t and the update cosine; task
    # arithmetic's grid holds its uniform-soup point only by accident, so its accuracy is its own.
    merged = run.read_csv(rundir.MERGES)
    assert [(r["pretrain_step"], r["lr"]) for r in merged] == [(s, lr) for s in (-1, 0, 60) for lr in (0.001, 0.01)]
    for row in merged:
        for key in ("task_arithmetic_test_acc", "ties_test_acc", "model_stock_test_acc", "ties_ood_acc",
                    "task_arithmetic_scale", "ties_density", "model_stock_t", "update_cos"):
            assert np.isfinite(row[key]), key
        assert -1.0 <= row["update_cos"] <= 1.0
    assert "<h2>Merges</h2>" in page
    # Sharpness: every member and every start (scratch: one per seed; checkpoints 0 and 60).
    sharp = run.read_csv(rundir.SHARPNESS)
    assert [r["member"] for r in sharp] == [m["member"] for m in run.members()]
    assert all(np.isfinite(r["sharpness"]) and r["sharpness_residual"] >= 0 for r in sharp)
    starts = run.read_csv(rundir.START_SHARPNESS)
    assert sorted((r["pretrain_step"], r["seed"]) for r in starts) == [(-1, 0), (-1, 1), (-1, 2), (0, -1), (60, -1)]


def test_scratch_members_start_apart_and_checkpoint_members_together(reference):
    cfg, out, _ = reference
    members = rundir.RunDir(out).members()
    run = barrier_stage.load_run(cfg, out)
    start_M = api.start_params(cfg, out, run.model, members, run.task.train)
    kernel = np.asarray(start_M["dense0"]["kernel"])
    scratch = [m["member"] for m in members if m["pretrain_step"] == -1]
    step0 = [m["member"] for m in members if m["pretrain_step"] == 0]
    assert len(scratch) == 6 and not np.allclose(kernel[scratch[0]], kernel[scratch[1]])
    np.testing.assert_array_equal(kernel[scratch[0]], kernel[scratch[3]])  # seed 0 at both LRs: one initialisation
    np.testing.assert_array_equal(kernel[step0[0]], kernel[step0[1]])  # the step-0 checkpoint, shared


def test_rerun_skips_every_stage_and_study_settings_rerun_only_later_stages(reference, data_dir, tmp_path):
    cfg, out, _ = reference
    assert study.study(cfg, out, progress=False) == []
    copy = str(tmp_path / "copy")
    shutil.copytree(out, copy)
    changed = tiny(data_dir, "study.similarity_examples=500")
    assert study.study(changed, copy, progress=False) == ["similarity", "calibrate", "report"]
    assert len(read_csv(os.path.join(copy, "similarity.csv"))) == len(read_csv(os.path.join(out, "similarity.csv")))
    # The margin decides the cell verdicts, H3's stays and the basins' cut: everything that reads it runs again.
    wider = tiny(data_dir, "study.similarity_examples=500", "study.margin=0.3")
    assert study.study(wider, copy, progress=False) == ["barriers", "refine", "similarity", "calibrate", "report"]
    assert {float(r["margin"]) for r in read_csv(os.path.join(copy, "barriers", "summary.csv"))} == {0.3}
    assert {float(r["basin_threshold"]) for r in read_csv(os.path.join(copy, "similarity.csv"))} == {0.3}
    assert rundir.RunDir(copy).read_json(rundir.CALIBRATION)["margin"] == 0.3


def test_a_round_whose_members_all_fail_is_data_and_the_study_finishes(reference, data_dir, tmp_path, monkeypatch):
    """A refinement round at a rate where every member diverges (it brackets the trainability edge): the study finishes,
    the round's members join the critical-rate tables as failing, and the report says every one failed."""
    cfg, ref_out, _ = reference
    out = str(tmp_path / "failing")
    shutil.copytree(ref_out, out)
    monkeypatch.setattr(refine, "proposals", lambda critical: {1e30: ["step 0 per_seed: 0.01 → inf (trainability)"]})
    assert study.study(tiny(data_dir, "study.refine_rounds=1"), out, progress=False) == ["refine", "report"]
    run = rundir.RunDir(out)
    [row] = run.read_csv(rundir.REFINE_ROUNDS)
    assert row["lrs"] == "1e+30" and row["unusable"] == row["members"] == 9
    members, pairs, _ = run.step_tables()
    failing = [m for m in members if m["lr"] == 1e30 and m["finetune_step"] == cfg.finetune.steps]
    assert len(failing) == 9 and all(m["diverged"] or m["unfit"] for m in failing)
    assert not [p for p in pairs if p["lr"] == 1e30 and p["finetune_step"] == cfg.finetune.steps]
    assert "9 members, all diverged or unfit — no pairs" in open(run.path(rundir.REPORT)).read()


def test_refinement_adds_the_midpoints_of_wide_brackets_for_every_start_and_resumes(reference, data_dir, tmp_path,
                                                                                   monkeypatch):
    """One round on the tiny grid (rates ×10 apart): the log-midpoint of a wide bracket, trained for every start in
    refine/round1/ on hard links of the pretraining checkpoints, joins the grid's rates in critical.csv; a round killed
    before its barriers resumes without training again; fewer rounds remove it. With 3 seeds no rate of the tiny grid
    is shown to stay or leave, so no bracket is decided: the round's rate is the midpoint a decided bracket [0.001,
    0.01] would propose (refine.proposals itself: tests/test_critical.py)."""
    cfg, ref_out, _ = reference
    out = str(tmp_path / "refined")
    shutil.copytree(ref_out, out)
    run = rundir.RunDir(out)
    assert refine.proposals(run.read_csv(rundir.CRITICAL)) == {}  # nothing decided, nothing refined
    wanted = {refine.midpoint(0.001, 0.01): ["step 0 per_seed: 0.001 → 0.01 (combined)"]}
    monkeypatch.setattr(refine, "proposals", lambda critical: wanted)
    refined = tiny(data_dir, "study.refine_rounds=1")
    measure_barriers = barrier_stage.barriers_of_run

    def killed_in_a_round(cfg, out, *args, **kwargs):
        if "refine" in out:
            raise KeyboardInterrupt
        return measure_barriers(cfg, out, *args, **kwargs)

    with monkeypatch.context() as patched:
        patched.setattr(barrier_stage, "barriers_of_run", killed_in_a_round)
        with pytest.raises(KeyboardInterrupt):
            study.study(refined, out, progress=False)
    one = run.refine_round(1)
    assert run.refined_rounds() == [] and one.exists(rundir.MEMBERS)
    trained_at = os.path.getmtime(one.path(rundir.FINETUNE_CURVES))
    assert study.study(refined, out, progress=False) == ["refine", "report"]
    assert os.path.getmtime(one.path(rundir.FINETUNE_CURVES)) == trained_at  # resumed, not trained again
    [row] = run.read_csv(rundir.REFINE_ROUNDS)
    assert row["lrs"] == " ".join(f"{lr:g}" for lr in wanted) and row["members"] == 9 * len(wanted)
    assert sorted({(m["pretrain_step"], m["lr"]) for m in one.members()}) == sorted(
        (s, lr) for s in (-1, 0, 60) for lr in wanted)
    pretrained = os.path.join(rundir.PRETRAIN_CHECKPOINTS, "60", ckpt.MANIFEST)
    assert os.stat(one.path(pretrained)).st_ino == os.stat(run.path(pretrained)).st_ino
    critical = run.read_csv(rundir.CRITICAL)
    assert all(r["rates"] == 2 + len(wanted) and r["members"] == 3 * (2 + len(wanted)) for r in critical)
    assert "round 1: rates" in open(run.path(rundir.REPORT)).read()
    # Comparing studies: the refined run states the grid's verdicts (the same tables) and its own H3 brackets.
    same = api.compare_runs(ref_out, ref_out)
    assert same and all(r["agree"] for r in same)
    assert {r["verdict"].split(" ")[0] for r in same} >= {"H1", "H2", "basin", "H3"}
    rows = api.compare_runs(ref_out, out)
    assert [r["verdict"] for r in rows] == [r["verdict"] for r in same]
    assert all(r["agree"] for r in rows if not r["verdict"].startswith("H3"))
    refined_h3 = [r["b"] for r in rows if r["verdict"].startswith("H3 stays")]
    assert refined_h3 == [noreturn.bracket_pair(r) for r in critical]  # the refined brackets, not the grid's
    assert cli.main(["compare", ref_out, str(tmp_path / "missing")]) == 2
    assert study.study(refined, out, progress=False) == []
    assert study.study(cfg, out, progress=False) == ["refine", "report"]
    assert not os.path.exists(one.root) and run.read_csv(rundir.REFINE_ROUNDS) == []
    assert read_csv(run.path(rundir.CRITICAL)) == read_csv(os.path.join(ref_out, "critical.csv"))


def test_stages_are_declared_in_an_order_their_needs_respect():
    names = list(study.STAGES)
    assert len(set(names)) == len(names) and names[-1] == "report"
    for k, stage in enumerate(study.STAGES.values()):
        assert set(stage.needs) <= set(names[:k]), stage.name
    assert set(study.STAGES["report"].needs) == set(names[1:-1])  # the report reads every measuring stage's results


def test_a_marker_from_before_a_key_existed_stands_for_its_default(reference, tmp_path):
    """A stage marker without a key added since (here barriers.measures) is the key's default: nothing reruns."""
    cfg, out, _ = reference
    copy = str(tmp_path / "older")
    shutil.copytree(out, copy)
    run = rundir.RunDir(copy)
    marker = run.read_marker("barriers")
    del marker["settings"]["measures"]
    run.write_marker("barriers", marker)
    assert study.study(cfg, copy, progress=False) == []


def test_a_changed_barrier_setting_reruns_what_reads_barriers_and_keeps_the_soups(reference, data_dir, tmp_path):
    cfg, out, _ = reference
    copy = str(tmp_path / "copy")
    shutil.copytree(out, copy)
    soups_before = open(os.path.join(copy, "soups.csv")).read()
    changed = tiny(data_dir, "barriers.bootstrap=50")
    assert study.study(changed, copy, progress=False) == ["barriers", "refine", "similarity", "calibrate", "report"]
    assert open(os.path.join(copy, "soups.csv")).read() == soups_before


# One runner writes every stage's marker, so the stages that differ in how they resume stand for the rest: fine-tuning
# (Orbax checkpoints; pretraining's resume: tests/test_api.py) and the first measuring stage; refinement's rounds: the
# refinement test; a whole study killed with SIGKILL: the kill -9 test.
@pytest.mark.parametrize("stage", ["finetune", "barriers"])
def test_resume_after_interruption_in_a_stage(reference, data_dir, tmp_path, monkeypatch, stage):
    """The stage is killed after doing its work but before its marker is written (the worst moment): the rerun
    resumes at that stage, keeps every earlier stage, and ends with the same results as an uninterrupted study."""
    cfg, ref_out, _ = reference
    out = str(tmp_path / "run")
    index = list(study.STAGES).index(stage)
    original = study.STAGES[stage]

    def interrupted(cfg, out, **kwargs):
        original.run(cfg, out, **kwargs)
        raise KeyboardInterrupt

    stages = study.STAGES.copy()
    stages[stage] = dataclasses.replace(original, run=interrupted)
    monkeypatch.setattr(study, "STAGES", stages)
    if index >= list(study.STAGES).index("finetune"):
        # The stages before it are the reference's: copy them (their markers and files) rather than train again, and
        # remove what this stage and the later ones wrote, so that they run from nothing (fine-tuning keeps its
        # checkpoints: it was interrupted after its training, and evaluates the members again).
        shutil.copytree(ref_out, out)
        run = rundir.RunDir(out)
        for later in list(study.STAGES.values())[index:]:
            run.remove_marker(later.name)
            for name in later.writes:
                if run.exists(name):
                    os.remove(run.path(name))
    with pytest.raises(KeyboardInterrupt):
        study.study(cfg, out, progress=False)
    markers = sorted(os.listdir(os.path.join(out, "stages")))
    assert markers == sorted(f"{s}.json" for s in list(study.STAGES)[:index])
    before = {m: open(os.path.join(out, "stages", m)).read() for m in markers}
    monkeypatch.undo()
    assert study.study(cfg, out, progress=False) == list(study.STAGES)[index:]
    assert all(open(os.path.join(out, "stages", m)).read() == text for m, text in before.items())
    assert read_csv(os.path.join(out, "summary.csv")) == read_csv(os.path.join(ref_out, "summary.csv"))
    assert read_csv(os.path.join(out, "critical.csv")) == read_csv(os.path.join(ref_out, "critical.csv"))


def test_kill_9_during_the_study_loses_nothing(reference, data_dir, tmp_path):
    cfg, ref_out, _ = reference
    out = str(tmp_path / "killed")
    command = [sys.executable, "-m", "jaxlmc.cli", "study", "configs/mnist1d.toml", "--out", out, "--quiet"]
    for o in TINY + [f'data.data_dir="{data_dir}"', *STUDY]:
        command += ["--set", o]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not os.path.exists(os.path.join(out, "stages", "finetune.json")):
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() < deadline, "the study never finished fine-tuning"
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(os.path.join(out, "report.html"))
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert read_csv(os.path.join(out, "summary.csv")) == read_csv(os.path.join(ref_out, "summary.csv"))


def test_greedy_soup_never_reads_test_data(reference, monkeypatch):
    """Replace the test and OOD sets with noise: the greedy soups and the best members stay the same."""
    cfg, out, _ = reference
    honest = read_csv(os.path.join(out, "soups.csv"))
    load = tasks.load_finetune_task
    rng = np.random.default_rng(0)

    def scrambled(cfg):
        task = load(cfg)
        noise = lambda s: dataclasses.replace(s, x=rng.normal(size=s.x.shape).astype(np.float32),  # noqa: E731
                                              y=rng.permutation(s.y))
        return dataclasses.replace(task, test=noise(task.test), ood=noise(task.ood))

    monkeypatch.setattr(tasks, "load_finetune_task", scrambled)
    rows = api.soups_of_run(cfg, out)
    for a, b in zip(honest, rows):
        assert a["greedy_members"] == b["greedy_members"] and int(a["best_member"]) == b["best_member"]
        assert float(a["greedy_val_acc"]) == pytest.approx(b["greedy_val_acc"])
    assert any(abs(float(a["uniform_test_acc"]) - b["uniform_test_acc"]) > 0.01 for a, b in zip(honest, rows))
    # Put the honest soups back for the other tests of this module.
    monkeypatch.undo()
    api.soups_of_run(cfg, out)


def test_report_command_and_its_errors(reference, tmp_path):
    _, out, _ = reference
    os.remove(os.path.join(out, "report.html"))
    done = subprocess.run([sys.executable, "-m", "jaxlmc.cli", "report", out], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert os.path.exists(os.path.join(out, "report.html"))
    empty = subprocess.run([sys.executable, "-m", "jaxlmc.cli", "report", str(tmp_path)], capture_output=True,
                           text=True)
    assert empty.returncode == 2 and "run `jaxlmc study`" in empty.stderr


def test_plan_command_refuses_what_it_cannot_plan_from(reference, tmp_path):
    """`jaxlmc plan`: two seeds' one pair per cell cannot separate member effects from pair noise, a directory
    without barriers has nothing to plan from, a target outside (0, 1) is refused: one line each, exit 2."""
    _, out, _ = reference
    cases = [([out, "--mde", "0.005"], "its variance components cannot be separated"),
             ([str(tmp_path), "--mde", "0.005"], "has no barriers/pairs.csv"),
             ([out, "--mde", "2"], "--mde must lie in (0, 1)")]
    for args, message in cases:
        proc = subprocess.run([sys.executable, "-m", "jaxlmc.cli", "plan", *args], capture_output=True, text=True)
        assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.splitlines()) == 1, proc.stderr


def test_validation_split_is_held_out_of_training(data_dir):
    cfg = tiny(data_dir)
    task = api.load_finetune_task(cfg)
    full = data.load_task(cfg.data.finetune_task, cfg.data.finetune_labels, data_dir)["train"]
    assert len(task.train.y) + len(task.val.y) == len(full.y) and len(task.val.y) == 300
    np.testing.assert_array_equal(task.val.x, full.x[-300:])
    with pytest.raises(config.ConfigError, match="data.validation_size 4000"):
        api.load_finetune_task(tiny(data_dir, "data.validation_size=4000"))


BROWSER = ("/usr/bin/chromium", "/usr/bin/chromedriver")


def test_report_renders_in_a_headless_browser(reference):
    """Debian's chromium opens report.html offline: every figure decodes to a non-empty image, no console errors."""
    if not all(os.path.exists(p) for p in BROWSER):
        if os.environ.get("JAXLMC_REQUIRE_BROWSER"):
            pytest.fail("chromium and chromedriver are required here (.ci/run installs them)")
        pytest.skip("Debian's chromium and chromium-driver are not installed (.ci/run installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    _, out, _ = reference
    options = webdriver.ChromeOptions()
    options.binary_location = BROWSER[0]
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(BROWSER[1]), options=options)
    try:
        driver.get("file://" + os.path.abspath(os.path.join(out, "report.html")))
        images = driver.execute_script(
            "return Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.naturalHeight])")
        assert len(images) == len(FIGURES)
        assert all(complete and width > 100 and height > 100 for complete, width, height in images), images
        errors = [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
        assert errors == []
        assert "Is fine-tuning path dependent?" in driver.title + driver.page_source
    finally:
        driver.quit()


def test_a_width_and_depth_scaling_trend(data_dir, tmp_path):
    cfg = config.load("configs/mnist1d.toml", TINY + [f'data.data_dir="{data_dir}"', "barriers.alphas=3",
                                                      "barriers.chunk_pairs=4", "data.validation_size=300",
                                                      "finetune.pretrain_steps=[60]", "study.widths=[8, 16]",
                                                      "model.width=8", "model.depth=1", "study.depths=[1, 2]",
                                                      'study.size_grid="cross"', "barriers.align=true",
                                                      "study.sharpness_iterations=0", "study.calibration_cells=0"])
    out = str(tmp_path / "trend")
    ran = study.study(cfg, out, progress=False)
    names = ["width8_depth1", "width16_depth1", "width8_depth2"]  # the widths at depth 1, then depth 2 at width 8
    assert ran[:len(list(study.STAGES))] == [f"{names[0]}/{s}" for s in list(study.STAGES)]
    assert sorted({r.split("/")[0] for r in ran}) == sorted(names)
    top = rundir.RunDir(out)
    rows = top.read_csv(rundir.SCALING)
    assert [(r["width"], r["depth"], r["lr"]) for r in rows] == [
        (w, d, lr) for w, d in ((8, 1), (16, 1), (8, 2)) for lr in (0.001, 0.01)]
    for r in rows:
        size_summary = top.size(f"width{r['width']}_depth{r['depth']}").read_csv(rundir.SUMMARY)
        match = [s for s in size_summary if s["lr"] == r["lr"]][0]
        assert r["error_barrier_test_mean"] == pytest.approx(match["error_barrier_test_mean"])
        assert r["finetune_member_steps_per_s"] > 0 and r["barrier_seconds_per_pair"] > 0
        assert r["error_barrier_test_lin_aligned_mean"] == pytest.approx(match["error_barrier_test_lin_aligned_mean"])
        critical = [c for c in top.size(f"width{r['width']}_depth{r['depth']}").read_csv(rundir.CRITICAL)
                    if c["pretrain_step"] == r["pretrain_step"] and c["finetune_step"] == cfg.finetune.steps][0]
        assert r["probe_test_acc"] == critical["probe_test_acc"]
        bracket = (critical["stay_lr"], critical["leave_lr"])
        assert (r["critical_stay_lr"], r["critical_leave_lr"]) == pytest.approx(bracket, nan_ok=True)
    run = barrier_stage.load_run(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, width=8, depth=2),
                                                     study=dataclasses.replace(cfg.study, widths=[], depths=[])),
                                 os.path.join(out, "width8_depth2"))
    members = len(top.size("width8_depth2").members())
    assert run.params["dense1"]["kernel"].shape == (members, 8, 8)
    assert rows[-1]["params_per_member"] == sum(leaf.size for leaf in jax.tree.leaves(run.params)) / members
    page = open(os.path.join(out, "scaling.html")).read()
    assert page.count("data:image/png;base64,") == 1 and "width8_depth2/report.html" in page
    assert "<h2>Trends</h2>" in page
    # The trends, recomputed from each size's own tables: the power law through two sizes is the log-ratio of their
    # within-cell means; each series (widths at depth 1, depths at width 8) is fitted on its own.
    fits = top.read_csv(rundir.SCALING_FITS)
    assert {(f["axis"], f["width"], f["depth"]) for f in fits} == {("width", 0, 1), ("depth", 8, 0)}
    # Both barriers, straight and after weight matching (the study's headline is the matched one).
    assert {f["measure"] for f in fits} == {"error_barrier_test_lin", "error_barrier_test_lin_aligned"}
    summaries = {name: {grid.cell(r): r for r in top.size(name).read_csv(rundir.BARRIER_SUMMARY)} for name in names}
    for f in fits:
        pair = names[:2] if f["axis"] == "width" else [names[0], names[2]]
        means = [summaries[name][grid.cell(f)][f"{f['measure']}_mean"] for name in pair]
        if min(means) > 0:
            assert f["exponent"] == pytest.approx(np.log(means[1] / means[0]) / np.log(2), rel=1e-9)
            # (a draw whose mean barrier is 0 at some size cannot be fitted on logs: it is left out, and counted)
            assert f["exponent_ci_lo"] <= f["exponent_ci_hi"] if f["replicates"] >= 2 else np.isnan(f["exponent_ci_lo"])
        else:
            assert np.isnan(f["exponent"])
    critical = {name: top.size(name).read_csv(rundir.CRITICAL) for name in names}
    for s in top.read_csv(rundir.SCALING_CRITICAL):
        pair = names[:2] if s["axis"] == "width" else [names[0], names[2]]
        same = [[r for r in critical[name] if (r["pretrain_step"], r["head"], r["finetune_step"])
                 == (s["pretrain_step"], s["head"], s["finetune_step"])][0] for name in pair]
        expected = trends.censored_slope([1, 2] if s["axis"] == "depth" else [8, 16], [r["stay_lr"] for r in same],
                                         [r["leave_lr"] for r in same])
        assert s["consistent"] == expected.consistent
        assert (s["slope_lo"], s["slope_hi"]) == pytest.approx((expected.lo, expected.hi), nan_ok=True)
    cost = {(c["axis"], c["quantity"]): c for c in top.read_csv(rundir.SCALING_COST)}
    params = {(r["width"], r["depth"]): r["params_per_member"] for r in rows}
    assert cost[("width", "params_per_member")]["exponent"] == pytest.approx(
        np.log(params[(16, 1)] / params[(8, 1)]) / np.log(2))
    assert study.study(cfg, out, progress=False) == []  # resumes: nothing left to do
    # A size that cannot fit in memory is refused before anything is written, naming the size.
    fresh = str(tmp_path / "too_large")
    huge = dataclasses.replace(cfg, study=dataclasses.replace(cfg.study, widths=[8, 2 ** 24]))
    with pytest.raises(config.ConfigError, match=r"^size width16777216_depth1: "):
        study.study(huge, fresh, progress=False)
    assert not os.path.exists(fresh)


def test_a_cell_whose_members_all_diverged_has_no_soup(reference, tmp_path):
    cfg, out, _ = reference
    copy = str(tmp_path / "copy")
    shutil.copytree(out, copy)
    rows = read_csv(os.path.join(copy, "members.csv"))
    for r in rows:
        if r["pretrain_step"] == "0" and r["lr"] == "0.01":
            r["diverged"] = "True"
    rundir.RunDir(copy).write_csv(rundir.MEMBERS, rows)
    soups = api.soups_of_run(cfg, copy)
    dead = [s for s in soups if s["pretrain_step"] == 0 and s["lr"] == 0.01]
    assert len(dead) == 1 and dead[0]["members_used"] == 0 and np.isnan(dead[0]["uniform_test_acc"])
    assert all(np.isfinite(s["uniform_test_acc"]) and np.isfinite(s["greedy_test_acc"]) for s in soups
               if s is not dead[0])


def test_activation_matching_repair_curves_and_layerwise_barriers(reference, data_dir, tmp_path):
    """The barrier stage rerun with activation matching, REPAIR, Bezier curves and layer-wise barriers: the aligned,
    _repair, _curve and layer-wise columns are there and finite, activation matching lowers the scratch seeds'
    barrier as weight matching does, the trained curves lower it further, and the report shows them."""
    cfg, out, _ = reference
    copy = str(tmp_path / "copy")
    shutil.copytree(out, copy)
    changed = tiny(data_dir, 'barriers.align="activations"', "barriers.repair=true", "barriers.layerwise=true",
                   "barriers.curve_steps=30", "barriers.curve_lr=0.01")
    assert study.study(changed, copy, progress=False) == ["barriers", "refine", "similarity", "calibrate", "report"]
    run = rundir.RunDir(copy)
    pairs = run.read_csv(rundir.PAIRS)
    for key in ("error_barrier_test_aligned", "loss_barrier_test_repair", "error_barrier_test_repair_floor",
                "loss_barrier_test_curve", "error_barrier_test_curve_floor"):
        assert all(np.isfinite(p[key]) for p in pairs), key
    scratch = [p for p in pairs if p["pretrain_step"] == -1]
    assert np.mean([p["loss_barrier_test_aligned"] for p in scratch]) < np.mean([p["loss_barrier_test"]
                                                                                 for p in scratch])
    layers = run.read_csv(rundir.LAYERWISE_SUMMARY)
    assert {r["layer"] for r in layers} == {"dense0", "dense1", "head"}
    assert len(run.read_csv(rundir.LAYERWISE)) == 3 * len(pairs)
    page = open(run.path(rundir.REPORT)).read()
    assert "Layer-wise barriers" in page and "REPAIR" in page and "Bezier curve" in page
    # The curve bends away from the straight line where the scratch seeds have a barrier, and lowers it.
    assert np.mean([p["loss_barrier_test_curve"] for p in scratch]) < np.mean([p["loss_barrier_test_aligned"]
                                                                               for p in scratch])
