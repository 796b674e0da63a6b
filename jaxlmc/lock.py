"""One writer per run directory: the lock file (`LOCK`) and the directory's creation.

`holding(root)` is entered by every API call that writes a run directory (jaxlmc.rundir.exclusive). The outermost
entry in a process creates the directory when it does not exist yet and takes an flock on `root/LOCK`, whose content
names the holder (pid, host, start, command), so a second process that tries to write is refused at once, naming it
(faults.RunLocked), before it loads any data. The lock is released and its file removed on leaving. When the call
fails before the run was started (its `started` file, the config, was never written), a directory it created is
removed again: bad input leaves nothing behind.

The lock file is opened without following links and must be a regular file (jaxlmc.files): a link planted in a shared
run directory never makes a writer clobber the file it points to. A record that jaxlmc did not write is refused in
one line that says how to clear it. A stale record of this host (its process is gone) is taken over with a note;
another host's record is trusted, since flock does not reach across hosts on every shared filesystem.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import sys
import time

from jaxlmc import faults, files, shard
from jaxlmc.config import ConfigError

LOCK = ".lock"

# root -> {"depth": nesting of `holding`, "fd": the locked LOCK file once taken, "created": the directory made here}
_held: dict[str, dict] = {}


@contextlib.contextmanager
def holding(root: str, started: str):
    """Hold `root`'s lock while inside (re-entrant within a process; with several processes, a multi-host run, the
    primary one holds it for all). `started`: the file (relative to root) whose presence means the run started."""
    root = os.path.abspath(root)
    entry = _held.setdefault(root, {"depth": 0, "fd": None, "created": None})
    entry["depth"] += 1
    failed = False
    try:
        if entry["depth"] == 1 and shard.is_primary():
            entry["created"] = _create(root)
            _take(root, entry)
        yield
    except BaseException:
        failed = True
        raise
    finally:
        entry["depth"] -= 1
        if entry["depth"] == 0:
            del _held[root]
            if entry["fd"] is not None:
                _release(root, entry["fd"])
            if failed and entry["created"] and not os.path.exists(os.path.join(root, started)):
                shutil.rmtree(entry["created"], ignore_errors=True)


def _create(root: str) -> str | None:
    """Create `root` (and missing parents) if it does not exist; returns the topmost directory created, if any."""
    if os.path.lexists(root) and not os.path.isdir(root):
        raise ConfigError(f"the run directory {root} is a file, not a directory; choose another --out")
    if os.path.isdir(root):
        return None
    top = root
    while not os.path.exists(os.path.dirname(top)):
        top = os.path.dirname(top)
    try:
        os.makedirs(root)
    except FileExistsError:
        return None  # another process made it meanwhile: it is not ours to remove
    except OSError as err:
        raise faults.WriteFailed(root, err.strerror or str(err)) from None
    return top


def _holder_text(record: dict | None) -> str:
    if not record:
        return "a process whose lock record is unreadable"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record["started"]))
    return f"pid {record['pid']} on {record['host']} (since {started}: {record['command']})"


_FIELDS = {"pid": int, "host": str, "started": (int, float), "command": str}


def _read_record(fd: int) -> dict | None:
    """The lock's record: {} when the file is empty (a holder killed before writing it), None when it is not a
    record jaxlmc writes (not JSON, not an object, missing or mistyped fields)."""
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 1 << 16).decode()
        if not text.strip():
            return {}
        record = json.loads(text)
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or set(record) != set(_FIELDS):
        return None
    if any(isinstance(record[k], bool) or not isinstance(record[k], t) for k, t in _FIELDS.items()):
        return None
    if record["pid"] <= 0:
        return None
    return record


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _take(root: str, entry: dict) -> None:
    path = os.path.join(root, LOCK)
    while True:
        fd = files.open_regular(path, root)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            record = _read_record(fd)
            os.close(fd)
            raise faults.RunLocked(f"{root} is being written by {_holder_text(record)}; wait for it to finish or "
                                   "use another --out") from None
        try:  # a releasing process may have removed the file between our open and flock: lock the new one
            same = os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    record, host = _read_record(fd), socket.gethostname()
    if record is None:
        os.close(fd)
        raise faults.RunLocked(f"{path} is not a lock record jaxlmc wrote (unreadable); if no jaxlmc process is "
                               f"writing {root}, delete {path}")
    if record and record["host"] != host:
        os.close(fd)
        raise faults.RunLocked(f"{root} is being written by {_holder_text(record)}; if that process is gone, "
                               f"delete {path}")
    if record and record["pid"] != os.getpid() and not _alive(record["pid"]):
        faults.notify(f"{root}: the lock of {_holder_text(record)} is stale (no such process); taking it over")
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, json.dumps({"pid": os.getpid(), "host": host, "started": time.time(),
                             "command": _command_line()}).encode())
    entry["fd"] = fd


def _command_line(limit: int = 100) -> str:
    text = " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]])
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _release(root: str, fd: int) -> None:
    path = os.path.join(root, LOCK)
    try:
        if os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino:
            os.remove(path)  # before unlocking: a waiting process then locks a new file, never this one
    except OSError:
        pass
    os.close(fd)
