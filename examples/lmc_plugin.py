"""A plugin defined outside jaxlmc, as a researcher would write one: datasets from in-memory arrays (pretraining and
fine-tuning variants), a model kind of its own, a pair measure of its own and a study stage of its own, each
registered on import (`PYTHONPATH=examples jaxlmc study … --import lmc_plugin`). tests/test_plugins.py runs a whole
study with it; docs/api.md lists every extension point."""
import jax
import numpy as np
from flax import nnx

from jaxlmc import data, measures, models, paths, rundir, study
from jaxlmc.models import Classifier, ModelKind, UnitAxis

FEATURES, CLASSES = 12, 4


def blobs(seed: int, n: int, shift: float) -> tuple[np.ndarray, np.ndarray]:
    """Four Gaussian blobs around fixed centres, moved by `shift` (the fine-tuning task's shift)."""
    centres = 1.5 * np.random.default_rng(0).normal(size=(CLASSES, FEATURES))
    rng = np.random.default_rng(seed)
    y = rng.integers(0, CLASSES, n)
    return (centres[y] + shift + rng.normal(size=(n, FEATURES))).astype(np.float32), y.astype(np.int32)


data.register_dataset("blobs_pre", lambda: {"train": blobs(1, 3000, 0.0), "test": blobs(2, 600, 0.0)}, CLASSES)
data.register_dataset("blobs_fine", lambda: {"train": blobs(3, 1200, 0.7), "test": blobs(4, 600, 0.7)}, CLASSES)
data.register_dataset("blobs_ood", lambda: {"test": blobs(5, 600, 1.4)}, CLASSES)


class TanhNet(Classifier):
    """One hidden layer of `width` tanh units, then the head."""

    def __init__(self, cfg, input_shape, num_classes, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(int(np.prod(input_shape)), cfg.width, rngs=rngs)
        self.head = nnx.Linear(cfg.width, num_classes, rngs=rngs)

    def features(self, x, drop=None):
        return models.dropout(jax.nn.tanh(self.hidden(x.reshape(x.shape[0], -1))), drop, 0)

    def unit_activations(self, x):
        return [self.features(x)]


def permutation_spec(cfg, input_shape):
    """The hidden units: the hidden kernel's output axis and bias, the head kernel's input axis."""
    return [[UnitAxis("hidden", "kernel", 1), UnitAxis("hidden", "bias", 0), UnitAxis("head", "kernel", 0)]]


models.register_kind(ModelKind("tanhnet", TanhNet, lambda cfg: ["hidden"], permutation_spec, min_depth=0))


def half_line(model, params_K, pairs_Px2, eval_sets, alphas, chunk_pairs, mesh, perms):
    """A pair measure: the straight line from member i to the midpoint of i and j (its α = 1 is the line's α = ½),
    evaluated by jaxlmc's pair evaluator; named where it is wanted (`barriers.measures = ["half"]`)."""
    half = paths.Path("half", lambda p_i, p_j, extra: (p_i, p_j), lambda ctx, v, a: paths.lerp(*ctx, 0.5 * a),
                      members_at_ends=False)
    return paths.make_path_eval(model, half, alphas, chunk_pairs, mesh)(params_K, pairs_Px2, eval_sets, perms)


measures.register_pair_measure(measures.PairMeasure("_half", "half line", compute=half_line))


def weight_norms(cfg, out):
    """A study stage of the plugin's own: every member's parameter norm, in the run directory."""
    run = rundir.RunDir(out)
    params = run.restore_params(rundir.CHECKPOINTS)
    norms = np.sqrt(sum(np.sum(np.square(np.asarray(a)), axis=tuple(range(1, np.ndim(a))))
                        for a in jax.tree.leaves(params)))
    run.write_text("plugin/weight_norms.csv", "member,norm\n" + "".join(f"{m},{n:.6f}\n" for m, n in enumerate(norms)))


study.register_stage(study.Stage("weight_norms", weight_norms, needs=("finetune",),
                                 writes=("plugin/weight_norms.csv",)), after="soups")
