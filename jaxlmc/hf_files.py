"""Hugging Face checkpoints as files: where a released model's directory is (a local snapshot, or the hub's cached
download of a repository at a pinned revision) and its config and weights read into numpy.

The weights are safetensors (`model.safetensors`, or shards listed in `model.safetensors.index.json`), read with the
`safetensors` package — no PyTorch at run time. A checkpoint released only as PyTorch `pytorch_model.bin`
(MultiBERTs) is read with `torch.load(weights_only=True)` when torch ≥ 2.6 is installed (before 2.6 a crafted file can
bypass weights_only), and refused otherwise: never unpickled by anything else. Every problem is one line naming what
and where. jaxlmc.hf maps what is read here onto jaxlmc's model kinds.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import json
import os
import re

import numpy as np

from jaxlmc import lazy

# Imported when a checkpoint is first read.
huggingface_hub = lazy.module("huggingface_hub")
hf_utils = lazy.module("huggingface_hub.utils")
safetensors = lazy.module("safetensors")
safetensors_numpy = lazy.module("safetensors.numpy")

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
TORCH_WEIGHTS, TORCH_WEIGHTS_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
# torch.load(weights_only=True) can be made to run code by a crafted file before torch 2.6 (CVE-2025-32434).
TORCH_MIN = (2, 6)
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt")  # a tokenizers tokenizer, or BERT's WordPiece vocabulary
_METADATA = [CONFIG, *TOKENIZER_FILES, "tokenizer_config.json"]


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
        hf_utils.validate_repo_id(source)
        # "runs/pythia" names a repository too; where "runs" is a directory here it means a path.
        local = os.sep in source and os.path.isdir(source.split(os.sep)[0] or os.sep)
    except hf_utils.HFValidationError:  # a path, not a repository name: no hub round trips for it
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
        return safetensors_numpy.load_file(path)
    except safetensors.SafetensorError as err:  # a truncated or corrupt file: its header does not describe its bytes
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


