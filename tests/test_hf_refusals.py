"""What jaxlmc.hf refuses to read, each in one line naming the file or key: GPT-NeoX config settings the gpt_neox kind
does not implement (scaled RoPE, tied embeddings, attention without biases, an odd rotary dimension), a truncated
safetensors file, and PyTorch .bin weights without a torch that loads them safely (≥ 2.6) — from a local directory
or from the hub (mocked: no network here). Checkpoints are the committed fixtures, copied and edited."""
import importlib.metadata
import importlib.util
import json
import os
import shutil

import huggingface_hub
import pytest

from jaxlmc import hf
from jaxlmc.models import base, gpt_neox
from jaxlmc.settings import ModelConfig

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
NEOX = os.path.join(FIXTURES, "gpt_neox_parallel")
BERT_BIN = os.path.join(FIXTURES, "bert_bin")
TORCH_HERE = importlib.util.find_spec("torch") is not None


def _copy(tmp_path, fixture: str = NEOX, **config) -> str:
    """A copy of a fixture checkpoint with its config.json's keys replaced (None: removed)."""
    directory = str(tmp_path / "ckpt")
    shutil.copytree(fixture, directory)
    path = os.path.join(directory, "config.json")
    with open(path) as f:
        raw = json.load(f)
    raw.update(config)
    with open(path, "w") as f:
        json.dump({k: v for k, v in raw.items() if v is not None}, f)
    return directory


def _refused(load, directory: str, *parts: str) -> str:
    with pytest.raises(hf.CheckpointError) as err:
        load(directory)
    message = str(err.value)
    assert "\n" not in message
    for part in parts:
        assert part in message, (part, message)
    return message


PYTHIA_STYLE = {"rope_parameters": None, "rope_scaling": None, "rotary_pct": 0.5, "rotary_emb_base": 10000}


def test_default_rope_in_either_spelling_reads_as_the_same_model(tmp_path):
    """transformers 5's rope_parameters with rope_type "default", Pythia's rotary_pct / rotary_emb_base with a null
    rope_scaling: the same arguments; without any rotary key, transformers' default 0.25."""
    args, _ = hf.load_gpt_neox(NEOX)
    assert (args.rotary_pct, args.rotary_emb_base) == (0.5, 10000.0)
    assert hf.load_gpt_neox(_copy(tmp_path, **PYTHIA_STYLE))[0] == args
    with open(os.path.join(NEOX, "config.json")) as f:
        bare = {**{k: v for k, v in json.load(f).items() if k != "rope_parameters"}, "hidden_size": 32}  # d = 8
    assert (hf.gpt_neox_args(bare).rotary_pct, hf.gpt_neox_args(bare).rotary_emb_base) == (0.25, 10000.0)


@pytest.mark.parametrize("config, parts", [
    ({"rope_scaling": {"type": "linear", "factor": 2.0}},
     ["config.json: rope_scaling with rope_type 'linear' is not supported (only 'default'"]),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000, "factor": 4.0}},
     ["config.json: rope_parameters with rope_type 'yarn' is not supported"]),
    ({"tie_word_embeddings": True}, ["config.json: tie_word_embeddings true is not supported"]),
    ({"attention_bias": False}, ["config.json: attention_bias false is not supported"]),
], ids=["rope_scaling", "rope_parameters", "tie_word_embeddings", "attention_bias"])
def test_gpt_neox_settings_the_kind_does_not_implement_are_refused(tmp_path, config, parts):
    _refused(hf.load_gpt_neox, _copy(tmp_path, **config), *parts)


def test_an_odd_rotary_dimension_is_a_config_error(tmp_path):
    """rotary_pct 0.25 at head dimension 12 (48 / 4) leaves 3 rotary dimensions: refused from config.json (naming the
    key it was read from) and from model.args, never a TypeError inside the model."""
    wide = {**PYTHIA_STYLE, "hidden_size": 48, "rotary_pct": 0.25}
    _refused(hf.load_gpt_neox, _copy(tmp_path / "a", **wide),
             "config.json: rotary_pct 0.25 of head dimension 12 gives 3 rotary dimensions, an odd number")
    _refused(hf.load_gpt_neox, _copy(tmp_path / "b", hidden_size=48,
                                     rope_parameters={"rope_type": "default", "partial_rotary_factor": 0.25}),
             "config.json: rope_parameters.partial_rotary_factor 0.25 of head dimension 12 gives 3 rotary dimensions")
    args = gpt_neox.GPTNeoXArgs(vocab_size=8, hidden_size=48, num_hidden_layers=1, num_attention_heads=4,
                                intermediate_size=8, rotary_pct=0.25)
    with pytest.raises(ValueError, match="model.args.rotary_pct 0.25 of head dimension 12 gives 3 rotary dimensions"):
        base.build(gpt_neox.KIND, ModelConfig(kind="gpt_neox", args=args), (4,), 8, True)


def test_a_truncated_safetensors_file_is_one_line_naming_it(tmp_path):
    directory = _copy(tmp_path)
    path = os.path.join(directory, "model.safetensors")
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[:len(data) // 2])
    _refused(hf.load_gpt_neox, directory, f"{path} cannot be read as safetensors (truncated, or not a safetensors "
                                          "file): Error while deserializing header: incomplete metadata")


def _torch_version(monkeypatch, version):
    """Pretend torch `version` is installed (None: no torch), as importlib.metadata reports it."""
    real = importlib.metadata.version

    def fake(name):
        if name != "torch":
            return real(name)
        if version is None:
            raise importlib.metadata.PackageNotFoundError(name)
        return version

    monkeypatch.setattr(importlib.metadata, "version", fake)
    if version is None:
        real_find = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, *rest: None if name == "torch" else real_find(name, *rest))


def test_pytorch_weights_need_torch_2_6(monkeypatch):
    """A .bin-only checkpoint without torch, or with a torch whose weights-only loading is bypassable (≤ 2.5.1):
    refused before torch is imported. 2.6 (a local build's +cu124 too) passes the check."""
    _torch_version(monkeypatch, None)
    _refused(lambda d: hf.load_bert(d, mlm_head=True), BERT_BIN,
             f"{BERT_BIN} holds PyTorch .bin weights only: reading them needs torch ≥ 2.6",
             "install torch ≥ 2.6, or convert the checkpoint to safetensors")
    _torch_version(monkeypatch, "2.5.1")
    _refused(lambda d: hf.load_bert(d, mlm_head=True), BERT_BIN,
             "reading them needs torch ≥ 2.6 (weights_only loading is unsafe before it; found 2.5.1)")
    if not TORCH_HERE:  # the check passes; then the missing torch is named
        _torch_version(monkeypatch, "2.6.0+cu124")
        _refused(lambda d: hf.load_bert(d, mlm_head=True), BERT_BIN,
                 "pytorch_model.bin needs torch, which cannot be imported")


def _hub(monkeypatch, tmp_path, listing):
    """huggingface_hub answering for a repository that holds config.json and pytorch_model.bin: a download gets what
    its patterns select; `listing` is what list_repo_files answers (an exception: offline)."""
    calls = []
    tmp_path.mkdir(parents=True)

    def snapshot_download(repo_id, revision=None, allow_patterns=()):
        calls.append(list(allow_patterns))
        directory = tmp_path / f"snapshot{len(calls)}"
        directory.mkdir()
        for name in os.listdir(BERT_BIN):
            if name == "config.json" or "pytorch_model*.bin" in allow_patterns:
                shutil.copy(os.path.join(BERT_BIN, name), directory)
        return str(directory)

    def list_repo_files(repo_id, revision=None):
        if isinstance(listing, Exception):
            raise listing
        return listing

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(huggingface_hub, "list_repo_files", list_repo_files)
    return calls


def test_a_hub_revision_with_pytorch_weights_only(monkeypatch, tmp_path):
    """Without torch ≥ 2.6 the .bin files are not downloaded, and the refusal names the repository and revision."""
    repo = "google/multiberts-seed_0-step_20k"
    calls = _hub(monkeypatch, tmp_path / "a", ["config.json", "pytorch_model.bin"])
    _torch_version(monkeypatch, None)
    _refused(lambda r: hf.load_bert(r, mlm_head=True), repo,
             f"{repo} (revision main) holds PyTorch .bin weights only: reading them needs torch ≥ 2.6",
             "install torch ≥ 2.6")
    _torch_version(monkeypatch, "2.5.1")
    _refused(lambda r: hf.load_bert(r, mlm_head=True), repo, "found 2.5.1")
    assert calls and not any("pytorch_model*.bin" in patterns for patterns in calls)
    # Offline, nothing says what the repository holds: its snapshot has no weights.
    _hub(monkeypatch, tmp_path / "b", OSError("offline"))
    _refused(lambda r: hf.load_bert(r, mlm_head=True), repo, "holds no weights")
    # With torch ≥ 2.6 the .bin weights are downloaded.
    calls = _hub(monkeypatch, tmp_path / "c", ["config.json", "pytorch_model.bin"])
    _torch_version(monkeypatch, "2.6.0")
    assert os.path.exists(os.path.join(hf.snapshot(repo), "pytorch_model.bin"))
    assert "pytorch_model*.bin" in calls[-1]
