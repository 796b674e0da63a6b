"""What every benchmark writes beside its numbers: when, where and with which versions they were measured."""
from __future__ import annotations

import datetime
import json
import os
import platform

import jax


def write_record(path: str, benchmark: str, **fields) -> None:
    record = {"benchmark": benchmark, "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "device": jax.devices()[0].device_kind, "platform": platform.platform(), "cpu_count": os.cpu_count(),
              "versions": {"jax": jax.__version__}, **fields}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(record, f, indent=2)
    print(f"written to {path}")
