"""Released checkpoints as the pretraining axis: two local "revisions" of a tiny GPT-NeoX in Hugging Face's format
(model.pretrained, finetune.pretrain_revisions) are imported as the pretraining checkpoints at the steps they name,
fine-tuned as a sequence classifier and measured (barriers aligned by weight matching); and the config's one-line
errors."""
import os
import shutil

import jax
import numpy as np
import pytest

from jaxlmc import api, config, data, hf, hf_files, rundir
from jaxlmc.models import base, gpt_neox
from jaxlmc.settings import ModelConfig

ARGS = gpt_neox.GPTNeoXArgs(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=32, rotary_pct=0.5)
ARGS_TOML = ("model.args={vocab_size = 32, hidden_size = 16, num_hidden_layers = 1, num_attention_heads = 2, "
             "intermediate_size = 32, rotary_pct = 0.5}")


def _tokens(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Sequences of 9 tokens below 32; the label says whether token 7 appears more often than token 3 (3 classes:
    fewer, as often, more)."""
    x = np.random.default_rng(seed).integers(0, 32, (n, 9)).astype(np.int32)
    y = (np.sign((x == 7).sum(1) - (x == 3).sum(1)) + 1).astype(np.int32)
    return x, y


if "pretrained_lm" not in data.DATASETS:
    data.register_dataset("pretrained_lm", lambda: {"train": _tokens(1, 600), "test": _tokens(2, 200)}, 3, vocab=32)
    data.register_dataset("pretrained_cls", lambda: {"train": _tokens(3, 900), "test": _tokens(4, 300)}, 3, vocab=32)


@pytest.fixture(scope="module")
def revisions(tmp_path_factory) -> str:
    """A directory with revisions step0 and step40: two initialisations of the tiny model, saved as transformers
    would save them."""
    root = str(tmp_path_factory.mktemp("pythia_tiny"))
    model = base.build(gpt_neox.KIND, ModelConfig(kind="gpt_neox", args=ARGS), (8,), 32, per_token=True)
    for step, key in ((0, 0), (40, 1)):
        hf.save_gpt_neox(os.path.join(root, f"step{step}"), ARGS, jax.tree.map(np.asarray,
                                                                                model.init(jax.random.key(key))))
    return root


def _config(root: str, extra=()):
    return config.load(None, [
        "model.kind=gpt_neox", ARGS_TOML, f'model.pretrained="{root}"', 'finetune.pretrain_revisions=["step0", "step40"]',
        "data.pretrain_task=pretrained_lm", "data.pretrain_labels=next_token", "data.finetune_task=pretrained_cls",
        "data.finetune_labels=identity", "data.ood_task=''", "data.train_eval_size=200", "data.validation_size=100",
        "finetune.lrs=[0.001, 0.01]", 'finetune.heads=["per_seed"]', "finetune.seeds=3", "finetune.steps=20",
        "finetune.warmup_steps=0", "finetune.batch_size=50", "finetune.scratch=false", "run.chunk_steps=10",
        "run.checkpoint_every=20", "barriers.alphas=3", "barriers.align=true", "barriers.noise_resamples=10",
        "study.sharpness_iterations=0", "study.similarity_examples=100", "study.fit_margin=-1", *extra])


def test_config_derives_the_starts_from_the_revisions_and_refuses_what_does_not_fit(revisions):
    cfg = _config(revisions)
    assert cfg.finetune.pretrain_steps == [0, 40]
    assert (cfg.pretrain.save_steps, cfg.pretrain.steps) == ([0, 40], 40)
    for extra, message in [(['finetune.pretrain_revisions=["main"]'], "'main' is not named step<N>"),
                           (["finetune.pretrain_revisions=[]"], "model.pretrained needs finetune.pretrain_revisions"),
                           (["finetune.pretrain_steps=[0, 100]"], r"finetune.pretrain_steps \[0, 100\] disagree")]:
        with pytest.raises(config.ConfigError, match=message):
            _config(revisions, extra)
    with pytest.raises(config.ConfigError, match="model.kind 'mlp' reads no released checkpoints"):
        config.load(None, [f'model.pretrained="{revisions}"', 'finetune.pretrain_revisions=["step0"]'])
    with pytest.raises(config.ConfigError, match="finetune.pretrain_revisions needs model.pretrained"):
        config.load(None, ['finetune.pretrain_revisions=["step0"]'])


def test_mismatched_arguments_are_refused_before_the_run_directory_exists(revisions, tmp_path):
    cfg = _config(revisions, [ARGS_TOML.replace("intermediate_size = 32", "intermediate_size = 48")])
    out = str(tmp_path / "run")
    with pytest.raises(config.ConfigError, match=r"model.args differ from revision step0's config: intermediate_size "
                                                 r"48 \(checkpoint: 32\)"):
        api.pretrain(cfg, out)
    assert not os.path.exists(out)


def test_checkpoint_errors_under_every_command_leave_nothing_behind(revisions, tmp_path):
    """A revision that cannot be read (a truncated weight file), or mismatched arguments, under finetune and study as
    under pretrain: one line, and no run directory (no config.json, no stages/)."""
    broken = tmp_path / "broken"
    for name in ("step0", "step40"):
        os.makedirs(broken / name)
        for file in os.listdir(os.path.join(revisions, name)):
            with open(os.path.join(revisions, name, file), "rb") as f:
                content = f.read()
            (broken / name / file).write_bytes(content[:len(content) // 2] if file.endswith(".safetensors") and
                                               name == "step40" else content)
    mismatched = [ARGS_TOML.replace("intermediate_size = 32", "intermediate_size = 48")]
    for cfg, message in [(_config(str(broken)), r"model.pretrained, revision step40: .*step40/model.safetensors "
                                                r"cannot be read as safetensors \(truncated"),
                         (_config(revisions, mismatched), "model.args differ from revision step0's config")]:
        for command in (api.finetune, api.study):
            out = str(tmp_path / "run")
            with pytest.raises(config.ConfigError, match=message):
                command(cfg, out)
            assert not os.path.exists(out), command


def test_a_missing_local_checkpoint_is_named_before_any_data_is_prepared(tmp_path, monkeypatch):
    """A local model.pretrained path that does not exist: one line naming it, at once — no dataset is prepared and
    no hub repository is asked for it."""
    def no_data(*args, **kwargs):
        raise AssertionError("data prepared before the checkpoint was checked")

    monkeypatch.setattr(data, "load_task", no_data)
    monkeypatch.setattr(hf_files.huggingface_hub, "snapshot_download", no_data)
    cfg = _config(str(tmp_path / "nowhere" / "pythia"))
    for command in (api.pretrain, api.finetune, api.study):
        with pytest.raises(config.ConfigError, match=rf"^model.pretrained, revision step0: {tmp_path}/nowhere/pythia "
                                                     r"does not exist \(a local checkpoint directory; a hub "
                                                     r"repository is named owner/name\)$"):
            command(cfg, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run")
    # A relative path that also reads as a hub name (owner/name): a path, where its first directory is here.
    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(config.ConfigError, match=r"^model.pretrained, revision step0: runs/pythia does not exist"):
        api.finetune(_config("runs/pythia"), str(tmp_path / "run"))


@pytest.mark.slow  # trains and measures
def test_fine_tuning_starts_from_released_revisions(revisions, tmp_path):
    """Import, fine-tuning and barriers (aligned) from the two revisions; the stages after the barriers read only
    the tables, whatever the model kind (the transformer's whole study: tests/test_transformer.py)."""
    out = str(tmp_path / "run")
    moved = str(tmp_path / "revisions")
    shutil.copytree(revisions, moved)
    cfg = _config(moved)
    api.finetune(cfg, out)  # imports the revisions first, as the study's pretrain stage does
    shutil.rmtree(moved)  # a finished run's starts are its own checkpoints: measuring needs no revision again
    api.barriers_of_run(cfg, out)
    run = api.RunDir(out)
    pretrain_rows = run.read_csv(rundir.PRETRAIN)
    assert [(r["step"], r["revision"]) for r in pretrain_rows] == [(0, "step0"), (40, "step40")]
    assert all(np.isfinite(r["test_loss"]) for r in pretrain_rows)
    # The imported checkpoints are the released weights, bit for bit.
    _, step40 = hf.load_gpt_neox(os.path.join(revisions, "step40"))
    saved = run.restore_params(rundir.PRETRAIN_CHECKPOINTS, 40)
    for a, b in zip(jax.tree.leaves(step40), jax.tree.leaves(jax.tree.map(lambda x: x[0], saved))):
        np.testing.assert_array_equal(a, b)
    members = run.read_csv(rundir.MEMBERS)
    assert sorted({m["pretrain_step"] for m in members}) == [0, 40] and len(members) == 12
    summary = run.read_csv(rundir.BARRIER_SUMMARY)
    assert len(summary) == 4 and all(np.isfinite(r["error_barrier_test_aligned_mean"]) for r in summary)


def test_revision_names_and_sources(tmp_path):
    """step<N> (Pythia's branches), step_<N>k (MultiBERTs' repositories); a local directory's subdirectory, a
    "{revision}" name filled in (one repository per checkpoint), else the hub repository's branch."""
    assert [config.revision_step(r) for r in ("step0", "step143000", "step_20k", "step_2000k", "step_512")] == [
        0, 143000, 20000, 2000000, 512]
    with pytest.raises(config.ConfigError, match="'20k' is not named step<N> or step_<N>k"):
        config.revision_step("20k")
    assert hf.revision_source(str(tmp_path), "step0") == (os.path.join(str(tmp_path), "step0"), None)
    assert hf.revision_source("google/multiberts-seed_0-{revision}", "step_20k") == (
        "google/multiberts-seed_0-step_20k", None)
    assert hf.revision_source("EleutherAI/pythia-14m", "step512") == ("EleutherAI/pythia-14m", "step512")
