"""The transformer kind: a decoder-only, pre-LayerNorm transformer over token sequences.

    tokens → token embedding + learned position embedding → depth × [x + Attn(LN(x)); x + MLP(LN(x))] → LN → head

Multi-head causal self-attention with `model.heads` heads of width/heads dimensions each, and an MLP of 4·width
GELU units per block; no dropout, no BatchNorm. Inputs are token ids (any numeric dtype: evaluation sets arrive as
float32, which holds every id of a vocabulary below 2²⁴ exactly). The head reads

* every position (`per_token`: language modelling, logits B×T×V against the next token), or
* the last position (sequence classification: its final hidden state is the penultimate representation, the one
  CKA and the linear probe see).

Parameters are one level deep (`params[layer][name]`, e.g. params["b0_q"]["kernel"]) with the attention heads as
an axis of their own (q/k/v kernels D×H×d, output kernel H×d×D), so the permutation spec can name them:

* the residual stream — one permutation of the width shared by both embeddings, every LayerNorm, every projection
  that reads the stream (q, k, v, MLP in, head: input axis) and every one that writes it (attention out, MLP out:
  output axis and bias); LayerNorm commutes with it (mean and variance over features do not depend on their order);
* each block's MLP hidden units (MLP in: output axis and bias; MLP out: input axis);
* each block's attention heads, whole (q, k, v kernels and biases, and the output kernel, on their head axis):
  relabelling heads leaves every head's Q/K and V/O pairing intact.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlmc.models import mup
from jaxlmc.models.base import Classifier, Dropout, ModelKind, PermutationSpec, UnitAxis, block_activations, block_spec

MLP_RATIO = 4


def layers(cfg) -> list[str]:
    """The permutation groups in the spec's order, each named by its first layer: the residual stream ("embed"),
    then per block its MLP hidden units ("b<k>_fc1") and its heads ("b<k>_q")."""
    return ["embed"] + [name for b in range(cfg.depth) for name in (f"b{b}_fc1", f"b{b}_q")]


def repair_points(cfg) -> list[tuple[str, str]]:
    """Per block, the MLP's first projection (kernel output axis and bias): it produces the GELU's input."""
    return [(f"b{b}_fc1", "kernel") for b in range(cfg.depth)]


def layer_groups(cfg) -> dict[str, list[str]]:
    """The layer-wise barrier's units: the embeddings, each block's attention and its MLP (each with the LayerNorm
    that feeds it), and the output (final LayerNorm and head)."""
    groups = {"embed": ["embed", "pos"]}
    for b in range(cfg.depth):
        groups[f"b{b}_attn"] = [f"b{b}_{name}" for name in ("ln1", "q", "k", "v", "o")]
        groups[f"b{b}_mlp"] = [f"b{b}_{name}" for name in ("ln2", "fc1", "fc2")]
    groups["out"] = ["ln_f", "head"]
    return groups


def head_dim(cfg) -> int:
    return cfg.width // cfg.heads


class Transformer(Classifier):
    def __init__(self, cfg, input_shape: tuple[int, ...], num_classes: int, rngs: nnx.Rngs, per_token: bool = False):
        (context,) = input_shape
        width, heads, dim = cfg.width, cfg.heads, head_dim(cfg)
        self.depth, self.heads, self.per_token = cfg.depth, heads, per_token
        init = nnx.initializers.normal(0.02)
        self.embed = nnx.Embed(cfg.vocab_size, width, embedding_init=init, rngs=rngs)
        self.pos = nnx.Embed(context, width, embedding_init=init, rngs=rngs)
        for b in range(cfg.depth):
            setattr(self, f"b{b}_ln1", nnx.LayerNorm(width, rngs=rngs))
            for name in "qkv":
                setattr(self, f"b{b}_{name}", nnx.LinearGeneral(width, (heads, dim), rngs=rngs))
            setattr(self, f"b{b}_o", nnx.LinearGeneral((heads, dim), width, axis=(-2, -1), rngs=rngs))
            setattr(self, f"b{b}_ln2", nnx.LayerNorm(width, rngs=rngs))
            setattr(self, f"b{b}_fc1", nnx.Linear(width, MLP_RATIO * width, rngs=rngs))
            setattr(self, f"b{b}_fc2", nnx.Linear(MLP_RATIO * width, width, rngs=rngs))
        self.ln_f = nnx.LayerNorm(width, rngs=rngs)
        self.head = nnx.Linear(width, num_classes, rngs=rngs)
        # µP (jaxlmc.models.mup): the head reads features / m, and scores divide by √(d·m) = d / √d_base, which grows
        # like d rather than √d (equal at the base width); 1 and √d under the standard parametrisation.
        self.readout_scale = mup.readout_scale(cfg)
        mup.init_readout(self.head, cfg)
        self.score_width_ratio = mup.width_ratio(cfg)

    def _run(self, x):
        """(the final hidden states B×T×D, the residual stream entering each LayerNorm [2·depth + 1 of B×T×D], and
        per block its MLP's post-GELU units B×T×(4·D), its heads' attention outputs B×T×H×d and its MLP's pre-GELU
        units B×T×(4·D))."""
        tokens = x.astype(jnp.int32)
        length = tokens.shape[1]
        h = self.embed(tokens) + self.pos(jnp.arange(length))[None]
        causal = jnp.tril(jnp.ones((length, length), bool))
        stream, blocks = [], []
        for b in range(self.depth):
            stream.append(h)
            a = getattr(self, f"b{b}_ln1")(h)
            q, k, v = (getattr(self, f"b{b}_{name}")(a) for name in "qkv")  # B×T×H×d each
            scale = jnp.sqrt(q.shape[-1] * self.score_width_ratio).astype(q.dtype)
            scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / scale
            weights = jax.nn.softmax(jnp.where(causal, scores, jnp.finfo(scores.dtype).min), axis=-1)
            heads = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
            h = h + getattr(self, f"b{b}_o")(heads)
            stream.append(h)
            m = getattr(self, f"b{b}_ln2")(h)
            pre = getattr(self, f"b{b}_fc1")(m)
            units = jax.nn.gelu(pre)
            h = h + getattr(self, f"b{b}_fc2")(units)
            blocks.append((units, heads, pre))
        stream.append(h)
        return self.ln_f(h), stream, blocks

    def hidden(self, x):
        """The final hidden states B×T×D."""
        return self._run(x)[0]

    def unit_activations(self, x) -> list[jax.Array]:
        """In the spec's group order, every position an example of its own (N = B·T):

        * the residual stream: its state entering each LayerNorm (the embeddings, and each block after its attention
          and after its MLP: 2·depth + 1 sites), N × D × sites — one feature per site, so activation matching sums
          the per-site correlations rather than pooling sites of different scales into one correlation;
        * per block, its MLP's hidden units after the GELU, N × 4·D;
        * per block, its heads: each head's attention output (before the output projection), N × H × d — a head is
          permuted whole, so its d dimensions are its features.
        """
        _, stream, blocks = self._run(x)
        return block_activations(stream, [(units, heads) for units, heads, _ in blocks])

    def preactivations(self, x) -> list[jax.Array]:
        """Per block, its MLP's input to the GELU, B × T × 4·D: what REPAIR renormalises (per unit over examples and
        positions; the residual stream is renormalised by the LayerNorms already)."""
        return [pre for _, _, pre in self._run(x)[2]]

    def features(self, x, drop: Dropout = None):
        if drop is not None:
            raise ValueError("model.kind 'transformer' has no dropout")
        h = self.hidden(x)
        return h if self.per_token else h[:, -1]


def permutation_spec(cfg, input_shape, per_token: bool = False) -> PermutationSpec:
    """The same for a classifier and a language model: either head is one linear layer reading the stream."""
    residual = [UnitAxis("embed", "embedding", 1), UnitAxis("pos", "embedding", 1),
                UnitAxis("ln_f", "scale", 0), UnitAxis("ln_f", "bias", 0), UnitAxis("head", "kernel", 0)]
    spec = []
    for b in range(cfg.depth):
        block_residual, groups = block_spec(f"b{b}_", "fc1", "fc2")
        residual += block_residual
        spec += groups
    return [residual] + spec


KIND = ModelKind("transformer", Transformer, layers, permutation_spec, min_depth=1, sequence=True,
                 layer_groups=layer_groups, repair_points=repair_points, mup=True)
