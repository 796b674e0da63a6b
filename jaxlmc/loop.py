"""The host side of training: advance a state through compiled chunks, save at checkpoint steps, report progress.

Progress reporting is passed in (`Progress`: a factory of context managers with `advance(n_steps, loss_nxM)`), so
nothing below the CLI imports the terminal UI; jaxlmc.ui.TrainingProgress is the CLI's.
"""
from __future__ import annotations

import contextlib
from typing import ContextManager, Protocol

import numpy as np

from jaxlmc import shard


class ProgressBar(Protocol):
    def advance(self, n_steps: int, loss_nxM: np.ndarray) -> None: ...


class Progress(Protocol):
    def __call__(self, name: str, total_steps: int, num_members: int, start_step: int) -> ContextManager[ProgressBar]:
        ...


class _Silent:
    def advance(self, n_steps: int, loss_nxM: np.ndarray) -> None:
        return None


def silent(name: str, total_steps: int, num_members: int, start_step: int) -> ContextManager[ProgressBar]:
    """A `Progress` that reports nothing (the API's default)."""
    return contextlib.nullcontext(_Silent())


def boundaries(start: int, total: int, chunk_steps: int, stops: set[int]) -> list[int]:
    """Steps at which a chunk ends: every `chunk_steps`, at every checkpoint stop, and at the end."""
    ends, step = [], start
    while step < total:
        step = min([s for s in stops if s > step] + [step + chunk_steps, total])
        ends.append(step)
    return ends


def run_loop(chunk_fn, state, consts, device_data, total_steps: int, chunk_steps: int, save_at: set[int],
             save_fn, bar: ProgressBar):
    """Advance every member to `total_steps` in compiled chunks; save at the steps in `save_at` and at the end.

    The metrics of a chunk are read on the host only after the next chunk was dispatched, so the device never waits
    for the host. Returns the final state.
    """
    step = int(state["step"])
    pending = None

    def report(loss_LxM, n):
        bar.advance(n, shard.to_host(loss_LxM)[:n])  # the one host read per chunk

    for end in boundaries(step, total_steps, chunk_steps, save_at):
        state, loss_LxM, _ = chunk_fn(state, consts, device_data, end - step)
        if pending is not None:
            report(*pending)
        pending = (loss_LxM, end - step)
        step = end
        if end in save_at or end == total_steps:
            save_fn(end, state)
    if pending is not None:
        report(*pending)
    return state


def train_to(name: str, chunk_fn, state, consts, device_data, total_steps: int, chunk_steps: int, save_at: set[int],
             save_fn, progress: Progress | None):
    """run_loop under a progress bar named `name` (none when `progress` is None)."""
    num_members = state["diverged"].shape[0]
    with (progress or silent)(name, total_steps, num_members, int(state["step"])) as bar:
        return run_loop(chunk_fn, state, consts, device_data, total_steps, chunk_steps, save_at, save_fn, bar)
