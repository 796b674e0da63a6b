"""The host side of training: advance a state through compiled chunks, save at checkpoint steps, report progress,
keep the training curves, and stop cleanly on a signal.

Progress reporting is passed in (`Progress`: a factory of context managers with `advance(n_steps, loss_nxM)`), so
nothing below the CLI imports the terminal UI; jaxlmc.ui.TrainingProgress is the CLI's.

Training curves (`TrainingCurves`): every member's mean training-batch loss and accuracy over each chunk, at the chunk's
last step. The caller's `save_fn(step, state, curves)` stores them beside each checkpoint (curves first: after a
kill they are at most ahead of the checkpoint, and `TrainingCurves.from_arrays` cuts them back to the step training
resumes from).

Signals (jaxlmc.faults): inside the loop a first SIGINT/SIGTERM is acted on at the next chunk boundary: the state
there is saved (unless it just was) and faults.Interrupted says the step and the last checkpoint. A second signal
abandons the chunk in flight; the last checkpoint is then the one before.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, ContextManager, Protocol

import numpy as np

from jaxlmc import faults, shard


class ProgressBar(Protocol):
    def advance(self, n_steps: int, loss_nxM: np.ndarray) -> None: ...


class Progress(Protocol):
    """A progress bar's factory. With num_members 0 the steps are member pairs (a barrier pass, jaxlmc.interpolation),
    advanced one by one with no losses (`advance(1, None)`), possibly from another thread."""

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


@dataclasses.dataclass
class TrainingCurves:
    """Training curves: at each recorded step (a chunk's last), every member's mean batch loss and accuracy over
    the chunk (NaN where a member's loss was not finite: it diverged there)."""

    step_K: list[int] = dataclasses.field(default_factory=list)
    loss_KxM: list[np.ndarray] = dataclasses.field(default_factory=list)
    acc_KxM: list[np.ndarray] = dataclasses.field(default_factory=list)

    @classmethod
    def from_arrays(cls, arrays: dict | None, upto: int) -> TrainingCurves:
        """Saved curves (`arrays()`), cut back to the steps ≤ `upto` (where training resumes)."""
        if not arrays:
            return cls()
        keep = np.asarray(arrays["step_K"]) <= upto
        return cls(list(np.asarray(arrays["step_K"])[keep]), list(arrays["loss_KxM"][keep]),
                   list(arrays["acc_KxM"][keep]))

    def add(self, end: int, loss_nxM: np.ndarray, acc_nxM: np.ndarray) -> None:
        with np.errstate(invalid="ignore"):
            self.step_K.append(end)
            self.loss_KxM.append(np.mean(loss_nxM, axis=0))
            self.acc_KxM.append(np.mean(acc_nxM, axis=0))

    def arrays(self, num_members: int) -> dict[str, np.ndarray]:
        empty = np.zeros((0, num_members), np.float32)
        return {"step_K": np.asarray(self.step_K, np.int64),
                "loss_KxM": np.asarray(self.loss_KxM, np.float32) if self.step_K else empty,
                "acc_KxM": np.asarray(self.acc_KxM, np.float32) if self.step_K else empty}


@dataclasses.dataclass(frozen=True)
class CurvesFile:
    """Where a training's curves are kept: `read()` -> the saved arrays (None when there are none), `write(arrays)`
    (jaxlmc.rundir.RunDir.curves_file)."""

    read: Callable[[], dict | None]
    write: Callable[[dict], None]


def run_loop(chunk_fn, state, consts, device_data, total_steps: int, chunk_steps: int, save_at: set[int],
             save_fn, bar: ProgressBar, curves: TrainingCurves | None = None, halt_on_divergence: bool = False):
    """Advance every member to `total_steps` in compiled chunks; save at the steps in `save_at` and at the end with
    `save_fn(step, state, curves)`.

    The metrics of a chunk are read on the host only after the next chunk was dispatched, so the device never waits
    for the host (except at a save, whose curves must be complete). Returns the final state.

    A member that diverges is frozen and flagged by the step itself (jaxlmc.train); with `halt_on_divergence` (one
    model that everything else starts from: pretraining) a non-finite training loss instead raises faults.Diverged
    naming the update where it happened, before anything after it is saved.
    """
    curves = TrainingCurves() if curves is None else curves
    step = int(state["step"])
    saved = step if step > 0 else None  # a resumed state came from a checkpoint at its step
    pending = None

    def report(loss_LxM, acc_LxM, n):
        loss_nxM, acc_nxM = shard.to_host(loss_LxM)[:n], shard.to_host(acc_LxM)[:n]  # the one host read per chunk
        if halt_on_divergence and not np.isfinite(loss_nxM).all():
            first = int(np.argmax(~np.isfinite(loss_nxM).all(axis=1)))
            where = pending_end[0] - n + first + 1
            raise faults.Diverged(f"diverged at step {where}", step=where, saved=saved)
        bar.advance(n, loss_nxM)
        curves.add(pending_end[0], loss_nxM, acc_nxM)

    pending_end = [step]
    with faults.deferred():
        try:
            for end in boundaries(step, total_steps, chunk_steps, save_at):
                state, loss_LxM, acc_LxM = chunk_fn(state, consts, device_data, end - step)
                if pending is not None:
                    report(*pending)
                pending, pending_end[0] = (loss_LxM, acc_LxM, end - step), end
                step = end
                stop = faults.take_pending()
                if end in save_at or end == total_steps or stop is not None:
                    report(*pending)
                    pending = None
                    save_fn(end, state, curves)
                    saved = end
                if stop is not None:
                    raise faults.Interrupted(stop)
            if pending is not None:
                report(*pending)
        except faults.Interrupted as interrupted:
            # `step` is where the chunk in flight started (abandoned) or ended (finished and saved).
            interrupted.step, interrupted.checkpoint = step, saved
            raise
    return state


def train_to(name: str, chunk_fn, state, consts, device_data, total_steps: int, chunk_steps: int, save_at: set[int],
             save_fn, progress: Progress | None, curves: TrainingCurves | None = None,
             halt_on_divergence: bool = False):
    """run_loop under a progress bar named `name` (none when `progress` is None)."""
    num_members = state["diverged"].shape[0]
    with (progress or silent)(name, total_steps, num_members, int(state["step"])) as bar:
        try:
            return run_loop(chunk_fn, state, consts, device_data, total_steps, chunk_steps, save_at, save_fn, bar,
                            curves, halt_on_divergence)
        except faults.Interrupted as interrupted:
            interrupted.where = interrupted.where or name
            raise
