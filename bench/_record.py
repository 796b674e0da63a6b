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
import time

import jax
import jax.numpy as jnp


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


def matmul_flops_per_s(size: int = 2048, repeats: int = 10) -> float:
    """The practical peak: a dense f32 matmul, timed after compilation."""
    a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    start = time.perf_counter()
    for _ in range(repeats):
        out = f(a)
    out.block_until_ready()
    return 2 * size ** 3 * repeats / (time.perf_counter() - start)


def write_record(path: str, benchmark: str, **fields) -> None:
    """The record as JSON at `path`, replacing any earlier one there; the host's dense matmul rate is measured now
    where the benchmark did not measure it itself."""
    fields.setdefault("matmul_flops_per_s", matmul_flops_per_s())
    record = {"benchmark": benchmark, "command": command(),
              "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "device": jax.devices()[0].device_kind, "devices": jax.device_count(), "platform": platform.platform(),
              "cpu_count": os.cpu_count(), "versions": versions(), **fields}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(record, f, indent=2)
    print(f"written to {path}")
