"""The bert kind: the BERT encoder (Devlin et al. 2019) of the MultiBERTs suite (Sellam et al. 2022), in NNX,
computing what Hugging Face's `BertModel` computes from the same weights (jaxlmc.hf reads them), with a new
classification head on the [CLS] position.

    tokens → LN(word + position + token-type embedding) → layers × block → [CLS] → pooler (tanh dense) → head
    block:  y = LN₁(x + Attn(x));  LN₂(y + MLP(y))          (post-LayerNorm)

Attention: bidirectional, `num_attention_heads` heads of d = hidden/heads dimensions, scaled by 1/√d, padded keys
masked; MLP: exact GELU. No dropout. A negative token id is padding: embedded as token 0 and never attended to.
With a label per position (`per_token`: masked language modelling, the label map "masked_token") the head is BERT's
pretraining MLM head (`MaskedLMHead`, BertForMaskedLM's), which reads every position; its transform and LayerNorm
join the residual stream in the permutation spec.

Inputs: token ids B×T (one segment: every token has token type 0), or B×T×2 — [..., 0] the token ids, [..., 1] each
position's token type — for sentence pairs, which jaxlmc.tokens.token_pairs encodes as BERT's tokenizer does:
`[CLS] a [SEP]` type 0, `b [SEP]` type 1, padding type 0 (jaxlmc.data reads a TFDS dataset of two texts so). One
array either way, so the engine's `apply(params, x)` over members is unchanged; B×T inputs compute exactly what they
did before token types existed (type 0's embedding broadcast, bit for bit).

The permutation spec: the residual stream (every embedding's hidden axis, every LayerNorm, every projection that reads
or writes the stream, the pooler's input), each block's MLP units, each block's whole heads, and the pooler's units.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlmc.models.base import (Classifier, Dropout, ModelKind, PermutationSpec, UnitAxis, block_activations,
                                block_spec, remat)


@dataclasses.dataclass(frozen=True)
class BertArgs:
    """[model.args] of the bert kind (the names of Hugging Face's BertConfig)."""

    vocab_size: int = 512
    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    intermediate_size: int = 256
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    remat: bool = False  # recompute each block's activations in the backward pass (less memory, ~⅓ more compute)
    pooler: bool = True  # the tanh pooler on [CLS] (BertForSequenceClassification's); false: [CLS]'s state itself


def _args(cfg) -> BertArgs:
    return cfg.args if isinstance(cfg.args, BertArgs) else BertArgs(**dict(cfg.args))


def split_types(x) -> tuple[jax.Array, jax.Array | None]:
    """(token ids B×T, token types B×T or None) of an input batch: B×T ids alone (one segment), or B×T×2 ids and
    types (sentence pairs), as int32."""
    x = jnp.asarray(x)
    if x.ndim == 3:
        return x[..., 0].astype(jnp.int32), x[..., 1].astype(jnp.int32)
    return x.astype(jnp.int32), None


class Block(nnx.Module):
    def __init__(self, a: BertArgs, rngs: nnx.Rngs):
        d, heads = a.hidden_size, a.num_attention_heads
        hd = d // heads
        self.q = nnx.LinearGeneral(d, (heads, hd), rngs=rngs)
        self.k = nnx.LinearGeneral(d, (heads, hd), rngs=rngs)
        self.v = nnx.LinearGeneral(d, (heads, hd), rngs=rngs)
        self.o = nnx.LinearGeneral((heads, hd), d, axis=(-2, -1), rngs=rngs)
        self.ln1 = nnx.LayerNorm(d, epsilon=a.layer_norm_eps, rngs=rngs)
        self.fc_in = nnx.Linear(d, a.intermediate_size, rngs=rngs)
        self.fc_out = nnx.Linear(a.intermediate_size, d, rngs=rngs)
        self.ln2 = nnx.LayerNorm(d, epsilon=a.layer_norm_eps, rngs=rngs)

    def __call__(self, x, real_BxT):
        """(new stream, MLP units after the GELU, head outputs B×T×H×d)."""
        q, k, v = self.q(x), self.k(x), self.v(x)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
        scores = jnp.where(real_BxT[:, None, None, :], scores, jnp.finfo(scores.dtype).min)
        heads = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)
        y = self.ln1(x + self.o(heads))
        units = jax.nn.gelu(self.fc_in(y), approximate=False)
        return self.ln2(y + self.fc_out(units)), units, heads


class MaskedLMHead(nnx.Module):
    """BERT's masked-language-modelling head (BertForMaskedLM's cls.predictions): dense → GELU → LayerNorm, then
    the word embeddings' transpose (tied, as in BERT's pretraining) and a bias per token."""

    def __init__(self, a: BertArgs, rngs: nnx.Rngs):
        self.transform = nnx.Linear(a.hidden_size, a.hidden_size, rngs=rngs)
        self.ln = nnx.LayerNorm(a.hidden_size, epsilon=a.layer_norm_eps, rngs=rngs)
        self.bias = nnx.Param(jnp.zeros((a.vocab_size,)))

    def __call__(self, h_BxTxD, embedding_VxD):
        t = self.ln(jax.nn.gelu(self.transform(h_BxTxD), approximate=False))
        return t @ embedding_VxD.T + self.bias[...][None, None]


class Bert(Classifier):
    def __init__(self, cfg, input_shape: tuple[int, ...], num_classes: int, rngs: nnx.Rngs, per_token: bool = False):
        a = _args(cfg)
        if per_token and num_classes != a.vocab_size:
            raise ValueError(f"model.kind 'bert' predicts masked tokens of its own vocabulary "
                             f"(model.args.vocab_size {a.vocab_size}), not {num_classes} classes per position")
        if a.hidden_size % a.num_attention_heads:
            raise ValueError(f"model.args.hidden_size {a.hidden_size} is not a multiple of num_attention_heads "
                             f"{a.num_attention_heads}")
        if len(input_shape) > 1 and tuple(input_shape[1:]) != (2,):
            raise ValueError(f"model.kind 'bert' reads token ids T or token ids and types T×2, not inputs of shape "
                             f"{tuple(input_shape)}")
        if input_shape and input_shape[0] > a.max_position_embeddings:
            raise ValueError(f"sequences of {input_shape[0]} tokens exceed model.args.max_position_embeddings "
                             f"{a.max_position_embeddings}")
        d = a.hidden_size
        self.embed = nnx.Embed(a.vocab_size, d, rngs=rngs)
        self.pos = nnx.Embed(a.max_position_embeddings, d, rngs=rngs)
        self.token_type = nnx.Embed(a.type_vocab_size, d, rngs=rngs)
        self.ln_embed = nnx.LayerNorm(d, epsilon=a.layer_norm_eps, rngs=rngs)
        self.remat = a.remat
        self.blocks = nnx.List([Block(a, rngs) for _ in range(a.num_hidden_layers)])
        self.pooler = nnx.Linear(d, d, rngs=rngs) if a.pooler else None
        self.per_token = per_token
        self.head = MaskedLMHead(a, rngs) if per_token else nnx.Linear(d, num_classes, rngs=rngs)

    def __call__(self, x, drop: Dropout = None):
        if not self.per_token:
            return super().__call__(x, drop)
        return self.head(self.features(x, drop), self.embed.embedding[...])

    def _run(self, x):
        tokens, types = split_types(x)
        real = tokens >= 0
        t = tokens.shape[1]
        if types is None:  # one segment: type 0 everywhere (the computation bit for bit as before token types)
            typed = self.token_type.embedding[...][0][None, None]
        else:
            typed = self.token_type.embedding[...][jnp.where(real, types, 0)]
        h = self.embed(jnp.maximum(tokens, 0)) + self.pos.embedding[...][:t][None] + typed
        h = self.ln_embed(h)
        stream, blocks = [h], []
        for block in self.blocks:
            h, units, heads = remat(block, self.remat)(h, real)
            stream.append(h)
            blocks.append((units, heads))
        return h, stream, blocks

    def hidden(self, x):
        """The final hidden states B×T×D (BertModel's last_hidden_state)."""
        return self._run(x)[0]

    def pooled(self, h_BxTxD):
        cls = h_BxTxD[:, 0]
        return cls if self.pooler is None else jnp.tanh(self.pooler(cls))

    def features(self, x, drop: Dropout = None):
        if drop is not None:
            raise ValueError("model.kind 'bert' has no dropout")
        h = self.hidden(x)
        return h if self.per_token else self.pooled(h)

    def unit_activations(self, x) -> list[jax.Array]:
        """The residual stream after the embedding LayerNorm and after each block, N × D × sites (every position an
        example); per block its MLP units N × I and its heads N × H × d; the pooler's units on [CLS], B × D (each
        example's row repeated over its positions, so that every group has the same rows)."""
        h, stream, blocks = self._run(x)
        acts = block_activations(stream, blocks)
        if self.pooler is not None:
            acts.append(jnp.repeat(self.pooled(h), x.shape[1], axis=0))
        return acts


def _depth(cfg) -> int:
    return _args(cfg).num_hidden_layers


def layers(cfg) -> list[str]:
    names = ["embed"] + [name for b in range(_depth(cfg)) for name in (f"blocks.{b}.fc_in", f"blocks.{b}.q")]
    return names + (["pooler"] if _args(cfg).pooler else [])


def layer_groups(cfg) -> dict[str, list[str]]:
    """Top-level parameter groups: the embeddings, all blocks, the output (pooler and head)."""
    out = ["pooler", "head"] if _args(cfg).pooler else ["head"]
    return {"embed": ["embed", "pos", "token_type", "ln_embed"], "blocks": ["blocks"], "out": out}


def permutation_spec(cfg, input_shape, per_token: bool = False) -> PermutationSpec:
    """With the masked-LM head (`per_token`), its transform, LayerNorm and tied decoder all live in the residual
    stream's space: both axes of the transform's kernel follow the stream's permutation."""
    a = _args(cfg)
    residual = [UnitAxis(name, "embedding", 1) for name in ("embed", "pos", "token_type")]
    residual += [UnitAxis("ln_embed", "scale", 0), UnitAxis("ln_embed", "bias", 0)]
    if per_token:
        residual += [UnitAxis("head.transform", "kernel", 0), UnitAxis("head.transform", "kernel", 1),
                     UnitAxis("head.transform", "bias", 0), UnitAxis("head.ln", "scale", 0),
                     UnitAxis("head.ln", "bias", 0)]
    if a.pooler:
        residual.append(UnitAxis("pooler", "kernel", 0))
    elif not per_token:
        residual.append(UnitAxis("head", "kernel", 0))
    spec = []
    for b in range(a.num_hidden_layers):
        block_residual, groups = block_spec(f"blocks.{b}.")
        residual += block_residual
        spec += groups
    if a.pooler:  # the pooler's units feed the classifier's head (a masked language model leaves them unread)
        spec.append([UnitAxis("pooler", "kernel", 1), UnitAxis("pooler", "bias", 0)]
                    + ([] if per_token else [UnitAxis("head", "kernel", 0)]))
    return [residual] + spec


KIND = ModelKind("bert", Bert, layers, permutation_spec, min_depth=0, sequence=True, layer_groups=layer_groups,
                 args=BertArgs, pads=True, token_types=True)
