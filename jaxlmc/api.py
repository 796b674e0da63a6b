"""The importable API: what the `jaxlmc` command does, as functions a script, a notebook or a test calls directly.

    pretrain(cfg, out)            pretraining checkpoints                         (jaxlmc.pretraining)
    finetune(cfg, out)            the member grid, in one compiled program        (jaxlmc.finetuning)
    barriers_of_run(cfg, out)     barriers between members and to their starts    (jaxlmc.measure)
    soups_of_run(cfg, out)        soups, ensembles, best and mean member          (jaxlmc.soups)
    similarity_of_run(cfg, out)   accuracy spread, disagreement, CKA, basins      (jaxlmc.similarity)
    study(cfg, out)               all of the above, resumable, and the report     (jaxlmc.study)
    render_report(out)            the report of a finished study                  (jaxlmc.report)
    compare_runs(a, b)            which verdicts two studies (a replicate) share  (jaxlmc.verdicts)
    config_differences(a, b)      the settings two studies differ in, beyond their seeds
    verdicts(run)                 the report's answers, hypothesis by hypothesis (jaxlmc.verdicts)

`out` is a run directory (jaxlmc.rundir owns its layout); a config comes from jaxlmc.config.load, and a run
directory's own from RunDir(out).config(). Training functions take an optional `progress` (jaxlmc.loop.Progress).
"""
from __future__ import annotations

from jaxlmc import report, rundir
from jaxlmc import verdicts as _verdicts
from jaxlmc.config import ConfigError
from jaxlmc.finetuning import finetune, load_member, start_params
from jaxlmc.measure import barriers_of_run, load_run
from jaxlmc.pretraining import pretrain
from jaxlmc.rundir import RunDir
from jaxlmc.similarity import similarity_of_run
from jaxlmc.soups import soups_of_run
from jaxlmc.study import STAGES, study
from jaxlmc.tasks import Task, load_finetune_task, load_pretrain_task

__all__ = ["STAGES", "RunDir", "Task", "barriers_of_run", "finetune", "load_finetune_task", "load_member",
           "load_pretrain_task", "load_run", "pretrain", "render_report", "compare_runs", "config_differences",
           "verdicts",
           "similarity_of_run", "soups_of_run",
           "start_params", "study"]


def render_report(out: str) -> str:
    """Re-render report.html, figures/ and summary.csv of a finished study; returns the report's path."""
    return report.render(out, STAGES)


def compare_runs(a: str, b: str) -> list[dict]:
    """The verdicts of two finished studies side by side (verdicts.compare): one row per verdict either states, with
    "agree". A replicate (the same config, another finetune.seed_offset and pretrain.seed) tells which verdicts are
    stable enough to be headlines."""
    for out in (a, b):
        run = RunDir(out)
        if not run.exists(rundir.SUMMARY):
            raise ConfigError(f"{out} holds no finished study (no summary.csv): run `jaxlmc study` on it first")
    return _verdicts.compare(RunDir(a), RunDir(b))


# What a replicate changes (its seed stream) and where its data lie: not differences between two studies' designs.
_REPLICATE_KEYS = {("finetune", "seed_offset"), ("pretrain", "seed"), ("data", "data_dir")}


def config_differences(a: str, b: str) -> list[str]:
    """The settings ("section.key") in which two run directories' configs differ, beyond what a replicate changes
    (finetune.seed_offset, pretrain.seed) and where the data lie: a comparison of verdicts across them compares
    designs, not seeds."""
    configs = [RunDir(out).read_json(rundir.CONFIG)["config"] for out in (a, b)]
    keys = sorted({(s, k) for c in configs for s, section in c.items() if isinstance(section, dict) for k in section})
    return [f"{s}.{k}" for s, k in keys if (s, k) not in _REPLICATE_KEYS
            and configs[0].get(s, {}).get(k) != configs[1].get(s, {}).get(k)]


def verdicts(run: RunDir) -> list[tuple[str, list[str]]]:
    """The report's answers for a finished study: (question, sentences) per hypothesis it can speak to."""
    return _verdicts.answer(run)
