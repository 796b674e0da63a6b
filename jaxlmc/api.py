"""The importable API: what the `jaxlmc` command does, as functions a script, a notebook or a test calls directly.

    pretrain(cfg, out)            pretraining checkpoints                         (jaxlmc.pretraining)
    finetune(cfg, out)            the member grid, in one compiled program        (jaxlmc.finetuning)
    barriers_of_run(cfg, out)     barriers between members and to their starts    (jaxlmc.measure)
    soups_of_run(cfg, out)        soups, ensembles, best and mean member          (jaxlmc.soups)
    similarity_of_run(cfg, out)   accuracy spread, disagreement, CKA, basins      (jaxlmc.similarity)
    study(cfg, out)               all of the above, resumable, and the report     (jaxlmc.study)
    render_report(out)            the report of a finished study                  (jaxlmc.report)

`out` is a run directory (jaxlmc.rundir owns its layout); a config comes from jaxlmc.config.load, and a run
directory's own from RunDir(out).config(). Training functions take an optional `progress` (jaxlmc.loop.Progress).
"""
from __future__ import annotations

from jaxlmc import report
from jaxlmc.finetuning import finetune, load_member, start_params
from jaxlmc.measure import barriers_of_run, load_run
from jaxlmc.pretraining import pretrain
from jaxlmc.rundir import RunDir
from jaxlmc.similarity import similarity_of_run
from jaxlmc.soups import soups_of_run
from jaxlmc.study import STAGES, study
from jaxlmc.tasks import Task, load_finetune_task, load_pretrain_task

__all__ = ["STAGES", "RunDir", "Task", "barriers_of_run", "finetune", "load_finetune_task", "load_member",
           "load_pretrain_task", "load_run", "pretrain", "render_report", "similarity_of_run", "soups_of_run",
           "start_params", "study"]


def render_report(out: str) -> str:
    """Re-render report.html, figures/ and summary.csv of a finished study; returns the report's path."""
    return report.render(out, STAGES)
