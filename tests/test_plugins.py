"""jaxlmc extended from outside the package: a model kind, datasets, a pair measure and a study stage defined in
examples/lmc_plugin.py run the whole `jaxlmc study` through the CLI, weight matching included, with no edit to
jaxlmc/."""
import csv
import os
import subprocess
import sys

import numpy as np
import pytest

from jaxlmc import api, config, rundir, study

PLUGINS = os.path.join(os.path.dirname(__file__), "plugins")
EXAMPLES = os.path.join(os.path.dirname(__file__), os.pardir, "examples")
SETTINGS = ["data.pretrain_task=blobs_pre", "data.finetune_task=blobs_fine", "data.ood_task=blobs_ood",
            "data.finetune_labels=identity", "data.train_eval_size=500", "data.validation_size=300",
            "model.kind=tanhnet", "model.width=16", "pretrain.steps=100", "pretrain.save_steps=[0, 100]",
            "pretrain.weight_decay=0.0", "pretrain.batch_size=50", "finetune.pretrain_steps=[100]",
            "finetune.lrs=[0.003, 0.03]", 'finetune.heads=["per_seed"]', "finetune.seeds=3", "finetune.steps=60",
            "finetune.warmup_steps=0", "finetune.batch_size=50", "finetune.scratch=true", "run.chunk_steps=20",
            "run.checkpoint_every=20", "barriers.alphas=5", "barriers.align=true",
            "study.sharpness_iterations=0", "study.similarity_examples=200", 'barriers.measures=["half"]']


def jaxlmc(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([PLUGINS, EXAMPLES, os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "jaxlmc.cli", *args], capture_output=True, text=True, env=env,
                          timeout=900)


@pytest.mark.slow  # a whole study in a subprocess
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
    # The plugin's pair measure, named in barriers.measures, has its columns.
    assert all(np.isfinite(float(r["error_barrier_test_half_mean"])) for r in summary)
    # The plugin's own study stage ran after the soups, with its marker, on every member.
    with open(os.path.join(out, "plugin", "weight_norms.csv")) as f:
        norms = list(csv.DictReader(f))
    assert len(norms) == 2 * 2 * 3 and all(float(r["norm"]) > 0 for r in norms)
    assert os.path.exists(os.path.join(out, "stages", "weight_norms.json"))
    with open(os.path.join(out, "config.json")) as f:
        assert '"lmc_plugin"' in f.read()  # the run remembers its plugin, and names it
    # A run directory does not choose what code runs: its plugin is imported only when the command allows it.
    refused = jaxlmc("barriers", out, "--quiet")
    assert refused.returncode == 2 and refused.stderr.strip().splitlines()[-1] == (
        f"jaxlmc: error: {out} was made with plugin module(s) lmc_plugin, whose code a run directory cannot choose "
        "to run: allow it with --import lmc_plugin"), refused.stderr
    again = jaxlmc("barriers", out, "--quiet", "--import", "lmc_plugin", "--set", "barriers.align=false")
    assert again.returncode == 0, again.stderr[-2000:]
    # Allowed but not importable: one line.
    missing = subprocess.run([sys.executable, "-m", "jaxlmc.cli", "barriers", out, "--import", "lmc_plugin"],
                             capture_output=True, text=True,
                             env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert missing.returncode == 2, missing.stderr
    assert missing.stderr.strip().splitlines()[-1].startswith(
        "jaxlmc: error: plugins.modules: cannot import 'lmc_plugin': ModuleNotFoundError"), missing.stderr


def test_a_kind_named_by_import_path_reads_its_own_arguments(tmp_path, monkeypatch):
    """model.kind = "module:attribute" imports the kind; [model.args] is checked against its dataclass (unknown and
    mistyped keys named), survives the run directory's config.json, and shapes the model that trains."""
    monkeypatch.syspath_prepend(PLUGINS)
    kind = ["model.kind=lmc_models:SCALED_TANH", "data.pretrain_task=points", "data.finetune_task=points",
            "data.ood_task=''", "data.finetune_labels=identity", "data.train_eval_size=300",
            "data.validation_size=200"]
    cfg = config.load(None, kind + ["model.args={hidden = 6, gain = 2.0}", "pretrain.steps=20",
                                    "pretrain.save_steps=[0, 20]", "pretrain.batch_size=50",
                                    "finetune.pretrain_steps=[20]"])
    assert type(cfg.model.args).__name__ == "TanhArgs" and (cfg.model.args.hidden, cfg.model.args.gain) == (6, 2.0)
    rows = api.pretrain(cfg, str(tmp_path / "run"))
    assert [r["step"] for r in rows] == [0, 20]
    saved = api.RunDir(str(tmp_path / "run"))
    assert saved.config().model.args == cfg.model.args
    params = saved.restore_params(rundir.PRETRAIN_CHECKPOINTS, 20)
    assert params["hidden"]["kernel"].shape == (1, 12, 6)
    assert "weight_norms" not in list(study.STAGES)  # (a plugin imported here would change every later study)
    for override, message in [("model.args={hiden = 6}", r"unknown key model.args.hiden \(known keys of "
                                                         r"\[model.args\]: gain, hidden\)"),
                              ("model.args={hidden = 'six'}", "model.args.hidden: expected an integer"),
                              ("model.args={gain = nan}", "model.args.gain: expected a finite number")]:
        with pytest.raises(config.ConfigError, match=message):
            config.load(None, kind + [override])
    with pytest.raises(config.ConfigError, match="model.args: model.kind 'mlp' takes no arguments of its own"):
        config.load(None, ["model.args={hidden = 6}"])
    with pytest.raises(config.ConfigError, match="model.kind: lmc_models.NOPE is missing"):
        config.load(None, ["model.kind=lmc_models:NOPE"])
    with pytest.raises(config.ConfigError, match="model.kind: cannot import 'no_such_module'"):
        config.load(None, ["model.kind=no_such_module:KIND"])
    with pytest.raises(config.ConfigError, match="does not expose its units' activations"):
        config.load(None, kind + ["barriers.align='activations'"])


def test_a_received_run_directory_imports_nothing_it_names(tmp_path, monkeypatch):
    """A run directory's config.json naming plugin modules (and a model kind by import path) imports none of them
    unless the caller allows each: one line lists what the run needs and how to allow it."""
    monkeypatch.syspath_prepend(PLUGINS)
    monkeypatch.syspath_prepend(EXAMPLES)
    raw = config.load("configs/mnist1d.toml").to_dict()
    raw["plugins"]["modules"] = ["lmc_plugin"]
    raw["model"]["kind"] = "lmc_models:SCALED_TANH"
    run = rundir.RunDir(str(tmp_path))
    run.write_json(rundir.CONFIG, {"config": raw})
    for name in ("lmc_plugin", "lmc_models"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    with pytest.raises(config.ConfigError, match=r"was made with plugin module\(s\) lmc_plugin, lmc_models, whose "
                                                 r"code .* allow it with --import lmc_plugin --import lmc_models$"):
        run.config()
    assert "lmc_plugin" not in sys.modules and "lmc_models" not in sys.modules
