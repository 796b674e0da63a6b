"""The bert kind against Hugging Face's BertForPreTraining: final hidden states, pooled [CLS] output and masked-LM
logits equal to transformers' on a padded batch, and on a padded batch of sentence pairs with token types (inputs
B×T×2), where one-segment inputs B×T are exactly token type 0 (a committed fixture made by
tests/fixtures/make_bert.py; live as well when transformers is installed), from safetensors and from a PyTorch state
dict (with torch; refused in one line without); a checkpoint that does not fit is one line; a permuted model computes the same function and weight and
activation matching find the permutation back."""
import importlib.util
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlmc import hf, permute
from jaxlmc.models import base, bert
from jaxlmc.settings import ModelConfig

DIRECTORY = os.path.join(os.path.dirname(__file__), "fixtures", "bert")
BIN_DIRECTORY = os.path.join(os.path.dirname(__file__), "fixtures", "bert_bin")


def _loaded(num_classes: int = 3):
    args, body = hf.load_bert(DIRECTORY)
    model = base.build(bert.KIND, ModelConfig(kind="bert", args=args), (10,), num_classes)
    head = jax.tree.map(np.asarray, model.init(jax.random.key(0))["head"])
    return model, {**body, "head": head}


def test_hidden_states_and_pooled_output_equal_transformers():
    model, params = _loaded()
    reference = np.load(os.path.join(DIRECTORY, "reference.npz"))
    tokens = reference["tokens"]
    assert (tokens < 0).any()
    hidden = np.asarray(nnx.merge(model.graphdef, params).hidden(tokens))
    real = tokens >= 0
    np.testing.assert_allclose(hidden[real], reference["hidden"][real], atol=1e-4, rtol=0)
    np.testing.assert_allclose(model.features(params, tokens), reference["pooled"], atol=1e-4, rtol=0)
    assert model.apply(params, tokens).shape == (3, 3)


def _pairs(reference) -> np.ndarray:
    """The fixture's sentence pairs as the bert kind reads them: B×T×2, token ids and token types."""
    return np.stack([reference["pair_tokens"], reference["pair_types"]], axis=-1)


def test_sentence_pairs_with_token_types_equal_transformers():
    model, params = _loaded()
    reference = np.load(os.path.join(DIRECTORY, "reference.npz"))
    x, real = _pairs(reference), reference["pair_tokens"] >= 0
    assert (reference["pair_types"] == 1).any() and not real.all()
    module = nnx.merge(model.graphdef, params)
    hidden = np.asarray(module.hidden(x))
    np.testing.assert_allclose(hidden[real], reference["pair_hidden"][real], atol=1e-5, rtol=0)  # measured 7e-7
    np.testing.assert_allclose(model.features(params, x), reference["pair_pooled"], atol=1e-5, rtol=0)
    assert model.apply(params, x).shape == (3, 3)
    # Read as one segment (every type 0), the same tokens are a different function: the types are what matched.
    assert np.abs(np.asarray(module.hidden(x[..., 0]))[real] - reference["pair_hidden"][real]).max() > 0.1
    masked_lm, mlm_params = _masked_lm()
    logits = np.asarray(masked_lm.apply(mlm_params, x))
    np.testing.assert_allclose(logits[real], reference["pair_mlm_logits"][real], atol=1e-5, rtol=0)


def test_one_segment_inputs_are_token_type_0_exactly():
    """B×T token ids compute exactly what B×T×2 with every type 0 does (the one-segment path is the one jaxlmc has
    always taken: its own expression, kept), down to unit activations; padding's type is never read."""
    model, params = _loaded()
    reference = np.load(os.path.join(DIRECTORY, "reference.npz"))
    tokens = reference["tokens"].astype(np.float32)
    typed = np.stack([tokens, np.zeros_like(tokens)], axis=-1)
    np.testing.assert_array_equal(model.apply(params, tokens), model.apply(params, typed))
    for a, b in zip(model.unit_activations(params, tokens), model.unit_activations(params, typed)):
        np.testing.assert_array_equal(a, b)
    padding_typed = typed.copy()
    padding_typed[..., 1] = np.where(tokens < 0, 1, 0)
    np.testing.assert_array_equal(model.apply(params, tokens), model.apply(params, padding_typed))
    with pytest.raises(ValueError, match=r"token ids T or token ids and types T×2, not inputs of shape \(10, 3\)"):
        base.build(bert.KIND, ModelConfig(kind="bert", args=model.cfg.args), (10, 3), 3)


def _masked_lm():
    args, params = hf.load_bert(DIRECTORY, mlm_head=True)
    return base.build(bert.KIND, ModelConfig(kind="bert", args=args), (10,), args.vocab_size, per_token=True), params


def test_masked_lm_logits_equal_transformers():
    model, params = _masked_lm()
    reference = np.load(os.path.join(DIRECTORY, "reference.npz"))
    tokens = reference["tokens"]
    real = tokens >= 0
    logits = np.asarray(model.apply(params, tokens))
    assert logits.shape == (3, 10, 64)
    np.testing.assert_allclose(logits[real], reference["mlm_logits"][real], atol=1e-4, rtol=0)
    # The head's parameters are the checkpoint's: a saved copy reads back bit for bit.
    assert set(params["head"]) == {"transform", "ln", "bias"}


def test_saved_checkpoints_read_back_bit_for_bit(tmp_path):
    args, params = hf.load_bert(DIRECTORY, mlm_head=True)
    hf.save_bert(str(tmp_path / "copy"), args, params)
    args_copy, params_copy = hf.load_bert(str(tmp_path / "copy"), mlm_head=True)
    assert args_copy == args
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params_copy)):
        np.testing.assert_array_equal(a, b)


def test_pytorch_state_dicts_need_torch_and_read_like_safetensors():
    if importlib.util.find_spec("torch") is None:
        with pytest.raises(hf.CheckpointError, match=r"PyTorch \.bin weights only: reading them needs torch"):
            hf.load_bert(BIN_DIRECTORY, mlm_head=True)
        return
    _, from_bin = hf.load_bert(BIN_DIRECTORY, mlm_head=True)  # its tied decoder copies are checked, then dropped
    _, from_safetensors = hf.load_bert(DIRECTORY, mlm_head=True)
    for a, b in zip(jax.tree.leaves(from_bin), jax.tree.leaves(from_safetensors)):
        np.testing.assert_array_equal(a, b)


def test_an_untied_or_missing_masked_lm_head_is_one_line():
    args, _ = hf.load_bert(DIRECTORY)
    state = hf.read_state_dict(DIRECTORY)
    untied = {**state, "cls.predictions.decoder.weight": state["bert.embeddings.word_embeddings.weight"] + 1}
    with pytest.raises(hf.CheckpointError, match="cls.predictions.decoder.weight differs from embeddings"):
        hf.bert_params(untied, args, mlm_head=True)
    headless = {k: v for k, v in state.items() if not k.startswith("cls.predictions")}
    with pytest.raises(hf.CheckpointError, match="no masked-LM head"):
        hf.bert_params(headless, args, mlm_head=True)
    hf.bert_params(headless, args)  # the encoder alone reads


def test_hidden_states_equal_transformers_live():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    reference = transformers.BertModel.from_pretrained(DIRECTORY).eval()
    tokens = np.random.default_rng(1).integers(0, 64, (2, 8))
    tokens[1, 5:] = -1
    with torch.no_grad():
        out = reference(input_ids=torch.as_tensor(np.maximum(tokens, 0)),
                        attention_mask=torch.as_tensor((tokens >= 0).astype(np.int64)))
    model, params = _loaded()
    np.testing.assert_allclose(model.features(params, tokens), out.pooler_output.numpy(), atol=1e-4, rtol=0)
    types = np.zeros_like(tokens)
    types[0, 3:], types[1, 2:5] = 1, 1  # second segments; padding type 0
    with torch.no_grad():
        typed = reference(input_ids=torch.as_tensor(np.maximum(tokens, 0)),
                          attention_mask=torch.as_tensor((tokens >= 0).astype(np.int64)),
                          token_type_ids=torch.as_tensor(types))
    np.testing.assert_allclose(model.features(params, np.stack([tokens, types], axis=-1)),
                               typed.pooler_output.numpy(), atol=1e-5, rtol=0)
    with torch.no_grad():
        logits = transformers.BertForMaskedLM.from_pretrained(BIN_DIRECTORY).eval()(
            input_ids=torch.as_tensor(np.maximum(tokens, 0)),
            attention_mask=torch.as_tensor((tokens >= 0).astype(np.int64))).logits.numpy()
    model, params = _masked_lm()
    np.testing.assert_allclose(np.asarray(model.apply(params, tokens))[tokens >= 0], logits[tokens >= 0], atol=1e-4)


def test_checkpoint_problems_are_one_line(tmp_path):
    directory = str(tmp_path / "ckpt")
    shutil.copytree(DIRECTORY, directory)
    with open(os.path.join(directory, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump({**config, "position_embedding_type": "relative_key"}, f)
    with pytest.raises(hf.CheckpointError, match="position_embedding_type 'relative_key' is not supported"):
        hf.load_bert(directory)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump({**config, "num_hidden_layers": 3}, f)
    with pytest.raises(hf.CheckpointError, match="tensor encoder.layer.2.attention.self.query.weight is missing"):
        hf.load_bert(directory)
    with pytest.raises(hf.CheckpointError, match="model_type 'bert' is not 'gpt_neox'"):
        hf.load_gpt_neox(DIRECTORY)


@pytest.mark.slow
@pytest.mark.parametrize("masked_lm", [False, True], ids=["classifier", "masked_lm"])
def test_a_permuted_bert_computes_the_same_function_and_matching_finds_it_back(masked_lm):
    model, params = _masked_lm() if masked_lm else _loaded()
    tokens = np.random.default_rng(2).integers(0, 64, (16, 10))
    spec = model.permutation_spec()
    rng = np.random.default_rng(3)
    widths = [permute._width(params, entries) for entries in spec]
    assert widths == [16, 40, 4, 40, 4, 16]  # residual stream, MLP units and heads per block, the pooler
    perms = [jnp.asarray(rng.permutation(w)) for w in widths]
    shuffled = permute.permute(params, perms, spec)
    np.testing.assert_allclose(model.apply(shuffled, tokens), model.apply(params, tokens), atol=1e-5)
    both = jax.tree.map(lambda a, b: jnp.stack([jnp.asarray(a), jnp.asarray(b)]), params, shuffled)
    for found in (permute.match_pairs(model, both, [(0, 1)]), permute.match_activations(model, both, [(0, 1)], tokens)):
        aligned = permute.permute(shuffled, [jnp.asarray(p[0]) for p in found], spec)
        for x, y in zip(jax.tree.leaves(aligned), jax.tree.leaves(params)):
            np.testing.assert_allclose(x, y, atol=1e-6)
