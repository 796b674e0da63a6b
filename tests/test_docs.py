"""The documentation's code runs: every Python block of docs/api.md, as a script, in a fresh process."""
import os
import re
import shutil
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # each runs a script in a fresh process (jax's import and compilation included)

ROOT = os.path.join(os.path.dirname(__file__), "..")


def api_blocks() -> list[str]:
    with open(os.path.join(ROOT, "docs", "api.md")) as f:
        return re.findall(r"```python\n(.*?)```", f.read(), re.S)


def run_block(code: str, cwd: str) -> str:
    shutil.copytree(os.path.join(ROOT, "configs"), os.path.join(cwd, "configs"), dirs_exist_ok=True)
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_the_library_example_fits_members_and_prints_barriers_with_intervals_and_floors(tmp_path):
    lines = run_block(api_blocks()[0], str(tmp_path)).splitlines()
    assert lines[0] == "16 members; 0 failed"
    assert [line.split(":")[0] for line in lines[1:]] == ["LR 0.001", "LR 0.01"]
    for line in lines[1:]:
        barrier, lo, hi, floor = map(float, re.search(
            r"barrier ([\d.]+) \(95 % CI over seeds ([\d.]+)–([\d.]+)\), noise floor ([\d.]+)", line).groups())
        assert 0 <= lo <= barrier <= hi < 1 and 0 < floor < 1


def test_the_core_example_trains_members_and_prints_barriers_with_intervals(tmp_path):
    out = run_block(api_blocks()[1], str(tmp_path))
    lines = out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["LR 0.001", "LR 0.01"]
    for line in lines:
        barrier, lo, hi = map(float, re.search(r"barrier ([\d.]+) \(95 % CI over seeds ([\d.]+)–([\d.]+)\)",
                                              line).groups())
        assert 0 <= lo <= barrier <= hi < 1


def test_the_run_directory_example_runs_a_study_and_prints_its_tables_and_answers(tmp_path, data_dir):
    lines = run_block(api_blocks()[2], str(tmp_path)).splitlines()
    assert [line.split()[:2] for line in lines[:2]] == [["60", "0.001"], ["60", "0.01"]]
    assert any(line.startswith("H2 ") for line in lines[2:]) and any(line.startswith("H3 ") for line in lines[2:])
    assert os.path.exists(tmp_path / "runs" / "api_example" / "report.html")
