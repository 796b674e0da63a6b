"""The barrier stage: barriers between a finished fine-tuning run's members and from each member to its starting
point, as `jaxlmc.pair_barriers` measures them on the run's `Members`, summarised per grid cell and written under
barriers/ (see jaxlmc.rundir for the files); the same at every saved fine-tuning step, in barriers/by_step/.

`load_run` reads a finished run as `Members` (model, final parameters, members.csv, task); soups (jaxlmc.soups),
similarity (jaxlmc.similarity) and sharpness (jaxlmc.sharpness) measure the same finished runs.
"""
from __future__ import annotations

import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxlmc import files, finetuning, grid, layerwise, library, loop, models, pair_sets, rundir, tasks
from jaxlmc.config import Config, ConfigError
from jaxlmc.interpolation import PairCurves, cell_summary
from jaxlmc.measures import PAIR_MEASURES, BezierSettings


def load_run(cfg: Config, out: str) -> library.Members:
    """A finished fine-tuning run as `Members` (jaxlmc.library, as `fit` returns them): the model, the final
    parameters, members.csv as its table, the grid's cells, and the fine-tuning task (`task`); `start` is None (the
    stages that need the starts compute them: finetuning.start_params)."""
    run = rundir.RunDir(out)
    members = run.members()
    task = tasks.load_finetune_task(cfg)
    with run.checkpoints(rundir.CHECKPOINTS, read_only=True) as manager:
        latest = manager.latest_step()
    if latest != cfg.finetune.steps:
        raise ConfigError(f"{out}: the latest fine-tuning checkpoint is at step {latest}, not finetune.steps = "
                          f"{cfg.finetune.steps}; finish the run with `jaxlmc finetune` first")
    model = models.build(cfg.model, task.input_shape, task.train.num_classes, task.per_token)
    params_M = jax.tree.map(jnp.asarray, run.restore_params(rundir.CHECKPOINTS, latest))
    return library.Members(model, params_M, None, members, {}, grid.CELL_KEYS, pair_keys=("pretrain_step_j", "lr_j"),
                           task=task)


def select_pairs(spec: str, members: list[dict]) -> tuple[list[tuple[int, int]], int]:
    """The requested pairs among used members, and how many requested pairs were left out (a member diverged or
    unfit): jaxlmc.pair_sets.select_pairs over the grid's cells, a bad spec a ConfigError naming barriers.pairs."""
    try:
        return pair_sets.select_pairs(spec, members, grid.CELL_KEYS, grid.usable)
    except ValueError as err:
        raise ConfigError(f"barriers.{err}" if str(err).startswith("pairs:") else f"barriers.pairs: {err}") from None


def summarize(cfg: Config, members: list[dict], pair_rows: list[dict], start_rows: list[dict]) -> list[dict]:
    """barriers/summary.csv: one row per grid cell (jaxlmc.interpolation.cell_summary over the grid's cell keys,
    verdicts at the study's margin)."""
    return cell_summary(members, pair_rows, start_rows, cfg.finetune.seeds, grid.CELL_KEYS, cfg.study.margin)


def measure_pairs(cfg: Config, run: library.Members, start_M: dict, reference_M: dict, pairs: list[tuple[int, int]],
                  status=None, progress: loop.Progress | None = None) -> library.Barriers:
    """The run's requested member pairs and every used member's line to its `reference_M`, as the [barriers] section
    asks: jaxlmc.pair_barriers on the run's members (cells: the grid's; each pair row also names member j's
    checkpoint and rate). `start_M` is where each member started (the fine-tuning updates θ − start, for
    update_cos)."""
    b, n = cfg.barriers, cfg.data.train_eval_size
    train_x, train_y = run.task.train.x, run.task.train.y
    return library.pair_barriers(
        dataclasses.replace(run, start=start_M), tasks.eval_arrays(cfg, run.task), pairs=pairs,
        align={True: "weights", False: None}.get(b.align, b.align), align_x=train_x[:n] if b.align == "activations" else None,
        repair_x=train_x[:min(b.repair_examples, n)] if b.repair else None,
        bezier=BezierSettings(b.curve_steps, b.curve_lr, cfg.finetune.batch_size, train_x, train_y)
        if b.curve_steps else None, measures=b.measures, num_alphas=b.alphas, noise_resamples=b.noise_resamples,
        reference=reference_M, chunk_pairs=b.chunk_pairs, memory_fraction=b.memory_fraction,
        eval_batch_size=cfg.run.eval_batch_size, status=status, progress=progress)


def write_barriers(run: rundir.RunDir, pairs, used, curves: PairCurves, pair_rows, start_rows, summary,
                   settings) -> None:
    run.write_csv(rundir.PAIRS, pair_rows)
    run.write_csv(rundir.TO_START, start_rows)
    run.write_csv(rundir.BARRIER_SUMMARY, summary)
    arrays = {"alphas": curves.alphas, "pairs": np.asarray(pairs, np.int32).reshape(-1, 2),
              "start_members": np.asarray(used, np.int32)}
    by_prefix = {"": curves.pairs, "start_": curves.to_start,
                 **{PAIR_MEASURES.lookup(name).npz_prefix: by_split for name, by_split in curves.measures.items()
                    if name != "straight"}}
    for prefix, by_split in by_prefix.items():
        for split, (loss, err) in by_split.items():
            arrays[f"{prefix}loss_{split}"], arrays[f"{prefix}error_{split}"] = loss[..., 0], err[..., 0]
    run.write_npz(rundir.CURVES, arrays)
    run.write_json(rundir.BARRIER_SETTINGS, settings)


@rundir.exclusive
def barriers_of_run(cfg: Config, out: str, status=None, allow_unusable: bool = False,
                    progress: loop.Progress | None = None) -> dict:
    """Evaluate the requested member pairs and every member-to-start pair of a finished fine-tuning run in one
    compiled pass; write barriers/. With finetune.save_steps, the same at each saved fine-tuning step (one pass per
    step), in barriers/by_step/ beside the final step's rows. Returns {"pairs", "to_start", "summary", "settings"}.

    A run none of whose members can be interpolated (every one diverged or unfit) is a ConfigError, unless
    `allow_unusable` (a refinement round: its failing rates are data, they bracket the trainability edge); its tables
    then hold its members and no pairs. `progress` shows each pass's pairs as they are evaluated."""
    b = cfg.barriers
    directory = rundir.RunDir(out)
    members = directory.members()
    pairs, left_out = select_pairs(b.pairs, members)  # a bad pair file is refused before any loading
    files.check_path(os.path.dirname(directory.path(rundir.PAIRS)), directory.root)  # (a link there: before computing)
    run = load_run(cfg, out)
    if not run.used and not allow_unusable:
        raise ConfigError(f"every member of {out} diverged or is unfit: there is nothing to interpolate")
    # The start every member's barrier to the start is measured against: its body with the probe head (a head that
    # works; a fresh random head sits at chance and would make that barrier meaningless). For probe-head members this
    # is exactly where they started.
    start_M = finetuning.start_params(cfg, out, run.model, members, run.task.train)
    probe_M = finetuning.start_params(cfg, out, run.model, members, run.task.train, heads="probe")
    if not run.used:
        return _without_pairs(cfg, out, run, start_M, probe_M)
    measured = measure_pairs(cfg, run, start_M, probe_M, pairs, status, progress)
    curves, pair_rows, start_rows = measured.curves, measured.pairs, measured.to_start
    summary = summarize(cfg, members, pair_rows, start_rows)
    num_used = len(run.used)
    num_evals = (len(pairs) + num_used) * (len(curves.alphas) - 2) + 2 * num_used
    settings = {"barriers": dataclasses.asdict(b), "chunk_pairs": curves.chunk, "member_pairs": len(pairs),
                "start_pairs": num_used, "left_out_pairs": left_out,
                "diverged_members": sum(m["diverged"] for m in members),
                "unfit_members": sum(bool(m.get("unfit")) for m in members), "splits": curves.splits,
                "alphas": curves.alphas.tolist(), "seconds": curves.seconds,
                "model_evals_per_s": num_evals / curves.seconds, "align_seconds": curves.align_seconds,
                "curve_seconds": curves.measure_seconds.get("curve", 0.0),
                "start": "each member's starting body with the linear-probe head (finetune.probe_steps, probe_l2)",
                "form": {"<metric>_barrier_<split>": "endpoint-mean: max L(α) − (L(0) + L(1))/2",
                         "<metric>_barrier_<split>_lin": "linear-baseline: max [L(α) − ((1−α)L(0) + αL(1))]",
                         "<barrier>_floor": "noise floor: 95 % quantile of the barrier of the centred curve over "
                                            "bootstrap resamplings of the evaluation examples",
                         "<barrier>_null": "null mean: the mean of those barriers (what noise alone adds; the "
                                           "excess is the barrier minus it)",
                         "<barrier>_null_se": "the null mean's Monte-Carlo standard error (SD of the resampled "
                                              "barriers / √resamplings): a verdict it moves is not resolved"},
                "verdicts": {"rule": "jaxlmc.decide (docs/science.md)", "margin": cfg.study.margin}}
    by_step = {cfg.finetune.steps: (members, pair_rows, start_rows, summary)}
    step_seconds = {}
    for step in cfg.finetune.save_steps:
        start_time = time.perf_counter()
        by_step[step] = _barriers_at_step(cfg, out, run, step, start_M, probe_M, status, progress)
        step_seconds[step] = time.perf_counter() - start_time
    settings["finetune_steps"] = sorted(by_step)
    settings["seconds_per_saved_step"] = step_seconds
    layer_rows = layer_summary = None
    if b.layerwise and pairs:
        layer_rows, layer_summary, settings["layerwise_seconds"] = layerwise.layer_barriers(cfg, run, pairs,
                                                                                             curves.perms, status)
    write_barriers(directory, pairs, run.used, curves, pair_rows, start_rows, summary, settings)
    if layer_rows is not None:
        directory.write_csv(rundir.LAYERWISE, layer_rows)
        directory.write_csv(rundir.LAYERWISE_SUMMARY, layer_summary)
    directory.write_by_step({step: by_step[step] for step in sorted(by_step)})
    return {"pairs": pair_rows, "to_start": start_rows, "summary": summary, "settings": settings,
            "layerwise": layer_rows, "layerwise_summary": layer_summary}


def _without_pairs(cfg: Config, out: str, run: library.Members, start_M: dict, probe_M: dict) -> dict:
    """barriers/ of a run none of whose final members can be interpolated: its members, no pairs (at a saved step
    where some members were still usable, their barriers as usual)."""
    directory = rundir.RunDir(out)
    summary = summarize(cfg, run.table, [], [])
    by_step = {cfg.finetune.steps: (run.table, [], [], summary)}
    for step in cfg.finetune.save_steps:
        by_step[step] = _barriers_at_step(cfg, out, run, step, start_M, probe_M, None)
    settings = {"barriers": dataclasses.asdict(cfg.barriers), "member_pairs": 0, "start_pairs": 0,
                "left_out_pairs": 0, "diverged_members": sum(m["diverged"] for m in run.table),
                "unfit_members": sum(bool(m.get("unfit")) for m in run.table), "usable_members": 0,
                "finetune_steps": sorted(by_step)}
    directory.write_csv(rundir.PAIRS, [])
    directory.write_csv(rundir.TO_START, [])
    directory.write_csv(rundir.BARRIER_SUMMARY, summary)
    directory.write_json(rundir.BARRIER_SETTINGS, settings)
    directory.write_by_step({step: by_step[step] for step in sorted(by_step)})
    return {"pairs": [], "to_start": [], "summary": summary, "settings": settings, "layerwise": None,
            "layerwise_summary": None}


def members_at_step(cfg: Config, out: str, run: library.Members, step: int, start_M: dict) -> tuple[list[dict], dict]:
    """(member rows, params_M) at a saved fine-tuning step: members.csv's rows with the metrics, divergence and
    unfit flags (study.fit_margin and study.unfit_fraction, the latter against the best member from the same start at
    that step) re-measured there."""
    saved = rundir.RunDir(out).restore_fields(rundir.CHECKPOINTS, step, ("params", "diverged"))
    params_M = jax.tree.map(jnp.asarray, saved["params"])
    results = finetuning.evaluate_members(cfg, run.model, run.task, params_M, start_M)
    rows = [{**m, **{k: float(v[i]) for k, v in results.items()}, "diverged": bool(saved["diverged"][i])}
            for i, m in enumerate(run.table)]
    chance = finetuning.chance_accuracy(cfg, run.task)
    for r, unfit in zip(rows, grid.unfit_flags(rows, cfg.study.unfit_fraction, chance, cfg.study.fit_margin)):
        r["unfit"] = unfit
    return rows, params_M


def _barriers_at_step(cfg: Config, out: str, final: library.Members, step: int, start_M: dict, probe_M: dict, status,
                      progress: loop.Progress | None = None):
    """(members, pair_rows, start_rows, summary) of the members as saved at fine-tuning step `step`."""
    members, params_M = members_at_step(cfg, out, final, step, start_M)
    run = dataclasses.replace(final, table=members, params=params_M)
    pairs, _ = select_pairs(cfg.barriers.pairs, members)
    if not run.used:
        return members, [], [], summarize(cfg, members, [], [])
    if status:
        status(f"fine-tuning step {step}:")
    measured = measure_pairs(cfg, run, start_M, probe_M, pairs, status, progress)
    return members, measured.pairs, measured.to_start, summarize(cfg, members, measured.pairs, measured.to_start)
