"""The library on one's own NNX modules and arrays (jaxlmc.fit, jaxlmc.pair_barriers): the README's example, the
engines it shares with the study, key-path permutation specs through nested modules, resuming, and its errors."""
import contextlib
import functools
import os
import subprocess
import sys
import types

import jax
import numpy as np
import optax
import pytest
from flax import nnx

import jaxlmc
from jaxlmc import measures, paths, permute, reference, report
from jaxlmc.settings import BarrierConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Block(nnx.Module):
    """A residual MLP block: the hidden units of `fc` are one permutation group."""

    def __init__(self, width: int, hidden: int, rngs: nnx.Rngs):
        self.fc = nnx.Linear(width, hidden, rngs=rngs)
        self.proj = nnx.Linear(hidden, width, rngs=rngs)

    def __call__(self, x):
        return x + self.proj(nnx.relu(self.fc(x)))


class Nested(nnx.Module):
    """Submodules inside a list: parameters nested three deep, with integer keys (blocks.0.fc.kernel)."""

    def __init__(self, rngs: nnx.Rngs):
        self.embed = nnx.Linear(6, 8, rngs=rngs)
        self.blocks = nnx.List([Block(8, 12, rngs) for _ in range(2)])
        self.head = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
        h = self.embed(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


NESTED_SPEC = [[jaxlmc.UnitAxis(f"blocks.{b}.fc", "kernel", 1), jaxlmc.UnitAxis(f"blocks.{b}.fc", "bias", 0),
                jaxlmc.UnitAxis(f"blocks.{b}.proj", "kernel", 0)] for b in range(2)]


def _data(n=600, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6)).astype(np.float32)
    y = (x[:, :3] @ rng.normal(size=(3, 3))).argmax(1).astype(np.int32)
    return x, y


@pytest.mark.slow
def test_readme_example_runs_and_prints_the_barrier_table():
    """examples/seeds_and_rates.py is the README's example, line for line; it prints one row per learning rate with
    its 496 within-cell pairs, an interval over seeds around the mean, the weight-matched barrier, which is
    far below the naive one (the seeds start from separate initialisations: permutation symmetry), and a verdict."""
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    with open(os.path.join(ROOT, "examples", "seeds_and_rates.py")) as f:
        example = f.read()
    body = example.split('"""', 2)[2].strip()
    assert body in readme, "the README's library example differs from examples/seeds_and_rates.py"
    assert len(body.splitlines()) <= 30
    out = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "seeds_and_rates.py")], capture_output=True,
                         text=True, check=True, timeout=600).stdout.splitlines()
    assert out[0].split()[:3] == ["lr", "pairs", "error_barrier_test_mean"]
    rows = [[float(v) for v in line.split()[:6]] for line in out[1:]]
    assert [r[0] for r in rows] == [0.001, 0.01] and all(r[1] == 496 for r in rows)
    for lr, _, mean, lo, hi, aligned in rows:
        assert lo <= mean <= hi
        assert aligned < mean / 2
    assert all(line.endswith(("one basin", "separate basins", "not resolved")) for line in out[1:])


@pytest.mark.slow
def test_fit_trains_members_like_the_engine_and_barriers_match_the_reference_loop():
    x, y = _data()
    members = jaxlmc.fit(Nested, (x[:400], y[:400]), lr=[3e-3, 1e-2], seeds=3, steps=60, batch_size=50,
                         chunk_steps=25)
    assert len(members) == 6 and members.cell_keys == ("lr",)
    assert [(r["lr"], r["seed"]) for r in members.table] == [(3e-3, 0), (3e-3, 1), (3e-3, 2), (1e-2, 0), (1e-2, 1),
                                                            (1e-2, 2)]
    assert members.curves["loss_KxM"].shape == (3, 6)  # chunks ending at steps 25, 50, 60
    assert all(r["train_acc"] > 0.6 and not r["diverged"] and not r["unfit"] for r in members.table)
    # Seeds draw their own initialisations: the starts differ.
    starts = members.start["embed"]["kernel"]
    assert not np.allclose(starts[0], starts[1])
    result = jaxlmc.pair_barriers(members, (x[400:], y[400:]), num_alphas=5, noise_resamples=20)
    assert [(r["i"], r["j"]) for r in result.pairs] == [(0, 1), (0, 2), (1, 2), (3, 4), (3, 5), (4, 5)]
    loss, err = reference.reference_curves(members.model, members.params, [(0, 2), (4, 5)], paths.alpha_grid(5),
                                          x[400:], y[400:])
    for row, ref_loss, ref_err in zip([result.pairs[1], result.pairs[5]], loss, err):
        np.testing.assert_allclose(row["loss_barrier_test"], ref_loss.max() - (ref_loss[0] + ref_loss[-1]) / 2,
                                   atol=2e-5)
        np.testing.assert_allclose(row["error_barrier_test"], ref_err.max() - (ref_err[0] + ref_err[-1]) / 2,
                                   atol=1e-6)
        assert row["loss_barrier_test_floor"] >= 0
    summary = result.summary()
    assert [(r["lr"], r["pairs"], r["members_used"]) for r in summary] == [(3e-3, 3, 0), (1e-2, 3, 0)]
    assert summary[0]["error_barrier_test_mean"] == pytest.approx(np.mean([r["error_barrier_test"]
                                                                            for r in result.pairs[:3]]))


@pytest.mark.slow
def test_key_path_spec_aligns_a_nested_module():
    """A member against a copy of itself with every block's hidden units shuffled: the same function, so weight
    matching through the nested key paths must find the shuffle back (aligned barrier 0), while the naive
    interpolation between the two has a barrier."""
    x, y = _data()
    members = jaxlmc.fit(Nested, (x, y), lr=1e-2, seeds=1, steps=100, batch_size=50, permutation_spec=NESTED_SPEC)
    one = members.member(0)
    rng = np.random.default_rng(1)
    shuffles = [rng.permutation(12) for _ in NESTED_SPEC]
    shuffled = permute.permute(one, [jax.numpy.asarray(s) for s in shuffles], NESTED_SPEC)
    np.testing.assert_allclose(members.model.apply(shuffled, x), members.model.apply(one, x), rtol=1e-5, atol=1e-5)
    pair = jaxlmc.Members(members.model, jax.tree.map(lambda a, b: np.stack([a, b]), one, shuffled),
                          jax.tree.map(lambda a, b: np.stack([a, b]), one, shuffled),
                          [{**members.table[0], "member": k, "seed": k} for k in range(2)], members.curves, ())
    result = jaxlmc.pair_barriers(pair, (x, y), align="weights", num_alphas=5, noise_resamples=0)
    row = result.pairs[0]
    assert row["loss_barrier_test"] > 0.05
    assert abs(row["loss_barrier_test_aligned"]) < 1e-5
    assert [np.array_equal(np.argsort(p[0]), s) or np.array_equal(p[0], s) for p, s in
            zip(result.curves.perms, shuffles)] == [True, True]


def test_optax_constructor_equals_the_registered_name_and_a_given_start_is_shared():
    x, y = _data()
    model, params = jaxlmc.from_module(Nested(nnx.Rngs(3)), (6,), 3)
    common = dict(lr=[1e-3, 3e-3], weight_decay=1e-4, seeds=2, steps=40, batch_size=40)
    by_name = jaxlmc.fit(model, (x, y), params=params, optimizer="adamw", **common)
    by_optax = jaxlmc.fit(model, (x, y), params=params, optimizer=optax.adamw, **common)
    for a, b in zip(jax.tree.leaves(by_name.params), jax.tree.leaves(by_optax.params)):
        np.testing.assert_array_equal(a, b)
    starts = by_name.start["embed"]["kernel"]
    np.testing.assert_array_equal(starts[0], starts[3])
    sgd = jaxlmc.fit(model, (x, y), params=params, optimizer=functools.partial(optax.sgd, momentum=0.9),
                     lr=0.05, seeds=2, steps=40, batch_size=40)
    assert all(r["train_acc"] > 0.5 for r in sgd.table)


class _Stop(Exception):
    pass


@contextlib.contextmanager
def _stop_at_step_30(name, total_steps, num_members, start_step):
    """A progress bar that kills the training once it has reported step 30 (after the checkpoint at step 20)."""

    class Bar:
        done = start_step

        def advance(self, n_steps, loss_nxM):
            Bar.done += n_steps
            if Bar.done >= 30:
                raise _Stop

    yield Bar()


@pytest.mark.slow
def test_a_checkpointed_fit_resumes_bit_for_bit(tmp_path):
    x, y = _data()
    args = dict(lr=[3e-3, 1e-2], seeds=2, steps=50, batch_size=40, chunk_steps=10)
    whole = jaxlmc.fit(Nested, (x, y), **args)
    directory = str(tmp_path / "fit")
    with pytest.raises(_Stop):
        jaxlmc.fit(Nested, (x, y), directory=directory, checkpoint_every=20, progress=_stop_at_step_30, **args)
    assert sorted(os.listdir(os.path.join(directory, "checkpoints"))) == ["20"]
    with pytest.raises(ValueError, match="other steps"):
        jaxlmc.fit(Nested, (x, y), directory=directory, checkpoint_every=20, **{**args, "steps": 60})
    resumed = jaxlmc.fit(Nested, (x, y), directory=directory, checkpoint_every=20, **args)
    for a, b in zip(jax.tree.leaves(whole.params), jax.tree.leaves(resumed.params)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(whole.curves["loss_KxM"], resumed.curves["loss_KxM"])
    np.testing.assert_array_equal(whole.curves["step_K"], resumed.curves["step_K"])


@pytest.mark.slow
def test_fit_in_parts_equals_one_program_in_memory_and_checkpointed(tmp_path, caplog):
    """fit trains members that do not fit one program in parts (max_members forces it here): the same parameters,
    flags and curves as one program, with and without a checkpoint directory (whose parts are stacked and removed)."""
    x, y = _data()
    args = dict(lr=[3e-3, 1e-2], seeds=3, steps=30, batch_size=40, chunk_steps=10)
    whole = jaxlmc.fit(Nested, (x, y), **args)
    in_memory = jaxlmc.fit(Nested, (x, y), max_members=4, **args)
    assert "fit: 6 members train in 2 parts, one after another (max_members = 4)" in caplog.text
    directory = str(tmp_path / "fit")
    checkpointed = jaxlmc.fit(Nested, (x, y), max_members=4, directory=directory, checkpoint_every=10, **args)
    assert not os.path.exists(os.path.join(directory, "parts"))
    for parted in (in_memory, checkpointed):
        for a, b in zip(jax.tree.leaves(whole.params), jax.tree.leaves(parted.params)):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(whole.curves["loss_KxM"], parted.curves["loss_KxM"], rtol=1e-6)
        assert [r["diverged"] for r in whole.table] == [r["diverged"] for r in parted.table]
    with pytest.raises(ValueError, match="max_members must be a non-negative integer"):
        jaxlmc.fit(Nested, (x, y), max_members=-1, **args)


def test_errors_name_what_is_wrong():
    x, y = _data()

    class WithNorm(nnx.Module):
        def __init__(self, rngs):
            self.dense = nnx.Linear(6, 3, rngs=rngs)
            self.norm = nnx.BatchNorm(3, rngs=rngs)

        def __call__(self, x):
            return self.norm(self.dense(x))

    with pytest.raises(TypeError, match=r"norm\.mean \(BatchStat\)"):
        jaxlmc.fit(WithNorm, (x, y), lr=1e-3, steps=5, batch_size=10)
    with pytest.raises(ValueError, match="per-member dropout needs"):
        jaxlmc.fit(Nested, (x, y), lr=1e-3, dropout=[0.0, 0.1], steps=5, batch_size=10)
    with pytest.raises(ValueError, match="lr: every value must be positive"):
        jaxlmc.fit(Nested, (x, y), lr=[1e-3, -1.0], steps=5, batch_size=10)
    with pytest.raises(ValueError, match="lr: nan is not finite"):
        jaxlmc.fit(Nested, (x, y), lr=float("nan"), steps=5, batch_size=10)
    with pytest.raises(ValueError, match="optimizer: 'adam' is not one of"):
        jaxlmc.fit(Nested, (x, y), lr=1e-3, steps=5, batch_size=10, optimizer="adam")
    with pytest.raises(ValueError, match="batch_size 1000"):
        jaxlmc.fit(Nested, (x, y), lr=1e-3, steps=5, batch_size=1000)


@pytest.fixture(scope="module")
def nested_members():
    """Three seeds of the nested module, weight-matchable, for the tests that measure rather than train."""
    x, y = _data()
    return jaxlmc.fit(Nested, (x[:400], y[:400]), lr=1e-2, seeds=3, steps=40, batch_size=50,
                      permutation_spec=NESTED_SPEC)


def _half_line(model, params_K, pairs_Px2, eval_sets, alphas, chunk_pairs, mesh, perms):
    """A pair measure of one's own: the straight line from member i to the midpoint of i and j."""
    half = paths.Path("half", lambda p_i, p_j, extra: (p_i, p_j), lambda ctx, v, a: paths.lerp(*ctx, 0.5 * a),
                      members_at_ends=False)
    return paths.make_path_eval(model, half, alphas, chunk_pairs, mesh)(params_K, pairs_Px2, eval_sets, perms)


@pytest.mark.slow
def test_a_registered_pair_measure_reaches_the_rows_the_summary_and_the_report(nested_members):
    x, y = _data()
    members = nested_members
    half = measures.PairMeasure("_half", "half line", compute=_half_line)
    with measures.PAIR_MEASURES.registered(half.name, half):
        with pytest.raises(ValueError, match="already registered"):
            measures.register_pair_measure(measures.PairMeasure("_half", "again", compute=_half_line))
        result = jaxlmc.pair_barriers(members, (x[400:], y[400:]), num_alphas=5, noise_resamples=10,
                                      measures=["half"])
        plain = jaxlmc.pair_barriers(members, (x[400:], y[400:]), num_alphas=5, noise_resamples=0)
        assert ("error_barrier_test_half_mean", "half line") in report.summary_table()
        with pytest.raises(ValueError, match="did you mean 'half'"):
            jaxlmc.pair_barriers(members, (x[400:], y[400:]), num_alphas=5, measures=["halve"])
    assert "half" not in measures.PAIR_MEASURES  # registered for the block only
    assert list(plain.curves.measures) == ["straight"] and "loss_barrier_test_half" not in plain.pairs[0]
    # Its α = 0.5 is the straight line's α = 0.25.
    np.testing.assert_allclose(result.curves.measures["half"]["test"][0][:, 2, 0],
                               result.curves.pairs["test"][0][:, 1, 0], rtol=1e-6)
    row = result.pairs[0]
    assert {"loss_barrier_test_half", "error_barrier_test_lin_half", "loss_barrier_test_half_floor",
            "loss_mid_test_half"} <= set(row)
    assert "error_barrier_test_half_mean" in result.summary()[0]


@pytest.mark.slow
def test_layer_wise_barriers_match_the_reference_loop(nested_members):
    x, y = _data()
    members = nested_members
    result = jaxlmc.pair_barriers(members, (x[400:], y[400:]), num_alphas=5, noise_resamples=0, layerwise=True,
                                  align="weights")
    assert [(r["i"], r["j"], r["layer"]) for r in result.layers[:3]] == [(0, 1, "blocks"), (0, 1, "embed"),
                                                                         (0, 1, "head")]
    assert len(result.layers) == 3 * 3 and "error_barrier_test_aligned" in result.layers[0]
    groups = {name: [name] for name in ("blocks", "embed", "head")}
    loss, _ = reference.reference_layer_curves(members.model, members.params, [(1, 2)], paths.alpha_grid(5),
                                              groups, x[400:], y[400:])
    for g, row in enumerate(result.layers[6:]):
        assert row["layer"] == list(groups)[g]
        np.testing.assert_allclose(row["loss_barrier_test"], loss[0, g].max() - (loss[0, g, 0] + loss[0, g, -1]) / 2,
                                   atol=2e-5)


@pytest.mark.slow
def test_bfloat16_compute_keeps_float32_master_weights_and_trains():
    x, y = _data()
    args = dict(lr=1e-2, seeds=2, steps=60, batch_size=50)
    full = jaxlmc.fit(Nested, (x, y), **args)
    mixed = jaxlmc.fit(Nested, (x, y), compute_dtype="bfloat16", **args)
    assert all(leaf.dtype == np.float32 for leaf in jax.tree.leaves(mixed.params))
    assert all(r["train_acc"] > 0.8 for r in mixed.table)
    # The same members up to bfloat16 rounding: close, not equal.
    a, b = mixed.params["head"]["kernel"], full.params["head"]["kernel"]
    assert not np.array_equal(a, b) and np.abs(np.asarray(a) - np.asarray(b)).max() < 0.1
    with pytest.raises(ValueError, match="compute_dtype: 'float16'"):
        jaxlmc.fit(Nested, (x, y), compute_dtype="float16", **args)


@pytest.mark.slow  # (10 s: keeps the quick subset under 3 minutes)
def test_pair_barriers_errors_and_defaults_are_the_command_lines():
    """One α grid for library and CLI; a pair list that pairs a member with itself or repeats a pair, members none of
    which can be interpolated, and aligning without a spec: each one line saying what to pass."""
    x, y = _data(200)
    members = jaxlmc.fit(Nested, (x, y), lr=1e-2, seeds=3, steps=5, batch_size=50, fit_margin=-1)
    bars = []

    @contextlib.contextmanager
    def recorded(name, total, num_members, start):
        bar = types.SimpleNamespace(name=name, total=total, members=num_members, ticks=[])
        bar.advance = lambda n, losses: bar.ticks.append((n, losses))
        bars.append(bar)
        yield bar

    result = jaxlmc.pair_barriers(members, (x, y), noise_resamples=0, to_start=True, progress=recorded)
    assert len(result.curves.alphas) == BarrierConfig().alphas == 25
    # The barrier pass's bar counts pairs (3 within the cell, 3 to the starts), one tick per pair from the pass.
    [bar] = bars
    assert (bar.name, bar.total, bar.members) == ("barriers", 6, 0) and bar.ticks == [(1, None)] * 6
    for pairs, message in [([(0, 1), (1, 1)], r"pairs: pair 2: \(1, 1\) pairs member 1 with itself"),
                           ([(0, 1), (2, 0), (1, 0)], r"pairs: pair 3: \(1, 0\) repeats pair 1"),
                           ([(0, 7)], "pairs: pair 1: member 7 out of range")]:
        with pytest.raises(ValueError, match=message):
            jaxlmc.pair_barriers(members, (x, y), pairs=pairs)
    with pytest.raises(ValueError, match=r"align='weights': model 'Nested' has no permutation spec; pass "
                                         r"permutation_spec=\[\[jaxlmc.UnitAxis"):
        jaxlmc.pair_barriers(members, (x, y), align="weights")
    members.table = [{**r, "unfit": True} for r in members.table]
    with pytest.raises(ValueError, match="every one of the 3 members diverged or is unfit"):
        jaxlmc.pair_barriers(members, (x, y))
