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
import io
import sys
import threading
import time

import jax
import numpy as np
import pytest
from flax import nnx

import jaxlmc

from jaxlmc import api, ckpt, config, faults, figures, figures_trends, layout, models, rundir, sizes

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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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
    fig, caption = figures_trends.training_curves(members, {"step_K": np.array([10, 20]), "loss_KxM": loss,
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


# ------------------------------------------------------------------------------------------------ input and faults
# that once got through: a planted link, a malformed lock, non-finite settings, diverged pretraining, sizes that do
# not fit, a failed start, a token model on signals.


def cli(data_dir, verb, out, *sets, config_path="configs/mnist1d.toml"):
    """The command `jaxlmc VERB CONFIG --out OUT` on the fault runs' settings plus `sets`."""
    args = [sys.executable, "-m", "jaxlmc.cli", verb, config_path, "--out", out, "--quiet"]
    for o in [*overrides(data_dir), *sets]:
        args += ["--set", o]
    return args


def one_line(proc) -> str:
    # (TFDS announces a dataset it prepares on stderr: progress, which the first command in a worker prints)
    lines = [line for line in proc.stderr.strip().splitlines()
             if not re.match(r"(Downloading and preparing dataset|Dataset \S+ downloaded and prepared)", line)]
    assert len(lines) == 1, proc.stderr
    return last_line(proc)


def test_a_planted_lock_link_is_refused_and_its_target_untouched(data_dir, tmp_path):
    """RUN/.lock as a link to another file: the command refuses in one line, writes nothing, and the file the link
    points to keeps its content. A FIFO in its place is refused too (opening it never blocks)."""
    target = tmp_path / "important.txt"
    target.write_text("keep me")
    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").symlink_to(target)
    line = one_line(run(cli(data_dir, "pretrain", str(out)), expect=1))
    assert line == f"jaxlmc: error: cannot write {out}/.lock: is a symbolic link; jaxlmc never writes through links " \
                   "inside a run directory (remove it)", line
    assert target.read_text() == "keep me" and os.listdir(out) == [".lock"]
    (out / ".lock").unlink()
    os.mkfifo(out / ".lock")
    line = one_line(run(cli(data_dir, "pretrain", str(out)), expect=1))
    assert "/.lock: is not a regular file" in line and os.listdir(out) == [".lock"]


def test_no_write_follows_a_link_below_the_run_directory(tmp_path):
    """Every file jaxlmc writes (atomic writes, markers, checkpoint file lists, directories) refuses a link at the
    file or on the way to it below the root; the root itself may be a link."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "members.csv").write_text("theirs")
    root = tmp_path / "run"
    root.mkdir()
    run_dir = rundir.RunDir(str(root))
    (root / "members.csv").symlink_to(elsewhere / "members.csv")
    with pytest.raises(faults.WriteFailed, match=r"members\.csv: is a symbolic link"):
        run_dir.write_csv(rundir.MEMBERS, [])
    (root / "barriers").symlink_to(elsewhere)
    with pytest.raises(faults.WriteFailed, match=r"/barriers: is a symbolic link"):
        run_dir.write_csv(rundir.PAIRS, [])
    (root / "stages").symlink_to(elsewhere)
    with pytest.raises(faults.WriteFailed, match=r"/stages: is a symbolic link"):
        run_dir.make_marker_dir()
    (root / "checkpoints").symlink_to(elsewhere)
    with pytest.raises(faults.WriteFailed, match=r"/checkpoints: is a symbolic link"):
        run_dir.checkpoints(rundir.CHECKPOINTS)
    assert sorted(os.listdir(elsewhere)) == ["members.csv"] and (elsewhere / "members.csv").read_text() == "theirs"
    linked = tmp_path / "linked"
    linked.symlink_to(root, target_is_directory=True)
    rundir.RunDir(str(linked)).write_json("settings.json", {"ok": True})  # the root may be a link
    assert json.loads((root / "settings.json").read_text()) == {"ok": True}


@pytest.mark.parametrize("content", ["", '{"pid": 1, "host": "h", "started": 0, "command": "jaxlmc"}'])
def test_a_lock_hard_linked_to_a_file_outside_is_refused_and_the_file_untouched(tmp_path, content):
    """RUN/.lock as a second name of a file elsewhere (empty, or holding a record that would be taken over): writing
    the lock would write that file, so it is refused in one line and the file keeps its content."""
    outside = tmp_path / "outside.txt"
    outside.write_text(content)
    root = tmp_path / "run"
    root.mkdir()
    os.link(outside, root / ".lock")
    with pytest.raises(faults.WriteFailed, match=rf"^cannot write {re.escape(str(root))}/\.lock: has 2 hard links "):
        with rundir.RunDir(str(root)).writing():
            pass
    assert outside.read_text() == content and os.listdir(root) == [".lock"]


@pytest.mark.parametrize("content", ["[1]", '{"pid": "abc"}', "not json", '{"pid": 5, "host": 3}'])
def test_a_malformed_lock_is_one_line_that_says_how_to_clear_it(tmp_path, content):
    root = tmp_path / "run"
    root.mkdir()
    (root / ".lock").write_text(content)
    with pytest.raises(faults.RunLocked, match=r"is not a lock record jaxlmc wrote .*if no jaxlmc process is writing "
                                               r".*, delete .*\.lock$"):
        with rundir.RunDir(str(root)).writing():
            pass
    assert (root / ".lock").read_text() == content  # left for the user to inspect and delete


@pytest.mark.parametrize("key", ["pretrain.lr", "pretrain.weight_decay", "pretrain.momentum", "finetune.momentum",
                                 "finetune.probe_l2", "barriers.curve_lr", "barriers.memory_fraction",
                                 "study.unfit_fraction"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_every_float_setting_must_be_finite(key, value):
    with pytest.raises(config.ConfigError, match=rf"^{re.escape(key)}: expected a finite number, got "):
        config.load("configs/mnist1d.toml", [f"{key}={value}"])
    with pytest.raises(config.ConfigError, match=r"^finetune\.lrs\[1\]: expected a finite number"):
        config.load("configs/mnist1d.toml", [f"finetune.lrs=[0.01, {value}]"])


def test_a_nan_setting_is_refused_before_anything_is_written(data_dir, tmp_path):
    out = str(tmp_path / "run")
    line = one_line(run(cli(data_dir, "pretrain", out, "pretrain.lr=nan"), expect=2))
    assert line == "jaxlmc: config error: pretrain.lr: expected a finite number, got nan", line
    assert not os.path.exists(out)


@pytest.mark.slow
def test_diverged_pretraining_stops_flags_it_and_a_corrected_config_replaces_it(data_dir, tmp_path):
    """SGD at rate 1000 diverges within a few steps: the command stops with one line naming the step, no checkpoint
    after it is saved (none holds a non-finite number), checkpoints.csv flags it, config.json is standard JSON. The
    same directory then accepts the corrected config (nothing had finished), moving the old run aside."""
    out = str(tmp_path / "run")
    bad = ["pretrain.optimizer=sgd", "pretrain.lr=1000.0"]
    line = one_line(run(cli(data_dir, "finetune", out, *bad), expect=1))
    match = re.fullmatch(r"jaxlmc: error: pretraining diverged at step (\d+) of 60 \(its loss or parameters stopped "
                         r"being finite; pretrain.optimizer 'sgd', pretrain.lr 1000\): lower pretrain.lr or add "
                         r"pretrain.warmup_steps; checkpoints up to step (\d+) kept, flagged in "
                         r"pretrain/checkpoints.csv", line)
    assert match, line
    step, kept = map(int, match.groups())
    run_dir = rundir.RunDir(out)
    rows = run_dir.read_csv(rundir.PRETRAIN)
    assert rows[-1]["step"] == step and rows[-1]["diverged"] and not any(r["diverged"] for r in rows[:-1])
    with ckpt.Checkpoints(run_dir.path(rundir.PRETRAIN_CHECKPOINTS), read_only=True) as manager:
        assert max(manager.steps()) == kept < step
        for saved in manager.steps():
            params = manager.restore_raw(saved)["params"]
            assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(params)), saved
    with open(run_dir.path(rundir.CONFIG)) as f:
        json.loads(f.read(), parse_constant=lambda name: pytest.fail(f"config.json holds {name}"))
    assert not os.path.exists(run_dir.path(rundir.MEMBERS))
    # Rerun with the same config: the same line (it diverges again, deterministically).
    assert one_line(run(cli(data_dir, "finetune", out, *bad), expect=1)) == line
    # A corrected config: accepted, the old run moved aside, said in one line; fine-tuning completes.
    proc = run(cli(data_dir, "finetune", out, "pretrain.optimizer=sgd", "pretrain.lr=0.05"), expect=0)
    note = one_line(proc)
    assert f"jaxlmc: {out} had nothing finished; its config changes (pretrain.lr: 1000.0 -> 0.05)" in note, note
    (moved,) = os.listdir(os.path.join(out, "superseded"))
    assert note.endswith(f"moved to {out}/superseded/{moved}")
    assert sorted(os.listdir(os.path.join(out, "superseded", moved))) == ["config.json", "pretrain", "training"]
    assert len(run_dir.read_csv(rundir.MEMBERS)) == 2 and not any(r["diverged"] for r in
                                                                   run_dir.read_csv(rundir.PRETRAIN))
    # Once something finished, the directory is bound to its config again.
    line = one_line(run(cli(data_dir, "finetune", out, "pretrain.optimizer=sgd", "pretrain.lr=0.01"), expect=2))
    assert "was made with a different config (pretrain.lr: 0.05 -> 0.01) and holds finished results" in line, line


@pytest.mark.slow
def test_fine_tuning_from_a_non_finite_checkpoint_is_refused(reference, data_dir, tmp_path):
    """A pretraining checkpoint holding NaN (a directory from before pretraining stopped on divergence): fine-tuning
    refuses it in one line and writes no member."""
    out = fresh_run(reference, tmp_path / "run")
    directory = os.path.join(out, "pretrain", "checkpoints")
    with ckpt.Checkpoints(directory, read_only=True) as manager:
        state = jax.tree.map(np.asarray, manager.restore_raw(60))
    state["params"] = jax.tree.map(lambda a: np.full_like(a, np.nan), state["params"])
    shutil.rmtree(os.path.join(directory, "60"))
    with ckpt.Checkpoints(directory, keep_steps=[0, 20, 60]) as manager:
        manager.save(60, state)
    line = one_line(run(command(data_dir, out), expect=1))
    assert line == (f"jaxlmc: error: the pretraining checkpoint at step 60 in {directory} holds non-finite parameters "
                    "(its pretraining diverged); fine-tuning from it is refused: pretrain again in a new --out"), line
    assert not os.path.exists(os.path.join(out, "members.csv")) and not os.path.exists(os.path.join(out, "checkpoints"))


@pytest.mark.parametrize("verb, setting, message", [
    ("finetune", "finetune.seeds=1000000000", r"fine-tuning of [\d,]+ members × [\d,]+ parameters needs at least [\d.]+ [TP]B "
                                  r"\(each member's starting and current parameters\) but [\d.]+ [KMGT]B of memory are "
                                  r"available; use fewer members .*"),
    ("pretrain", "model.width=10000000", r"pretraining of 1 member × [\d,]+ parameters needs at least [\d.]+ [TP]B .* use a smaller "
                             r"model \(model.width, model.depth\)$"),
    # clamped to the largest evaluation set: fits, and trains
    pytest.param("pretrain", "run.eval_batch_size=1000000", None, marks=pytest.mark.slow),
])
def test_sizes_that_cannot_fit_are_refused_before_anything_is_built(data_dir, tmp_path, verb, setting, message):
    """A member grid or a model far beyond the memory: one line with the estimate and the memory available, exit 2,
    within seconds (nothing is built), and no directory, lock or Orbax temporary directory left behind."""
    out = str(tmp_path / "run")
    start = time.monotonic()
    if message is None:
        run(cli(data_dir, verb, out, setting), expect=0)
        return
    line = one_line(run(cli(data_dir, verb, out, setting), expect=2))
    assert re.fullmatch(r"jaxlmc: error: " + message, line), line
    assert time.monotonic() - start < 60 and not os.path.exists(out)


def test_one_members_step_must_fit_one_device():
    """The per-member bound counts the largest activation, read off the traced step."""
    model = models.build(config.load(None, ["model.width=1000"]).model, (40,), 10)
    fp = sizes.footprint(model, 4, 500, 1000, 4000, "adamw", 0.9, "fine-tuning")
    assert fp.largest_array_bytes >= 1000 * 1000 * 4  # the eval batch's hidden activations: 1000 × 1000 float32
    params = fp.params_per_member * 4
    # parameters, gradients, Adam's two moments (and its step counts), the data order, the largest activation
    assert 0 <= fp.one_member_bytes - (4 * params + 4 * 4000 + fp.largest_array_bytes) < 64
    assert fp.all_members_bytes == 4 * 2 * params
    sizes.check(fp, available_bytes=fp.all_members_bytes, device_bytes=fp.one_member_bytes)  # fits exactly
    with pytest.raises(config.ConfigError, match=r"^fine-tuning: one member of [\d,]+ parameters needs at least .* per "
                                                 r"step .* but 1 KB of memory are available"):
        sizes.check(fp, available_bytes=fp.all_members_bytes, device_bytes=1000)


def test_a_token_model_on_signals_is_refused(data_dir, tmp_path):
    out = str(tmp_path / "run")
    line = one_line(run(cli(data_dir, "finetune", out, "model.kind=transformer", "model.vocab_size=16"), expect=2))
    assert line == ("jaxlmc: error: model.kind 'transformer' reads integer token ids, but data.finetune_task "
                    "'mnist1d/shifted' has no tokens (real-valued inputs of shape (40,)); use a text or token dataset, "
                    "or a model kind for real-valued inputs"), line
    assert not os.path.exists(out)


@pytest.mark.slow  # (10 s: keeps the quick subset under 3 minutes)
def test_paths_of_the_wrong_kind_are_input_errors(data_dir, tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("mine")
    line = one_line(run(cli(data_dir, "pretrain", str(a_file)), expect=2))
    assert line == f"jaxlmc: error: the run directory {a_file} is a file, not a directory; choose another --out", line
    assert a_file.read_text() == "mine"
    line = one_line(run(cli(data_dir, "pretrain", str(tmp_path / "run"), config_path=str(tmp_path)), expect=2))
    assert line == f"jaxlmc: config error: config file {tmp_path} is a directory, not a TOML file", line
    proc = run([sys.executable, "-m", "jaxlmc.cli", "report", str(tmp_path / "missing")], expect=2)
    assert one_line(proc) == (f"jaxlmc: error: {tmp_path / 'missing'} does not exist: give the run directory of a "
                              "finished `jaxlmc study`")


@pytest.mark.slow
def test_the_lock_is_taken_before_the_data_are_loaded(reference, data_dir, tmp_path):
    """A second writer is refused before it reads any data: here its dataset does not even exist, and it still
    reports the lock (exit 75), not the dataset."""
    out = fresh_run(reference, tmp_path / "run")
    with rundir.RunDir(out).writing():
        start = time.monotonic()
        proc = run(cli(data_dir, "finetune", out, 'data.finetune_task="no_such_dataset"'), expect=75)
        assert "is being written by pid" in one_line(proc) and time.monotonic() - start < 30


@pytest.mark.slow
def test_repretraining_a_deleted_checkpoint_says_what_and_why(reference, data_dir, tmp_path):
    out = fresh_run(reference, tmp_path / "run")
    shutil.rmtree(os.path.join(out, "pretrain", "checkpoints", "60"))  # (pretraining had finished: its table is there)
    proc = run(command(data_dir, out), expect=0)
    directory = os.path.join(out, "pretrain", "checkpoints")
    assert proc.stderr.strip() == (f"jaxlmc: pretraining checkpoint(s) at step(s) 60 missing from {directory}; "
                                   "pretraining again from step 20 to recreate them"), proc.stderr
    assert_same_final(out, reference)


def test_event_loop_noise_is_dropped_and_everything_else_passes_straight_through():
    """The stderr filter of a command: tracebacks ending in "Event loop is closed" (written in pieces, as threads
    do) vanish; other tracebacks, progress redraws and lines pass through, the latter at once."""
    target = io.StringIO()
    stream = ckpt._TracebackFilter(target)
    stream.write("step 1/10\r")
    assert target.getvalue() == "step 1/10\r"
    noise = 'Traceback (most recent call last):\n  File "x.py", line 1, in f\n    g()\nRuntimeError: Event loop is closed\n'
    for piece in (noise[:7], noise[7:40], noise[40:]):
        stream.write(piece)
    real = "Traceback (most recent call last):\n  File \"y.py\", line 2\nValueError: real\n"
    stream.write(real)
    stream.write("jaxlmc: error: cannot write x: No space left on device\n")
    assert target.getvalue() == "step 1/10\r" + real + "jaxlmc: error: cannot write x: No space left on device\n"
    before = sys.stderr
    with ckpt.quiet_event_loop_noise():
        assert isinstance(sys.stderr, ckpt._TracebackFilter)
    assert sys.stderr is before


def test_event_loop_noise_from_threads_writing_at_once_is_dropped():
    """Two threads print their "Event loop is closed" tracebacks at once, piece by piece interleaved (as tensorstore's
    callbacks did in CI): both vanish, and a real traceback interleaved with noise still comes through whole."""
    target = io.StringIO()
    stream = ckpt._TracebackFilter(target)
    noise = ['Traceback (most recent call last):\n', '  File "b.py", line 806, in call_soon_threadsafe\n',
             '    self._check_closed()\n', 'RuntimeError: Event loop is closed\n']
    real = ['Traceback (most recent call last):\n', '  File "y.py", line 2\n', 'ValueError: real\n']

    def writer(me, pieces):  # writes one piece per turn, then hands the turn to the other thread
        for piece in pieces:
            turns[me].acquire()
            stream.write(piece)
            turns[1 - me].release()
        for _ in range(8):  # (keeps passing turns once its own pieces are written)
            if not turns[me].acquire(timeout=1):
                return
            turns[1 - me].release()

    for second in (noise, real):
        turns = [threading.Semaphore(0), threading.Semaphore(0)]
        target.seek(0)
        target.truncate()
        threads = [threading.Thread(target=writer, args=(0, noise)), threading.Thread(target=writer, args=(1, second))]
        for t in threads:
            t.start()
        turns[0].release()
        for t in threads:
            t.join()
        stream.release()
        assert target.getvalue() == ("" if second is noise else "".join(real)), target.getvalue()


def test_a_step_without_its_file_list_is_set_aside_and_recomputed(tmp_path, capfd):
    """Deleting a checkpoint's jaxlmc_files.json must not switch its check off: a checkpointed `fit` whose final step
    lost its list sets that step aside (one line) and trains again, to the same parameters."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 5)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int32)
    kwargs = dict(steps=20, batch_size=16, lr=1e-2, seeds=2, directory=str(tmp_path / "fit"), chunk_steps=10)
    first = jaxlmc.fit(lambda rngs: nnx.Linear(5, 2, rngs=rngs), (x, y), **kwargs)
    step_dir = tmp_path / "fit" / layout.FIT_CHECKPOINTS / "20"
    os.remove(step_dir / ckpt.MANIFEST)
    again = jaxlmc.fit(lambda rngs: nnx.Linear(5, 2, rngs=rngs), (x, y), **kwargs)
    err = capfd.readouterr().err
    assert f"checkpoint step 20 in {step_dir.parent} is corrupt: it has no file list {ckpt.MANIFEST}" in err, err
    assert os.listdir(tmp_path / "fit" / "corrupt" / layout.FIT_CHECKPOINTS) == ["20"]
    assert os.path.exists(step_dir / ckpt.MANIFEST)  # trained and saved again, with its list
    for a, b in zip(jax.tree.leaves(first.params), jax.tree.leaves(again.params)):
        np.testing.assert_array_equal(a, b)
