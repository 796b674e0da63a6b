"""Terminal feedback: a rich progress bar in member-steps per second, and the per-member summary table."""
from __future__ import annotations

import math

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn, \
    TimeRemainingColumn
from rich.table import Table
from rich.text import Text

console = Console()


class _MemberStepsPerSecond(ProgressColumn):
    """Steps/s of the bar times the number of members: the throughput the ensemble achieves."""

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        if speed is None:
            return Text("… member-steps/s", style="progress.data.speed")
        return Text(f"{speed * task.fields['members']:,.0f} member-steps/s", style="progress.data.speed")


class TrainingProgress:
    """Context manager; `advance(n_steps, loss_nxM)` after each chunk."""

    def __init__(self, name: str, total_steps: int, num_members: int, start_step: int = 0, enabled: bool = True):
        self.enabled = enabled
        self.num_members = num_members
        if not enabled:
            return
        self._progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("steps"),
            _MemberStepsPerSecond(), TextColumn("{task.fields[loss]}"), TimeElapsedColumn(),
            TimeRemainingColumn(), console=console,
        )
        resumed = f" (resumed at step {start_step})" if start_step else ""
        self._task = self._progress.add_task(f"{name} ×{num_members}{resumed}", total=total_steps,
                                             completed=start_step, members=num_members, loss="")

    def __enter__(self):
        if self.enabled:
            self._progress.start()
        return self

    def __exit__(self, *exc):
        if self.enabled:
            self._progress.stop()

    def advance(self, n_steps: int, loss_nxM: np.ndarray) -> None:
        if not self.enabled:
            return
        finite = loss_nxM[-1][np.isfinite(loss_nxM[-1])]
        loss = f"loss {np.median(finite):.3f}" if finite.size else "loss –"
        self._progress.update(self._task, advance=n_steps, loss=loss)


def _fmt(value) -> str:
    if isinstance(value, bool):
        return "[red]yes[/red]" if value else ""
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        return f"{value:.4g}"
    return str(value)


def print_members(rows: list[dict], columns: list[str]) -> None:
    table = Table(title=f"{len(rows)} fine-tuned members", show_lines=False)
    for column in columns:
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(*[_fmt(row[c]) for c in columns])
    console.print(table)
    diverged = sum(r["diverged"] for r in rows)
    test_acc = np.array([r["test_acc"] for r in rows if not r["diverged"]])
    if test_acc.size:
        console.print(f"test accuracy {test_acc.mean():.3f} ± {test_acc.std():.3f} over {test_acc.size} members; "
                      f"{diverged} diverged")


def print_pretrain(rows: list[dict]) -> None:
    table = Table(title="pretraining checkpoints")
    for column in ["step", "train_loss", "train_acc", "test_loss", "test_acc"]:
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(*[_fmt(row[c]) for c in ["step", "train_loss", "train_acc", "test_loss", "test_acc"]])
    console.print(table)
