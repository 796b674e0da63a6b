"""The transformer kind and the language tasks: permutation symmetry and weight matching, TinyLang's structure,
language-modelling evaluation per token, and n-gram baselines."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlmc import analysis, builders, config, data, models, paths, permute, stats, tokens, train
from jaxlmc.config import ModelConfig

CFG = ModelConfig(kind="transformer", width=16, depth=2, heads=4, vocab_size=11)
CONTEXT = 6


@pytest.mark.slow
@pytest.mark.parametrize("per_token, classes", [(True, 11), (False, 3)])
def test_a_permuted_transformer_computes_the_same_function_and_matching_recovers_it(per_token, classes):
    model = models.build(CFG, (CONTEXT,), classes, per_token=per_token)
    params = model.init(jax.random.key(0))
    spec = model.permutation_spec()
    # The residual stream, then each block's MLP units and heads.
    assert [entries[0].layer for entries in spec] == model.layers() == ["embed", "b0_fc1", "b0_q", "b1_fc1", "b1_q"]
    widths = [params[e[0].layer][e[0].name].shape[e[0].axis] for e in spec]
    assert widths == [16, 64, 4, 64, 4]
    rng = np.random.default_rng(1)
    perms = [jnp.asarray(rng.permutation(w)) for w in widths]
    shuffled = permute.permute(params, perms, spec)
    x = jax.random.randint(jax.random.key(2), (7, CONTEXT), 0, 11).astype(jnp.float32)
    out = model.apply(params, x)
    assert out.shape == ((7, CONTEXT, classes) if per_token else (7, classes))
    np.testing.assert_allclose(model.apply(shuffled, x), out, rtol=1e-4, atol=1e-5)
    assert not np.allclose(shuffled["b0_q"]["kernel"], params["b0_q"]["kernel"])

    pair = jax.tree.map(lambda a, b: jnp.stack([a, b]), params, shuffled)
    found = permute.match_pairs(model, pair, [(0, 1)])
    aligned = permute.permute(shuffled, [jnp.asarray(f[0]) for f in found], spec)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(aligned)):
        np.testing.assert_array_equal(a, b)

    xs = np.asarray(jax.random.randint(jax.random.key(3), (40, CONTEXT), 0, 11), np.float32)
    ys = np.asarray(model.apply(params, jnp.asarray(xs))).argmax(-1).astype(np.int32)
    fn = paths.make_path_eval(model, paths.straight(), paths.alpha_grid(5), 1)
    sets = {"t": train.batch_eval_set(xs, ys, 20)}
    naive = fn(pair, jnp.asarray([[0, 1]], jnp.int32), sets)["t"][0]
    after = fn(pair, jnp.asarray([[0, 1]], jnp.int32), sets, [jnp.asarray(f) for f in found])["t"][0]
    assert stats.barrier_endpoint_mean(after)[0] == pytest.approx(0.0, abs=1e-5)
    assert stats.barrier_endpoint_mean(naive)[0] > 0.01


def test_the_head_reads_the_last_position_and_attention_is_causal():
    model = models.build(CFG, (CONTEXT,), 11, per_token=True)
    classify = models.build(CFG, (CONTEXT,), 11, per_token=False)
    params = model.init(jax.random.key(0))
    x = jax.random.randint(jax.random.key(1), (3, CONTEXT), 0, 11).astype(jnp.float32)
    changed = x.at[:, -1].set((x[:, -1] + 1) % 11)
    per_token, changed_per_token = model.apply(params, x), model.apply(params, changed)
    np.testing.assert_allclose(per_token[:, :-1], changed_per_token[:, :-1], atol=1e-6)  # the past never sees it
    np.testing.assert_allclose(classify.apply(params, x), per_token[:, -1], rtol=1e-5, atol=1e-6)


def test_config_refuses_a_transformer_without_a_vocabulary_or_with_uneven_heads():
    with pytest.raises(config.ConfigError, match="model.vocab_size ≥ 2"):
        config.load(None, ["model.kind=transformer", "barriers.align=false"])
    with pytest.raises(config.ConfigError, match="model.heads ≥ 1 dividing model.width"):
        config.load(None, ["model.kind=transformer", "model.vocab_size=16", "model.width=30", "model.heads=4"])
    with pytest.raises(ValueError, match="predicts one label per example"):
        models.build(ModelConfig(kind="mlp", width=8, depth=1), (4,), 3, per_token=True)


def test_tinylang_follows_its_rules_and_the_far_rules_are_new(data_dir):
    for variant, spec in builders.TINYLANG_VARIANTS.items():
        tokens, labels = builders.tinylang(variant)["train"]
        assert tokens.shape == (spec["train"], builders.TINYLANG_LENGTH) and tokens.max() < builders.TINYLANG_VOCAB
        a = np.asarray(spec["multipliers"])[labels]
        # Every next token follows the sequence's rule unless replaced by noise: b is the most frequent offset.
        offsets = (tokens[:, 1:] - a[:, None] * tokens[:, :-1]) % 16
        b = np.asarray([np.bincount(row, minlength=16).argmax() for row in offsets])
        follows = (tokens[:, 1:] == (a[:, None] * tokens[:, :-1] + b[:, None]) % 16).mean()
        assert abs(follows - (1 - spec["noise"] * 15 / 16)) < 0.03, variant
    assert not set(builders.TINYLANG_VARIANTS["far"]["multipliers"]) & set(builders.TINYLANG_VARIANTS["pretrain"]["multipliers"])

    lm = data.load_task("tiny_lang/near", "next_token", data_dir)
    assert lm["train"].x.shape == (4000, 32) and lm["train"].y.shape == (4000, 32) and lm["train"].num_classes == 16
    np.testing.assert_array_equal(lm["train"].x[:, 1:], lm["train"].y[:, :-1])  # the label is the next token
    clf = data.load_task("tiny_lang/classify", "identity", data_dir)
    assert clf["train"].x.shape == (4000, 32) and clf["train"].y.shape == (4000,) and clf["train"].num_classes == 4
    with pytest.raises(ValueError, match="needs a token dataset"):
        data.load_task("mnist1d", "next_token", data_dir)


def test_per_token_evaluation_is_the_mean_over_every_token():
    model = models.build(CFG, (CONTEXT,), 11, per_token=True)
    params = model.init(jax.random.key(0))
    rng = np.random.default_rng(0)
    x = rng.integers(0, 11, (13, CONTEXT)).astype(np.float32)
    y = rng.integers(0, 11, (13, CONTEXT)).astype(np.int32)
    loss, err = train.loss_and_error(model, params, train.batch_eval_set(x, y, 5))
    logits = model.apply(params, jnp.asarray(x))
    np.testing.assert_allclose(loss, train.cross_entropy(logits, jnp.asarray(y)).mean(), rtol=1e-5)
    np.testing.assert_allclose(err, (np.asarray(logits).argmax(-1) != y).mean(), rtol=1e-6)


def test_ngram_baselines_count_what_they_should():
    # A deterministic cycle 0 → 1 → 2 → 0: the bigram model predicts every next token, the unigram none better than
    # a third.
    x = np.tile([[0, 1, 2, 0, 1, 2]], (50, 1))
    y = np.tile([[1, 2, 0, 1, 2, 0]], (50, 1))
    unigram, bigram = analysis.ngram_baselines(x, y, x, y, vocab=3)
    assert bigram["model"] == "bigram" and bigram["test_acc"] == 1.0 and bigram["test_loss"] < 0.02
    assert unigram["test_acc"] == pytest.approx(1 / 3) and unigram["test_loss"] == pytest.approx(np.log(3), abs=1e-3)


@pytest.mark.slow
def test_a_tiny_language_model_study_end_to_end(data_dir, tmp_path):
    """configs/tinylm.toml, shrunk: LM pretraining, sequence-classification fine-tuning of the members, barriers,
    soups, merges, similarity and the report, through the unchanged study."""
    from jaxlmc import rundir, study

    cfg = config.load("configs/tinylm.toml", [
        f'data.data_dir="{data_dir}"', "model.width=16", "pretrain.steps=60", "pretrain.save_steps=[0, 60]",
        "finetune.pretrain_steps=[0, 60]", "finetune.seeds=3", "finetune.steps=20", "finetune.warmup_steps=5", "finetune.batch_size=16",
        "run.chunk_steps=10", "run.checkpoint_every=20", "data.train_eval_size=100", "data.validation_size=100",
        "barriers.alphas=3", "barriers.noise_resamples=10", "barriers.chunk_pairs=4", "study.similarity_examples=50",
        "study.fit_margin=-1", "study.sharpness_iterations=0",  # the transformer's sharpness: test_sharpness
        "barriers.align=false"])  # its weight matching: test_a_permuted_transformer_…
    out = str(tmp_path / "tinylm")
    assert study.study(cfg, out, progress=False) == list(study.STAGES)
    run = rundir.RunDir(out)
    baselines = {b["model"]: b for b in run.read_csv(rundir.BASELINES)}
    assert set(baselines) == {"unigram", "bigram"}
    assert baselines["unigram"]["test_loss"] == pytest.approx(np.log(16), abs=0.02)  # TinyLang is near uniform
    pretrained = run.read_csv(rundir.PRETRAIN)
    assert pretrained[-1]["test_loss"] < pretrained[0]["test_loss"]
    summary = run.read_csv(rundir.SUMMARY)
    assert len(summary) == 2 * 2 + 2 and all(np.isfinite(r["error_barrier_test_mean"]) for r in summary)
    page = open(run.path(rundir.REPORT)).read()
    assert "bigram" in page and "H1 — does the seeds" in page
    # Merges run unchanged on the transformer (its layer groups' barriers: tests/test_layerwise.py; its sharpness:
    # tests/test_sharpness.py); sharpness_iterations = 0 skips that stage, leaving its tables empty.
    assert all(np.isfinite(r["model_stock_test_acc"]) for r in run.read_csv(rundir.MERGES))
    assert run.read_csv(rundir.SHARPNESS) == [] and "sharpness.png" not in page


def test_text_is_read_as_bytes_in_windows_or_one_left_padded_sequence_per_example():
    windows = tokens.text_windows(["abcdef", "gh"], window=3)  # joined: "abcdef\ngh", 9 bytes
    np.testing.assert_array_equal(windows, [list(b"abc"), list(b"def"), list(b"\ngh")])
    assert tokens.text_windows(["ab", "cdef"], window=4).tolist() == [list(b"ab\nc")]  # the partial "def" is dropped
    sequences = tokens.text_sequences([b"hello world", "hi", "é"], window=5)
    np.testing.assert_array_equal(sequences, [list(b"hello"), [0, 0, 0] + list(b"hi"), [0, 0, 0, 0xC3, 0xA9]])


@pytest.mark.slow
def test_real_text_datasets_pretrain_a_language_model_and_finetune_a_classifier(tmp_path):
    """configs/shakespeare_to_imdb.toml, shrunk, on TFDS mock data: tiny_shakespeare (one text per split, no labels)
    is cut into byte windows for next-byte pretraining, imdb_reviews gives one sequence per review for sentiment
    classification with a new head; both through the loader every dataset uses."""
    import tensorflow_datasets as tfds

    from jaxlmc import api, ckpt, tasks

    cfg = config.load("configs/shakespeare_to_imdb.toml", [
        f'data.data_dir="{tmp_path / "tfds"}"', "data.context_length=8", "model.width=8", "model.depth=1",
        "model.heads=2", "pretrain.steps=4", "pretrain.save_steps=[0, 4]", "pretrain.batch_size=8",
        "pretrain.warmup_steps=0", "finetune.pretrain_steps=[4]", "finetune.lrs=[1e-3]", "finetune.seeds=2",
        "finetune.steps=4", "finetune.batch_size=8", "finetune.warmup_steps=0", "run.chunk_steps=2",
        "run.checkpoint_every=2", "data.train_eval_size=16", "data.validation_size=8", "finetune.scratch=false"])
    with tfds.testing.mock_data(num_examples=48):
        pre = tasks.load_pretrain_task(cfg)
        assert pre.per_token and pre.train.x.shape[1] == 8 and pre.train.num_classes == tokens.TEXT_VOCAB
        np.testing.assert_array_equal(pre.train.x[:, 1:], pre.train.y[:, :-1])  # targets: the next byte
        fine = tasks.load_finetune_task(cfg)
        assert not fine.per_token and fine.train.x.shape[1] == 8 and fine.train.num_classes == 2
        rows = api.finetune(cfg, str(tmp_path / "run"), progress=False)
        with pytest.raises(config.ConfigError, match="model.vocab_size 16 is smaller than data.pretrain_task"):
            tasks.load_pretrain_task(config.load("configs/shakespeare_to_imdb.toml", [
                f'data.data_dir="{tmp_path / "tfds"}"', "model.vocab_size=16"]))
        with pytest.raises(config.ConfigError, match="text dataset: set data.context_length"):
            tasks.load_pretrain_task(config.load("configs/shakespeare_to_imdb.toml", [
                f'data.data_dir="{tmp_path / "tfds"}"', "data.context_length=0"]))
        with pytest.raises(config.ConfigError, match="no labels: it can only be a language-modelling task"):
            tasks.load_pretrain_task(config.load("configs/shakespeare_to_imdb.toml", [
                f'data.data_dir="{tmp_path / "tfds"}"', 'data.pretrain_labels="identity"']))
    assert len(rows) == 2 and all(np.isfinite(r["test_loss"]) for r in rows)
    assert api.load_member(str(tmp_path / "run"), 0)["head"]["kernel"].shape[-1] == 2
    assert ckpt.restore_params(str(tmp_path / "run" / "pretrain" / "checkpoints"), 4)["head"]["kernel"].shape[-1] == 256


def test_context_length_is_refused_for_datasets_of_fixed_size(data_dir):
    with pytest.raises(ValueError, match="applies to text datasets only"):
        data.load_task("tiny_lang/pretrain", "next_token", data_dir, context_length=8)
