"""Small refusals, each one line: an abstract model kind, a plugin that exits at import, shutil's errors without a
path, comparing studies of different designs, and a linked barriers/ directory found before any computation."""
import json
import os
import shutil

import pytest

from jaxlmc import api, barrier_stage, cli, config, faults, rundir


def test_the_abstract_classifier_is_not_a_model_kind():
    with pytest.raises(config.ConfigError, match=r"^model.kind: jaxlmc.models.Classifier does not define "
                                                 r"features\(x, drop\): name a Classifier subclass"):
        config.load("configs/mnist1d.toml", ['model.kind="jaxlmc.models:Classifier"'])


def test_a_plugin_that_exits_at_import_is_named(tmp_path, monkeypatch):
    (tmp_path / "exits_at_import.py").write_text("import sys\nsys.exit(3)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(config.ConfigError, match=r"^plugins.modules: cannot import 'exits_at_import': importing it "
                                                 r"called sys.exit\(3\)$"):
        config.import_plugins(["exits_at_import"])
    with pytest.raises(config.ConfigError, match=r"^model.kind: cannot import 'exits_at_import': importing it called "
                                                 r"sys.exit\(3\)$"):
        config.load("configs/mnist1d.toml", ['model.kind="exits_at_import:KIND"'])


def test_an_os_error_without_a_file_names_the_path_shutil_was_at(tmp_path, monkeypatch, capsys):
    link = tmp_path / "figures"
    link.symlink_to(tmp_path, target_is_directory=True)
    monkeypatch.setattr(api, "render_report", lambda out: shutil.rmtree(link))
    assert cli.main(["report", str(tmp_path)]) == 1
    assert capsys.readouterr().err.strip() == f"jaxlmc: error: {link}: Cannot call rmtree on a symbolic link"


def test_comparing_studies_of_different_designs_warns(tmp_path, capsys, monkeypatch):
    base = config.load("configs/mnist1d.toml").to_dict()
    other = json.loads(json.dumps(base))
    other["finetune"]["seed_offset"], other["pretrain"]["seed"] = 1000, 7  # a replicate's changes: not differences
    other["finetune"]["lrs"] = [0.1]
    for name, cfg in (("a", base), ("b", other)):
        rundir.RunDir(str(tmp_path / name)).write_json(rundir.CONFIG, {"config": cfg})
    assert api.config_differences(str(tmp_path / "a"), str(tmp_path / "b")) == ["finetune.lrs"]
    monkeypatch.setattr(api, "compare_runs", lambda a, b: [{"verdict": "H1", "a": "x", "b": "x", "agree": True}])
    assert cli.main(["compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    assert "warning: the two studies' configs differ beyond their seeds (finetune.lrs)" in capsys.readouterr().out


def test_a_linked_barriers_directory_is_refused_before_any_computation(tmp_path, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    root = tmp_path / "run"
    root.mkdir()
    (root / "barriers").symlink_to(elsewhere, target_is_directory=True)
    monkeypatch.setattr(rundir.RunDir, "members", lambda self: [])

    def computed(*args):
        raise AssertionError("the run was loaded before its barriers/ directory was checked")

    monkeypatch.setattr(barrier_stage, "load_run", computed)
    with pytest.raises(faults.WriteFailed, match=r"/run/barriers: is a symbolic link"):
        barrier_stage.barriers_of_run(config.load("configs/mnist1d.toml"), str(root))
    assert os.listdir(elsewhere) == []
