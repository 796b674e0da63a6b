"""The gpt_neox kind against Hugging Face's GPT-NeoX: logits equal to transformers' on a padded batch (committed
fixtures made by tests/fixtures/make_gpt_neox.py; live as well when transformers is installed), one-line errors for
checkpoints that do not fit, and the permutation spec: a permuted model computes the same function, and weight and
activation matching find the permutation back."""
import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlmc import hf, permute
from jaxlmc.models import base, gpt_neox
from jaxlmc.settings import ModelConfig

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
NAMES = ("gpt_neox_parallel", "gpt_neox_sequential")


def _model(args, num_classes: int, per_token: bool):
    return base.build(gpt_neox.KIND, ModelConfig(kind="gpt_neox", args=args), (9,), num_classes, per_token)


@pytest.mark.parametrize("name", NAMES)
def test_logits_equal_transformers_on_a_padded_batch(name):
    directory = os.path.join(FIXTURES, name)
    args, params = hf.load_gpt_neox(directory)
    reference = np.load(os.path.join(directory, "reference.npz"))
    tokens = reference["tokens"]
    assert (tokens < 0).any()  # the batch is padded
    logits = np.asarray(_model(args, args.vocab_size, True).apply(params, tokens))
    real = tokens >= 0
    np.testing.assert_allclose(logits[real], reference["logits"][real], atol=1e-4, rtol=0)


def test_logits_equal_transformers_live(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    directory = os.path.join(FIXTURES, NAMES[0])
    model = transformers.GPTNeoXForCausalLM.from_pretrained(directory).eval()
    tokens = np.random.default_rng(1).integers(0, 64, (2, 7))
    tokens[1, 4:] = -1
    with torch.no_grad():
        expected = model(input_ids=torch.as_tensor(np.maximum(tokens, 0)),
                         attention_mask=torch.as_tensor((tokens >= 0).astype(np.int64))).logits.numpy()
    args, params = hf.load_gpt_neox(directory)
    logits = np.asarray(_model(args, args.vocab_size, True).apply(params, tokens))
    np.testing.assert_allclose(logits[tokens >= 0], expected[tokens >= 0], atol=1e-4, rtol=0)
    # What jaxlmc writes (hf.save_gpt_neox), transformers reads as the same model.
    exported = str(tmp_path / "exported")
    hf.save_gpt_neox(exported, args, params)
    again = transformers.GPTNeoXForCausalLM.from_pretrained(exported).eval()
    with torch.no_grad():
        logits_again = again(input_ids=torch.as_tensor(np.maximum(tokens, 0)),
                             attention_mask=torch.as_tensor((tokens >= 0).astype(np.int64))).logits.numpy()
    np.testing.assert_allclose(logits_again[tokens >= 0], expected[tokens >= 0], atol=1e-5, rtol=0)


def test_a_classifier_reads_the_last_real_token():
    args, params = hf.load_gpt_neox(os.path.join(FIXTURES, NAMES[0]))
    tokens = np.load(os.path.join(FIXTURES, NAMES[0], "reference.npz"))["tokens"]
    lm = _model(args, args.vocab_size, True)
    classifier = _model(args, 3, False)
    body = {k: v for k, v in params.items() if k != "head"}
    head = jax.tree.map(np.asarray, classifier.init(jax.random.key(0))["head"])
    features = np.asarray(classifier.features({**body, "head": head}, tokens))
    hidden = np.asarray(lm.features(params, tokens))
    last = (tokens >= 0).sum(axis=1) - 1
    np.testing.assert_allclose(features, hidden[np.arange(len(tokens)), last], atol=1e-6)


def _broken(tmp_path, edit) -> str:
    directory = str(tmp_path / "ckpt")
    shutil.copytree(os.path.join(FIXTURES, NAMES[0]), directory)
    edit(directory)
    return directory


def test_checkpoint_problems_are_one_line_naming_what_and_where(tmp_path):
    def retype(directory):
        path = os.path.join(directory, "config.json")
        with open(path) as f:
            config = json.load(f)
        with open(path, "w") as f:
            json.dump({**config, "model_type": "llama"}, f)

    def widen(directory):
        path = os.path.join(directory, "config.json")
        with open(path) as f:
            config = json.load(f)
        with open(path, "w") as f:
            json.dump({**config, "intermediate_size": 48}, f)

    cases = [(lambda d: os.remove(os.path.join(d, "model.safetensors")), "holds no weights \\(model.safetensors"),
             (lambda d: os.remove(os.path.join(d, "config.json")), r"config.json is missing"),
             (retype, "model_type 'llama' is not 'gpt_neox'"),
             (widen, r"tensor gpt_neox.layers.0.mlp.dense_h_to_4h.weight has shape \(40, 16\), the config implies "
                     r"\(48, 16\)")]
    for k, (edit, message) in enumerate(cases):
        with pytest.raises(hf.CheckpointError, match=message) as err:
            hf.load_gpt_neox(_broken(tmp_path / str(k), edit))
        assert "\n" not in str(err.value)
    with pytest.raises(hf.CheckpointError, match="no-such-directory does not exist \\(a local checkpoint directory"):
        hf.load_gpt_neox(str(tmp_path / "no-such-directory"))


def _random_perms(model, params, seed):
    rng = np.random.default_rng(seed)
    spec = model.permutation_spec()
    widths = [permute._width(params, entries) for entries in spec]
    return [jnp.asarray(rng.permutation(w)) for w in widths], spec


@pytest.mark.slow
def test_a_permuted_model_computes_the_same_function_and_matching_finds_it_back():
    args, params = hf.load_gpt_neox(os.path.join(FIXTURES, NAMES[0]))
    model = _model(args, args.vocab_size, True)
    tokens = np.random.default_rng(2).integers(0, 64, (16, 9))
    perms, spec = _random_perms(model, params, 3)
    assert [len(p) for p in perms] == [16, 40, 4, 40, 4]  # residual stream, then MLP units and heads per block
    shuffled = permute.permute(params, perms, spec)
    np.testing.assert_allclose(model.apply(shuffled, tokens), model.apply(params, tokens), atol=1e-5)
    both = jax.tree.map(lambda a, b: jnp.stack([jnp.asarray(a), jnp.asarray(b)]), params, shuffled)
    found_w = permute.match_pairs(model, both, [(0, 1)])
    found_a = permute.match_activations(model, both, [(0, 1)], tokens)
    for found in (found_w, found_a):
        aligned = permute.permute(shuffled, [jnp.asarray(p[0]) for p in found], spec)
        for x, y in zip(jax.tree.leaves(aligned), jax.tree.leaves(params)):
            np.testing.assert_allclose(x, y, atol=1e-6)


@pytest.mark.slow
def test_gradient_checkpointing_gives_the_same_gradients():
    args, params = hf.load_gpt_neox(os.path.join(FIXTURES, NAMES[0]))
    tokens = np.load(os.path.join(FIXTURES, NAMES[0], "reference.npz"))["tokens"]
    grads = {}
    for remat in (False, True):
        model = _model(dataclasses.replace(args, remat=remat), args.vocab_size, True)
        loss = lambda p: jnp.mean(model.apply(p, tokens) ** 2)  # noqa: E731
        grads[remat] = jax.grad(loss)(params)
        assert ("remat" in str(jax.make_jaxpr(jax.grad(loss))(params))) == remat
    for a, b in zip(jax.tree.leaves(grads[False]), jax.tree.leaves(grads[True])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
