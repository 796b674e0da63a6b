"""Text as a checkpoint's tokens (data.tokenizer): a tiny tokenizer trained offline with the `tokenizers` library and
saved as tokenizer.json round-trips TFDS mock text; labelled texts become right-padded sequences (token id -1), a
corpus becomes windows without padding; the config refuses what cannot work."""
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
import tokenizers
from tokenizers import models, pre_tokenizers, trainers

from jaxlmc import config, data, tasks

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
    tok = data.tokenizer(tokenizer_json)
    texts = ["the small model", "a basin path seed rate loss barrier the a small", ""]
    x = data.token_sequences(texts, tok, 5)
    assert x.shape == (3, 5) and x.dtype == np.int32
    assert tok.decode([int(i) for i in x[0] if i >= 0]) == "the small model"
    assert list(x[0, 3:]) == [data.TOKEN_PAD] * 2 and (x[1] >= 0).all() and (x[2] == data.TOKEN_PAD).all()
    windows = data.token_windows(texts, tok, 4)
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
    tok = data.tokenizer(tokenizer_json)
    assert split.x.shape == (12, 16)  # context_length + 1 tokens, the last dropped for classification
    for row, text in zip(split.x.astype(np.int64), texts):
        ids = tok.encode(text.decode("utf-8") if isinstance(text, bytes) else text, add_special_tokens=False).ids
        real = row[row >= 0]
        assert list(real) == ids[:len(real)] and (row[len(real):] == data.TOKEN_PAD).all()


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
