"""Every Orbax call in jaxlmc lives here.

A `Checkpoints` wraps one `orbax.checkpoint.CheckpointManager` over a directory of step-numbered checkpoints of a
state pytree. Orbax writes each checkpoint to a temporary directory and renames it when complete, so a process
killed at any moment (kill -9) leaves either the previous checkpoints or the new one, never a torn one; leftover
temporary directories are ignored and cleaned up on the next start.

What happens to a checkpoint after it was written is checked too. Each step directory gets a file list
(jaxlmc.manifest, `MANIFEST`: every file's size and CRC32) once Orbax has committed it, and every restore first compares the files
with it: a truncated, deleted or changed file is found before Orbax reads it (Orbax itself does not notice a flipped
bit). A step that fails is reported in one line, moved aside (never deleted) to the `aside` directory, and resuming
falls back to the newest intact step (`Checkpoints.resume`). A step without a file list (a kill between Orbax's
commit and the list, or a deleted list) is not trusted: it is set aside and recomputed like a corrupt one. A read
error from Orbax marks a step corrupt as well.

A save that fails (disk full, permission denied, read-only filesystem) removes its temporary directory and raises
`faults.WriteFailed` naming the file and the operating system's error; the steps saved before stay intact.
"""
from __future__ import annotations

import contextlib
import glob
import io
import logging
import os
import re
import shutil
import sys
import threading
from typing import Callable, Iterable, Sequence

import jax
import numpy as np

from jaxlmc import faults, files, lazy, manifest, shard
from jaxlmc.manifest import MANIFEST, CorruptCheckpointInfo  # noqa: F401 (MANIFEST: the file list's name)

# Imported when a checkpoint directory is first opened.
ocp = lazy.module("orbax.checkpoint")
checkpoint_managers = lazy.module("orbax.checkpoint.checkpoint_managers")

# What a tensorstore/Orbax read error says when the bytes on disk are not what was written (as opposed to, say, a
# restore target of the wrong shape, which is a bug and must not move an intact checkpoint aside).
_READ_FAULT = re.compile(r"OUT_OF_RANGE|DATA_LOSS|NOT_FOUND|Error reading|Error opening|[Cc]orrupt|decod|"
                         r"Expecting value|No such file|Unterminated", re.S)


@contextlib.contextmanager
def _quiet_logs():
    """For the duration of one of jaxlmc's Orbax calls: Orbax logs every save and restore at INFO/WARNING through absl,
    and a failed write again at ERROR from each of its threads, which jaxlmc reports itself (a progress bar; one line
    naming the file and the OS error). The process's logging is as it was afterwards."""
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        absl.setLevel(level)


_NOISE = "RuntimeError: Event loop is closed"


class _TracebackFilter(io.TextIOBase):
    """A text stream that passes everything through to `target` at once, except tracebacks that end in
    `RuntimeError: Event loop is closed`: a traceback is held until its last line says which it is. Each writing
    thread has its own held lines, since several threads print their tracebacks at once, interleaved piece by piece."""

    _START = "Traceback (most recent call last):"

    def __init__(self, target):
        self.target = target
        self.held: dict[int, tuple[list[str], str]] = {}  # thread id -> (traceback lines held, unfinished line)
        self.lock = threading.Lock()

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        me = threading.get_ident()
        with self.lock:
            block, partial = self.held.pop(me, ([], ""))
            lines = (partial + text).split("\n")
            partial = lines.pop()
            for line in lines:
                if line.startswith(self._START):  # (a new traceback: one held before it was not noise)
                    self._emit(block)
                    block = [line]
                elif block:
                    block.append(line)
                    if line and not line[0].isspace():  # the exception's own line ends the traceback
                        if line.strip() != _NOISE:
                            self._emit(block)
                        block = []
                else:
                    self.target.write(line + "\n")
            # An unfinished line (a progress bar's redraw) goes out at once, unless it may be a traceback's first line.
            if partial and not block and not self._START.startswith(partial):
                self.target.write(partial)
                partial = ""
            if block or partial:
                self.held[me] = (block, partial)
        return len(text)

    def _emit(self, block: list[str]) -> None:
        if block:
            self.target.write("\n".join(block) + "\n")

    def release(self) -> None:
        """Writes out whatever is still held (an unfinished traceback or line), thread by thread."""
        with self.lock:
            for block, partial in self.held.values():
                self.target.write("\n".join(block + [partial]) if block else partial)
            self.held.clear()
        self.target.flush()

    def flush(self) -> None:
        self.target.flush()


@contextlib.contextmanager
def quiet_event_loop_noise():
    """While a command (or one of jaxlmc's Orbax calls) runs: when a write fails, tensorstore's callbacks into Orbax's
    already-closed asyncio loop print one "RuntimeError: Event loop is closed" traceback each (dozens, through
    sys.stderr, from other threads, some after the call returned); they say nothing about the failure, which is
    reported in one line. Everything else written meanwhile passes straight through. sys.stderr is as it was
    afterwards."""
    real = sys.stderr
    if isinstance(real, _TracebackFilter):  # (already filtered by an enclosing call)
        yield
        return
    sys.stderr = _TracebackFilter(real)
    try:
        yield
    finally:
        held = sys.stderr
        sys.stderr = real
        if isinstance(held, _TracebackFilter):
            held.release()


class Checkpoints:
    def __init__(self, directory: str, keep_steps: Sequence[int] = (), keep_latest: int = 1,
                 read_only: bool = False, aside: str | None = None, root: str | None = None):
        """`keep_steps` are kept for ever (e.g. the pretraining checkpoints); of the rest the newest `keep_latest`.
        Corrupt steps are moved into `aside` (default: corrupt/<name> beside the directory). `root` (default: the
        directory's parent), the run directory: below it no link is followed when writing (jaxlmc.files)."""
        self.directory = os.path.abspath(directory)
        self.root = os.path.abspath(root or os.path.dirname(self.directory))
        if not read_only:
            files.check_path(self.directory, self.root)
        self._intact: set[int] = set()  # steps whose files passed the check in this process (read once)
        self.aside = os.path.abspath(aside or os.path.join(os.path.dirname(self.directory), "corrupt",
                                                           os.path.basename(self.directory)))
        with _quiet_logs():  # ("read_only=True, setting save_interval_steps=0", at WARNING)
            options = self._options(keep_steps, keep_latest, read_only)
        try:  # (creating the directory is the first write of a run's checkpoints)
            # Orbax's tensorstore layer refuses relative paths; run directories are usually given relative to the cwd.
            with _quiet_logs():
                self._manager = ocp.CheckpointManager(self.directory, options=options,
                                                      item_handlers=ocp.StandardCheckpointHandler())
        except Exception as err:
            found = faults.os_error_of(err)
            if found is None:
                raise
            raise faults.WriteFailed(found[0] or self.directory, found[1]) from None

    @staticmethod
    def _options(keep_steps: Sequence[int], keep_latest: int, read_only: bool) -> ocp.CheckpointManagerOptions:
        policies = [checkpoint_managers.LatestN(keep_latest)]
        if keep_steps:
            policies.append(checkpoint_managers.CustomSteps(list(keep_steps)))
        return ocp.CheckpointManagerOptions(
            enable_async_checkpointing=False,
            cleanup_tmp_directories=not read_only,
            create=not read_only,
            read_only=read_only,
            preservation_policy=None if read_only else checkpoint_managers.AnyPreservationPolicy(policies),
        )

    def __enter__(self) -> Checkpoints:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    # Writing.
    def save(self, step: int, state) -> None:
        try:
            with _quiet_logs(), quiet_event_loop_noise():
                self._manager.save(step, args=ocp.args.StandardSave(state), force=True)
                self._manager.wait_until_finished()
        except BaseException as err:  # (an interrupt too: no half-written step may stay behind)
            for tmp in glob.glob(os.path.join(glob.escape(self.directory), f"{step}.orbax-checkpoint-tmp*")):
                shutil.rmtree(tmp, ignore_errors=True)
            found = faults.os_error_of(err) if isinstance(err, Exception) else None
            if found is None:
                raise
            # (the file it names was in the temporary directory, removed above: name the step instead)
            raise faults.WriteFailed(f"checkpoint step {step} in {self.directory}", found[1]) from None
        if shard.is_primary():
            try:
                self._write_manifest(step)
            except faults.WriteFailed as err:
                # A step without its file list is not a finished checkpoint: remove it so a resume saves it again.
                shutil.rmtree(self.step_dir(step), ignore_errors=True)
                raise faults.WriteFailed(f"checkpoint step {step} in {self.directory}", err.reason) from None
        self._intact.discard(step)  # (a step saved again: checked afresh when read)
        shard.sync(f"manifest {self.directory} {step}")  # no process checks the step before its list is there

    def _write_manifest(self, step: int) -> None:
        manifest.write(self.step_dir(step), self.root)

    # Checking.
    def problem(self, step: int) -> str | None:
        """What is wrong with the files of a saved step (compared with its file list), or None."""
        if step in self._intact:
            return None
        found = manifest.problem(self.step_dir(step))
        if found is None:
            self._intact.add(step)
        return found

    def set_aside(self, step: int, problem: str) -> CorruptCheckpointInfo:
        """Move a corrupt step into `aside` (a second corrupt copy of the same step gets a time suffix)."""
        self._intact.discard(step)
        target = manifest.aside_target(self.aside, step, self.root)
        if shard.is_primary():
            manifest.move(self.step_dir(step), target)
        shard.sync(f"aside {self.directory} {step}")
        with _quiet_logs():
            self._manager.reload()
        return CorruptCheckpointInfo(self.directory, step, problem, target)

    def verified_steps(self) -> list[int]:
        """The saved steps whose files pass the check; the others are moved aside, each reported in one line."""
        intact = []
        for step in self.steps():
            problem = self.problem(step)
            if problem is None:
                intact.append(step)
            else:
                faults.notify(self.set_aside(step, problem).line())
        return intact

    # Reading.
    def _restore_checked(self, step: int, restore: Callable[[], object]):
        problem = self.problem(step)
        if problem is None:
            try:
                with _quiet_logs():
                    return restore()
            except Exception as err:
                if not _READ_FAULT.search(str(err)):
                    raise
                problem = f"Orbax cannot read it ({str(err).splitlines()[0][:300]})"
        info = self.set_aside(step, problem)
        intact = [s for s in self.steps() if s < step]
        raise faults.CorruptCheckpoint(info.line() + "; rerunning the training command (study, finetune, pretrain) "
                                       f"continues from {f'step {intact[-1]}' if intact else 'the start'}")

    def restore(self, step: int, abstract_state):
        """Restore into the structure, shapes, dtypes (and shardings) of `abstract_state` (e.g. from eval_shape).
        A step that fails its check is moved aside and raises faults.CorruptCheckpoint."""
        return self._restore_checked(
            step, lambda: self._manager.restore(step, args=ocp.args.StandardRestore(abstract_state)))

    def restore_like(self, step: int, host_tree):
        """Restore into the structure, shapes and dtypes of a tree of host arrays, as host arrays."""
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), np.asarray(a).dtype, sharding=device),
                              host_tree)
        return jax.tree.map(np.asarray, self.restore(step, target))

    def restore_raw(self, step: int):
        """Restore without a target from the caller: nested dicts/lists of arrays on this process's first device,
        whatever devices saved them (a checkpoint saved sharded over 8 devices restores on 1)."""
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

        def read():
            target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                                  self._manager.item_metadata(step))
            return self._manager.restore(step, args=ocp.args.StandardRestore(target))

        return _int_keys(self._restore_checked(step, read))

    def resume(self, abstract_state, required: Iterable[int] = ()) -> tuple[int | None, object]:
        """(step, state) to continue training from: the newest intact step before which no `required` step (one that
        must be kept, e.g. finetune.save_steps) is missing; (None, None) when there is none. Corrupt steps are moved
        aside; intact steps after the chosen one are deleted, as training recomputes them bit for bit."""
        required = sorted(set(required))
        while True:
            intact = self.verified_steps()
            usable = [s for s in intact if all(r in intact for r in required if r <= s)]
            if not usable:
                self._delete_after(-1, intact)
                return None, None
            step = usable[-1]
            self._delete_after(step, intact)
            try:
                return step, self.restore(step, abstract_state)
            except faults.CorruptCheckpoint as err:
                faults.notify(str(err).split("; rerunning")[0])

    def _delete_after(self, step: int, intact: list[int]) -> None:
        later = [s for s in intact if s > step]
        if later:
            faults.notify(f"deleting the checkpoints at step(s) {', '.join(map(str, later))} in {self.directory}: training "
                   f"continues from {'step ' + str(step) if step >= 0 else 'the start'} and saves them again")
            with _quiet_logs():
                for s in later:
                    self._manager.delete(s)
                    self._intact.discard(s)
                self._manager.reload()

    def close(self) -> None:
        with _quiet_logs():
            self._manager.close()


def _int_keys(tree):
    """A restored tree with the integer dict keys it was saved with: Orbax stores keys as strings, and NNX names the
    modules of a list by their index (blocks.0, blocks.1, …), which parameter pytrees must match exactly."""
    if isinstance(tree, dict):
        return {int(k) if isinstance(k, str) and k.isdigit() else k: _int_keys(v) for k, v in tree.items()}
    return tree


def restore_params(directory: str, step: int | None = None, aside: str | None = None,
                   root: str | None = None) -> dict:
    """The `params` subtree of a saved state (latest step by default), as host numpy arrays."""
    return restore_fields(directory, step, ("params",), aside, root)["params"]


def restore_fields(directory: str, step: int | None, fields: Sequence[str], aside: str | None = None,
                   root: str | None = None) -> dict:
    """Some top-level entries (e.g. "params", "diverged") of the state saved at `step` (default: the latest), as
    host numpy arrays. A corrupt step is moved to `aside` (below `root`, the run directory)."""
    with Checkpoints(directory, read_only=True, aside=aside, root=root) as manager:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {directory}")
        if step not in manager.steps():
            raise FileNotFoundError(f"no checkpoint at step {step} in {directory} (have {manager.steps()})")
        raw = manager.restore_raw(step)
    return {name: jax.tree.map(np.asarray, raw[name]) for name in fields}
