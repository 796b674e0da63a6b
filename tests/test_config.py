import dataclasses
import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jaxlmc import config, config_doc
from jaxlmc.config import ConfigError


def test_defaults_and_file_agree_on_types():
    cfg = config.load("configs/mnist1d.toml")
    assert cfg.model.kind == "mlp"
    assert isinstance(cfg.finetune.lrs[0], float)
    assert len(cfg.finetune.pretrain_steps) * len(cfg.finetune.lrs) * cfg.finetune.seeds >= 64


@pytest.mark.parametrize("override, message", [
    ("model.widht=3", "unknown key model.widht"),
    ("modle.width=3", "unknown section [modle]"),
    ("model.width=wide", "model.width: expected an integer"),
    ("model.width=2.5", "model.width: expected an integer"),
    ("finetune.lrs=0.1", "finetune.lrs: expected a list"),
    ("finetune.lrs=[0.1, \"x\"]", "finetune.lrs[1]: expected a number"),
    ("finetune.new_head=1", "finetune.new_head: expected true/false"),
    ("model.kind=rnn", "model.kind: 'rnn' is not one of"),
    ("finetune.schedules=[\"cosine\", \"step\"]", "finetune.schedules[1]"),
    ("finetune.pretrain_steps=[5]", "finetune.pretrain_steps [5] are not saved"),
    ("pretrain.save_steps=[0, 99999]", "lie outside"),
    ("finetune.save_steps=[0, 100]", "finetune.save_steps must increase strictly and lie strictly between 0"),
    ("finetune.save_steps=[300, 100]", "finetune.save_steps must increase strictly"),
    ("finetune.save_steps=[100, 1000]", "finetune.save_steps must increase strictly"),  # the last step: always kept
    ("finetune.save_steps=[\"30\"]", "finetune.save_steps[0]: expected an integer"),
    ("finetune.lrs=[]", "finetune.lrs must not be empty"),
    ("finetune.lrs=[-1.0]", "finetune.lrs must be positive"),
    ("finetune.seeds=0", "finetune.seeds must be positive"),
    ("data.finetune_labels=odd", "data.finetune_labels"),
    ("width=3", "must be section.key"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        config.load("configs/mnist1d.toml", [override])
    assert message in str(err.value)


def test_override_parsing():
    cfg = config.load(None, ["model.kind=cnn", "finetune.lrs=[1e-3, 3e-3]", "finetune.new_head=false",
                             "pretrain.lr=1"])
    assert cfg.model.kind == "cnn" and cfg.finetune.lrs == [1e-3, 3e-3]
    assert cfg.finetune.new_head is False and cfg.pretrain.lr == 1.0 and isinstance(cfg.pretrain.lr, float)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        config.load(str(tmp_path / "nope.toml"))
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\nwidth = 3")
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.load(str(bad))


def test_cli_config_error_exits_before_any_work(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "jaxlmc.cli", "finetune", "configs/mnist1d.toml", "--out", str(out),
                           "--set", "finetune.lrz=[0.1]"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "unknown key finetune.lrz" in proc.stderr
    assert not out.exists()  # nothing written


def test_config_round_trips_through_json():
    cfg = config.load("configs/mnist1d.toml", ["model.depth=3"])
    again = config.from_dict(json.loads(cfg.to_json()))
    assert again == cfg


def test_the_config_reference_is_generated_from_the_code_and_current():
    """docs/config.md lists every key of every section with its default and comment; regenerate it with
    `python -m jaxlmc.config_doc > docs/config.md` when config.py changes."""
    text = config_doc.render()
    for section in dataclasses.fields(config.Config):
        for f in dataclasses.fields(getattr(config.Config(), section.name)):
            assert f"| `{f.name}` |" in text, f"{section.name}.{f.name}"
    assert "| `refine_rounds` | int | `0` | Refinement" in text
    with open(os.path.join(os.path.dirname(__file__), "..", "docs", "config.md")) as f:
        assert f.read() == text, "docs/config.md is stale: python -m jaxlmc.config_doc > docs/config.md"


def test_registries_refuse_a_taken_name_and_configs_name_what_is_registered():
    from jaxlmc import data, labels, models, optimizers
    with pytest.raises(ValueError, match="already registered"):
        optimizers.register_optimizer("adamw", lambda lr, wd, m: None)
    with pytest.raises(ValueError, match="already registered"):
        labels.register_label_map("mod5", lambda y, c: (y, c))
    with pytest.raises(ValueError, match="already registered"):
        models.register_kind(models.KINDS["mlp"])
    with pytest.raises(ConfigError, match=r"finetune.optimizer: 'lion' is not one of \['adamw', 'sgd'"):
        config.load("configs/mnist1d.toml", ["finetune.optimizer=lion"])
    with pytest.raises(ConfigError, match="data.finetune_labels: 'halves' is not one of"):
        config.load("configs/mnist1d.toml", ["data.finetune_labels=halves"])
    with pytest.raises(ConfigError, match="plugins.modules: cannot import 'no_such_plugin': ModuleNotFoundError"):
        config.load("configs/mnist1d.toml", ['plugins.modules=["no_such_plugin"]'])
    data.register_dataset("arrays_for_a_test", {"train": (np.zeros((4, 3)), np.arange(4) % 2),
                                                "test": (np.ones((2, 3)), np.array([0, 1]))}, num_classes=2)
    task = data.load_task("arrays_for_a_test")
    assert task["train"].x.shape == (4, 3) and task["test"].num_classes == 2 and data.num_classes("arrays_for_a_test") == 2
    with pytest.raises(ValueError, match="has no split 'ood'"):
        data.load_task("arrays_for_a_test", splits=("ood",))


def test_every_shipped_config_validates():
    paths = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "configs", "*.toml")))
    assert any(p.endswith("pythia_noreturn.toml") for p in paths) and len(paths) >= 10
    for path in paths:
        config.load(path)


def test_a_kinds_arguments_that_build_no_model_are_a_config_error():
    """An odd rotary dimension (rotary_pct 0.25 of a 12-dimensional head) names the key instead of crashing."""
    with pytest.raises(config.ConfigError, match="model.args: rotary_pct 0.25 of head dimension 12 gives 3 rotary "
                                                 "dimensions, an odd number"):
        config.load("configs/tinylm.toml", ['model.kind="gpt_neox"', "model.args={rotary_pct=0.25, hidden_size=48}"])
