"""What a user can run into besides a bad config, as exceptions the CLI turns into one line each, and the signal
handling that lets a training loop stop at a chunk boundary.

    RunFault            any fault the user can act on; str(fault) is the whole message, exit status `exit_code`
      CorruptCheckpoint   a saved step failed its check (moved aside by jaxlmc.ckpt; the rerun uses an older one)
      WriteFailed         the disk is full, a directory is not writable, the filesystem is read-only, …
      RunLocked           another live process writes the same run directory
      Diverged            pretraining stopped being finite, or a start to fine-tune from is not finite
    Interrupted         SIGINT/SIGTERM (a BaseException, like KeyboardInterrupt: `except Exception` lets it pass)

Signals: `handle_signals()` (the CLI) turns SIGINT and SIGTERM into `Interrupted`. Inside `deferred()` (a training
loop) the first signal only sets a flag that the loop reads at its next chunk boundary (`pending()`), so the chunk in
flight and a checkpoint being written finish; a second signal interrupts at once.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import sys


def notify(text: str) -> None:
    """Something the user should know that did not stop the command (a fault recovered from, a run directory's
    state changed): always said (also under --quiet), on stderr, in one line."""
    print(f"jaxlmc: {text}", file=sys.stderr, flush=True)


class RunFault(Exception):
    exit_code = 1


class CorruptCheckpoint(RunFault):
    pass


class WriteFailed(RunFault):
    def __init__(self, path: str, reason: str):
        super().__init__(f"cannot write {path}: {reason}")
        self.path, self.reason = path, reason


class Diverged(RunFault):
    """Training that must not diverge did (pretraining: the one model every start comes from), at update `step`
    (its loss or parameters stopped being finite; `saved`: the last checkpoint before), or a checkpoint to start
    from holds non-finite parameters."""

    def __init__(self, message: str, step: int | None = None, saved: int | None = None):
        super().__init__(message)
        self.step, self.saved = step, saved


class RunLocked(RunFault):
    exit_code = 75  # EX_TEMPFAIL: try again when the other process is done


class Interrupted(BaseException):
    """A signal stopped the command. `step`/`checkpoint` are filled in by the training loop that was running."""

    def __init__(self, signum: int, step: int | None = None, checkpoint: int | None = None, where: str = ""):
        super().__init__(signum)
        self.signum, self.step, self.checkpoint, self.where = signum, step, checkpoint, where

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM

    def __str__(self) -> str:
        if self.step is None:
            return f"interrupted{f' in {self.where}' if self.where else ''}; rerun the same command to resume"
        saved = "no checkpoint yet" if self.checkpoint is None else f"last checkpoint at step {self.checkpoint}"
        return f"interrupted at step {self.step}{f' of {self.where}' if self.where else ''}; {saved}; " \
               "rerun the same command to resume"


_TENSORSTORE_ERRNO = re.compile(r"os_error_code='(\d+)'")
_QUOTED_PATH = re.compile(r'"(/[^"]+)"')


def path_of(err: OSError) -> str | None:
    """The file an OSError is about: its filename, or — for shutil's errors that carry none ("Cannot call rmtree on a
    symbolic link") — the path shutil was working on when it raised."""
    if err.filename:
        return os.fsdecode(err.filename)
    found, tb = None, err.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        path = frame.f_locals.get("path")
        if frame.f_code.co_filename == shutil.__file__ and isinstance(path, (str, bytes, os.PathLike)):
            found = os.fsdecode(path)
        tb = tb.tb_next
    return found


def os_error_of(err: BaseException) -> tuple[str | None, str] | None:
    """(path, strerror) of the operating-system error behind `err`, searched along its cause chain: a Python OSError,
    or a tensorstore error (Orbax's writes) that carries `os_error_code='N'` and the file in quotes. None if the
    error did not come from the operating system."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno:
            return err.filename, os.strerror(err.errno)
        code = _TENSORSTORE_ERRNO.search(str(err))
        if code:
            paths = _QUOTED_PATH.findall(str(err))
            return (paths[-1].removesuffix(".__lock") if paths else None), os.strerror(int(code.group(1)))
        err = err.__cause__ or err.__context__
    return None


_state = {"depth": 0, "pending": None}


def _on_signal(signum, frame):
    if _state["depth"] and _state["pending"] is None:
        _state["pending"] = signum  # the loop stops at its next chunk boundary
        return
    raise Interrupted(signum)


@contextlib.contextmanager
def handle_signals():
    """SIGINT and SIGTERM raise `Interrupted` (deferred inside `deferred()`); the previous handlers come back after."""
    previous = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    _state["pending"] = None
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _state["pending"] = None


@contextlib.contextmanager
def deferred():
    """While inside, a first signal waits for `take_pending()` at a safe point (only under handle_signals); one that
    nothing took is raised on leaving."""
    _state["depth"] += 1
    try:
        yield
    finally:
        _state["depth"] -= 1
    if _state["depth"] == 0 and (signum := take_pending()) is not None:
        raise Interrupted(signum)


def take_pending() -> int | None:
    """The signal that arrived inside `deferred()` and was not acted on yet, if any; it counts as acted on now."""
    signum, _state["pending"] = _state["pending"], None
    return signum
