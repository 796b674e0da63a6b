"""Pretraining: one model on the pretraining task, with Orbax checkpoints at `pretrain.save_steps` (the starting
points of the fine-tuning grid) and a table of their loss and accuracy."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxlmc import analysis, faults, hf, loop, models, rundir, shard, sizes, tasks, train, trainer
from jaxlmc.config import Config, ConfigError


@rundir.exclusive
def pretrain(cfg: Config, out: str, progress: loop.Progress | None = None,
             task: tasks.Task | None = None, revisions: dict[int, dict] | None = None) -> list[dict]:
    """Pretrain one model on the pretraining task; save Orbax checkpoints at `pretrain.save_steps`.

    Resumes from the latest checkpoint in the run directory. Returns one row per saved checkpoint with its train/test
    loss and accuracy (also written to pretrain/checkpoints.csv). With model.pretrained the released revisions are
    imported instead (`revisions`: already read by check_revisions; None: read here).
    """
    p = cfg.pretrain
    run = rundir.RunDir(out)
    if task is None:
        if cfg.model.pretrained:
            tasks.check_pretrained(cfg)  # before any data
        task = tasks.load_pretrain_task(cfg)  # before the run directory: bad data leaves nothing behind
    model = models.build(cfg.model, task.input_shape, task.train.num_classes, task.per_token)
    if cfg.model.pretrained:  # released revisions: nothing is trained
        return import_revisions(cfg, run, model, task, revisions)
    if p.batch_size > len(task.train.y):
        raise ConfigError(f"pretrain.batch_size {p.batch_size} exceeds the {len(task.train.y)} training examples")
    sizes.check_pretraining(cfg, model, task)
    run.open(cfg)
    keys = train.stream_keys("pretrain", [p.seed])
    params_1 = jax.tree.map(lambda a: a[None], model.init(keys["init"][0]))
    consts = {
        "lr": jnp.asarray(train.lr_table([p.lr], [p.schedule], p.steps, p.warmup_steps)),
        "wd": jnp.asarray([p.weight_decay], jnp.float32),
        "data_key": keys["data"],
    }
    n_train = len(task.train.y)
    # One process: the model lives on one device. Several: it is replicated over all of them, so that it is one
    # global array that Orbax saves once.
    mesh = shard.global_mesh()
    state = shard.replicate(train.init_state(params_1, p.optimizer, p.momentum, n_train), mesh)
    consts = shard.replicate(consts, mesh)
    abstract = shard.abstract(state)
    save_at = set(p.save_steps) | set(range(cfg.run.checkpoint_every, p.steps, cfg.run.checkpoint_every))
    chunk_fn = train.make_train_chunk(model, p.optimizer, p.momentum, p.batch_size, n_train, cfg.run.chunk_steps,
                                      member_group=cfg.run.member_group, compute_dtype=cfg.run.compute_dtype)
    device_data = shard.replicate({"x": jnp.asarray(task.train.x), "y": jnp.asarray(task.train.y)}, mesh)
    with run.checkpoints(rundir.PRETRAIN_CHECKPOINTS, keep_steps=p.save_steps) as manager:
        on_disk = manager.steps()
        try:
            trainer.train_resumable(
                "pretrain", manager, state, chunk_fn, consts, device_data, p.steps, cfg.run.chunk_steps, save_at,
                run.curves_file(rundir.PRETRAIN_CURVES), required=p.save_steps, save_start=0 in p.save_steps,
                progress=progress, halt_on_divergence=True,
                on_resume=lambda latest: _say_what_is_retrained(cfg, run, manager.directory, on_disk, latest))
        except faults.Diverged as diverged:
            kept = [s for s in sorted(set(p.save_steps)) if s < diverged.step and s in manager.steps()]
            rows = _checkpoint_rows(cfg, model, task, manager, kept, abstract, mesh)
            run.write_csv(rundir.PRETRAIN, rows + [{"step": diverged.step, "diverged": True}])
            last = max([s for s in manager.steps() if s < diverged.step], default=None)
            raise faults.Diverged(
                f"pretraining diverged at step {diverged.step} of {p.steps} (its loss or parameters stopped being "
                f"finite; pretrain.optimizer {p.optimizer!r}, pretrain.lr {p.lr:g}): lower pretrain.lr or add "
                f"pretrain.warmup_steps; {'no checkpoint' if last is None else f'checkpoints up to step {last}'} "
                f"kept, flagged in {rundir.PRETRAIN.path}", step=diverged.step, saved=last) from None
        # Evaluate every kept checkpoint (also those saved before a resume) so the table is complete.
        rows = _checkpoint_rows(cfg, model, task, manager, sorted(set(p.save_steps) | {p.steps}), abstract, mesh)
    run.write_csv(rundir.PRETRAIN, rows)
    if task.per_token:
        run.write_csv(rundir.BASELINES, analysis.ngram_baselines(task.train.x, task.train.y, task.test.x, task.test.y,
                                                                 task.train.num_classes))
    return rows


def load_revisions(cfg: Config, model: models.Model, task: tasks.Task) -> dict[int, dict]:
    """{step: parameters} of every released revision (model.pretrained, finetune.pretrain_revisions), each read and
    checked against the config and the model the pretraining task implies: one ConfigError line naming the revision."""
    abstract = jax.eval_shape(model.init, jax.random.key(0))
    loaded = {}
    for step, revision in zip(cfg.finetune.pretrain_steps, cfg.finetune.pretrain_revisions):
        source, branch = hf.revision_source(cfg.model.pretrained, revision)
        try:
            args, params = hf.LOADERS[cfg.model.kind](source, branch)
        except hf.CheckpointError as err:
            raise ConfigError(f"model.pretrained, revision {revision}: {err}") from None
        args = dataclasses.replace(args, remat=cfg.model.args.remat)  # a memory setting, not the architecture
        if args != cfg.model.args:
            differ = [f"{f.name} {getattr(cfg.model.args, f.name)!r} (checkpoint: {getattr(args, f.name)!r})"
                      for f in dataclasses.fields(args) if getattr(args, f.name) != getattr(cfg.model.args, f.name)]
            raise ConfigError(f"model.args differ from revision {revision}'s config: {'; '.join(differ)}")
        shapes = jax.tree.map(lambda a: tuple(np.shape(a)), params)
        if shapes != jax.tree.map(lambda a: a.shape, abstract):
            raise ConfigError(f"revision {revision}'s parameters do not fit the model the pretraining task "
                              f"{cfg.data.pretrain_task!r} implies ({task.train.num_classes} classes per position)")
        loaded[step] = params
    return loaded


def check_sources(cfg: Config, out: str) -> None:
    """Before any data are prepared: with model.pretrained and its import unfinished in `out`, every revision is there
    (tasks.check_pretrained). A finished run needs none of them again: its starts are its own checkpoints."""
    if cfg.model.pretrained and not pretraining_complete(cfg, out):
        tasks.check_pretrained(cfg)


def check_revisions(cfg: Config, out: str, task: tasks.Task) -> dict[int, dict] | None:
    """Before a run directory is written: with model.pretrained and its import unfinished in `out`, every revision
    read and checked (`load_revisions`; returned, for `pretrain` to import), so that a checkpoint error leaves nothing
    behind. None when there is nothing to import."""
    if cfg.model.pretrained and not pretraining_complete(cfg, out):
        return load_revisions(cfg, models.build(cfg.model, task.input_shape, task.train.num_classes, task.per_token),
                              task)
    return None


def import_revisions(cfg: Config, run: rundir.RunDir, model: models.Model, task: tasks.Task,
                     loaded: dict[int, dict] | None = None) -> list[dict]:
    """The released revisions (model.pretrained, finetune.pretrain_revisions) as the pretraining checkpoints at the
    steps they stand for, so that everything downstream starts from them as from jaxlmc's own; their evaluation on
    the pretraining task in pretrain/checkpoints.csv. A revision already imported (and intact) is not read again."""
    p = cfg.pretrain
    revisions = dict(zip(cfg.finetune.pretrain_steps, cfg.finetune.pretrain_revisions))
    if loaded is None:  # (read and checked already by the caller: check_revisions)
        loaded = load_revisions(cfg, model, task)  # every revision is checked before the run directory is touched
    run.open(cfg)
    mesh = shard.global_mesh()
    state_of = lambda params: shard.replicate(train.init_state(  # noqa: E731
        jax.tree.map(lambda a: jnp.asarray(a)[None], params), p.optimizer, p.momentum, len(task.train.y)), mesh)
    with run.checkpoints(rundir.PRETRAIN_CHECKPOINTS, keep_steps=p.save_steps) as manager:
        have = manager.verified_steps()
        for step, params in loaded.items():
            if step not in have:
                manager.save(step, state_of(params))
        template = shard.abstract(state_of(next(iter(loaded.values()))))
        rows = _checkpoint_rows(cfg, model, task, manager, sorted(loaded), template, mesh)
    for row in rows:
        row["revision"] = revisions[row["step"]]
    run.write_csv(rundir.PRETRAIN, rows)
    return rows


def _checkpoint_rows(cfg: Config, model, task: tasks.Task, manager, steps: list[int], abstract, mesh) -> list[dict]:
    """Train and test loss and accuracy of the pretraining checkpoints at `steps`."""
    evaluate = train.make_evaluate(model)
    sets = tasks.eval_sets(cfg, task)
    rows = []
    for step in steps:
        params = manager.restore(step, abstract)["params"]
        row = {"step": step, "diverged": False}
        for name in ("train", "test"):
            loss, acc = map(shard.to_host, evaluate(params, shard.replicate(sets[name], mesh)))
            row.update({f"{name}_loss": float(loss[0]), f"{name}_acc": float(acc[0])})
        rows.append(row)
    return rows


def _say_what_is_retrained(cfg: Config, run: rundir.RunDir, directory: str, on_disk: list[int],
                           latest: int | None) -> None:
    """One line when pretraining runs again to recreate checkpoints that were there before (deleted by hand, say):
    which, and from where. Steps beyond the newest one on disk of an unfinished pretraining are just its rest."""
    p = cfg.pretrain
    finished = run.exists(rundir.PRETRAIN) and not any(r.get("diverged") for r in run.read_csv(rundir.PRETRAIN))
    horizon = p.steps if finished else max(on_disk, default=-1)
    gone = [s for s in sorted(set(p.save_steps) | {p.steps}) if s <= horizon and s not in on_disk]
    if gone:
        faults.notify(f"pretraining checkpoint(s) at step(s) {', '.join(map(str, gone))} missing from {directory}; "
                      f"pretraining again from {'the start' if latest is None else f'step {latest}'} to recreate "
                      "them")


def pretraining_complete(cfg: Config, out: str) -> bool:
    """Every checkpoint pretraining keeps (pretrain.save_steps, which fine-tuning starts from) and the last is saved
    and intact (corrupt ones are moved aside, so pretraining runs again from the newest intact step before them)."""
    run = rundir.RunDir(out)
    if not run.exists(rundir.PRETRAIN_CHECKPOINTS):
        return False
    with run.checkpoints(rundir.PRETRAIN_CHECKPOINTS, read_only=True) as manager:
        steps = manager.verified_steps()
    return all(s in steps for s in [*cfg.pretrain.save_steps, *cfg.finetune.pretrain_steps, cfg.pretrain.steps])
