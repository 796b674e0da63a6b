"""jaxlmc extended from outside the package: a model kind and datasets defined in tests/plugins/lmc_plugin.py run the
whole `jaxlmc study` through the CLI, weight matching included, with no edit to jaxlmc/."""
import csv
import os
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # a whole study in a subprocess

PLUGINS = os.path.join(os.path.dirname(__file__), "plugins")
SETTINGS = ["data.pretrain_task=blobs_pre", "data.finetune_task=blobs_fine", "data.ood_task=blobs_ood",
            "data.finetune_labels=identity", "data.train_eval_size=500", "data.validation_size=300",
            "model.kind=tanhnet", "model.width=16", "pretrain.steps=100", "pretrain.save_steps=[0, 100]",
            "pretrain.weight_decay=0.0", "pretrain.batch_size=50", "finetune.pretrain_steps=[100]",
            "finetune.lrs=[0.003, 0.03]", 'finetune.heads=["per_seed"]', "finetune.seeds=3", "finetune.steps=60",
            "finetune.warmup_steps=0", "finetune.batch_size=50", "finetune.scratch=true", "run.chunk_steps=20",
            "run.checkpoint_every=20", "barriers.alphas=5", "barriers.align=true",
            "study.sharpness_iterations=0", "study.similarity_examples=200"]


def jaxlmc(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([PLUGINS, os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "jaxlmc.cli", *args], capture_output=True, text=True, env=env,
                          timeout=900)


def test_a_model_kind_and_datasets_from_a_plugin_run_the_whole_study(tmp_path):
    out = str(tmp_path / "plugin_run")
    command = ["study", "configs/mnist1d.toml", "--out", out, "--quiet", "--import", "lmc_plugin"]
    for setting in SETTINGS:
        command += ["--set", setting]
    done = jaxlmc(*command)
    assert done.returncode == 0, done.stderr[-3000:]
    with open(os.path.join(out, "summary.csv")) as f:
        summary = list(csv.DictReader(f))
    assert [(r["pretrain_step"], r["lr"]) for r in summary] == [(s, lr) for s in ("-1", "100")
                                                               for lr in ("0.003", "0.03")]
    # Weight matching ran on the plugin's permutation spec: the scratch seeds (separate initialisations) come closer.
    scratch = [r for r in summary if r["pretrain_step"] == "-1"]
    assert all(np.isfinite(float(r["loss_barrier_test_aligned_mean"])) for r in summary)
    assert np.mean([float(r["loss_barrier_test_aligned_mean"]) for r in scratch]) < np.mean(
        [float(r["loss_barrier_test_mean"]) for r in scratch])
    # The plugin's own study stage ran after the soups, with its marker, on every member.
    with open(os.path.join(out, "plugin", "weight_norms.csv")) as f:
        norms = list(csv.DictReader(f))
    assert len(norms) == 2 * 2 * 3 and all(float(r["norm"]) > 0 for r in norms)
    assert os.path.exists(os.path.join(out, "stages", "weight_norms.json"))
    with open(os.path.join(out, "config.json")) as f:
        assert '"lmc_plugin"' in f.read()  # the run remembers its plugin: a later command imports it itself
    again = jaxlmc("barriers", out, "--quiet", "--set", "barriers.align=false")  # reads the run's own config
    assert again.returncode == 0, again.stderr[-2000:]
    # Without the plugin importable, a command on the run says so in one line.
    missing = subprocess.run([sys.executable, "-m", "jaxlmc.cli", "barriers", out], capture_output=True, text=True,
                             env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert missing.returncode == 2, missing.stderr
    assert missing.stderr.strip().splitlines()[-1].startswith(
        "jaxlmc: error: plugins.modules: cannot import 'lmc_plugin': ModuleNotFoundError"), missing.stderr
