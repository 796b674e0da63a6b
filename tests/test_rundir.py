"""The run directory's one owner: typed tables, atomic writes, the grid's declarations as columns and cell keys, and
the layering rules that keep it the one owner."""
import ast
import dataclasses
import os
import pathlib

import numpy as np
import pytest

from jaxlmc import config, grid, rundir
from jaxlmc.config import ConfigError

PACKAGE = pathlib.Path(rundir.__file__).parent


def test_tables_read_back_with_their_declared_types(tmp_path):
    run = rundir.RunDir(str(tmp_path))
    rows = [{"member": 0, "pretrain_step": -1, "lr": 0.001, "weight_decay": 0.0, "schedule": "cosine",
             "dropout": 0.1, "seed": 3, "test_acc": 0.5, "ood_acc": float("nan"), "diverged": False}]
    run.write_csv(rundir.MEMBERS, rows)
    back = run.read_csv(rundir.MEMBERS)[0]
    assert back["member"] == 0 and back["pretrain_step"] == -1 and back["seed"] == 3
    assert back["lr"] == 0.001 and back["schedule"] == "cosine" and back["diverged"] is False
    assert np.isnan(back["ood_acc"]) and np.isnan(back["train_acc"])  # NaN, and absent: empty, read as NaN
    pairs = [{"i": 0, "j": 1, "pretrain_step": 0, "lr": 0.01, "weight_decay": 0.0, "schedule": "cosine",
              "dropout": 0.0, "same_cell": True, "pretrain_step_j": 0, "lr_j": 0.01, "error_barrier_test": 0.25,
              "dist": 1.5, "update_cos": 0.5}]
    run.write_csv(rundir.PAIRS, pairs)
    back = run.read_csv(rundir.PAIRS)[0]
    assert back["same_cell"] is True and back["error_barrier_test"] == 0.25  # a measure column: float
    summary = [{"pretrain_step": 0, "lr": 0.01, "weight_decay": 0.0, "schedule": "cosine", "dropout": 0.0,
                "members": 2, "basins": None, "greedy_members": "3 4"}]
    run.write_csv(rundir.SUMMARY, summary)
    back = run.read_csv(rundir.SUMMARY)[0]
    assert back["basins"] is None and back["members"] == 2 and back["greedy_members"] == "3 4"


def test_a_column_a_table_does_not_declare_is_refused_and_nothing_is_written(tmp_path):
    run = rundir.RunDir(str(tmp_path))
    with pytest.raises(ValueError, match="declares no column 'members_typo'"):
        run.write_csv(rundir.SOUPS, [{"pretrain_step": 0, "members_typo": 1}])
    assert not run.exists(rundir.SOUPS)


def test_writes_are_atomic_and_leave_no_temporary_files(tmp_path):
    run = rundir.RunDir(str(tmp_path))
    run.write_json(rundir.BARRIER_SETTINGS, {"a": 1})
    run.write_npz(rundir.CURVES, {"alphas": np.linspace(0, 1, 3)})
    assert sorted(os.listdir(tmp_path / "barriers")) == ["curves.npz", "settings.json"]
    assert run.read_json(rundir.BARRIER_SETTINGS) == {"a": 1}
    np.testing.assert_array_equal(run.read_npz(rundir.CURVES)["alphas"], [0, 0.5, 1])


def test_cell_keys_and_member_columns_follow_the_grid_declarations():
    fields = [f for f in dataclasses.fields(config.FinetuneConfig) if "grid" in f.metadata]
    assert [a.field for a in grid.AXES] == [f.name for f in fields]
    assert grid.CELL_KEYS == ("pretrain_step", "lr", "weight_decay", "schedule", "dropout", "head")
    assert rundir.MEMBERS.names[:8] == ["member", *grid.CELL_KEYS, "seed"]
    for table in (rundir.PAIRS, rundir.TO_START, rundir.BARRIER_SUMMARY, rundir.SOUPS, rundir.SIMILARITY,
                  rundir.BASINS, rundir.SUMMARY, rundir.SCALING):
        assert set(grid.CELL_KEYS) <= set(table.names), table.path


def test_the_grid_nests_axes_in_field_order_with_seeds_innermost():
    cfg = config.load(None, ["finetune.pretrain_steps=[0, 100]", "finetune.lrs=[0.1, 0.2]", "finetune.seeds=2",
                             "finetune.dropouts=[0.0, 0.5]", "finetune.scratch=true", "pretrain.steps=100",
                             "pretrain.save_steps=[0, 100]"])
    rows = grid.member_grid(cfg)
    assert len(rows) == 3 * 2 * 2 * 2 and [r["member"] for r in rows] == list(range(24))
    assert [(r["pretrain_step"], r["lr"], r["dropout"], r["seed"]) for r in rows[:5]] == [
        (-1, 0.1, 0.0, 0), (-1, 0.1, 0.0, 1), (-1, 0.1, 0.5, 0), (-1, 0.1, 0.5, 1), (-1, 0.2, 0.0, 0)]
    assert len(grid.cell_groups(rows)) == 12
    consts = grid.member_consts(cfg.finetune, rows)
    assert consts["lr"].shape == (24, cfg.finetune.steps)
    np.testing.assert_array_equal(consts["dropout"], [r["dropout"] for r in rows])
    assert "noise_key" in consts
    plain = grid.member_consts(cfg.finetune, [r for r in rows if r["dropout"] == 0.0])
    assert "dropout" not in plain and "noise_key" not in plain  # nobody drops: the step compiles without masks


@pytest.mark.parametrize("override, message", [
    ("finetune.dropouts=[1.0]", "finetune.dropouts must lie in [0, 1)"),
    ("finetune.dropouts=[0.1, 0.1]", "finetune.dropouts has repeated values"),
    ("finetune.weight_decays=[-0.1]", "finetune.weight_decays must be non-negative"),
])
def test_grid_values_are_validated_from_their_declaration(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(")", r"\)")):
        config.load(None, [override])


def test_a_run_directory_from_before_a_new_key_still_resumes(tmp_path):
    """A saved config that lacks a key (a directory made before the key existed) stands for its default."""
    cfg = config.load(None, [])
    run = rundir.RunDir(str(tmp_path))
    saved = cfg.to_dict()
    del saved["finetune"]["dropouts"]
    run.write_json(rundir.CONFIG, {"config": saved})
    run.open(cfg)  # no error
    run.write_marker("pretrain", {})  # a finished stage: the directory is bound to its config
    with pytest.raises(ConfigError, match=r"finetune.dropouts: 0.0 -> \[0.5\]|finetune.dropouts: \[0.0\] -> \[0.5\]"):
        run.open(config.load(None, ["finetune.dropouts=[0.5]"]))


def _imports_and_calls(path: pathlib.Path):
    tree = ast.parse(path.read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    nested = [node for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
              for inner in ast.walk(node) if isinstance(inner, (ast.Import, ast.ImportFrom))]
    return imported, nested


def test_only_the_layout_parses_result_files_and_no_module_hides_an_import():
    for path in sorted(PACKAGE.rglob("*.py")):
        imported, nested = _imports_and_calls(path)
        assert not nested, f"{path.name} imports inside a function"
        if path.name not in ("layout.py", "pair_sets.py"):  # pair_sets.py reads the user's pair file, an input
            assert "csv" not in imported, f"{path.name} parses CSV itself"
        text = path.read_text()
        # (hf_files.py names a Hugging Face checkpoint's own config.json: a checkpoint's layout, not a run directory's.)
        if path.name not in ("layout.py", "hf_files.py"):
            for result in ("members.csv", "pairs.csv", "summary.csv", "config.json", "curves.npz"):
                assert f'"{result}"' not in text and f"'{result}'" not in text, f"{path.name} names {result}"


def test_nothing_below_the_cli_imports_the_ui():
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name in ("cli.py", "ui.py"):
            continue
        tree = ast.parse(path.read_text())
        names = {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) for alias in node.names}
        modules = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        assert "ui" not in names and "jaxlmc.ui" not in modules, path.name
