"""Hugging Face checkpoints as jaxlmc parameters: every read of a released model lives here.

A checkpoint is a directory (a local snapshot, or the hub's cached download of a repository at a pinned revision)
holding `config.json` and the weights as safetensors (`model.safetensors`, or shards listed in
`model.safetensors.index.json`), read with the `safetensors` package into numpy — no PyTorch at run time. A checkpoint
released only as PyTorch `pytorch_model.bin` (MultiBERTs) is read with `torch.load(weights_only=True)` when torch ≥ 2.6
is installed (before 2.6 a crafted file can bypass weights_only), and refused otherwise: never unpickled by anything
else. `gpt_neox_params` maps a GPT-NeoX (Pythia) state dict onto the gpt_neox kind's parameters
(jaxlmc.models.gpt_neox), which then compute what `transformers`' GPTNeoXForCausalLM computes (tested against its
logits). Every problem — a missing file, an unsupported architecture or setting, a name or shape that does not match —
is one line naming what and where.
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import importlib.util
import json
import os
import re
from typing import Callable

import huggingface_hub
import numpy as np
from huggingface_hub.utils import HFValidationError, validate_repo_id
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from jaxlmc.models.bert import BertArgs
from jaxlmc.models.gpt_neox import GPTNeoXArgs, args_problem as gpt_neox_args_problem

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
TORCH_WEIGHTS, TORCH_WEIGHTS_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
# torch.load(weights_only=True) can be made to run code by a crafted file before torch 2.6 (CVE-2025-32434).
TORCH_MIN = (2, 6)
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt")  # a tokenizers tokenizer, or BERT's WordPiece vocabulary
_METADATA = [CONFIG, *TOKENIZER_FILES, "tokenizer_config.json"]
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
    if os.path.lexists(source):
        raise CheckpointError(f"{source} is not a directory (a checkpoint is a directory holding config.json)")
    try:
        validate_repo_id(source)
        # "runs/pythia" names a repository too; where "runs" is a directory here it means a path.
        local = os.sep in source and os.path.isdir(source.split(os.sep)[0] or os.sep)
    except HFValidationError:  # a path, not a repository name: no hub round trips for it
        local = True
    if local:
        raise CheckpointError(f"{source} does not exist (a local checkpoint directory; a hub repository is named "
                              "owner/name)")
    where = f"{source} (revision {revision or 'main'})"
    directory = _download(source, revision, [*_METADATA, "*.safetensors", WEIGHTS_INDEX], where)
    if _has_safetensors(directory) or _has_torch_weights(directory):
        return directory
    refusal = _torch_refusal(where)
    if refusal is None:  # released as PyTorch weights only, and a torch that reads them safely
        return _download(source, revision, [*_METADATA, "pytorch_model*.bin", TORCH_WEIGHTS_INDEX], where)
    # Without such a torch, .bin weights are not downloaded (gigabytes, to be refused): say so where the hub lists
    # them. Offline (no listing) the snapshot is returned as it is, and read_state_dict says it holds no weights.
    try:
        files = huggingface_hub.list_repo_files(source, revision=revision)
    except Exception:  # offline, or the hub refuses the listing
        files = []
    if any(re.fullmatch(r"pytorch_model.*\.bin(\.index\.json)?", name) for name in files):
        raise CheckpointError(refusal)
    return directory


def _download(source: str, revision: str | None, patterns: list[str], where: str) -> str:
    try:
        return huggingface_hub.snapshot_download(source, revision=revision, allow_patterns=patterns)
    except Exception as err:  # the hub's many errors (offline, unknown repository or revision): one line
        raise CheckpointError(f"{where} is neither a local directory nor reachable on the Hugging Face hub: "
                              f"{type(err).__name__}: {str(err).splitlines()[0]}") from None


def revision_source(pretrained: str, revision: str) -> tuple[str, str | None]:
    """(source, hub revision) of one released revision of `model.pretrained`: a local directory's subdirectory
    `revision`; a name with "{revision}" in it filled in (suites released as one repository per checkpoint:
    "google/multiberts-seed_0-{revision}"), at its main branch; else the hub repository's branch `revision`
    (Pythia's "step512")."""
    if "{revision}" in pretrained:
        return pretrained.replace("{revision}", revision), None
    if os.path.isdir(pretrained):
        return os.path.join(pretrained, revision), None
    return pretrained, revision


def _has_safetensors(directory: str) -> bool:
    return any(os.path.exists(os.path.join(directory, name)) for name in (WEIGHTS, WEIGHTS_INDEX))


def _has_torch_weights(directory: str) -> bool:
    return any(os.path.exists(os.path.join(directory, name)) for name in (TORCH_WEIGHTS, TORCH_WEIGHTS_INDEX))


def _torch_version() -> str | None:
    """The installed torch's version (None: no torch), read without importing it (seconds)."""
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        if importlib.util.find_spec("torch") is None:
            return None
        try:  # importable, but not an installed distribution
            return str(importlib.import_module("torch").__version__)
        except Exception as err:  # a broken install: its own error, in the refusal's words
            return f"unimportable ({type(err).__name__})"


def _torch_refusal(where: str) -> str | None:
    """Why the PyTorch .bin weights at `where` cannot be read here (None: they can): no torch, or one older than
    2.6, whose weights-only loading a crafted file can bypass."""
    version = _torch_version()
    if version is None:
        return (f"{where} holds PyTorch .bin weights only: reading them needs torch ≥ 2.6 (loaded with "
                "weights_only=True, never as an arbitrary pickle): install torch ≥ 2.6, or convert the checkpoint "
                "to safetensors")
    release = tuple(int(n) for n in re.findall(r"\d+", version.split("+")[0])[:2])
    if release < TORCH_MIN:
        return (f"{where} holds PyTorch .bin weights only: reading them needs torch ≥ 2.6 (weights_only loading is "
                f"unsafe before it; found {version}): upgrade torch, or convert the checkpoint to safetensors")
    return None


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
    """Every tensor of the checkpoint's weight file(s), by name, as numpy arrays: safetensors where the checkpoint
    has them, else PyTorch .bin files through torch.load(weights_only=True) when torch ≥ 2.6 is installed."""
    if _has_safetensors(directory):
        read, names = _read_safetensors, _shards(directory, WEIGHTS, WEIGHTS_INDEX)
    elif _has_torch_weights(directory):
        refusal = _torch_refusal(directory)
        if refusal is not None:
            raise CheckpointError(refusal)
        read, names = _read_torch, _shards(directory, TORCH_WEIGHTS, TORCH_WEIGHTS_INDEX)
    else:
        raise CheckpointError(f"{directory} holds no weights ({WEIGHTS}, {WEIGHTS_INDEX}, {TORCH_WEIGHTS} or "
                              f"{TORCH_WEIGHTS_INDEX})")
    state = {}
    for name in names:
        state.update(read(os.path.join(directory, name)))
    return state


def _shards(directory: str, single: str, index: str) -> list[str]:
    if os.path.exists(os.path.join(directory, single)):
        return [single]
    path = os.path.join(directory, index)
    try:
        with open(path) as f:
            return sorted(set(json.load(f)["weight_map"].values()))
    except (ValueError, KeyError, AttributeError) as err:
        raise CheckpointError(f"{path} is not a weight index (a JSON weight_map): {err}") from None


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    try:
        return load_file(path)
    except SafetensorError as err:  # a truncated or corrupt file: its header does not describe its bytes
        raise CheckpointError(f"{path} cannot be read as safetensors (truncated, or not a safetensors file): "
                              f"{str(err).splitlines()[0] if str(err) else ''}") from None
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path} cannot be read as safetensors: {err}") from None


def _read_torch(path: str) -> dict[str, np.ndarray]:
    # torch is optional (gigabytes, and seconds to import): loaded only for a checkpoint that needs it.
    try:
        torch = importlib.import_module("torch")
    except ImportError as err:  # installed (its version was read) but broken
        raise CheckpointError(f"{path} needs torch, which cannot be imported: {type(err).__name__}: {err}") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch's unpickler refuses anything but tensors and containers: one line
        raise CheckpointError(f"{path} cannot be read as a PyTorch state dict (weights only): "
                              f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} is not a state dict of tensors")
    return {name: tensor.float().numpy() for name, tensor in state.items()}


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


def gpt_neox_args(config: dict, where: str = "config.json") -> GPTNeoXArgs:
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
    save_file(gpt_neox_state_dict(params, a), os.path.join(directory, WEIGHTS))


def bert_args(config: dict, where: str = "config.json") -> BertArgs:
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
    save_file(bert_state_dict(params, a), os.path.join(directory, WEIGHTS))


# Per model kind, the reader of its released checkpoints: (source, revision) -> (its [model.args], parameters).
# The head is the pretraining task's: Pythia's next-token head, BERT's masked-LM head.
LOADERS: dict[str, Callable[[str, str | None], tuple]] = {
    "gpt_neox": lambda source, revision: load_gpt_neox(source, revision),
    "bert": lambda source, revision: load_bert(source, revision, mlm_head=True)}


def register_loader(kind: str, load: Callable[[str, str | None], tuple]) -> None:
    """Let model.pretrained name checkpoints of `kind`: `load(source, revision)` returns (args, parameters)."""
    if kind in LOADERS:
        raise ValueError(f"model kind {kind!r} already has a checkpoint loader")
    LOADERS[kind] = load
