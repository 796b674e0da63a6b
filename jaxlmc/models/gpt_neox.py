"""The gpt_neox kind: the GPT-NeoX decoder of the Pythia suites (Black et al. 2022; Biderman et al. 2023), in NNX,
computing what Hugging Face's `GPTNeoXForCausalLM` computes from the same weights (jaxlmc.hf reads them).

    tokens → embedding → layers × block → final LayerNorm → head
    block:  x + Attn(LN₁(x)) + MLP(LN₂(x))          (parallel residual, Pythia's)
            or  y = x + Attn(LN₁(x));  y + MLP(LN₂(y))

Attention: causal, `heads` heads of d = hidden/heads dimensions, scaled by 1/√d; rotary position embeddings
(Su et al. 2021) on the first ⌊d·rotary_pct⌋ dimensions of each head's queries and keys (GPT-NeoX's "rotate half"
form, base `rotary_base`), the rest passed through. MLP: GELU (exact, erf) between two projections. No dropout.

Inputs are token ids B×T (any numeric dtype); a negative id is padding: it is embedded as token 0, never attended
to, and a classifier reads each sequence's last real token. The head reads every position (`per_token`: language
modelling, the pretrained `embed_out`) or the last real one (sequence classification: a new head).

Parameters keep the attention heads as an axis (q, k, v kernels D×H×d, output kernel H×d×D), so the permutation
spec names whole heads: the residual stream (every LayerNorm, both embeddings' hidden axis, every projection reading
or writing the stream), each block's MLP units, each block's heads (rotary dimensions are never permuted inside a
head: relabelling heads keeps every head's dimensions in place).
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
class GPTNeoXArgs:
    """[model.args] of the gpt_neox kind (the names of Hugging Face's GPTNeoXConfig where one exists)."""

    vocab_size: int = 512
    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    intermediate_size: int = 256
    rotary_pct: float = 0.25
    rotary_emb_base: float = 10000.0
    use_parallel_residual: bool = True
    layer_norm_eps: float = 1e-5
    remat: bool = False  # recompute each block's activations in the backward pass (less memory, ~⅓ more compute)

    def problem(self) -> str | None:
        """What makes these arguments describe no buildable model (jaxlmc.config refuses them naming it)."""
        return args_problem(self)


def args_problem(a: GPTNeoXArgs, rotary_name: str = "rotary_pct") -> str | None:
    """What makes these arguments describe no model this kind can build, as one line naming the field (None: they
    are sound); `rotary_name` is what the line calls rotary_pct (a checkpoint's config.json may spell it otherwise).
    Rotary embeddings rotate pairs of dimensions: ⌊d·rotary_pct⌋ must be even."""
    if a.num_attention_heads < 1 or a.hidden_size % a.num_attention_heads:
        return f"hidden_size {a.hidden_size} is not a multiple of num_attention_heads {a.num_attention_heads}"
    head = a.hidden_size // a.num_attention_heads
    if not 0 <= a.rotary_pct <= 1:
        return f"{rotary_name} {a.rotary_pct} is not between 0 and 1"
    dims = int(head * a.rotary_pct)
    if dims % 2:
        return (f"{rotary_name} {a.rotary_pct} of head dimension {head} gives {dims} rotary dimensions, an odd number: "
                "rotary embeddings rotate pairs of dimensions")
    return None


def _args(cfg) -> GPTNeoXArgs:
    return cfg.args if isinstance(cfg.args, GPTNeoXArgs) else GPTNeoXArgs(**dict(cfg.args))


def rotary(x_BxTxHxR, positions_T, base: float):
    """Rotary embedding of the R leading dimensions of each head ("rotate half": dimension k pairs with k + R/2)."""
    rot = x_BxTxHxR.shape[-1]
    inv_freq = 1.0 / (base ** (jnp.arange(0, rot, 2, dtype=jnp.float32) / rot))
    freqs_TxR2 = positions_T[:, None].astype(jnp.float32) * inv_freq[None]
    angles = jnp.concatenate([freqs_TxR2, freqs_TxR2], axis=-1)[None, :, None, :]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    half = rot // 2
    rotated = jnp.concatenate([-x_BxTxHxR[..., half:], x_BxTxHxR[..., :half]], axis=-1)
    return x_BxTxHxR * cos + rotated * sin


class Block(nnx.Module):
    def __init__(self, a: GPTNeoXArgs, rngs: nnx.Rngs):
        d, heads = a.hidden_size, a.num_attention_heads
        hd = d // heads
        self.ln1 = nnx.LayerNorm(d, epsilon=a.layer_norm_eps, rngs=rngs)
        self.ln2 = nnx.LayerNorm(d, epsilon=a.layer_norm_eps, rngs=rngs)
        self.q = nnx.LinearGeneral(d, (heads, hd), rngs=rngs)
        self.k = nnx.LinearGeneral(d, (heads, hd), rngs=rngs)
        self.v = nnx.LinearGeneral(d, (heads, hd), rngs=rngs)
        self.o = nnx.LinearGeneral((heads, hd), d, axis=(-2, -1), rngs=rngs)
        self.fc_in = nnx.Linear(d, a.intermediate_size, rngs=rngs)
        self.fc_out = nnx.Linear(a.intermediate_size, d, rngs=rngs)
        self.rotary_dims = int(hd * a.rotary_pct)
        self.base = a.rotary_emb_base
        self.parallel = a.use_parallel_residual

    def attention(self, h, real_BxT):
        """(output B×T×D, each head's output before the projection B×T×H×d)."""
        q, k, v = self.q(h), self.k(h), self.v(h)
        positions = jnp.arange(h.shape[1])
        r = self.rotary_dims
        if r:
            q = jnp.concatenate([rotary(q[..., :r], positions, self.base), q[..., r:]], axis=-1)
            k = jnp.concatenate([rotary(k[..., :r], positions, self.base), k[..., r:]], axis=-1)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
        t = h.shape[1]
        allowed = jnp.tril(jnp.ones((t, t), bool))[None, None] & real_BxT[:, None, None, :]
        # A padded query (every key it may see is padding, at the start) attends uniformly: its output is never read.
        scores = jnp.where(allowed, scores, jnp.finfo(scores.dtype).min)
        heads = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(v.dtype), v)
        return self.o(heads), heads

    def __call__(self, x, real_BxT):
        """(new stream, MLP units after the GELU, head outputs, MLP input to the GELU)."""
        attn, heads = self.attention(self.ln1(x), real_BxT)
        mid = x + attn
        pre = self.fc_in(self.ln2(x if self.parallel else mid))
        units = jax.nn.gelu(pre, approximate=False)
        return mid + self.fc_out(units), units, heads, pre


class GPTNeoX(Classifier):
    def __init__(self, cfg, input_shape: tuple[int, ...], num_classes: int, rngs: nnx.Rngs, per_token: bool = False):
        a = _args(cfg)
        problem = args_problem(a)
        if problem is not None:
            raise ValueError(f"model.args.{problem}")
        self.per_token = per_token
        self.embed = nnx.Embed(a.vocab_size, a.hidden_size, rngs=rngs)
        self.remat = a.remat
        self.blocks = nnx.List([Block(a, rngs) for _ in range(a.num_hidden_layers)])
        self.ln_f = nnx.LayerNorm(a.hidden_size, epsilon=a.layer_norm_eps, rngs=rngs)
        self.head = nnx.Linear(a.hidden_size, num_classes, use_bias=not per_token, rngs=rngs)

    def _run(self, x):
        tokens = x.astype(jnp.int32)
        real = tokens >= 0
        h = self.embed(jnp.maximum(tokens, 0))
        stream, blocks = [h], []
        for block in self.blocks:
            h, units, heads, pre = remat(block, self.remat)(h, real)
            stream.append(h)
            blocks.append((units, heads, pre))
        return self.ln_f(h), real, stream, blocks

    def hidden(self, x):
        return self._run(x)[0]

    def features(self, x, drop: Dropout = None):
        if drop is not None:
            raise ValueError("model.kind 'gpt_neox' has no dropout")
        h, real, _, _ = self._run(x)
        if self.per_token:
            return h
        last = jnp.maximum(real.sum(axis=1) - 1, 0)  # right padding: the last real token
        return jnp.take_along_axis(h, last[:, None, None], axis=1)[:, 0]

    def unit_activations(self, x) -> list[jax.Array]:
        """As the transformer kind's, real positions weighted like padded ones (pass unpadded batches): the residual
        stream at every site N × D × sites, then per block its MLP units N × I and its heads N × H × d."""
        _, _, stream, blocks = self._run(x)
        return block_activations(stream, [(units, heads) for units, heads, _ in blocks])


def _depth(cfg) -> int:
    return _args(cfg).num_hidden_layers


def layers(cfg) -> list[str]:
    return ["embed"] + [name for b in range(_depth(cfg)) for name in (f"blocks.{b}.fc_in", f"blocks.{b}.q")]


def layer_groups(cfg) -> dict[str, list[str]]:
    """Top-level parameter groups: the embedding, all blocks (one module list), the output. (Finer, per-block groups
    would need nested keys in Model.layer_groups.)"""
    return {"embed": ["embed"], "blocks": ["blocks"], "out": ["ln_f", "head"]}


def permutation_spec(cfg, input_shape, per_token: bool = False) -> PermutationSpec:
    """The same for a classifier and a language model: either head is one linear layer reading the stream."""
    residual = [UnitAxis("embed", "embedding", 1), UnitAxis("ln_f", "scale", 0), UnitAxis("ln_f", "bias", 0),
                UnitAxis("head", "kernel", 0)]
    spec = []
    for b in range(_depth(cfg)):
        block_residual, groups = block_spec(f"blocks.{b}.")
        residual += block_residual
        spec += groups
    return [residual] + spec


KIND = ModelKind("gpt_neox", GPTNeoX, layers, permutation_spec, min_depth=0, sequence=True,
                 layer_groups=layer_groups, args=GPTNeoXArgs, pads=True)
