"""The whole study on released revisions: two local "revisions" of a tiny random GPT-NeoX (next-token pretraining
task, a tokenizer.json) and of a tiny random BERT (masked-token pretraining task, a WordPiece vocab.txt as
MultiBERTs ship it), each saved in Hugging Face's format with its tokenizer beside it, on TFDS mock text (for BERT
also fine-tuned on sentence pairs, GLUE's MRPC with RTE as the OOD set: token ids and token types): import, the
scratch control, fine-tuning, barriers, the critical rate and the report, through the unchanged study."""
import os

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
import tokenizers
from tokenizers import models as tokenizer_models
from tokenizers import pre_tokenizers, trainers

from jaxlmc import config, hf, rundir, study
from jaxlmc.models import base, bert, gpt_neox
from jaxlmc.settings import ModelConfig

WORDS = "the a small model learns fine tuning basin path seed rate loss barrier".split()
BERT_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]  # 18 tokens: the model's vocabulary, tied


def _gpt_neox_revisions(root: str) -> tuple[list[str], list[str]]:
    args = gpt_neox.GPTNeoXArgs(vocab_size=16, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=32, rotary_pct=0.5)
    tok = tokenizers.Tokenizer(tokenizer_models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([" ".join(WORDS)], trainers.WordLevelTrainer(special_tokens=["[UNK]"]))
    model = base.build(gpt_neox.KIND, ModelConfig(kind="gpt_neox", args=args), (8,), 16, per_token=True)
    revisions = ["step0", "step100"]
    for key, revision in enumerate(revisions):
        hf.save_gpt_neox(os.path.join(root, revision), args, jax.tree.map(np.asarray, model.init(jax.random.key(key))))
        tok.save(os.path.join(root, revision, "tokenizer.json"))
    args_toml = ("model.args={vocab_size = 16, hidden_size = 16, num_hidden_layers = 1, num_attention_heads = 2, "
                 "intermediate_size = 32, rotary_pct = 0.5}")
    return revisions, ["model.kind=gpt_neox", args_toml, "data.pretrain_labels=next_token"]


def _bert_revisions(root: str) -> tuple[list[str], list[str]]:
    args = bert.BertArgs(vocab_size=len(BERT_VOCAB), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=16)
    model = base.build(bert.KIND, ModelConfig(kind="bert", args=args), (8,), len(BERT_VOCAB), per_token=True)
    revisions = ["step_0k", "step_1k"]  # MultiBERTs' names: steps 0 and 1000
    for key, revision in enumerate(revisions):
        hf.save_bert(os.path.join(root, revision), args, jax.tree.map(np.asarray, model.init(jax.random.key(key))))
        with open(os.path.join(root, revision, "vocab.txt"), "w") as f:
            f.write("\n".join(BERT_VOCAB) + "\n")
    args_toml = (f"model.args={{vocab_size = {len(BERT_VOCAB)}, hidden_size = 16, num_hidden_layers = 1, "
                 "num_attention_heads = 2, intermediate_size = 32, max_position_embeddings = 16}")
    return revisions, ["model.kind=bert", args_toml, "data.pretrain_labels=masked_token"]


def _bert_pair_revisions(root: str) -> tuple[list[str], list[str]]:
    revisions, keys = _bert_revisions(root)
    return revisions, [*keys, 'data.finetune_task="glue/mrpc"', 'data.test_split="validation"',
                       'data.ood_task="glue/rte"', 'data.ood_split="validation"']


@pytest.mark.slow  # three whole studies
@pytest.mark.parametrize("make", [_gpt_neox_revisions, _bert_revisions, _bert_pair_revisions],
                         ids=["gpt_neox", "bert", "bert_pairs"])
def test_a_whole_study_from_released_revisions(make, tmp_path):
    root = str(tmp_path / "suite")
    revisions, kind_keys = make(root)
    cfg = config.load(None, [
        f'model.pretrained="{root}"', f"finetune.pretrain_revisions={revisions}",
        'data.tokenizer="pretrained"', f'data.data_dir="{tmp_path / "tfds"}"', "data.context_length=8",
        'data.pretrain_task="tiny_shakespeare"', 'data.finetune_task="imdb_reviews"', 'data.finetune_labels="identity"',
        'data.ood_task=""', "data.train_eval_size=32", "data.validation_size=16", "finetune.lrs=[0.001, 0.1]",
        'finetune.heads=["per_seed"]', "finetune.seeds=2", "finetune.steps=10", "finetune.warmup_steps=0",
        "finetune.batch_size=16", "run.chunk_steps=5", "run.checkpoint_every=10", "barriers.alphas=3",
        "barriers.noise_resamples=10", "study.sharpness_iterations=0", "study.similarity_examples=32",
        "study.fit_margin=-1", "study.refine_rounds=0", "finetune.scratch=true", "barriers.align=true", *kind_keys])
    out = str(tmp_path / "run")
    with tfds.testing.mock_data(num_examples=64):
        assert study.study(cfg, out, progress=False) == list(study.STAGES)
    run = rundir.RunDir(out)
    pretrained = run.read_csv(rundir.PRETRAIN)
    assert [r["revision"] for r in pretrained] == revisions
    assert all(np.isfinite(r["test_loss"]) for r in pretrained)
    members = run.read_csv(rundir.MEMBERS)
    assert sorted({m["pretrain_step"] for m in members}) == [-1, *cfg.finetune.pretrain_steps] and len(members) == 12
    summary = run.read_csv(rundir.BARRIER_SUMMARY)
    assert len(summary) == 6 and all(np.isfinite(r["error_barrier_test_aligned_mean"]) for r in summary)
    assert len(run.read_csv(rundir.CRITICAL)) == 3  # one critical-rate row per start (scratch and both revisions)
    page = open(run.path(rundir.REPORT)).read()
    assert revisions[-1] in page or str(cfg.finetune.pretrain_steps[-1]) in page
