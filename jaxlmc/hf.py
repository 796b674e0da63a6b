"""Hugging Face checkpoints as jaxlmc parameters: every read of a released model lives here.

A checkpoint is a directory (a local snapshot, or the hub's cached download of a repository at a pinned revision)
holding `config.json` and the weights as safetensors (`model.safetensors`, or shards listed in
`model.safetensors.index.json`), read with the `safetensors` package into numpy — no PyTorch at run time, and never a
pickle. `gpt_neox_params` maps a GPT-NeoX (Pythia) state dict onto the gpt_neox kind's parameters
(jaxlmc.models.gpt_neox), which then compute what `transformers`' GPTNeoXForCausalLM computes (tested against
its logits). Every problem — a missing file, an unsupported architecture, a name or shape that does not match — is
one line naming what and where.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable

import huggingface_hub
import numpy as np
from safetensors.numpy import load_file, save_file

from jaxlmc.models.bert import BertArgs
from jaxlmc.models.gpt_neox import GPTNeoXArgs

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
# Buffers some GPT-NeoX checkpoints carry that are not parameters (recomputed from the config).
_GPT_NEOX_BUFFERS = ("attention.bias", "attention.masked_bias", "attention.rotary_emb.inv_freq")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read as asked; the message names the file or tensor."""


def snapshot(source: str, revision: str | None = None) -> str:
    """The local directory of a checkpoint: `source` itself when it is one, else the hub's snapshot of repository
    `source` at `revision` (a branch, tag or commit: Pythia's "step512"), downloaded once and cached by
    huggingface_hub (offline: only what the cache holds)."""
    if os.path.isdir(source):
        return source
    try:
        return huggingface_hub.snapshot_download(source, revision=revision,
                                                 allow_patterns=[CONFIG, "*.safetensors", WEIGHTS_INDEX,
                                                                 "tokenizer.json"])
    except Exception as err:  # the hub's many errors (offline, unknown repository or revision): one line
        raise CheckpointError(f"{source} (revision {revision or 'main'}) is neither a local directory nor reachable "
                              f"on the Hugging Face hub: {type(err).__name__}: {str(err).splitlines()[0]}") from None


def read_config(directory: str) -> dict:
    path = os.path.join(directory, CONFIG)
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: a Hugging Face checkpoint directory holds its config.json") from None
    except ValueError as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from None


def read_state_dict(directory: str) -> dict[str, np.ndarray]:
    """Every tensor of the checkpoint's safetensors file(s), by name, as numpy arrays."""
    single, index = os.path.join(directory, WEIGHTS), os.path.join(directory, WEIGHTS_INDEX)
    if os.path.exists(single):
        names = [WEIGHTS]
    elif os.path.exists(index):
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
    else:
        raise CheckpointError(f"{directory} holds neither {WEIGHTS} nor {WEIGHTS_INDEX} (only safetensors weights are "
                              "read: convert a PyTorch .bin checkpoint with transformers' save_pretrained)")
    state = {}
    for name in names:
        path = os.path.join(directory, name)
        try:
            state.update(load_file(path))
        except (OSError, ValueError) as err:
            raise CheckpointError(f"{path} cannot be read as safetensors: {err}") from None
    return state


def gpt_neox_args(config: dict, where: str = "config.json") -> GPTNeoXArgs:
    """The gpt_neox kind's arguments from a Hugging Face GPTNeoXConfig (config.json)."""
    if config.get("model_type") != "gpt_neox":
        raise CheckpointError(f"{where}: model_type {config.get('model_type')!r} is not 'gpt_neox' (architectures "
                              f"{config.get('architectures')})")
    if config.get("hidden_act", "gelu") != "gelu":
        raise CheckpointError(f"{where}: hidden_act {config['hidden_act']!r} is not supported (only 'gelu')")
    rope = config.get("rope_parameters") or {}
    return GPTNeoXArgs(
        vocab_size=int(config["vocab_size"]), hidden_size=int(config["hidden_size"]),
        num_hidden_layers=int(config["num_hidden_layers"]), num_attention_heads=int(config["num_attention_heads"]),
        intermediate_size=int(config["intermediate_size"]),
        rotary_pct=float(config.get("rotary_pct", config.get("partial_rotary_factor",
                                                             rope.get("partial_rotary_factor", 1.0)))),
        rotary_emb_base=float(config.get("rotary_emb_base", config.get("rope_theta", rope.get("rope_theta", 1e4)))),
        use_parallel_residual=bool(config.get("use_parallel_residual", True)),
        layer_norm_eps=float(config.get("layer_norm_eps", 1e-5)))


def _take(state: dict, name: str, shape: tuple[int, ...], where: str) -> np.ndarray:
    if name not in state:
        raise CheckpointError(f"{where}: tensor {name} is missing")
    array = np.asarray(state.pop(name), np.float32)
    if array.shape != shape:
        raise CheckpointError(f"{where}: tensor {name} has shape {array.shape}, the config implies {shape}")
    return array


def gpt_neox_params(state: dict[str, np.ndarray], a: GPTNeoXArgs, where: str = "checkpoint") -> dict:
    """The gpt_neox kind's parameters (with its language-modelling head) from a GPTNeoXForCausalLM state dict.

    Linear weights are stored out × in and become in × out kernels; the fused query_key_value projection holds, per
    head, its query, key and value rows in turn (out index = head · 3d + {0, d, 2d} + i), split here into the
    q, k, v kernels D × H × d; the output projection's input axis is heads × d."""
    state = {k: v for k, v in state.items() if not k.endswith(_GPT_NEOX_BUFFERS)}
    d, heads, inner, vocab = a.hidden_size, a.num_attention_heads, a.intermediate_size, a.vocab_size
    hd = d // heads
    take = lambda name, *shape: _take(state, name, shape, where)  # noqa: E731

    def norm(prefix):
        return {"scale": take(f"{prefix}.weight", d), "bias": take(f"{prefix}.bias", d)}

    params = {"embed": {"embedding": take("gpt_neox.embed_in.weight", vocab, d)}, "blocks": {}}
    for b in range(a.num_hidden_layers):
        p = f"gpt_neox.layers.{b}"
        qkv_w = take(f"{p}.attention.query_key_value.weight", 3 * d, d).reshape(heads, 3, hd, d)
        qkv_b = take(f"{p}.attention.query_key_value.bias", 3 * d).reshape(heads, 3, hd)
        block = {"ln1": norm(f"{p}.input_layernorm"), "ln2": norm(f"{p}.post_attention_layernorm")}
        for s, name in enumerate("qkv"):
            block[name] = {"kernel": qkv_w[:, s].transpose(2, 0, 1), "bias": qkv_b[:, s]}
        block["o"] = {"kernel": take(f"{p}.attention.dense.weight", d, d).T.reshape(heads, hd, d),
                      "bias": take(f"{p}.attention.dense.bias", d)}
        block["fc_in"] = {"kernel": take(f"{p}.mlp.dense_h_to_4h.weight", inner, d).T,
                          "bias": take(f"{p}.mlp.dense_h_to_4h.bias", inner)}
        block["fc_out"] = {"kernel": take(f"{p}.mlp.dense_4h_to_h.weight", d, inner).T,
                           "bias": take(f"{p}.mlp.dense_4h_to_h.bias", d)}
        params["blocks"][b] = block
    params["ln_f"] = norm("gpt_neox.final_layer_norm")
    params["head"] = {"kernel": take("embed_out.weight", vocab, d).T}
    if state:
        raise CheckpointError(f"{where}: tensors the gpt_neox kind does not have: {', '.join(sorted(state)[:4])}")
    return params


def load_gpt_neox(source: str, revision: str | None = None) -> tuple[GPTNeoXArgs, dict]:
    """(arguments, parameters with the language-modelling head) of a GPT-NeoX checkpoint: a local directory or a hub
    repository at a revision (jaxlmc.hf.snapshot)."""
    directory = snapshot(source, revision)
    args = gpt_neox_args(read_config(directory), os.path.join(directory, CONFIG))
    return args, gpt_neox_params(read_state_dict(directory), args, directory)


def gpt_neox_state_dict(params: dict, a: GPTNeoXArgs) -> dict[str, np.ndarray]:
    """The inverse of `gpt_neox_params`: a GPTNeoXForCausalLM state dict of the gpt_neox kind's parameters (with its
    language-modelling head)."""
    d, heads = a.hidden_size, a.num_attention_heads
    hd = d // heads
    arr = lambda x: np.ascontiguousarray(np.asarray(x, np.float32))  # noqa: E731
    state = {"gpt_neox.embed_in.weight": arr(params["embed"]["embedding"]),
             "gpt_neox.final_layer_norm.weight": arr(params["ln_f"]["scale"]),
             "gpt_neox.final_layer_norm.bias": arr(params["ln_f"]["bias"]),
             "embed_out.weight": arr(np.asarray(params["head"]["kernel"]).T)}
    for b, block in params["blocks"].items():
        p = f"gpt_neox.layers.{b}"
        for ln, name in (("ln1", "input_layernorm"), ("ln2", "post_attention_layernorm")):
            state[f"{p}.{name}.weight"], state[f"{p}.{name}.bias"] = arr(block[ln]["scale"]), arr(block[ln]["bias"])
        kernel = np.stack([np.asarray(block[n]["kernel"]).transpose(1, 2, 0) for n in "qkv"], axis=1)  # H×3×d×D
        state[f"{p}.attention.query_key_value.weight"] = arr(kernel.reshape(3 * d, d))
        state[f"{p}.attention.query_key_value.bias"] = arr(np.stack([block[n]["bias"] for n in "qkv"], 1).reshape(-1))
        state[f"{p}.attention.dense.weight"] = arr(np.asarray(block["o"]["kernel"]).reshape(heads * hd, d).T)
        state[f"{p}.attention.dense.bias"] = arr(block["o"]["bias"])
        state[f"{p}.mlp.dense_h_to_4h.weight"] = arr(np.asarray(block["fc_in"]["kernel"]).T)
        state[f"{p}.mlp.dense_h_to_4h.bias"] = arr(block["fc_in"]["bias"])
        state[f"{p}.mlp.dense_4h_to_h.weight"] = arr(np.asarray(block["fc_out"]["kernel"]).T)
        state[f"{p}.mlp.dense_4h_to_h.bias"] = arr(block["fc_out"]["bias"])
    return state


def save_gpt_neox(directory: str, a: GPTNeoXArgs, params: dict) -> None:
    """Write a Hugging Face checkpoint (config.json, model.safetensors) of gpt_neox parameters, readable by
    `load_gpt_neox` and by transformers' GPTNeoXForCausalLM.from_pretrained."""
    os.makedirs(directory, exist_ok=True)
    config = {"architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox", "hidden_act": "gelu",
              "tie_word_embeddings": False, **dataclasses.asdict(a)}
    with open(os.path.join(directory, CONFIG), "w") as f:
        json.dump(config, f, indent=2)
    save_file(gpt_neox_state_dict(params, a), os.path.join(directory, WEIGHTS))


# Per model kind, the reader of its released checkpoints: (source, revision) -> (its [model.args], parameters).
LOADERS: dict[str, Callable[[str, str | None], tuple]] = {"gpt_neox": lambda source, revision: load_gpt_neox(
    source, revision)}


def register_loader(kind: str, load: Callable[[str, str | None], tuple]) -> None:
    """Let model.pretrained name checkpoints of `kind`: `load(source, revision)` returns (args, parameters)."""
    if kind in LOADERS:
        raise ValueError(f"model kind {kind!r} already has a checkpoint loader")
    LOADERS[kind] = load


def bert_args(config: dict, where: str = "config.json") -> BertArgs:
    """The bert kind's arguments from a Hugging Face BertConfig (config.json)."""
    if config.get("model_type") != "bert":
        raise CheckpointError(f"{where}: model_type {config.get('model_type')!r} is not 'bert' (architectures "
                              f"{config.get('architectures')})")
    if config.get("hidden_act", "gelu") != "gelu":
        raise CheckpointError(f"{where}: hidden_act {config['hidden_act']!r} is not supported (only 'gelu')")
    if config.get("position_embedding_type", "absolute") != "absolute":
        raise CheckpointError(f"{where}: position_embedding_type {config['position_embedding_type']!r} is not "
                              "supported (only 'absolute')")
    return BertArgs(vocab_size=int(config["vocab_size"]), hidden_size=int(config["hidden_size"]),
                    num_hidden_layers=int(config["num_hidden_layers"]),
                    num_attention_heads=int(config["num_attention_heads"]),
                    intermediate_size=int(config["intermediate_size"]),
                    max_position_embeddings=int(config.get("max_position_embeddings", 512)),
                    type_vocab_size=int(config.get("type_vocab_size", 2)),
                    layer_norm_eps=float(config.get("layer_norm_eps", 1e-12)))


# Tensors of BERT checkpoints the encoder does not use: the pretraining heads, a fine-tuned classifier, buffers.
_BERT_UNUSED = ("cls.", "classifier.", "embeddings.position_ids")


def bert_params(state: dict[str, np.ndarray], a: BertArgs, where: str = "checkpoint") -> dict:
    """The bert kind's parameters without a head (a fine-tuning task draws its own) from a BertModel or
    BertFor* state dict ("bert." prefixed or not; LayerNorm as weight/bias or, in converted TensorFlow checkpoints,
    gamma/beta). Linear weights (out × in) become kernels (in × out), query/key/value D × H × d."""
    state = {k.removeprefix("bert."): v for k, v in state.items()}
    state = {k.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias"): v
             for k, v in state.items() if not k.startswith(_BERT_UNUSED)}
    d, heads, inner = a.hidden_size, a.num_attention_heads, a.intermediate_size
    hd = d // heads
    take = lambda name, *shape: _take(state, name, shape, where)  # noqa: E731

    def norm(prefix):
        return {"scale": take(f"{prefix}.weight", d), "bias": take(f"{prefix}.bias", d)}

    def dense(prefix, n_in, n_out):
        return {"kernel": take(f"{prefix}.weight", n_out, n_in).T, "bias": take(f"{prefix}.bias", n_out)}

    params = {"embed": {"embedding": take("embeddings.word_embeddings.weight", a.vocab_size, d)},
              "pos": {"embedding": take("embeddings.position_embeddings.weight", a.max_position_embeddings, d)},
              "token_type": {"embedding": take("embeddings.token_type_embeddings.weight", a.type_vocab_size, d)},
              "ln_embed": norm("embeddings.LayerNorm"), "blocks": {}}
    for b in range(a.num_hidden_layers):
        p = f"encoder.layer.{b}"
        block = {}
        for name, torch_name in (("q", "query"), ("k", "key"), ("v", "value")):
            block[name] = {"kernel": take(f"{p}.attention.self.{torch_name}.weight", d, d).T.reshape(d, heads, hd),
                           "bias": take(f"{p}.attention.self.{torch_name}.bias", d).reshape(heads, hd)}
        block["o"] = {"kernel": take(f"{p}.attention.output.dense.weight", d, d).T.reshape(heads, hd, d),
                      "bias": take(f"{p}.attention.output.dense.bias", d)}
        block["ln1"] = norm(f"{p}.attention.output.LayerNorm")
        block["fc_in"] = dense(f"{p}.intermediate.dense", d, inner)
        block["fc_out"] = dense(f"{p}.output.dense", inner, d)
        block["ln2"] = norm(f"{p}.output.LayerNorm")
        params["blocks"][b] = block
    if a.pooler:
        params["pooler"] = dense("pooler.dense", d, d)
    else:
        state = {k: v for k, v in state.items() if not k.startswith("pooler.")}
    if state:
        raise CheckpointError(f"{where}: tensors the bert kind does not have: {', '.join(sorted(state)[:4])}")
    return params


def load_bert(source: str, revision: str | None = None) -> tuple[BertArgs, dict]:
    """(arguments, encoder parameters without a head) of a BERT checkpoint: a local directory or a hub repository at
    a revision (MultiBERTs: google/multiberts-seed_0-step_20k)."""
    directory = snapshot(source, revision)
    args = bert_args(read_config(directory), os.path.join(directory, CONFIG))
    return args, bert_params(read_state_dict(directory), args, directory)
