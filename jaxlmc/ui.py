"""Terminal feedback: a rich progress bar in member-steps per second (`TrainingProgress`, the CLI's
jaxlmc.loop.Progress), and the tables of members, barriers and the study. Grid columns come from the grid's
declarations (jaxlmc.grid): an axis gets a column when it is declared always shown or the rows vary it."""
from __future__ import annotations

import math
import os
import threading

import numpy as np
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from rich.table import Table
from rich.text import Text

from jaxlmc import grid, report, rundir

console = Console()


class _MemberStepsPerSecond(ProgressColumn):
    """Steps/s of the bar times the number of members: the throughput the ensemble achieves (pairs/s for a barrier
    pass, whose bar counts pairs)."""

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        members = task.fields["members"]
        unit = "member-steps/s" if members else "pairs/s"
        if speed is None:
            return Text(f"… {unit}", style="progress.data.speed")
        return Text(f"{speed * (members or 1):,.0f} {unit}", style="progress.data.speed")


class TrainingProgress:
    """Context manager; `advance(n_steps, loss_nxM)` after each chunk. With num_members 0 (jaxlmc.loop.Progress) the
    bar counts member pairs of a barrier pass: pairs/s and the time left instead of member-steps/s and a loss."""

    def __init__(self, name: str, total_steps: int, num_members: int, start_step: int = 0, enabled: bool = True):
        self.enabled = enabled
        self.num_members = num_members
        if not enabled:
            return
        self.total = total_steps
        self._lock = threading.Lock()
        last = TimeRemainingColumn() if num_members == 0 else TextColumn("{task.fields[loss]}")
        self._progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(bar_width=10), MofNCompleteColumn(),
            _MemberStepsPerSecond(), last, TimeElapsedColumn(), console=console,
        )
        resumed = f" from {start_step}" if start_step else ""
        label = f"{name} ×{num_members}{resumed}" if num_members else f"{name} (pairs)"
        self._task = self._progress.add_task(label, total=total_steps, completed=start_step, members=num_members,
                                             loss="")

    def __enter__(self):
        if self.enabled:
            self._progress.start()
        return self

    def __exit__(self, *exc):
        if self.enabled:
            self._progress.stop()

    def advance(self, n_steps: int, loss_nxM: np.ndarray | None) -> None:
        if not self.enabled:
            return
        if loss_nxM is None:  # pairs, ticked from the compiled pass's threads (one per device)
            with self._lock:
                done = self._progress.tasks[0].completed
                self._progress.update(self._task, completed=min(done + n_steps, self.total))
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


# Short headers so the per-member table fits an 80-column terminal; members.csv has every column in full.
MEMBER_RESULTS = [("train_acc", "train acc"), ("test_acc", "test acc"), ("ood_acc", "ood acc"),
                  ("dist_from_init", "dist"), ("diverged", "div"), ("unfit", "unfit")]


def print_members(rows: list[dict]) -> None:
    # Grid axes the rows do not vary (often weight decay and schedule) are left out so the table fits 80 columns.
    columns = [("member", "#")] + [(a.column, a.header) for a in grid.shown(rows)] + MEMBER_RESULTS
    table = Table(title=f"{len(rows)} fine-tuned members (all columns in members.csv)")
    for _, header in columns:
        table.add_column(header, justify="right")
    for row in rows:
        table.add_row(*[_fmt(row[key]) for key, _ in columns])
    console.print(table)
    console.print("test examples ×k: k times the pilot's test set — data.test_split = \"test[:N]\" on a task with "
                  "that many (mnist1d/shifted_xl has 8000); evaluations: pair-α evaluations × the test set's size "
                  "relative to the pilot's")

    groups: dict = {}
    for row in rows:
        groups.setdefault(grid.cell(row), []).append(row)
    axes = grid.shown(rows, cells_only=True)
    summary = Table(title="per cell: mean ± std over seeds (diverged and unfit members left out)")
    for header in [a.header for a in axes] + ["n", "test acc", "ood acc", "dist", "div", "unfit"]:
        summary.add_column(header, justify="right")
    for members in groups.values():
        used = [m for m in members if grid.usable(m)]

        def stat(key, digits=3):
            values = np.array([m[key] for m in used], dtype=float)
            if values.size == 0 or np.isnan(values).all():
                return "–"
            return f"{values.mean():.{digits}f}±{values.std():.{digits}f}"

        summary.add_row(*cell_values(members[0], axes), str(len(members)), stat("test_acc"), stat("ood_acc"), stat("dist_from_init", 1),
                        str(sum(m["diverged"] for m in members)), str(sum(bool(m.get("unfit")) for m in members)))
    console.print(summary)


def cell_values(row: dict, axes) -> list[str]:
    return [f"{row[a.column]:g}" if isinstance(row[a.column], float) else str(row[a.column]) for a in axes]


def print_pretrain(rows: list[dict], baselines: list[dict] = ()) -> None:
    """The pretraining checkpoints' table, then (a language model's) the unigram and bigram baselines."""
    table = Table(title="pretraining checkpoints")
    for column in ["step", "train_loss", "train_acc", "test_loss", "test_acc"]:
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(*[_fmt(row[c]) for c in ["step", "train_loss", "train_acc", "test_loss", "test_acc"]])
    console.print(table)
    for b in baselines:
        console.print(f"{b['model']} baseline (counted on the training split): test loss {b['test_loss']:.3f} nats "
                      f"per token, accuracy {b['test_acc']:.3f}")


def _count(value) -> str:
    return "–" if value is None else str(value)


def _num(value, digits=3) -> str:
    return "–" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


def print_barriers(result: dict) -> None:
    """Per-cell summary of the barrier stage: mean, std and bootstrap CI of the barriers between seeds, then the
    barrier to the starting point and the geometry. Every column of every form is in barriers/summary.csv."""
    summary, settings = result["summary"], result["settings"]
    if not summary:
        return
    axes = grid.shown(summary, cells_only=True)
    key_headers = [a.header for a in axes]

    # (a cell that got no pair, as with a cross-cell pair file, has no pair columns: shown as –)
    splits = [s for s in ("test", "ood") if any(f"error_barrier_{s}_mean" in row for row in summary)]
    for metric in ("error", "loss"):
        table = Table(title=f"{metric} barrier between seeds (endpoint-mean form): mean ± std and 95% bootstrap CI "
                            "over pairs", box=box.SIMPLE_HEAD, pad_edge=False)
        for header in key_headers + ["n"] + [h for s in splits for h in (s, f"{s} CI")]:
            table.add_column(header, justify="right")
        for row in summary:
            cells = cell_values(row, axes) + [str(row["pairs"])]
            for split in splits:
                name = f"{metric}_barrier_{split}"
                cells += [f"{_num(row.get(name + '_mean'))}±{_num(row.get(name + '_std'))}",
                          f"{_num(row.get(name + '_ci_lo'))}–{_num(row.get(name + '_ci_hi'))}"]
            table.add_row(*cells)
        console.print(table)

    # To the probed start (the starting body with a linear-probe head, a start that works), in the same form as the
    # seeds' barrier, beside its noise floor.
    table = Table(title="to the probed start (test error barrier, endpoint-mean form; its noise floor) and geometry: "
                  "mean ± std", box=box.SIMPLE_HEAD, pad_edge=False)
    for header in key_headers + ["n", "to start", "floor", "dist to start", "dist between", "update cos"]:
        table.add_column(header, justify="right")
    for row in summary:
        def ms(metric, digits=3):
            return f"{_num(row.get(f'{metric}_mean'), digits)}±{_num(row.get(f'{metric}_std'), digits)}"

        table.add_row(*cell_values(row, axes), str(row["members_used"]), ms("start_error_barrier_test"),
                      _num(row.get("start_error_barrier_test_floor_mean")), ms("start_dist", 2), ms("dist", 2),
                      ms("update_cos", 2))
    console.print(table)
    if settings["diverged_members"] or settings.get("unfit_members"):
        console.print(f"[yellow]{settings['diverged_members']} diverged and {settings.get('unfit_members', 0)} unfit "
                      f"members left out ({settings['left_out_pairs']} pairs)[/yellow]")
    across = sum(not p["same_cell"] for p in result["pairs"])
    if across:
        console.print(f"{across} pair{'s' * (across > 1)} join members of different cells: not in the per-cell tables, "
                      "each in barriers/pairs.csv")
    console.print(f"{settings['member_pairs']} member pairs and {settings['start_pairs']} to-start pairs × "
                  f"{len(settings['alphas'])} α on {', '.join(settings['splits'])} in {settings['seconds']:.1f} s "
                  f"(chunks of {settings['chunk_pairs']} pair{'s' * (settings['chunk_pairs'] > 1)}, compilation included)")


def print_study(out: str) -> None:
    """The study's answer in the terminal: the report's headline sentences and a compact per-cell table."""
    run = rundir.RunDir(out)
    summary = report.build_summary(run)
    table = Table(title="per cell (test set; every column in summary.csv)", box=box.SIMPLE_HEAD, pad_edge=False)
    heads = [("head", "head")] if len({r["head"] for r in summary}) > 1 else []
    columns = [("pretrain_step", "pretrain"), ("lr", "lr"), *heads, ("unfit", "unfit"),
               ("error_barrier_test_mean", "err barrier"), ("error_barrier_test_floor_mean", "floor"),
               ("basins", "basins"), ("best_test_acc", "best"), ("uniform_test_acc", "soup"),
               ("greedy_test_acc", "greedy"), ("ensemble_test_acc", "ens"), ("ood_acc_std", "ood std")]
    for _, header in columns:
        table.add_column(header, justify="right")
    for row in summary:
        table.add_row(*[report.step_label(int(row[k])) if k == "pretrain_step" else
                        f"{row[k]:g}" if k == "lr" else str(row[k]) if k == "head" else
                        _count(row[k]) if k in ("basins", "unfit") else _num(row.get(k))
                        for k, _ in columns])
    console.print(table)
    if run.exists(rundir.BASELINES):
        final = run.read_csv(rundir.PRETRAIN)[-1]
        print_pretrain([final], run.read_csv(rundir.BASELINES))
    for question, lines in report.headline(run):
        console.print(f"[bold]{escape(question)}[/bold]")
        for line in lines:  # (computed text: its brackets, "[0.001, 0.01]", are not markup)
            console.print(f"  • {escape(line)}")
    console.print(f"report: {os.path.join(out, 'report.html')}")


def print_comparison(rows: list[dict], run_a: str, run_b: str, differences: list[str] = ()) -> None:
    """Two studies' verdicts side by side (api.compare_runs), the disagreements marked, and how many agree; first a
    warning when their configs differ beyond a replicate's seeds (api.config_differences)."""
    if differences:
        console.print(f"[yellow]warning: the two studies' configs differ beyond their seeds ({', '.join(differences)}):"
                      " verdicts that disagree may differ by design, not by chance[/yellow]")
    table = Table(title="verdicts of two studies", box=box.SIMPLE_HEAD, pad_edge=False)
    for header in ("verdict", run_a, run_b, "agree"):
        table.add_column(escape(header))
    for r in rows:
        table.add_row(escape(r["verdict"]), escape(r["a"]), escape(r["b"]),
                      "yes" if r["agree"] else "[bold red]no[/bold red]")
    console.print(table)
    console.print(f"{sum(r['agree'] for r in rows)} of {len(rows)} verdicts agree")


def print_plan(pilot: dict, rows: list[dict], target: float, shown: int = 8) -> None:
    """The planner's answer (api.plan_run): the pilot's design, then the cheapest designs that reach `target` (or,
    when none does, the closest)."""
    console.print(f"pilot: {pilot['cells']} cells, {pilot['seeds']} seeds, pairs {pilot['pairs']}: minimum detectable "
                  f"excess {pilot['measured']:.4f} measured, {pilot['predicted']:.4f} predicted by the model")
    reach = [r for r in rows if r["reaches"]]
    title = (f"designs that reach {target:g}, cheapest first" if reach else
             f"no design in the planner's range reaches {target:g}; the closest")
    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False)
    for header in ("seeds", "pairs", "test examples", "min detectable", "member-steps / cell", "evaluations / cell"):
        table.add_column(header, justify="right")
    for r in (reach or rows)[:shown]:
        table.add_row(str(r["seeds"]), r["pairs"], r["test_examples"], f"{r['min_detectable']:.4f}",
                      f"{r['member_steps']:,}", f"{r['evaluations']:,.0f}")
    console.print(table)
