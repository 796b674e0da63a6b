"""`jaxlmc study`: the whole experiment of BRIEF §1 from one config, as stages that resume.

    pretrain → finetune → barriers → soups → similarity → report

Each stage stores its results in the run directory and then a marker, ``stages/<stage>.json``, holding the settings
it ran with; the marker is written last and atomically, so a stage killed at any moment has no marker and runs again
(pretraining and fine-tuning also resume from their latest Orbax checkpoint inside the stage). Running the study
again skips every stage whose marker matches the current settings and resumes at the first that does not; when a
stage runs again, every later stage runs again too.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Callable

from jaxlmc import api, measure, report
from jaxlmc.config import Config


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[Config, str, bool], object]
    settings: Callable[[Config], dict]  # what the stage's results depend on beyond the training config


def _training(cfg: Config) -> dict:
    return {}  # the training sections are enforced for the whole directory by api.open_run_dir


STAGES = [
    Stage("pretrain", lambda cfg, out, progress: api.pretrain(cfg, out, progress=progress), _training),
    Stage("finetune", lambda cfg, out, progress: api.finetune(cfg, out, progress=progress),
          lambda cfg: {"eval_batch_size": cfg.run.eval_batch_size, "train_eval_size": cfg.data.train_eval_size}),
    Stage("barriers", lambda cfg, out, progress: measure.barriers_of_run(cfg, out),
          lambda cfg: {**dataclasses.asdict(cfg.barriers), "train_eval_size": cfg.data.train_eval_size}),
    Stage("soups", lambda cfg, out, progress: measure.soups_of_run(cfg, out), lambda cfg: {}),
    Stage("similarity", lambda cfg, out, progress: measure.similarity_of_run(cfg, out),
          lambda cfg: dataclasses.asdict(cfg.study)),
    Stage("report", lambda cfg, out, progress: report.render(out), lambda cfg: {}),
]
STAGE_NAMES = [s.name for s in STAGES]


def _marker(out: str, name: str) -> str:
    return os.path.join(out, "stages", f"{name}.json")


def _settings(stage: Stage, cfg: Config) -> dict:
    # JSON round trip: compare what is stored, not Python objects.
    return json.loads(json.dumps(stage.settings(cfg)))


def stage_done(cfg: Config, out: str, name: str) -> bool:
    stage = STAGES[STAGE_NAMES.index(name)]
    try:
        with open(_marker(out, name)) as f:
            return json.load(f)["settings"] == _settings(stage, cfg)
    except (OSError, ValueError, KeyError):
        return False


def width_dir(out: str, width: int) -> str:
    return os.path.join(out, f"width{width}")


def study(cfg: Config, out: str, progress: bool = True, say: Callable[[str], None] = lambda text: None) -> list[str]:
    """Run every unfinished stage in order. Returns the names of the stages that ran.

    With study.widths, one whole study per width runs in out/width<W>/ (each resumable on its own), and
    out/scaling.csv, out/figures/scaling.png and out/scaling.html report barriers and throughput against width.
    """
    if cfg.study.widths:
        api.load_finetune_task(cfg)
        api.open_run_dir(cfg, out)
        ran = []
        for width in cfg.study.widths:
            say(f"width {width}")
            one = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, width=width),
                                      study=dataclasses.replace(cfg.study, widths=[]))
            ran += [f"width{width}/{name}" for name in study(one, width_dir(out, width), progress, say)]
        report.render_scaling(out, cfg.study.widths)
        return ran
    api.load_finetune_task(cfg)  # bad data is refused before the run directory is created
    api.open_run_dir(cfg, out)
    os.makedirs(os.path.join(out, "stages"), exist_ok=True)
    ran: list[str] = []
    for stage in STAGES:
        if not ran and stage_done(cfg, out, stage.name):
            say(f"{stage.name}: done, skipped")
            continue
        if os.path.exists(_marker(out, stage.name)):
            os.remove(_marker(out, stage.name))  # stale: it must not survive a kill during the rerun
        say(f"{stage.name}: running")
        start = time.perf_counter()
        stage.run(cfg, out, progress)
        seconds = time.perf_counter() - start
        api.write_atomic(_marker(out, stage.name), json.dumps(
            {"settings": _settings(stage, cfg), "seconds": seconds,
             "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=2))
        say(f"{stage.name}: finished in {seconds:.1f} s")
        ran.append(stage.name)
    return ran
