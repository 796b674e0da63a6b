"""Text as tokens: as UTF-8 bytes (one fixed vocabulary, TEXT_VOCAB: `text_windows`, `text_sequences`), or as a
released checkpoint's tokens (data.tokenizer), through the `tokenizers` library: labelled texts as right-padded
sequences, a corpus as windows, and masked language modelling's inputs and labels.

Every sequence carries the tokenizer's own special tokens — BERT's `[CLS] … [SEP]`, none for Pythia's — around as
much of its text as leaves room for them, so that a classifier reading BERT's position 0 reads `[CLS]`, as in its
pretraining. A sentence pair (`token_pairs`: GLUE's MRPC, RTE, MNLI, …) is `[CLS] a [SEP] b [SEP]` with its token
types beside the ids, as BERT's tokenizer makes it.
"""
from __future__ import annotations

import functools
import json
import os
import zlib

import numpy as np

from jaxlmc import lazy

tokenizers = lazy.module("tokenizers")  # imported when a text is first tokenized

TOKEN_PAD = -1  # padding of tokenized text: a model kind that reads it masks negative ids
IGNORED = -1  # a per-position label that no loss or error counts (jaxlmc.train): the positions not masked
MASK_TOKENS = ("[MASK]", "<mask>")  # BERT's, RoBERTa's
# BERT's masking (Devlin et al. 2019): 15% of the positions are predicted; of those 80% read the mask token, 10% a
# random token, 10% themselves.
MASK_RATE, MASK_AS_MASK, MASK_AS_RANDOM = 0.15, 0.8, 0.1


@functools.cache
def tokenizer(path: str) -> tokenizers.Tokenizer:
    """A tokenizer.json (a released checkpoint's own), read once; a BERT checkpoint's vocab.txt (MultiBERTs ship no
    tokenizer.json) becomes its WordPiece tokenizer, lower-casing as its tokenizer_config.json says (default: yes,
    as the uncased models do)."""
    try:
        if os.path.basename(path) == "vocab.txt":
            return tokenizers.Tokenizer.from_str(tokenizers.BertWordPieceTokenizer(
                path, lowercase=_lower_case(os.path.dirname(path))).to_str())
        return tokenizers.Tokenizer.from_file(path)
    except Exception as err:  # the library's own error types: one line naming the file
        raise ValueError(f"{path} is not a tokenizer the tokenizers library reads: {err}") from None


def _lower_case(directory: str) -> bool:
    path = os.path.join(directory, "tokenizer_config.json")
    if not os.path.exists(path):
        return True
    with open(path) as f:
        return bool(json.load(f).get("do_lower_case", True))


def _as_text(text) -> str:
    return text.decode("utf-8", "replace") if isinstance(text, bytes) else str(text)


def _room(tok: tokenizers.Tokenizer, length: int, pair: bool = False) -> int:
    """The tokens of text a sequence of `length` holds beside the tokenizer's special tokens (of a pair: at least one
    per text)."""
    special = tok.num_special_tokens_to_add(pair)
    room = length - special
    if room < 1 + pair:
        raise ValueError(f"sequences of {length} tokens leave no room for {'two texts' if pair else 'text'} beside "
                         f"the tokenizer's {special} special tokens")
    return room


def token_sequences(texts, tok: tokenizers.Tokenizer, length: int) -> np.ndarray:
    """Labelled texts tokenized, one sequence per text: its first tokens closed by the tokenizer's special tokens,
    `length` in all at most, right-padded with TOKEN_PAD (a kind that reads padding attends to real tokens only)."""
    room = _room(tok, length)
    out = np.full((len(texts), length), TOKEN_PAD, np.int32)
    for row, encoding in enumerate(tok.encode_batch([_as_text(t) for t in texts], add_special_tokens=False)):
        encoding.truncate(room)
        ids = tok.post_process(encoding).ids
        out[row, :len(ids)] = ids
    return out


TYPE_PAD = 0  # the token type of padding (never attended to, as BERT's tokenizer pads types)


def token_pairs(firsts, seconds, tok: tokenizers.Tokenizer, length: int) -> np.ndarray:
    """Labelled text pairs tokenized, one sequence per pair, N×`length`×2: [..., 0] the token ids, right-padded with
    TOKEN_PAD; [..., 1] their token types, TYPE_PAD on padding. Both come from the tokenizer's own pair encoding —
    BERT's `[CLS] a [SEP] b [SEP]`, types 0 for `[CLS] a [SEP]` and 1 for `b [SEP]` (its post-processor's type ids) —
    and a pair too long is cut as transformers' BertTokenizer cuts it with truncation="longest_first" (the library's
    own truncation, special tokens counted): the longer text loses its last tokens, down to half the room when the
    shorter needs its half too (an odd token to the longer; of two as long, to the second). An empty second text is
    no second segment (`[CLS] a [SEP]`, all type 0), as there and in BERT's own run_classifier."""
    if len(firsts) != len(seconds):
        raise ValueError(f"{len(firsts)} first texts and {len(seconds)} second texts do not pair up")
    _room(tok, length, pair=True)
    cutter = tokenizers.Tokenizer.from_str(tok.to_str())  # a copy: the shared tokenizer is left without truncation
    cutter.no_padding()
    cutter.enable_truncation(length, strategy="longest_first")
    out = np.full((len(firsts), length, 2), TYPE_PAD, np.int32)
    out[..., 0] = TOKEN_PAD
    inputs = [(_as_text(a), _as_text(b)) if _as_text(b) else _as_text(a) for a, b in zip(firsts, seconds)]
    for row, encoding in enumerate(cutter.encode_batch(inputs, add_special_tokens=True)):
        out[row, :len(encoding.ids), 0] = encoding.ids
        out[row, :len(encoding.ids), 1] = encoding.type_ids
    return out


def token_windows(texts, tok: tokenizers.Tokenizer, length: int) -> np.ndarray:
    """A corpus tokenized: every text's tokens in turn, cut into consecutive pieces that the tokenizer's special
    tokens close into windows of `length` (a last partial piece is dropped) — no padding."""
    encodings = tok.encode_batch([_as_text(t) for t in texts], add_special_tokens=False)
    stream = np.asarray([i for e in encodings for i in e.ids], np.int32)
    room = _room(tok, length)
    pieces = stream[:len(stream) // room * room].reshape(-1, room)
    before, after = _special_frame(tok)
    frame = lambda ids: np.broadcast_to(np.asarray(ids, np.int32), (len(pieces), len(ids)))  # noqa: E731
    return np.concatenate([frame(before), pieces, frame(after)], axis=1)


def _special_frame(tok: tokenizers.Tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after a text's tokens (BERT: [CLS], [SEP])."""
    probe = tok.encode("x", add_special_tokens=False)
    probe.truncate(1)
    closed = tok.post_process(probe)
    content = [k for k, s in enumerate(closed.sequence_ids) if s is not None]
    if not content:  # nothing of the text survived: no frame can be told apart
        return [], []
    return closed.ids[:content[0]], closed.ids[content[-1] + 1:]


def special_ids(tok: tokenizers.Tokenizer) -> list[int]:
    return sorted(i for i, token in tok.get_added_tokens_decoder().items() if token.special)


def mask_token_id(tok: tokenizers.Tokenizer) -> int:
    for name in MASK_TOKENS:
        if tok.token_to_id(name) is not None:
            return tok.token_to_id(name)
    raise ValueError(f"the tokenizer has no mask token ({' or '.join(MASK_TOKENS)}): label map 'masked_token' "
                     "needs one")


def mask_tokens(windows_NxT: np.ndarray, tok: tokenizers.Tokenizer, seed: str) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, labels) of masked language modelling on `token_windows`' windows: in every window the same number of
    its text positions (MASK_RATE of them, at least one; never the special tokens framing it) are predicted — labels
    there are the original tokens, IGNORED elsewhere — and read the mask token, a random ordinary token or themselves
    (BERT's 80/10/10). One fixed draw per `seed` (the split's name): the same set is scored alike in every run."""
    before, after = _special_frame(tok)
    n, length = windows_NxT.shape
    text_columns = np.arange(len(before), length - len(after))
    if not n or not len(text_columns):
        raise ValueError("no tokens to mask: no windows, or windows of special tokens only")
    rng = np.random.default_rng(zlib.crc32(seed.encode()))
    per_window = max(1, round(MASK_RATE * len(text_columns)))
    # Each window's own random choice of text positions.
    chosen_NxK = text_columns[np.argsort(rng.random((n, len(text_columns))), axis=1)[:, :per_window]]
    rows = np.arange(n)[:, None]
    original_NxK = windows_NxT[rows, chosen_NxK]
    labels = np.full(windows_NxT.shape, IGNORED, np.int32)
    labels[rows, chosen_NxK] = original_NxK
    fate = rng.random(chosen_NxK.shape)
    ordinary = np.setdiff1d(np.arange(tok.get_vocab_size()), special_ids(tok))
    random_NxK = rng.choice(ordinary, size=chosen_NxK.shape)
    inputs = windows_NxT.astype(np.int32).copy()
    inputs[rows, chosen_NxK] = np.where(fate < MASK_AS_MASK, mask_token_id(tok),
                                        np.where(fate < MASK_AS_MASK + MASK_AS_RANDOM, random_NxK, original_NxK))
    return inputs, labels


# Text is tokenized as UTF-8 bytes: one fixed vocabulary for every text dataset, needing no fitting, so a model
# pretrained on one corpus reads any other (character level for English text, where a byte is a character). Byte 0
# (NUL, absent from text) pads sequences shorter than the window.
TEXT_VOCAB = 256
TEXT_PAD = 0


def _as_bytes(text) -> bytes:
    return text if isinstance(text, bytes) else str(text).encode("utf-8")


def text_windows(texts, window: int) -> np.ndarray:
    """A corpus (texts without labels, e.g. tiny_shakespeare's one long text per split) as sequences_NxW: the texts
    joined by newlines, as bytes, cut into consecutive non-overlapping windows (a last partial window is dropped)."""
    corpus = np.frombuffer(b"\n".join(_as_bytes(t) for t in texts), dtype=np.uint8)
    n = len(corpus) // window
    return corpus[:n * window].reshape(n, window).astype(np.int32)


def text_sequences(texts, window: int) -> np.ndarray:
    """Labelled texts (one sequence per example, e.g. a review) as sequences_NxW: each text's first `window` bytes,
    left-padded with TEXT_PAD when shorter, so the last position — the one a classification head reads — holds the
    text's own last byte rather than padding."""
    out = np.full((len(texts), window), TEXT_PAD, dtype=np.int32)
    for i, text in enumerate(texts):
        encoded = np.frombuffer(_as_bytes(text)[:window], dtype=np.uint8)
        if len(encoded):
            out[i, window - len(encoded):] = encoded
    return out
