"""One Registry type behind every extension point, and a light `import jaxlmc`."""
import subprocess
import sys

import pytest

from jaxlmc import config, data, hf, labels, measures, models, optimizers, study
from jaxlmc.registry import Registry

HEAVY = ("tensorflow_datasets", "orbax", "huggingface_hub", "tokenizers", "matplotlib", "safetensors", "mnist1d")


def test_registry_registers_looks_up_with_a_hint_and_unregisters_after_a_block():
    things = Registry("thing", {"alpha": 1, "beta": 2})
    assert things.register("gamma", 3) == 3 and list(things) == ["alpha", "beta", "gamma"]
    with pytest.raises(ValueError, match="thing 'beta' is already registered"):
        things.register("beta", 9)
    with pytest.raises(ValueError, match=r"thing 'alpah' is not registered \(registered: alpha, beta, gamma\); "
                                         r"did you mean 'alpha'\?"):
        things.lookup("alpah")
    assert "did you mean" not in things.unknown("zzz")
    things.register("between", 4, after="alpha")
    assert list(things) == ["alpha", "between", "beta", "gamma"]
    with pytest.raises(ValueError, match="after='nope' is not registered"):
        things.register("late", 5, after="nope")
    with pytest.raises(RuntimeError):
        with things.registered("temporary", 6):
            assert things.lookup("temporary") == 6
            raise RuntimeError  # however the block ends, the entry is gone
    assert "temporary" not in things
    assert things.unregister("between") == 4 and things.names() == ["alpha", "beta", "gamma"]
    copy = things.copy()
    copy.register("only_in_copy", 7)
    assert isinstance(copy, Registry) and "only_in_copy" not in things


@pytest.mark.parametrize("registry, register, name, value", [
    (models.KINDS, lambda v: models.register_kind(v), "mlp", None),
    (optimizers.OPTIMIZERS, lambda v: optimizers.register_optimizer("adamw", v), "adamw", None),
    (labels.LABEL_MAPS, lambda v: labels.register_label_map("mod5", v), "mod5", None),
    (measures.PAIR_MEASURES, lambda v: measures.register_pair_measure(v), "aligned", None),
    (hf.LOADERS, lambda v: hf.register_loader("bert", v), "bert", None),
    (study.STAGES, lambda v: study.register_stage(v, after="soups"), "soups", None),
])
def test_every_extension_point_is_a_registry_that_refuses_a_taken_name(registry, register, name, value):
    assert isinstance(registry, Registry) and name in registry
    with pytest.raises(ValueError, match="already registered"):
        register(registry[name])
    assert isinstance(data.DATASETS, Registry)


def test_import_jaxlmc_loads_no_heavy_dependency_and_drawing_a_figure_sets_no_backend():
    code = ("import sys, jaxlmc\n"
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}))\n"
            "import matplotlib\n"
            "backend = dict.__getitem__(matplotlib.rcParams, 'backend')  # (raw: reading it may choose one)\n"
            "from jaxlmc import figures\n"
            "fig, ax = figures.subplots(figsize=(2, 2)); ax.plot([0, 1]); assert figures.png(fig)[:4] == b'\\x89PNG'\n"
            "print('matplotlib.pyplot' in sys.modules, dict.__getitem__(matplotlib.rcParams, 'backend') == backend)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == ["[]", "False True"]


def test_a_named_measure_that_the_barriers_section_cannot_feed_is_refused_at_load():
    needy = measures.PairMeasure("_needy", "needs REPAIR", compute=lambda *a, **k: {}, options=("repair_x",))
    with measures.PAIR_MEASURES.registered(needy.name, needy):
        with pytest.raises(config.ConfigError, match="barriers.measures: pair measure 'needy' needs repair_x"):
            config.load("configs/mnist1d.toml", ['barriers.measures=["needy"]'])
        assert config.load("configs/mnist1d.toml", ['barriers.measures=["needy"]', "barriers.repair=true"])
    misnamed = measures.PairMeasure("_other", "misnamed", compute=lambda *a, **k: {})
    with measures.PAIR_MEASURES.registered("mine", misnamed):
        with pytest.raises(ValueError, match="registered under another name than its own"):
            measures.chosen(["mine"], {}, aligned=False)


def test_a_pair_measure_is_computed_only_when_a_call_names_it():
    with pytest.raises(ValueError, match="pair measure 'aligned' needs alignment"):
        measures.chosen(["aligned"], {"line": True}, aligned=False)
    with pytest.raises(ValueError, match="pair measure 'repair' needs repair_x"):
        measures.chosen(["repair"], {"repair_x": None}, aligned=False)
    picked = measures.chosen(["curve", "aligned"], {"line": True, "bezier": object()}, aligned=True)
    assert [m.name for m in picked] == ["straight", "aligned", "curve"]  # the registry's order, the columns' order
