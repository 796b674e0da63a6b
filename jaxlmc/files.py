"""Writing files inside a run directory without following links out of it.

A run directory may be shared: anyone who can write into it could plant a symbolic link (`RUN/.lock ->
~/important.txt`, `RUN/barriers -> /elsewhere`) so that the next writer clobbers a file of its own. So below the run
directory's root, jaxlmc writes only into real directories and replaces or opens only regular files: a link or
another kind of file (a FIFO, a device) on the way is refused in one line (faults.WriteFailed) and nothing is
written. The root itself may be a link (a run directory placed on another disk): it is the user's own choice.

    write_atomic(path, content, root)   a whole file or nothing, via a temporary file renamed into place
    make_dirs(path, root)               directories below root, none of them a link
    open_regular(path, root)            a file descriptor for reading and writing, created if need be, never a link
"""
from __future__ import annotations

import errno
import os
import stat
import tempfile

from jaxlmc import faults

_NOT_REGULAR = "is not a regular file; jaxlmc writes only regular files inside a run directory (remove it)"
_LINK = "is a symbolic link; jaxlmc never writes through links inside a run directory (remove it)"
_HARD_LINK = ("has {} hard links (it is another file too); jaxlmc never writes through links inside a run directory "
              "(remove it)")


def _below(path: str, root: str) -> list[str]:
    """The paths from just below `root` down to `path` (both absolute); empty when `path` is not below `root`."""
    rel = os.path.relpath(path, root)
    if rel == "." or rel.startswith(os.pardir):
        return []
    parts, out = rel.split(os.sep), []
    for k in range(1, len(parts) + 1):
        out.append(os.path.join(root, *parts[:k]))
    return out


def check_path(path: str, root: str) -> None:
    """Refuse `path` when a component below `root` is a symbolic link, when a directory on the way is not a
    directory, or when `path` exists and is not a regular file or directory."""
    path, root = os.path.abspath(path), os.path.abspath(root)
    for component in _below(path, root):
        try:
            mode = os.lstat(component).st_mode
        except FileNotFoundError:
            return  # the rest is created by jaxlmc itself
        except OSError as err:
            raise faults.WriteFailed(component, err.strerror or str(err)) from None
        if stat.S_ISLNK(mode):
            raise faults.WriteFailed(component, _LINK)
        if component != path and not stat.S_ISDIR(mode):
            raise faults.WriteFailed(component, "is not a directory")
        if component == path and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise faults.WriteFailed(component, _NOT_REGULAR)


def make_dirs(path: str, root: str) -> None:
    """os.makedirs(path, exist_ok=True), refusing links below `root`."""
    check_path(path, root)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as err:
        raise faults.WriteFailed(path, err.strerror or str(err)) from None
    check_path(path, root)  # (a link planted meanwhile)


def write_atomic(path: str, content: str | bytes, root: str) -> None:
    """Write a whole file or nothing: a kill mid-write leaves the previous version. `path` lies below `root`, the run
    directory; a link or a non-regular file at `path` or on the way to it is refused (faults.WriteFailed)."""
    path = os.path.abspath(path)
    directory = os.path.dirname(path)
    make_dirs(directory, root)
    check_path(path, root)
    if os.path.isdir(path):
        raise faults.WriteFailed(path, "is a directory")
    tmp = None
    try:
        # mkstemp opens with O_EXCL, so it never follows a link; rename replaces the name, not what it points to.
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
        with os.fdopen(fd, "wb" if isinstance(content, bytes) else "w") as f:
            f.write(content)
        os.replace(tmp, path)
    except OSError as err:  # disk full, not writable, read-only: the previous version stays, no temporary file
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
        raise faults.WriteFailed(path, err.strerror or str(err)) from None


def open_regular(path: str, root: str, mode: int = 0o644) -> int:
    """A descriptor of the regular file `path` (below `root`) opened for reading and writing, created when missing.
    Never follows a link (O_NOFOLLOW) and never blocks on a FIFO (O_NONBLOCK, then refused as not regular)."""
    path = os.path.abspath(path)
    check_path(os.path.dirname(path), root)
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, mode)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise faults.WriteFailed(path, _LINK) from None
        if err.errno in (errno.ENXIO, errno.EISDIR):
            raise faults.WriteFailed(path, _NOT_REGULAR) from None
        raise faults.WriteFailed(path, err.strerror or str(err)) from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise faults.WriteFailed(path, _NOT_REGULAR)
    if info.st_nlink > 1:  # a hard link: writing it would write the file it is also, wherever that lies
        # (0 links: a releasing holder removed the file meanwhile; the lock's loop opens the new one)
        os.close(fd)
        raise faults.WriteFailed(path, _HARD_LINK.format(info.st_nlink))
    return fd
