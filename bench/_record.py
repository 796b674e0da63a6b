"""What every benchmark writes beside its numbers: when, where, with which versions and by which command they were
measured."""
from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import sys

import jax


def versions() -> dict:
    """The versions of the libraries a timing depends on (torch only where the run imported it)."""
    names = ["jax", "jaxlib", "numpy", "optax", "flax"] + (["torch"] if "torch" in sys.modules else [])
    found = {}
    for name in names:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def command() -> str:
    """The command line that ran this benchmark, as typed (`python -m bench …`)."""
    argv = list(sys.orig_argv)
    argv[0] = os.path.basename(argv[0])
    return shlex.join(argv)


def write_record(path: str, benchmark: str, **fields) -> None:
    record = {"benchmark": benchmark, "command": command(),
              "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "device": jax.devices()[0].device_kind, "devices": jax.device_count(), "platform": platform.platform(),
              "cpu_count": os.cpu_count(), "versions": versions(), **fields}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(record, f, indent=2)
    print(f"written to {path}")
