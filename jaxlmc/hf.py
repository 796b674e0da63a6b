"""Hugging Face checkpoints as jaxlmc parameters: the GPT-NeoX (Pythia) and BERT state dicts mapped onto the
gpt_neox and bert kinds (jaxlmc.models), which then compute what `transformers`' models compute (tested against their
logits), the reverse mappings that save jaxlmc parameters as such checkpoints, and the registry of checkpoint loaders
per model kind (`LOADERS`, `register_loader`). The files themselves are read by jaxlmc.hf_files. Every problem — an
unsupported architecture or setting, a name or shape that does not match — is one line naming what and where.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable

import numpy as np

from jaxlmc import lazy
from jaxlmc.hf_files import (CONFIG, TOKENIZER_FILES, WEIGHTS, CheckpointError, read_config, read_state_dict,
                             revision_source, snapshot)
from jaxlmc.models.bert import BertArgs
from jaxlmc.models.gpt_neox import GPTNeoXArgs, args_problem as gpt_neox_args_problem
from jaxlmc.registry import Registry

safetensors_numpy = lazy.module("safetensors.numpy")  # imported when a checkpoint is first saved

__all__ = ["LOADERS", "TOKENIZER_FILES", "CheckpointError", "bert_args", "bert_params", "bert_state_dict",
           "gpt_neox_args", "gpt_neox_params", "gpt_neox_state_dict", "load_bert", "load_gpt_neox", "read_state_dict",
           "register_loader", "revision_source", "save_bert", "save_gpt_neox", "snapshot"]
# Buffers some GPT-NeoX checkpoints carry that are not parameters (recomputed from the config).
_GPT_NEOX_BUFFERS = ("attention.bias", "attention.masked_bias", "attention.rotary_emb.inv_freq")


def _check_architecture(config: dict, model_type: str, where: str) -> None:
    if config.get("model_type") != model_type:
        raise CheckpointError(f"{where}: model_type {config.get('model_type')!r} is not {model_type!r} (architectures "
                              f"{config.get('architectures')})")
    if config.get("hidden_act", "gelu") != "gelu":
        raise CheckpointError(f"{where}: hidden_act {config['hidden_act']!r} is not supported (only 'gelu')")


def _first(config: dict, rope: dict, rope_key: str, keys: tuple[str, ...], default: float) -> tuple[float, str]:
    """(value, the key it was read from) of a rotary setting: the RoPE table's (transformers 5's rope_parameters, or
    an older rope_scaling), else the first top-level key present, else transformers' default."""
    if rope.get(keys[-1]) is not None:
        return rope[keys[-1]], f"{rope_key}.{keys[-1]}"
    for key in keys:
        if config.get(key) is not None:
            return config[key], key
    return default, keys[0]


def gpt_neox_args(config: dict, where: str = CONFIG) -> GPTNeoXArgs:
    """The gpt_neox kind's arguments from a Hugging Face GPTNeoXConfig (config.json): the rotary settings as
    transformers reads them (rope_parameters, or an older rope_scaling, before rotary_pct / rotary_emb_base; defaults
    0.25 and 10000). Settings the kind does not implement are refused, each naming its key: scaled RoPE (a rope_type
    other than "default"), tied input and output embeddings, attention projections without biases."""
    _check_architecture(config, "gpt_neox", where)
    rope_key = "rope_scaling" if config.get("rope_scaling") is not None else "rope_parameters"
    rope = config.get(rope_key) or {}
    if not isinstance(rope, dict):
        raise CheckpointError(f"{where}: {rope_key} {rope!r} is not a table of RoPE settings")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise CheckpointError(f"{where}: {rope_key} with rope_type {rope_type!r} is not supported (only 'default': "
                              "unscaled rotary embeddings)")
    if config.get("tie_word_embeddings", False):
        raise CheckpointError(f"{where}: tie_word_embeddings {json.dumps(config['tie_word_embeddings'])} is not "
                              "supported (the gpt_neox kind's output layer embed_out is its own matrix, not the input "
                              "embedding)")
    if not config.get("attention_bias", True):
        raise CheckpointError(f"{where}: attention_bias {json.dumps(config['attention_bias'])} is not supported (the "
                              "gpt_neox kind's attention projections have biases)")
    rotary_pct, rotary_key = _first(config, rope, rope_key, ("rotary_pct", "partial_rotary_factor"), 0.25)
    rotary_base, _ = _first(config, rope, rope_key, ("rotary_emb_base", "rope_theta"), 1e4)
    args = GPTNeoXArgs(
        vocab_size=int(config["vocab_size"]), hidden_size=int(config["hidden_size"]),
        num_hidden_layers=int(config["num_hidden_layers"]), num_attention_heads=int(config["num_attention_heads"]),
        intermediate_size=int(config["intermediate_size"]), rotary_pct=float(rotary_pct),
        rotary_emb_base=float(rotary_base), use_parallel_residual=bool(config.get("use_parallel_residual", True)),
        layer_norm_eps=float(config.get("layer_norm_eps", 1e-5)))
    problem = gpt_neox_args_problem(args, rotary_key)
    if problem is not None:
        raise CheckpointError(f"{where}: {problem}")
    return args


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
    safetensors_numpy.save_file(gpt_neox_state_dict(params, a), os.path.join(directory, WEIGHTS))


def bert_args(config: dict, where: str = CONFIG) -> BertArgs:
    """The bert kind's arguments from a Hugging Face BertConfig (config.json)."""
    _check_architecture(config, "bert", where)
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


# Tensors of BERT checkpoints the encoder does not use: next-sentence prediction, a fine-tuned classifier, buffers.
_BERT_UNUSED = ("cls.seq_relationship.", "classifier.", "embeddings.position_ids")
_MLM = "cls.predictions."


def bert_params(state: dict[str, np.ndarray], a: BertArgs, where: str = "checkpoint", mlm_head: bool = False) -> dict:
    """The bert kind's parameters from a BertModel or BertFor* state dict ("bert." prefixed or not; LayerNorm as
    weight/bias or, in converted TensorFlow checkpoints, gamma/beta): without a head (a fine-tuning task draws its
    own), or with `mlm_head` the pretraining masked-LM head (jaxlmc.models.bert.MaskedLMHead; its decoder must be the
    word embeddings, tied). Linear weights (out × in) become kernels (in × out), query/key/value D × H × d."""
    state = {k.removeprefix("bert."): v for k, v in state.items()}
    state = {k.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias"): v
             for k, v in state.items() if not k.startswith(_BERT_UNUSED) and (mlm_head or not k.startswith(_MLM))}
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
    if mlm_head:
        params["head"] = _mlm_head(state, a, where, params["embed"]["embedding"])
    if state:
        raise CheckpointError(f"{where}: tensors the bert kind does not have: {', '.join(sorted(state)[:4])}")
    return params


def _mlm_head(state: dict, a: BertArgs, where: str, embedding_VxD: np.ndarray) -> dict:
    """BertForMaskedLM's cls.predictions (taken out of `state`), its decoder checked to be the word embeddings."""
    d, vocab = a.hidden_size, a.vocab_size
    if f"{_MLM}transform.dense.weight" not in state:
        raise CheckpointError(f"{where}: no masked-LM head ({_MLM}*): a BertModel without its pretraining heads cannot "
                              "be evaluated on a masked-token task")
    head = {"transform": {"kernel": _take(state, f"{_MLM}transform.dense.weight", (d, d), where).T,
                          "bias": _take(state, f"{_MLM}transform.dense.bias", (d,), where)},
            "ln": {"scale": _take(state, f"{_MLM}transform.LayerNorm.weight", (d,), where),
                   "bias": _take(state, f"{_MLM}transform.LayerNorm.bias", (d,), where)},
            "bias": _take(state, f"{_MLM}bias", (vocab,), where)}
    # Tied copies, where a checkpoint stores them: they must be what the head reads.
    tied = {f"{_MLM}decoder.weight": ("embeddings.word_embeddings.weight", embedding_VxD),
            f"{_MLM}decoder.bias": (f"{_MLM}bias", head["bias"])}
    for name, (source, value) in tied.items():
        if name in state and not np.array_equal(np.asarray(state.pop(name), np.float32), value):
            raise CheckpointError(f"{where}: {name} differs from {source} (an untied masked-LM decoder is not "
                                  "supported)")
    return head


def load_bert(source: str, revision: str | None = None, mlm_head: bool = False) -> tuple[BertArgs, dict]:
    """(arguments, parameters) of a BERT checkpoint — the encoder, and with `mlm_head` its masked-LM head — from a
    local directory or a hub repository at a revision (MultiBERTs: google/multiberts-seed_0-step_20k)."""
    directory = snapshot(source, revision)
    args = bert_args(read_config(directory), os.path.join(directory, CONFIG))
    state = read_state_dict(directory)
    # The pooler is the checkpoint's when it has one (BertForMaskedLM has none).
    args = dataclasses.replace(args, pooler=any(k.removeprefix("bert.").startswith("pooler.") for k in state))
    return args, bert_params(state, args, directory, mlm_head=mlm_head)


def bert_state_dict(params: dict, a: BertArgs) -> dict[str, np.ndarray]:
    """The inverse of `bert_params`: a BertForMaskedLM-style state dict ("bert." prefixed) of the bert kind's
    parameters — with a masked-LM head, its cls.predictions; a classification head is not written."""
    d = a.hidden_size
    arr = lambda x: np.ascontiguousarray(np.asarray(x, np.float32))  # noqa: E731

    def dense(prefix, p):
        kernel = np.asarray(p["kernel"])  # in × out (q, k, v: D × H × d)
        return {f"{prefix}.weight": arr(kernel.reshape(kernel.shape[0], -1).T),
                f"{prefix}.bias": arr(np.asarray(p["bias"]).reshape(-1))}

    def norm(prefix, p):
        return {f"{prefix}.weight": arr(p["scale"]), f"{prefix}.bias": arr(p["bias"])}

    e = "bert.embeddings"
    state = {f"{e}.word_embeddings.weight": arr(params["embed"]["embedding"]),
             f"{e}.position_embeddings.weight": arr(params["pos"]["embedding"]),
             f"{e}.token_type_embeddings.weight": arr(params["token_type"]["embedding"]),
             **norm(f"{e}.LayerNorm", params["ln_embed"])}
    for b, block in params["blocks"].items():
        p = f"bert.encoder.layer.{b}"
        for name, torch_name in (("q", "query"), ("k", "key"), ("v", "value")):
            state.update(dense(f"{p}.attention.self.{torch_name}", block[name]))
        state[f"{p}.attention.output.dense.weight"] = arr(np.asarray(block["o"]["kernel"]).reshape(d, d).T)
        state[f"{p}.attention.output.dense.bias"] = arr(block["o"]["bias"])
        state.update({**norm(f"{p}.attention.output.LayerNorm", block["ln1"]),
                      **dense(f"{p}.intermediate.dense", block["fc_in"]), **dense(f"{p}.output.dense", block["fc_out"]),
                      **norm(f"{p}.output.LayerNorm", block["ln2"])})
    if "pooler" in params:
        state.update(dense("bert.pooler.dense", params["pooler"]))
    head = params.get("head", {})
    if "transform" in head:
        state.update({**dense(f"{_MLM}transform.dense", head["transform"]),
                      **norm(f"{_MLM}transform.LayerNorm", head["ln"]), f"{_MLM}bias": arr(head["bias"])})
    return state


def save_bert(directory: str, a: BertArgs, params: dict) -> None:
    """Write a Hugging Face checkpoint (config.json, model.safetensors) of bert parameters, readable by `load_bert`
    and by transformers' BertForMaskedLM / BertModel.from_pretrained."""
    os.makedirs(directory, exist_ok=True)
    config = {"architectures": ["BertForMaskedLM"], "model_type": "bert", "hidden_act": "gelu",
              "position_embedding_type": "absolute",
              **{k: v for k, v in dataclasses.asdict(a).items() if k not in ("remat", "pooler")}}
    with open(os.path.join(directory, CONFIG), "w") as f:
        json.dump(config, f, indent=2)
    safetensors_numpy.save_file(bert_state_dict(params, a), os.path.join(directory, WEIGHTS))


# Per model kind, the reader of its released checkpoints: (source, revision) -> (its [model.args], parameters).
# The head is the pretraining task's: Pythia's next-token head, BERT's masked-LM head.
LOADERS: Registry[Callable[[str, str | None], tuple]] = Registry("checkpoint loader", {
    "gpt_neox": lambda source, revision: load_gpt_neox(source, revision),
    "bert": lambda source, revision: load_bert(source, revision, mlm_head=True)})


def register_loader(kind: str, load: Callable[[str, str | None], tuple]) -> None:
    """Let model.pretrained name checkpoints of model kind `kind`: `load(source, revision)` returns (args,
    parameters). A kind that has a loader already is refused."""
    LOADERS.register(kind, load)
