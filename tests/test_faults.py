"""Fault injection against the `jaxlmc` command run as a subprocess: corrupt checkpoints, a full disk, permissions, a
read-only filesystem, SIGINT/SIGTERM, a second process on the same run directory. Each gives its exit status and one
line on stderr, and the run then resumes to the same final parameters as a run that never met the fault."""
import glob
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jaxlmc import api, ckpt, config, faults, figures, rundir

from conftest import TINY

# Two members, 300 steps: long enough to be interrupted between its checkpoints (every 100 steps).
FAULT = TINY + ["finetune.pretrain_steps=[60]", "finetune.lrs=[0.01]", "finetune.steps=300",
                "run.checkpoint_every=100"]


def overrides(data_dir):
    return FAULT + [f'data.data_dir="{data_dir}"']


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir):
    """A fine-tuning run that met no fault, and a template holding only its pretraining (what each test's run
    starts from, so the subprocesses only fine-tune)."""
    out = str(tmp_path_factory.mktemp("reference"))
    api.finetune(config.load("configs/mnist1d.toml", overrides(data_dir)), out, progress=False)
    template = str(tmp_path_factory.mktemp("template"))
    for name in ("config.json", "pretrain", "training/pretrain.npz"):
        source, target = os.path.join(out, name), os.path.join(template, name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        (shutil.copytree if os.path.isdir(source) else shutil.copy)(source, target)
    return out, template


def fresh_run(reference, path) -> str:
    shutil.copytree(reference[1], path)
    return str(path)


def command(data_dir, out, verb="finetune"):
    args = [sys.executable, "-m", "jaxlmc.cli", verb]
    if verb == "barriers":
        return args + [out, "--quiet"]
    args += [os.path.abspath("configs/mnist1d.toml"), "--out", out, "--quiet"]
    for o in overrides(data_dir):
        args += ["--set", o]
    return args


def run(args, expect: int, prefix=()):
    proc = subprocess.run([*prefix, *args], capture_output=True, text=True, cwd=os.getcwd())
    assert proc.returncode == expect, proc.stderr
    return proc


def last_line(proc) -> str:
    lines = proc.stderr.strip().splitlines()
    assert lines, "nothing on stderr"
    assert not any("Traceback" in line for line in lines), proc.stderr
    return lines[-1]


def assert_same_final(out, reference):
    """The final parameters, divergence flags and members.csv equal the reference's bit for bit; so do the training
    curves; no temporary file or directory is left."""
    a = ckpt.restore_fields(os.path.join(reference[0], "checkpoints"), 300, ("params", "diverged"))
    b = ckpt.restore_fields(os.path.join(out, "checkpoints"), 300, ("params", "diverged"))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
    with open(os.path.join(reference[0], "members.csv")) as f, open(os.path.join(out, "members.csv")) as g:
        assert f.read() == g.read()
    ref_curves = rundir.RunDir(reference[0]).read_npz(rundir.FINETUNE_CURVES)
    curves = rundir.RunDir(out).read_npz(rundir.FINETUNE_CURVES)
    assert list(curves["step_K"]) == list(range(10, 301, 10))
    for name in ("step_K", "loss_KxM", "acc_KxM"):
        np.testing.assert_array_equal(curves[name], ref_curves[name])
    assert_no_leftovers(out)


def assert_no_leftovers(out):
    left = [p for p in glob.glob(os.path.join(out, "**", "*"), recursive=True)
            if "orbax-checkpoint-tmp" in p or os.path.basename(p).startswith(".tmp-")]
    assert not left and not os.path.exists(os.path.join(out, rundir.LOCK)), left


def largest_data_file(step_dir):
    files = [p for p in glob.glob(os.path.join(step_dir, "**", "*"), recursive=True)
             if os.path.isfile(p) and os.path.basename(p) != ckpt.MANIFEST]
    return max(files, key=os.path.getsize)


def truncate(step_dir):
    path = largest_data_file(step_dir)
    os.truncate(path, os.path.getsize(path) // 3)
    return "truncated"


def delete(step_dir):
    os.remove(os.path.join(step_dir, "default", "_METADATA"))
    return "is missing"


def flip_bit(step_dir):
    path = largest_data_file(step_dir)
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        byte = f.read(1)[0]
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte ^ 0x04]))
    return "CRC32 mismatch"


def test_corrupt_final_checkpoint_is_moved_aside_and_training_resumes(reference, data_dir, tmp_path):
    """A reader (`jaxlmc barriers`) stops with one line and sets the step aside; the training command then continues
    from the newest intact step. (Deleted files and flipped bits: the next test, on the same check.)"""
    out = str(tmp_path / "run")
    shutil.copytree(reference[0], out)
    what = truncate(os.path.join(out, "checkpoints", "300"))
    line = last_line(run(command(data_dir, out, "barriers"), expect=1))
    assert line.startswith(f"jaxlmc: error: checkpoint step 300 in {out}/checkpoints is corrupt: file ") and (
        what in line and f"moved aside to {out}/corrupt/checkpoints/300" in line and
        line.endswith("continues from step 200")), line
    run(command(data_dir, out), expect=0)
    assert os.listdir(os.path.join(out, "corrupt", "checkpoints")) == ["300"]  # kept, not deleted
    assert_same_final(out, reference)


def test_corrupt_pretraining_checkpoint_is_retrained(reference, data_dir, tmp_path, capsys):
    """A corrupt pretraining checkpoint that fine-tuning starts from: moved aside, pretraining continues from the
    newest intact step before it (later ones are recomputed), and fine-tuning ends where the reference did."""
    out = fresh_run(reference, tmp_path / "run")
    flip_bit(os.path.join(out, "pretrain", "checkpoints", "20"))
    api.finetune(config.load("configs/mnist1d.toml", overrides(data_dir)), out, progress=False)
    err = capsys.readouterr().err
    assert "checkpoint step 20 in" in err and "CRC32 mismatch" in err and "continues from step 0" in err
    assert os.listdir(os.path.join(out, "corrupt", "pretrain", "checkpoints")) == ["20"]
    assert_same_final(out, reference)


def test_resume_takes_the_newest_intact_step_that_keeps_every_required_one(tmp_path, capfd):
    """Steps 10…40 saved, 10 and 20 required (kept for ever). 40 with a flipped bit: resume from 30. 20 truncated as
    well: 30 and 40 would skip it, so resume from 10 and delete 30 (it is recomputed). 10 with a deleted file: start
    again. Every corrupt step is kept aside."""
    directory = str(tmp_path / "checkpoints")
    state = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "step": np.int32(0)}
    with ckpt.Checkpoints(directory, keep_steps=[10, 20], keep_latest=2) as manager:
        for step in (10, 20, 30, 40):
            manager.save(step, {**state, "step": np.int32(step)})
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), np.asarray(a).dtype), state)
    flip_bit(os.path.join(directory, "40"))
    with ckpt.Checkpoints(directory, keep_steps=[10, 20], keep_latest=2) as manager:
        step, restored = manager.resume(abstract, required=[10, 20])
        assert step == 30 and int(restored["step"]) == 30
    truncate(os.path.join(directory, "20"))
    with ckpt.Checkpoints(directory, keep_steps=[10, 20], keep_latest=2) as manager:
        step, restored = manager.resume(abstract, required=[10, 20])
        assert step == 10 and int(restored["step"]) == 10 and manager.steps() == [10]
    delete(os.path.join(directory, "10"))
    with ckpt.Checkpoints(directory, keep_steps=[10, 20], keep_latest=2) as manager:
        assert manager.resume(abstract, required=[10, 20]) == (None, None) and manager.steps() == []
    err = capfd.readouterr().err.splitlines()
    problems = [line.split(" is corrupt: ")[1].split(";")[0] for line in err if "is corrupt" in line]
    assert [p.split()[0] for p in problems] == ["file"] * 3, problems  # each names the file, and what is wrong
    assert problems[0].endswith("changed since it was saved (CRC32 mismatch)") and problems[1].endswith(
        "were saved (truncated)") and problems[2] == "file default/_METADATA is missing", problems
    assert any("deleting the checkpoints at step(s) 30" in line for line in err)
    assert sorted(os.listdir(tmp_path / "corrupt" / "checkpoints")) == ["10", "20", "40"]


def test_unchecked_read_errors_never_move_an_intact_checkpoint(reference, tmp_path):
    """A restore that fails for a reason other than the bytes on disk (here a target of the wrong shape: a bug)
    raises as it is and leaves the step where it was."""
    out = str(tmp_path / "run")
    shutil.copytree(os.path.join(reference[0], "checkpoints"), out)
    with ckpt.Checkpoints(out, read_only=True) as manager:
        wrong = {"params": jax.tree.map(lambda a: jax.ShapeDtypeStruct((3, *a.shape), a.dtype),
                                        ckpt.restore_params(out, 300))}
        with pytest.raises(Exception) as err:
            manager.restore(300, wrong)
        assert not isinstance(err.value, faults.CorruptCheckpoint)
    assert sorted(os.listdir(out)) == ["200", "300"]


def test_manifest_lists_every_file(reference):
    step_dir = os.path.join(reference[0], "checkpoints", "300")
    with open(os.path.join(step_dir, ckpt.MANIFEST)) as f:
        listing = json.load(f)
    files = {os.path.relpath(p, step_dir) for p in glob.glob(os.path.join(step_dir, "**", "*"), recursive=True)
             if os.path.isfile(p)} - {ckpt.MANIFEST}
    assert set(listing) == files and all(size > 0 for size, _ in listing.values() if size)


def _can_unshare() -> str | None:
    if shutil.which("unshare") is None:
        return "no unshare(1) here"
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    return None if probe.returncode == 0 else "cannot make a mount namespace here (needs root or user namespaces)"


def in_namespace(script: str) -> subprocess.CompletedProcess:
    return subprocess.run(["unshare", "-m", "sh", "-ec", script], capture_output=True, text=True, cwd=os.getcwd())


def shell(args) -> str:
    return " ".join("'" + a.replace("'", "'\\''") + "'" for a in args)


@pytest.mark.skipif(_can_unshare() is not None, reason=str(_can_unshare()))
def test_disk_full_is_one_line_and_resumable(reference, data_dir, tmp_path):
    """A tmpfs with room for the pretraining and about one fine-tuning checkpoint: the command stops with one line
    naming the checkpoint and ENOSPC, leaves no temporary directory, and the run copied elsewhere finishes."""
    template = reference[1]
    used = sum(os.path.getsize(p) for p in glob.glob(os.path.join(template, "**", "*"), recursive=True)
               if os.path.isfile(p))
    one = sum(os.path.getsize(p) for p in glob.glob(os.path.join(reference[0], "checkpoints", "300", "**", "*"),
                                                    recursive=True) if os.path.isfile(p))
    mount, out = tmp_path / "small", tmp_path / "small" / "run"
    mount.mkdir()
    kept = tmp_path / "kept"
    size_kb = (used + int(2.5 * one)) // 1024 + 64
    proc = in_namespace(f"mount -t tmpfs -o size={size_kb}k tmpfs {mount}; cp -a {template} {out}; "
                        f"set +e; {shell(command(data_dir, str(out)))}; echo rc=$? >&2; cp -a {out} {kept}")
    assert "rc=1" in proc.stderr, proc.stderr
    line = [x for x in proc.stderr.splitlines() if x.startswith("jaxlmc:")][-1]
    # Which write meets the full disk first, a checkpoint or the curves saved before it, depends on their sizes.
    assert re.fullmatch(rf"jaxlmc: error: cannot write (checkpoint step \d+ in {out}/checkpoints|"
                        rf"{out}/training/finetune.npz): No space left on device", line), line
    assert "Traceback" not in proc.stderr and "Event loop" not in proc.stderr
    assert_no_leftovers(str(kept))
    with ckpt.Checkpoints(os.path.join(kept, "checkpoints"), read_only=True) as saved:  # the steps before: intact
        assert saved.verified_steps() == saved.steps() and saved.steps()[-1:] != [300]
    run(command(data_dir, str(kept)), expect=0)
    assert_same_final(str(kept), reference)


@pytest.mark.skipif(_can_unshare() is not None, reason=str(_can_unshare()))
def test_read_only_filesystem_is_one_line_and_resumable(reference, data_dir, tmp_path):
    out = fresh_run(reference, tmp_path / "run")
    proc = in_namespace(f"mount --bind {out} {out}; mount -o remount,ro,bind {out}; set +e; "
                        f"{shell(command(data_dir, out))}; echo rc=$? >&2")
    assert "rc=1" in proc.stderr, proc.stderr
    line = [x for x in proc.stderr.splitlines() if x.startswith("jaxlmc:")][-1]
    assert line.startswith(f"jaxlmc: error: cannot write {out}") and "Read-only file system" in line, line
    run(command(data_dir, out), expect=0)
    assert_same_final(out, reference)


def _without_root_powers() -> tuple[list[str] | None, str]:
    """A command prefix under which file permissions apply (root ignores them), or None and why not."""
    if os.geteuid() != 0:
        return [], ""
    if shutil.which("setpriv") is None:
        return None, "running as root without setpriv(1): permissions cannot be enforced"
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner"], ""


@pytest.mark.skipif(_without_root_powers()[0] is None, reason=_without_root_powers()[1])
def test_permission_denied_is_one_line_and_resumable(reference, data_dir, tmp_path):
    """The training curves' directory is not writable: the first save stops the command with one line naming the
    file, before its checkpoint is written (curves go first), and the run resumes once it is writable."""
    out = fresh_run(reference, tmp_path / "run")
    os.chmod(os.path.join(out, "training"), 0o555)
    try:
        proc = run(command(data_dir, out), expect=1, prefix=_without_root_powers()[0])
    finally:
        os.chmod(os.path.join(out, "training"), 0o755)
    line = last_line(proc)
    assert line == f"jaxlmc: error: cannot write {out}/training/finetune.npz: Permission denied", line
    assert ckpt.Checkpoints(os.path.join(out, "checkpoints"), read_only=True).steps() == []
    assert_no_leftovers(out)
    run(command(data_dir, out), expect=0)
    assert_same_final(out, reference)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_stops_at_a_checkpoint_and_resume_is_bit_exact(reference, data_dir, tmp_path, signum):
    """The signal is acted on at the next chunk boundary: that step is saved and named."""
    out = fresh_run(reference, tmp_path / "run")
    proc = subprocess.Popen(command(data_dir, out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not os.path.isdir(os.path.join(out, "checkpoints", "100")):
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() < deadline, "the run never reached its first checkpoint"
        time.sleep(0.01)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("jaxlmc: interrupted at step ") and line.endswith(
        "; rerun the same command to resume"), err
    step = int(line.split("interrupted at step ")[1].split()[0])
    saved = int(line.split("last checkpoint at step ")[1].split(";")[0])
    assert 100 <= saved == step < 300 or step == 300  # (a very fast machine may have finished)
    assert saved in ckpt.Checkpoints(os.path.join(out, "checkpoints"), read_only=True).steps()
    assert not os.path.exists(os.path.join(out, "members.csv"))
    run(command(data_dir, out), expect=0)
    assert_same_final(out, reference)


def test_second_writer_is_refused_at_once(reference, data_dir, tmp_path):
    """While a process writes a run directory (here this one), the command on it exits at once naming that process,
    and leaves the directory as it was."""
    out = fresh_run(reference, tmp_path / "run")
    with rundir.RunDir(out).writing():
        line = last_line(run(command(data_dir, out), expect=faults.RunLocked.exit_code))
        assert f"{out} is being written by pid {os.getpid()} on {socket.gethostname()}" in line, line
        assert sorted(os.listdir(out)) == [".lock", "config.json", "pretrain", "training"]
    assert not os.path.exists(os.path.join(out, rundir.LOCK))


def test_lock_is_reentrant_detects_stale_holders_and_respects_other_hosts(tmp_path, capfd):
    root = tmp_path / "run"
    root.mkdir()
    run_dir = rundir.RunDir(str(root))
    lock = root / rundir.LOCK
    gone = subprocess.Popen(["true"])
    gone.wait()
    lock.write_text(json.dumps({"pid": gone.pid, "host": socket.gethostname(), "started": 0, "command": "x"}))
    with run_dir.writing(), run_dir.writing():  # a stale lock is taken over; nesting is fine
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert "is stale" in capfd.readouterr().err and not lock.exists()  # released on leaving
    lock.write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": 0, "command": "jaxlmc study"}))
    with pytest.raises(faults.RunLocked, match=r"pid 1 on elsewhere .*delete .*\.lock"):
        with run_dir.writing():
            pass


def test_errors_are_short_and_debug_shows_the_traceback(data_dir, tmp_path):
    out = str(tmp_path / "run")
    bad = [sys.executable, "-m", "jaxlmc.cli", "finetune", "configs/mnist1d.toml", "--out", out,
           "--set", f'data.data_dir="{data_dir}"', "--set", 'data.finetune_task="mnist1dd"']
    proc = run(bad, expect=2)
    assert len(proc.stderr.strip().splitlines()) == 1 and "closest: mnist1d" in proc.stderr, proc.stderr
    proc = run([*bad, "--debug"], expect=2)
    assert "Traceback" in proc.stderr and proc.stderr.strip().splitlines()[-1].startswith("jaxlmc: error: data.finetune_task")
    assert not os.path.exists(out)


def test_training_curves_figure_marks_diverged_and_unfit_members():
    """Synthetic curves: the used members make a median line and band per LR, the diverged one a red dashed line
    ending in × at its last finite loss, the unfit one a dotted line; each has a legend entry."""
    members = [{"member": m, "pretrain_step": 0, "lr": lr, "seed": m, "head": "per_seed", "weight_decay": 0.0,
                "schedule": "cosine", "dropout": 0.0, "diverged": m == 3, "unfit": m == 2}
               for m, lr in enumerate([0.01, 0.01, 0.1, 0.1])]
    loss = np.array([[1.0, 1.1, 2.0, 3.0], [0.5, 0.6, 1.9, np.nan]], np.float32)
    fig, caption = figures.training_curves(members, {"step_K": np.array([10, 20]), "loss_KxM": loss,
                                                     "acc_KxM": np.zeros_like(loss)})
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["LR 0.01", "LR 0.1, unfit", "LR 0.1, diverged"], labels
    crosses = [line for line in ax.get_lines() if line.get_marker() == "x"]
    assert len(crosses) == 1 and list(crosses[0].get_xdata()) == [10] and list(crosses[0].get_ydata()) == [3.0]
    median = [line for line in ax.get_lines() if line.get_label() == "LR 0.01"][0]
    np.testing.assert_allclose(median.get_ydata(), [1.05, 0.55])
    assert "Diverged members (1)" in caption and "unfit ones (1)" in caption
    figures.png(fig)
