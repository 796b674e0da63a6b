"""`jaxlmc study`: the whole experiment (docs/science.md) from one config, as stages that resume.

    pretrain → finetune → barriers → refine → soups → similarity → calibrate → sharpness → report

The stages are data (`STAGES`): each names the function that runs it, the config keys its results depend on beyond
the training sections, the stages whose results it reads, and the run-directory files it writes. The report and the
CLI read this table; nothing else lists the stages.

Each stage stores its results in the run directory and then a marker, ``stages/<stage>.json``, holding the settings
it ran with; the marker is written last and atomically, so a stage killed at any moment has no marker and runs again
(pretraining and fine-tuning also resume from their latest Orbax checkpoint inside the stage). Running the study
again skips every stage whose marker matches the current settings and resumes at the first that does not; when a
stage runs again, so does every stage that needs its results (directly or through another).
"""
from __future__ import annotations

import dataclasses
import json
import time
from typing import Callable

import jax

from jaxlmc import (barrier_stage, calibration, config, faults, finetuning, loop, models, pretraining, refine, report,
                    report_scaling, rundir, sharpness, similarity, size_axes, soups, tasks)
from jaxlmc.config import Config
from jaxlmc.registry import Registry


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[..., object]  # run(cfg, out), and progress=… when `trains`
    settings: tuple[str, ...] = ()  # config keys ("section" or "section.key") its results depend on
    needs: tuple[str, ...] = ()  # the stages whose results it reads: when one of them runs again, so does this one
    writes: tuple = ()  # its results: rundir tables and files
    trains: bool = False  # it shows a progress bar (training steps, or a barrier pass's pairs)
    complete: Callable[[Config, str], bool] | None = None  # beyond its files: e.g. its checkpoints are there

    def settings_of(self, cfg: Config) -> dict:
        """The values of `settings` in `cfg`: a whole section's keys, or one key, by its own name. JSON round trip:
        compare what the marker stores, not Python objects."""
        values = {}
        for name in self.settings:
            section, _, key = name.partition(".")
            part = dataclasses.asdict(getattr(cfg, section))
            values.update({key: part[key]} if key else part)
        return json.loads(json.dumps(values))


def report_stage(cfg: Config, out: str) -> str:
    return report.render(out, list(STAGES.values()))


# The training sections are enforced for the whole directory by RunDir.open, so no stage lists them.
STAGES: Registry[Stage] = Registry("study stage", {stage.name: stage for stage in [
    Stage("pretrain", pretraining.pretrain, writes=(rundir.PRETRAIN,), trains=True,
          complete=pretraining.pretraining_complete),
    Stage("finetune", finetuning.finetune, settings=("run.eval_batch_size", "data.train_eval_size", "study.unfit_fraction",
                                                     "study.fit_margin"),
          needs=("pretrain",), writes=(rundir.MEMBERS,), trains=True,
          complete=finetuning.finetuning_complete),
    Stage("barriers", barrier_stage.barriers_of_run,
          settings=("barriers", "data.train_eval_size", "study.unfit_fraction", "study.fit_margin", "study.margin"),
          needs=("finetune",), trains=True,
          writes=(rundir.PAIRS, rundir.TO_START, rundir.BARRIER_SUMMARY, rundir.CURVES,
                  rundir.BARRIER_SETTINGS, *rundir.BY_STEP)),
    Stage("refine", refine.refine_run, settings=("study.refine_rounds",), needs=("barriers",),
          writes=(rundir.REFINE_ROUNDS,), trains=True, complete=refine.rounds_complete),
    Stage("soups", soups.soups_of_run, needs=("finetune",),
          writes=(rundir.SOUPS, rundir.MERGES)),
    Stage("similarity", similarity.similarity_of_run, settings=("study.similarity_examples", "study.margin"),
          needs=("finetune", "barriers"),
          writes=(rundir.SIMILARITY, rundir.BASINS, rundir.SIMILARITY_ARRAYS)),
    Stage("calibrate", calibration.calibrate_run, settings=("study.calibration_cells",),
          needs=("barriers", "similarity"), writes=(rundir.CALIBRATION,)),
    Stage("sharpness", sharpness.sharpness_of_run, needs=("finetune",),
          settings=("study.sharpness_iterations", "study.sharpness_examples", "data.train_eval_size"),
          writes=(rundir.SHARPNESS, rundir.START_SHARPNESS)),
    Stage("report", report_stage, needs=("finetune", "barriers", "refine", "soups", "similarity", "calibrate",
                                         "sharpness"),
          writes=(rundir.SUMMARY, rundir.CRITICAL, rundir.REPORT)),
]})


def register_stage(stage: Stage, after: str) -> None:
    """Add a stage to every study, right after the stage named `after` (and before the report, which reads the
    results of the stages it `needs`): a plugin module's own measurement of the fine-tuned members, resumable and
    rerun with what it needs like the built-in ones. Its `needs` must name stages before it."""
    names = list(STAGES)
    if after not in names or after == "report":
        raise ValueError(f"register_stage: after={after!r} must name a stage before the report ({names[:-1]})")
    unknown = [n for n in stage.needs if n not in names[:names.index(after) + 1]]
    if unknown:
        raise ValueError(f"study stage {stage.name!r} needs {unknown}, which do not run before it")
    STAGES.register(stage.name, stage, after=after)


def stage_done(cfg: Config, out: str, name: str) -> bool:
    """A stage is done when its marker holds the current settings (a key it lacks — a marker from before the key
    existed — stands for its default), every file it writes is there (a run directory
    from an older jaxlmc, whose stage wrote less, runs that stage again), and its own check passes (a training
    stage's checkpoints are there: one moved aside as corrupt is trained again)."""
    stage = STAGES[name]
    run = rundir.RunDir(out)
    marker = run.read_marker(name)
    return (marker is not None and isinstance(marker.get("settings"), dict)
            and not rundir.settings_changes(marker["settings"], stage.settings_of(cfg), stage.settings_of(Config()))
            and all(run.exists(name) for name in stage.writes)
            and (stage.complete is None or stage.complete(cfg, out)))


@rundir.exclusive
def study(cfg: Config, out: str, progress: loop.Progress | None = None,
          say: Callable[[str], None] = lambda text: None) -> list[str]:
    """Run every unfinished stage in order. Returns the names of the stages that ran.

    With size axes (study.widths, study.depths, study.parametrizations: jaxlmc.size_axes), one whole study per size
    runs in its own directory (width<W>/, width<W>_depth<D>/, …; each resumable on its own), and scaling.csv, the
    trends (scaling_fits.csv, scaling_critical.csv, scaling_cost.csv), figures/scaling.png and scaling.html report
    them against size.
    """
    run = rundir.RunDir(out)
    # Bad data, and a model or grid too large for the memory — at any size — are refused before anything is written.
    pretraining.check_sources(cfg, out)
    task, pre_task = tasks.load_finetune_task(cfg), tasks.load_pretrain_task(cfg)
    scaled = bool(size_axes.given_axes(cfg))
    params_per_member = {}
    for size in size_axes.sizes(cfg):
        one = size_axes.config_at(cfg, size)
        try:
            if scaled:
                config.validate(one)
            params_per_member[size] = models.param_count(
                jax.eval_shape(finetuning.check_sizes(one, pre_task, task).init, jax.random.key(0)))
        except config.ConfigError as err:
            raise (config.ConfigError(f"size {size_axes.directory(cfg, size)}: {err}") if scaled else err) from None
    pretraining.check_revisions(cfg, out, pre_task)  # a checkpoint error, too, leaves nothing behind
    run.open(cfg)
    if scaled:
        ran = []
        names = {size: size_axes.directory(cfg, size) for size in size_axes.sizes(cfg)}
        for size, name in names.items():
            say(name)
            ran += [f"{name}/{stage}" for stage in study(size_axes.config_at(cfg, size), run.size(name).root,
                                                         progress, say)]
        report_scaling.render_scaling(out, names, params_per_member)
        return ran
    run.make_marker_dir()
    ran: list[str] = []
    for stage in STAGES.values():
        if stage_done(cfg, out, stage.name) and not set(stage.needs) & set(ran):
            say(f"{stage.name}: done, skipped")
            continue
        run.remove_marker(stage.name)  # stale: it must not survive a kill during the rerun
        say(f"{stage.name}: running")
        start = time.perf_counter()
        try:
            stage.run(cfg, out, progress=progress) if stage.trains else stage.run(cfg, out)
        except faults.Interrupted as interrupted:
            interrupted.where = interrupted.where or f"the {stage.name} stage"
            raise
        seconds = time.perf_counter() - start
        run.write_marker(stage.name, {"settings": stage.settings_of(cfg), "seconds": seconds,
                                      "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})
        say(f"{stage.name}: finished in {seconds:.1f} s")
        ran.append(stage.name)
    return ran
