"""A permutation spec is checked before use: malformed specs and specs that change the network's function are one
line naming the group and the parameter axis, in `fit`, `pair_barriers` and for the built-in and HF kinds."""
import dataclasses
import os

import jax
import numpy as np
import pytest
from flax import nnx

import jaxlmc
from jaxlmc import hf, spec_check
from jaxlmc.models import UnitAxis, base, bert, gpt_neox
from jaxlmc.settings import ModelConfig

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


class Net(nnx.Module):  # the README's example model
    def __init__(self, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(20, 64, rngs=rngs)
        self.out = nnx.Linear(64, 4, rngs=rngs)

    def __call__(self, x):
        return self.out(nnx.relu(self.hidden(x)))


GOOD = [[UnitAxis("hidden", "kernel", 1), UnitAxis("hidden", "bias", 0), UnitAxis("out", "kernel", 0)]]
BAD_SPECS = [
    ([GOOD[0][:2]], "it misses out.kernel axis 0"),  # the next layer's input axis left out
    ([[GOOD[0][0], GOOD[0][2]]], "it misses hidden.bias axis 0"),  # a bias left out (zero at init: perturbed first)
    ([GOOD[0][:2] + [UnitAxis("out", "kernel", 1)]], "out.kernel axis 1 indexes 4 units"),
    (GOOD[0], "group 0 is a single UnitAxis"),  # a flat list
    ([[UnitAxis("hidden", "kernel", 2)]], "hidden.kernel has 2 axes (20, 64), axis 2 is out of range"),
    ([[UnitAxis("hiden", "kernel", 1)]], "no 'hiden' among ['hidden', 'out']"),
]


@pytest.fixture(scope="module")
def arrays():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 20)).astype(np.float32)
    return x, (x[:, :4] @ rng.normal(size=(4, 4))).argmax(1)


@pytest.mark.parametrize("spec, message", BAD_SPECS)
def test_fit_refuses_a_spec_that_is_not_a_symmetry_in_one_line(arrays, spec, message):
    with pytest.raises(spec_check.SpecError) as err:
        jaxlmc.fit(Net, arrays, lr=1e-3, seeds=2, steps=2, batch_size=20, permutation_spec=spec)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_pair_barriers_checks_the_spec_before_aligning(arrays):
    members = jaxlmc.fit(Net, arrays, lr=1e-3, seeds=2, steps=2, batch_size=20, permutation_spec=GOOD,
                         fit_margin=-1)
    broken = dataclasses.replace(members.model.kind, permutation_spec=lambda cfg, shape: [GOOD[0][:2]])
    members.model = dataclasses.replace(members.model, kind=broken)
    with pytest.raises(spec_check.SpecError, match="it misses out.kernel axis 0"):
        jaxlmc.pair_barriers(members, arrays, align="weights")


def _without(spec, drop: UnitAxis):
    assert any(drop in group for group in spec)
    return [[e for e in group if e != drop] for group in spec]


@pytest.mark.slow
def test_the_hf_kinds_specs_pass_and_a_missing_input_axis_is_named():
    """The shipped specs of gpt_neox and bert are symmetries of the released models; each with the MLP's output
    projection's input axis (its units' next-layer axis) left out is caught and named."""
    x = np.array([[5, 9, 2, 7, 1, -1, -1, -1, -1], [3, 3, 8, 1, 4, 6, 2, 9, 0]], np.float32)
    neox_args, neox_params = hf.load_gpt_neox(os.path.join(FIXTURES, "gpt_neox_parallel"))
    bert_args, bert_params = hf.load_bert(os.path.join(FIXTURES, "bert"), mlm_head=True)
    for kind, args, params in [(gpt_neox.KIND, neox_args, neox_params), (bert.KIND, bert_args, bert_params)]:
        model = base.build(kind, ModelConfig(kind=kind.name, args=args), (9,), args.vocab_size, per_token=True)
        spec_check.check_spec(model, params, x)
        spec = model.permutation_spec()
        mlp_group = next(g for g in spec if g[0].name == "kernel" and g[0].axis == 1 and "fc" in g[0].layer)
        dropped = next(e for e in mlp_group if e.axis == 0 and e.layer != mlp_group[0].layer)
        with pytest.raises(spec_check.SpecError, match=f"it misses {dropped.layer}.{dropped.name} axis 0"):
            spec_check.check_spec(model, params, x, spec=_without(spec, dropped))


class Positive(nnx.Module):
    def __init__(self, width: int):
        self.value = nnx.Param(jax.numpy.full((width,), 3.0))


class PositiveScale(nnx.Module):
    """A hidden layer scaled by log(scale): a parameter that must stay positive (noise of its own size would flip
    it and make every output NaN)."""

    def __init__(self, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(20, 64, rngs=rngs)
        self.scale = Positive(64)
        self.out = nnx.Linear(64, 4, rngs=rngs)

    def __call__(self, x):
        return self.out(nnx.relu(self.hidden(x)) * jax.numpy.log(self.scale.value[...])[None])


def test_a_correct_spec_of_a_network_with_a_positive_parameter_passes(arrays):
    spec = [[UnitAxis("hidden", "kernel", 1), UnitAxis("hidden", "bias", 0), UnitAxis("scale", "value", 0),
             UnitAxis("out", "kernel", 0)]]
    model, params = jaxlmc.from_module(PositiveScale(nnx.Rngs(0)), (20,), 4, spec)
    spec_check.check_spec(model, params, arrays[0][:4])
    with pytest.raises(spec_check.SpecError, match="it misses scale.value axis 0"):
        spec_check.check_spec(model, params, arrays[0][:4], spec=[[e for e in spec[0] if e.layer != "scale"]])
