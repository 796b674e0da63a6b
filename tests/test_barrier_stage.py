"""`jaxlmc barriers` on a finished fine-tuning run: files, pair sets, diverged members, agreement with the reference."""
import csv
import dataclasses
import itertools
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlmc import api, barrier_stage, config, grid, models, pair_sets, paths, reference, rundir, stats, train
from jaxlmc.config import ConfigError

from conftest import TINY


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def run(tmp_path_factory, data_dir):
    cfg = config.load("configs/mnist1d.toml", TINY + [f'data.data_dir="{data_dir}"', "finetune.seeds=3"])
    out = str(tmp_path_factory.mktemp("run"))
    api.finetune(cfg, out, progress=False)
    return cfg, out


def with_barriers(cfg, **changes):
    return dataclasses.replace(cfg, barriers=dataclasses.replace(cfg.barriers, **changes))


@pytest.mark.slow
def test_within_pairs_files_and_agreement_with_the_reference_loop(run):
    cfg, out = run
    result = barrier_stage.barriers_of_run(with_barriers(cfg, alphas=5), out)
    directory = os.path.join(out, "barriers")
    pairs = read_csv(os.path.join(directory, "pairs.csv"))
    # 2 checkpoints × 2 lrs = 4 cells of 3 seeds: 3 pairs each, every pair inside its cell.
    assert len(pairs) == 12 and all(p["same_cell"] == "True" for p in pairs)
    members = rundir.RunDir(out).members()
    for p in pairs:
        assert grid.cell(members[int(p["i"])]) == grid.cell(members[int(p["j"])])
    for column in ["loss_barrier_train", "error_barrier_test", "loss_barrier_test_lin", "error_barrier_ood_lin",
                   "loss_mid_ood", "dist", "update_cos"]:
        assert column in pairs[0]

    curves = np.load(os.path.join(directory, "curves.npz"))
    assert curves["loss_test"].shape == (12, 5) and curves["start_error_ood"].shape == (12, 5)
    np.testing.assert_allclose(curves["alphas"], np.linspace(0, 1, 5))

    # One pair against the plain loop on the test set, parameters read back from the checkpoint.
    task = api.load_finetune_task(cfg)
    model = models.build(cfg.model, task.input_shape, task.train.num_classes)
    i, j = int(pairs[5]["i"]), int(pairs[5]["j"])
    params_2 = jax.tree.map(lambda a, b: jnp.stack([a, b]), api.load_member(out, i), api.load_member(out, j))
    ref_loss, ref_err = reference.reference_curves(model, params_2, [(0, 1)], curves["alphas"],
                                                  jnp.asarray(task.test.x), jnp.asarray(task.test.y))
    np.testing.assert_allclose(curves["loss_test"][5], ref_loss[0], rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(curves["error_test"][5], ref_err[0], atol=1e-6)
    assert float(pairs[5]["loss_barrier_test"]) == pytest.approx(stats.barrier_endpoint_mean(ref_loss)[0],
                                                                 rel=1e-4, abs=1e-6)
    # The member end of a to-start curve is the member's own test loss from members.csv.
    np.testing.assert_allclose(curves["start_loss_test"][:, 0],
                               [float(m["test_loss"]) for m in read_csv(os.path.join(out, "members.csv"))],
                               rtol=1e-5)

    # Geometry: distance between members and the cosine of their updates, against numpy.
    start_M = api.start_params(cfg, out, model, members, barrier_stage.load_run(cfg, out).task.train)
    flat = lambda t: np.concatenate([np.ravel(a) for a in jax.tree.leaves(t)])  # noqa: E731
    u_i = flat(api.load_member(out, i)) - flat(jax.tree.map(lambda a: a[i], start_M))
    u_j = flat(api.load_member(out, j)) - flat(jax.tree.map(lambda a: a[j], start_M))
    assert float(pairs[5]["update_cos"]) == pytest.approx(u_i @ u_j / np.linalg.norm(u_i) / np.linalg.norm(u_j),
                                                           rel=1e-4)
    assert float(pairs[5]["dist"]) == pytest.approx(
        np.linalg.norm(flat(api.load_member(out, i)) - flat(api.load_member(out, j))), rel=1e-5)

    summary = read_csv(os.path.join(directory, "summary.csv"))
    assert len(summary) == 4 and all(int(row["pairs"]) == 3 for row in summary)
    cell_rows = [p for p in result["pairs"] if p["pretrain_step"] == int(summary[0]["pretrain_step"])
                 and p["lr"] == float(summary[0]["lr"])]
    mean = np.mean([p["error_barrier_test"] for p in cell_rows])
    assert float(summary[0]["error_barrier_test_mean"]) == pytest.approx(mean, abs=1e-9)
    assert float(summary[0]["error_barrier_test_ci_lo"]) <= mean <= float(summary[0]["error_barrier_test_ci_hi"])
    settings = json.load(open(os.path.join(directory, "settings.json")))
    assert settings["chunk_pairs"] >= 1 and settings["diverged_members"] == 0


@pytest.mark.slow
def test_all_pairs_and_diverged_members_left_out(run, tmp_path):
    cfg, out = run
    copy = str(tmp_path / "copy")
    shutil.copytree(out, copy)
    rows = read_csv(os.path.join(copy, "members.csv"))
    rows[4]["diverged"] = "True"
    rundir.RunDir(copy).write_csv(rundir.MEMBERS, rows)
    result = barrier_stage.barriers_of_run(with_barriers(cfg, alphas=3, pairs="all", chunk_pairs=5), copy)
    assert len(result["pairs"]) == len(list(itertools.combinations(range(11), 2)))
    assert all(4 not in (p["i"], p["j"]) for p in result["pairs"])
    assert result["settings"]["left_out_pairs"] == 11 and result["settings"]["diverged_members"] == 1
    assert [s["member"] for s in result["to_start"]] == [m for m in range(12) if m != 4]
    assert {p["same_cell"] for p in result["pairs"]} == {True, False}


@pytest.mark.slow
def test_explicit_pair_file(run, tmp_path):
    cfg, out = run
    path = tmp_path / "pairs.csv"
    path.write_text("i,j\n0,1\n3,0\n")
    result = barrier_stage.barriers_of_run(with_barriers(cfg, alphas=3, pairs=str(path)), out)
    assert [(p["i"], p["j"]) for p in result["pairs"]] == [(0, 1), (3, 0)]
    (tmp_path / "bad.txt").write_text("0 1\n0 99\n")
    with pytest.raises(ConfigError, match="member 99 out of range"):
        barrier_stage.barriers_of_run(with_barriers(cfg, alphas=3, pairs=str(tmp_path / "bad.txt")), out)


def test_read_pairs_formats(tmp_path):
    (tmp_path / "a.txt").write_text("# pairs\n0 1\n2, 3\n")
    assert pair_sets.read_pairs(str(tmp_path / "a.txt"), 4) == [(0, 1), (2, 3)]
    (tmp_path / "b.csv").write_text("j,i,note\n1,0,x\n")
    assert pair_sets.read_pairs(str(tmp_path / "b.csv"), 4) == [(0, 1)]
    (tmp_path / "c.csv").write_text("a,b\n1,0\n")
    with pytest.raises(ValueError, match="columns i and j"):
        pair_sets.read_pairs(str(tmp_path / "c.csv"), 4)


@pytest.mark.slow
def test_cli_prints_the_summary_and_refuses_training_overrides(run, tmp_path):
    _, out = run
    cli = [sys.executable, "-m", "jaxlmc.cli", "barriers", out]
    done = subprocess.run(cli + ["--alphas", "3"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "error barrier between seeds" in done.stdout and "to the probed start" in done.stdout
    refused = subprocess.run(cli + ["--set", "finetune.lrs=[0.1]"], capture_output=True, text=True)
    assert refused.returncode == 2 and "finetune.lrs decides how the members" in refused.stderr
    (tmp_path / "across.csv").write_text("i,j\n0,6\n1,7\n")  # every pair joins two cells: no cell gets a pair
    across = subprocess.run(cli + ["--alphas", "3", "--pairs", str(tmp_path / "across.csv")], capture_output=True,
                            text=True)
    assert across.returncode == 0, across.stderr
    assert "2 pairs join members of different cells" in across.stdout
    (tmp_path / "self.csv").write_text("i,j\n0,1\n2,2\n")
    itself = subprocess.run(cli + ["--pairs", str(tmp_path / "self.csv")], capture_output=True, text=True)
    assert itself.returncode == 2 and itself.stderr.strip().endswith("pair 2: (2, 2) pairs member 2 with itself")
    missing = subprocess.run(cli + ["--pairs", str(tmp_path / "nope.csv")], capture_output=True, text=True)
    assert missing.returncode == 2 and "nope.csv" in missing.stderr
    not_a_run = subprocess.run([sys.executable, "-m", "jaxlmc.cli", "barriers", str(tmp_path)], capture_output=True,
                               text=True)
    assert not_a_run.returncode == 2 and "not a run directory" in not_a_run.stderr


@pytest.mark.slow
def test_auto_chunk_size_follows_the_memory_budget():
    model = models.build(config.ModelConfig(kind="mlp", width=64, depth=2), (10,), 3)
    params_M = jax.vmap(model.init)(jax.random.split(jax.random.key(0), 16))
    x = np.zeros((200, 10), np.float32)
    sets = {"test": train.batch_eval_set(x, np.zeros(200, np.int32), 100)}
    alphas = paths.alpha_grid(9)
    assert paths.auto_chunk_pairs(model, params_M, sets, alphas, num_pairs=120, budget_bytes=1) == 1
    assert paths.auto_chunk_pairs(model, params_M, sets, alphas, num_pairs=120, budget_bytes=2**40) == 120
    middle = paths.auto_chunk_pairs(model, params_M, sets, alphas, num_pairs=120, budget_bytes=4 * 2**20)
    assert 1 < middle < 120  # ≈ 7 α × 100 examples × 64 units × 4 B × a few buffers per pair


def test_all_sets_in_one_pass_equal_separate_passes():
    model = models.build(config.ModelConfig(kind="mlp", width=8, depth=1), (4,), 3)
    params_M = jax.vmap(model.init)(jax.random.split(jax.random.key(2), 4))
    rng = np.random.default_rng(0)
    sets = {name: train.batch_eval_set(rng.normal(size=(n, 4)), rng.integers(0, 3, n), 16)
            for name, n in [("a", 40), ("b", 23)]}
    pairs = jnp.asarray([(0, 1), (2, 3), (1, 3)], jnp.int32)
    fn = paths.make_path_eval(model, paths.straight(), paths.alpha_grid(5), 2)
    together = fn(params_M, pairs, sets)
    for name, s in sets.items():
        alone = fn(params_M, pairs, {name: s})[name]
        np.testing.assert_allclose(together[name][0], alone[0], rtol=1e-6)


def test_midpoint_and_bootstrap():
    curve = np.array([[0.0, 1.0, 3.0, 1.0]])
    assert stats.midpoint(curve, np.linspace(0, 1, 4))[0] == pytest.approx(2.0)  # between α = 1/3 and 2/3
    values = np.random.default_rng(0).normal(1.0, 0.1, 50)
    lo, hi = stats.ci(stats.member_replicates(values, stats.seed_draws(50, 2000)))
    assert lo < values.mean() < hi and hi - lo < 0.1
    assert np.isnan(stats.ci(stats.member_replicates([1.0, 2.0], stats.seed_draws(2, 100)))[0])  # < 3 members
