"""Text as a checkpoint's tokens (data.tokenizer): a tiny tokenizer trained offline with the `tokenizers` library and
saved as tokenizer.json round-trips TFDS mock text; labelled texts become right-padded sequences (token id -1), a
corpus becomes windows without padding; text pairs (GLUE's MRPC under TFDS mock data) become `[CLS] a [SEP] b [SEP]`
with token types 0 then 1, cut longest first as transformers' BertTokenizer cuts them; the config refuses what cannot
work."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tensorflow_datasets as tfds
import tokenizers
from tokenizers import models, pre_tokenizers, trainers

from jaxlmc import config, data, tasks, tokens, train

WORDS = "the a small model learns fine tuning basin path seed rate loss barrier".split()


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory) -> str:
    """A word-level tokenizer of a small vocabulary (and [UNK]), trained here on generated sentences."""
    rng = np.random.default_rng(0)
    corpus = [" ".join(rng.choice(WORDS, 8)) for _ in range(200)]
    tok = tokenizers.Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=["[UNK]"]))
    path = str(tmp_path_factory.mktemp("tok") / "tokenizer.json")
    tok.save(path)
    return path


def test_token_sequences_and_windows(tokenizer_json):
    tok = tokens.tokenizer(tokenizer_json)
    texts = ["the small model", "a basin path seed rate loss barrier the a small", ""]
    x = tokens.token_sequences(texts, tok, 5)
    assert x.shape == (3, 5) and x.dtype == np.int32
    assert tok.decode([int(i) for i in x[0] if i >= 0]) == "the small model"
    assert list(x[0, 3:]) == [tokens.TOKEN_PAD] * 2 and (x[1] >= 0).all() and (x[2] == tokens.TOKEN_PAD).all()
    windows = tokens.token_windows(texts, tok, 4)
    stream = [i for t in texts for i in tok.encode(t).ids]
    assert windows.shape == (len(stream) // 4, 4)
    np.testing.assert_array_equal(windows.ravel(), stream[:windows.size])


def test_tfds_mock_text_round_trips_through_the_tokenizer(tokenizer_json, tmp_path):
    """imdb_reviews under tfds.testing.mock_data: every review's tokens decode to its words (unknown ones as
    [UNK]); the vocabulary is the tokenizer's; padding only after the text."""
    with tfds.testing.mock_data(num_examples=12):
        source = tfds.data_source("imdb_reviews", split="train", data_dir=str(tmp_path))
        texts = [source[i]["text"] for i in range(len(source))]
        split = data.load_task("imdb_reviews", data_dir=str(tmp_path), splits=("train",), context_length=16,
                               tokenizer_path=tokenizer_json)["train"]
        assert data.vocab_size("imdb_reviews", str(tmp_path), tokenizer_json) == len(WORDS) + 1
    tok = tokens.tokenizer(tokenizer_json)
    assert split.x.shape == (12, 16)  # context_length + 1 tokens, the last dropped for classification
    for row, text in zip(split.x.astype(np.int64), texts):
        ids = tok.encode(text.decode("utf-8") if isinstance(text, bytes) else text, add_special_tokens=False).ids
        real = row[row >= 0]
        assert list(real) == ids[:len(real)] and (row[len(real):] == tokens.TOKEN_PAD).all()


def test_the_config_refuses_tokenized_text_where_it_cannot_work(tokenizer_json, tmp_path):
    with pytest.raises(config.ConfigError, match="data.tokenizer: .* is not a file"):
        tasks.load_pretrain_task(config.load(None, [f'data.tokenizer="{tmp_path / "missing.json"}"',
                                                    "model.kind=gpt_neox"]))
    with pytest.raises(config.ConfigError, match="model.kind 'transformer' does not read padding"):
        tasks.load_pretrain_task(config.load(None, [f'data.tokenizer="{tokenizer_json}"', "model.kind=transformer",
                                                    "model.vocab_size=64"]))
    with pytest.raises(config.ConfigError, match='"pretrained" needs model.pretrained'):
        tasks.load_pretrain_task(config.load(None, ['data.tokenizer="pretrained"', "model.kind=gpt_neox"]))
    assert os.path.exists(tokenizer_json)


@pytest.fixture(scope="module")
def bert_vocab(tmp_path_factory) -> str:
    """A BERT-style WordPiece vocabulary (vocab.txt, as MultiBERTs ship it): [CLS] … [SEP] around every text."""
    path = tmp_path_factory.mktemp("bert_tok") / "vocab.txt"
    path.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    return str(path)


def test_sequences_and_windows_carry_the_tokenizers_special_tokens(bert_vocab):
    tok = tokens.tokenizer(bert_vocab)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    x = tokens.token_sequences(["The small model", "a basin path seed rate loss barrier the a small"], tok, 6)
    assert list(x[0]) == [cls, *tok.encode("the small model", add_special_tokens=False).ids, sep,
                          tokens.TOKEN_PAD]  # lower-cased, as uncased BERT
    assert x[1, 0] == cls and x[1, -1] == sep  # a long text is cut inside its frame: [SEP] stays
    windows = tokens.token_windows(["the small model learns fine tuning basin path seed rate"], tok, 5)
    assert windows.shape == (3, 5) and (windows[:, 0] == cls).all() and (windows[:, -1] == sep).all()
    np.testing.assert_array_equal(windows[:, 1:-1].ravel(), tok.encode(
        "the small model learns fine tuning basin path seed", add_special_tokens=False).ids)
    with pytest.raises(ValueError, match="leave no room for text"):
        tokens.token_sequences(["the"], tok, 2)


def _segments(row) -> tuple[list[int], list[int]]:
    """The ids of a pair row's type-0 and type-1 positions (padding left out)."""
    real = row[:, 0] >= 0
    return [int(i) for i in row[real & (row[:, 1] == 0), 0]], [int(i) for i in row[real & (row[:, 1] == 1), 0]]


def test_text_pairs_carry_token_types_and_are_cut_longest_first(bert_vocab):
    tok = tokens.tokenizer(bert_vocab)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    ids = {w: tok.token_to_id(w) for w in WORDS}
    x = tokens.token_pairs(["The small model", "the a small", "a basin path seed rate loss", "the a"],
                           ["basin path", "model learns fine tuning", "the small", ""], tok, 9)
    assert x.shape == (4, 9, 2) and x.dtype == np.int32
    # [CLS] a [SEP] type 0, b [SEP] type 1, padding (id -1) type 0 — lower-cased, as uncased BERT.
    assert x[0, :, 0].tolist() == [cls, ids["the"], ids["small"], ids["model"], sep, ids["basin"], ids["path"], sep,
                                   tokens.TOKEN_PAD]
    assert x[0, :, 1].tolist() == [0, 0, 0, 0, 0, 1, 1, 1, 0]
    # 3 + 4 tokens in a room of 6: the longer (second) text loses its last token.
    assert _segments(x[1]) == ([cls, ids["the"], ids["a"], ids["small"], sep],
                               [ids["model"], ids["learns"], ids["fine"], sep])
    # 6 + 2: the first text is cut to 4, the second kept whole.
    assert _segments(x[2]) == ([cls, *[ids[w] for w in "a basin path seed".split()], sep],
                               [ids["the"], ids["small"], sep])
    # An empty second text is no second segment, as in transformers and BERT's run_classifier.
    assert _segments(x[3]) == ([cls, ids["the"], ids["a"], sep], [])
    # Both longer than half the room (5 after [CLS], [SEP], [SEP]): half each, the odd token to the longer text, and
    # to the second of two as long (the tokenizers library's longest_first, which transformers' BertTokenizer uses).
    cut = tokens.token_pairs(["a basin path seed", "a basin path seed rate loss", "a basin path"],
                             ["the small model learns fine", "the small model", "the small model"], tok, 8)
    assert [tuple(len(s) - 1 - (k == 0) for k, s in enumerate(_segments(row))) for row in cut] == [(2, 3), (3, 2),
                                                                                                   (2, 3)]
    with pytest.raises(ValueError, match="leave no room for two texts"):
        tokens.token_pairs(["the"], ["a"], tok, 4)
    assert tok.truncation is None  # the shared tokenizer is left as it was


def test_text_pairs_equal_transformers_bert_tokenizer_live(bert_vocab):
    transformers = pytest.importorskip("transformers")
    reference = transformers.BertTokenizer(bert_vocab)
    rng = np.random.default_rng(0)
    words = [*WORDS, "Zebra", "THE"]
    for _ in range(200):
        a, b = (" ".join(rng.choice(words, rng.integers(0, 12))) for _ in range(2))
        length = int(rng.integers(5, 20))
        expected = reference(a, b, truncation="longest_first", max_length=length, padding="max_length")
        real = np.asarray(expected["attention_mask"]) == 1
        row = tokens.token_pairs([a], [b], tokens.tokenizer(bert_vocab), length)[0]
        np.testing.assert_array_equal(row[:, 0] >= 0, real)
        np.testing.assert_array_equal(row[real], np.stack([expected["input_ids"], expected["token_type_ids"]],
                                                          axis=-1)[real])


def test_tfds_text_pairs_are_read_as_token_ids_and_types(bert_vocab, tmp_path):
    """glue/mrpc (sentence1, sentence2) under TFDS mock data: N×T×2 inputs, the last position dropped as for one
    text; a dataset of one text stays N×T; what cannot read pairs, or a dataset of no known input, is one line."""
    tok = tokens.tokenizer(bert_vocab)
    with tfds.testing.mock_data(num_examples=6):
        split = data.load_task("glue/mrpc", "identity", data_dir=str(tmp_path), splits=("train",), context_length=12,
                               tokenizer_path=bert_vocab)["train"]  # (registers TFDS's lazily imported GLUE)
        source = tfds.data_source("glue/mrpc", split="train", data_dir=str(tmp_path))
        firsts, seconds = ([source[i][k] for i in range(len(source))] for k in ("sentence1", "sentence2"))
        assert data.is_pair("glue/mrpc", str(tmp_path)) and not data.is_pair("imdb_reviews", str(tmp_path))
        with pytest.raises(ValueError, match=r"glue/mrpc holds text pairs \(sentence1 and sentence2\): read them "
                                             r"with a tokenizer"):
            data.load_task("glue/mrpc", data_dir=str(tmp_path), splits=("train",), context_length=12)
        with pytest.raises(ValueError, match="label map 'masked_token' .* cannot read it"):
            data.load_task("glue/mrpc", "masked_token", data_dir=str(tmp_path), splits=("train",), context_length=12,
                           tokenizer_path=bert_vocab)
        single = data.load_task("imdb_reviews", data_dir=str(tmp_path), splits=("train",), context_length=12,
                                tokenizer_path=bert_vocab)["train"]
    assert split.x.shape == (6, 12, 2) and split.x.dtype == np.float32 and split.token_types
    np.testing.assert_array_equal(split.x, tokens.token_pairs(firsts, seconds, tok, 12).astype(np.float32))
    assert (split.x[:, :, 1] == 1).any() and single.x.shape == (6, 12) and not single.token_types
    with pytest.raises(ValueError, match=r"squad has no input feature jaxlmc reads \(it has answers, context, id, "
                                         r"question, title\): text \(text or sentence\), a text pair"):
        data.is_text("squad", str(tmp_path))


def test_the_config_refuses_text_pairs_for_a_kind_without_token_types(tokenizer_json):
    with pytest.raises(config.ConfigError, match="data.pretrain_task 'glue/mrpc' holds text pairs, read as token ids "
                                                 "and token types; model.kind 'gpt_neox' reads one segment"):
        tasks.load_pretrain_task(config.load(None, [f'data.tokenizer="{tokenizer_json}"', "model.kind=gpt_neox",
                                                    'data.pretrain_task="glue/mrpc"']))


def test_masking_predicts_the_same_number_of_ordinary_positions_in_every_window(bert_vocab):
    tok = tokens.tokenizer(bert_vocab)
    rng = np.random.default_rng(0)
    windows = tokens.token_windows([" ".join(rng.choice(WORDS, 4000))], tok, 42)
    inputs, labels = tokens.mask_tokens(windows, tok, "corpus:train")
    counted = labels >= 0
    assert (counted.sum(axis=1) == 6).all()  # 15% of the 40 ordinary positions
    assert not counted[:, [0, -1]].any()  # never [CLS] or [SEP]
    np.testing.assert_array_equal(labels[counted], windows[counted])
    np.testing.assert_array_equal(inputs[~counted], windows[~counted])
    mask_id = tok.token_to_id("[MASK]")
    as_mask, as_self = (inputs[counted] == mask_id).mean(), (inputs[counted] == windows[counted]).mean()
    assert 0.75 < as_mask < 0.85 and 0.08 < as_self < 0.2  # 80% [MASK]; 10% unchanged, plus random draws of itself
    again = tokens.mask_tokens(windows, tok, "corpus:train")
    np.testing.assert_array_equal(again[0], inputs)  # one fixed draw per split
    assert not np.array_equal(tokens.mask_tokens(windows, tok, "corpus:test")[1], labels)


def test_masked_token_task_reads_tfds_text_as_a_corpus(bert_vocab, tmp_path):
    with tfds.testing.mock_data(num_examples=20):
        task = data.load_task("imdb_reviews", "masked_token", data_dir=str(tmp_path), context_length=12,
                              tokenizer_path=bert_vocab)
    train = task["train"]
    assert train.x.shape[1:] == (12,) and train.y.shape == train.x.shape and train.num_classes == len(WORDS) + 5
    assert ((train.y >= 0).sum(axis=1) == 2).all()  # 15% of 10 ordinary tokens, rounded
    with pytest.raises(ValueError, match="'masked_token' needs text read by a tokenizer"):
        with tfds.testing.mock_data(num_examples=4):
            data.load_task("imdb_reviews", "masked_token", data_dir=str(tmp_path), context_length=12)


def test_losses_count_only_labelled_positions():
    logits = jax.random.normal(jax.random.key(0), (2, 3, 5))
    y = np.array([[1, -1, 4], [-1, -1, 2]])
    full = optax.softmax_cross_entropy_with_integer_labels(logits, np.maximum(y, 0))
    counted = y >= 0
    np.testing.assert_allclose(train.mean_loss(logits, y), full[counted].mean(), rtol=1e-6)
    np.testing.assert_allclose(train.per_example(train.cross_entropy(logits, y), y),
                               [full[0, [0, 2]].mean(), full[1, 2]], rtol=1e-6)
    hits = np.asarray(jnp.argmax(logits, -1) == y)
    np.testing.assert_allclose(train.mean_accuracy(logits, y), hits[counted].mean(), rtol=1e-6)
    # Class labels (one per example) are all counted, as before.
    np.testing.assert_allclose(train.mean_loss(logits[:, 0], y[:, 2]),
                               optax.softmax_cross_entropy_with_integer_labels(logits[:, 0], y[:, 2]).mean())
