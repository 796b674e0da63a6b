"""Fine-tuning: every member of the grid (jaxlmc.grid) from its starting point, simultaneously, in one compiled
program (or in as few parts as memory allows); members.csv; and reading members back."""
from __future__ import annotations

import hashlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from jaxlmc import data, faults, grid, loop, models, rundir, shard, sizes, tasks, train, trainer
from jaxlmc.config import Config, ConfigError
from jaxlmc.pretraining import check_revisions, check_sources, pretrain, pretraining_complete


@rundir.exclusive
def finetune(cfg: Config, out: str, progress: loop.Progress | None = None) -> list[dict]:
    """Fine-tune every member of the grid simultaneously in one compiled program; write members.csv.

    Pretrains first if the run directory lacks the pretraining checkpoints. Resumes from the latest fine-tuning
    checkpoint. Returns the rows of members.csv.
    """
    f = cfg.finetune
    run = rundir.RunDir(out)
    # Everything that can be wrong with the inputs is checked before the run directory is touched.
    check_sources(cfg, out)
    task = tasks.load_finetune_task(cfg)
    pre_task = tasks.load_pretrain_task(cfg)
    if task.token_shape != pre_task.token_shape:  # text pairs' token types (N×T×2) aside
        raise ConfigError(f"data.finetune_task inputs {task.input_shape} differ from data.pretrain_task inputs "
                          f"{pre_task.input_shape}")
    if f.batch_size > len(task.train.y):
        raise ConfigError(f"finetune.batch_size {f.batch_size} exceeds the {len(task.train.y)} training examples")
    model = check_sizes(cfg, pre_task, task)
    revisions = check_revisions(cfg, out, pre_task)
    run.open(cfg)
    if not pretraining_complete(cfg, out):
        pretrain(cfg, out, progress=progress, task=pre_task, revisions=revisions)

    rows = grid.member_grid(cfg)
    start_M = start_params(cfg, out, model, rows, task.train)
    how = trainer.MemberTraining(f.optimizer, f.momentum, f.batch_size, f.steps, cfg.run.chunk_steps,
                                 cfg.run.member_group, cfg.run.compute_dtype, tuple(f.save_steps),
                                 cfg.run.checkpoint_every, cfg.run.max_members)
    store = trainer.MemberStore(run, rundir.CHECKPOINTS, rundir.FINETUNE_CURVES, keep_latest=2)
    state, _ = trainer.train_members(model, start_M, grid.member_consts(f, rows), task.train.x, task.train.y, how,
                                     store, progress)

    results = evaluate_members(cfg, model, task, state["params"], start_M)
    diverged = shard.to_host(state["diverged"])
    for i, r in enumerate(rows):
        r.update({k: float(v[i]) for k, v in results.items()})
        r["diverged"] = bool(diverged[i])
    new_head = f.new_head or task.train.num_classes != pre_task.train.num_classes
    for r, unfit in zip(rows, grid.unfit_flags(rows, cfg.study.unfit_fraction, chance_accuracy(cfg, task),
                                          cfg.study.fit_margin)):
        r["unfit"] = unfit
        r["seed_varies"] = grid.seed_varies(r, new_head)
    run.write_csv(rundir.MEMBERS, rows)
    return rows


def check_sizes(cfg: Config, pre_task: tasks.Task, task: tasks.Task) -> models.Model:
    """Refuse (ConfigError) a pretraining or a member grid that cannot fit in memory (jaxlmc.sizes), before anything
    is built or written; returns the fine-tuning model."""
    pre_model = models.build(cfg.model, pre_task.input_shape, pre_task.train.num_classes, pre_task.per_token)
    sizes.check_pretraining(cfg, pre_model, pre_task)
    model = models.build(cfg.model, task.input_shape, task.train.num_classes, task.per_token)
    sizes.check_finetuning(cfg, model, task)
    return model


def finetuning_complete(cfg: Config, out: str) -> bool:
    """The final fine-tuning checkpoint is saved (it may still fail its check when read: then it is moved aside and
    this turns False)."""
    run = rundir.RunDir(out)
    if not run.exists(rundir.CHECKPOINTS):
        return False
    with run.checkpoints(rundir.CHECKPOINTS, read_only=True) as manager:
        return cfg.finetune.steps in manager.steps()


def chance_accuracy(cfg: Config, task: tasks.Task) -> float:
    """The train accuracy of always predicting the most frequent label (per token for a language model), on the
    fixed train-evaluation subset the members' train accuracy is measured on."""
    return grid.chance_accuracy(task.train.y[:cfg.data.train_eval_size])


def start_params(cfg: Config, out: str, model: models.Model, rows: list[dict], train_split: data.Split,
                 heads: str | None = None) -> dict:
    """start_M: every member's starting point.

    A member's body comes from its pretraining checkpoint, or (pretrain_step -1, the scratch control) from its seed's
    own random initialisation (the seed's "init" stream: members that share a seed share it). With a new head
    (finetune.new_head, or a fine-tuning task with other classes) the head follows the member's head policy
    (`heads`, when given, overrides it for every member: the barrier stage asks for "probe", the start with a head
    that works):
      per_seed  drawn from the seed's "head" stream;
      shared    one draw for every member (the "shared" phase's stream): seeds differ in data order only;
      zero      all zeros;
      probe     a linear probe fitted on the fine-tuning training split's features of the frozen body (deterministic,
                so the members of a cell start bit-identical too).
    """
    seeds = [r["seed"] for r in rows]
    keys = train.member_keys(seeds, cfg.finetune.seed_offset)
    run = rundir.RunDir(out)
    # A body's identity: its checkpoint, or the seed of a scratch initialisation.
    body_of = [r["pretrain_step"] if r["pretrain_step"] >= 0 else ("scratch", r["seed"]) for r in rows]
    # Pretraining states have a member axis of length 1.
    bodies = {s: jax.tree.map(lambda a: a[0], run.restore_params(rundir.PRETRAIN_CHECKPOINTS, s))
              for s in sorted({b for b in body_of if not isinstance(b, tuple)})}
    for step, body in bodies.items():
        if not all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(body)):
            raise faults.Diverged(f"the pretraining checkpoint at step {step} in "
                                  f"{run.path(rundir.PRETRAIN_CHECKPOINTS)} holds non-finite parameters (its "
                                  "pretraining diverged); fine-tuning from it is refused: pretrain again in a new --out")
    scratch = sorted({b for b in body_of if isinstance(b, tuple)})
    if scratch:
        scratch_keys = train.member_keys([seed for _, seed in scratch], cfg.finetune.seed_offset)["init"]
        scratch_S = jax.tree.map(np.asarray, jax.jit(jax.vmap(model.init))(scratch_keys))
        bodies.update({b: jax.tree.map(lambda a, n=n: a[n], scratch_S) for n, b in enumerate(scratch)})

    head_shapes = jax.tree.map(lambda a: tuple(a.shape), jax.eval_shape(model.init, jax.random.key(0))["head"])
    new_head = cfg.finetune.new_head or any(jax.tree.map(lambda a: tuple(a.shape), src["head"]) != head_shapes
                                            for src in bodies.values())
    start_M = jax.tree.map(lambda *leaves: jnp.asarray(np.stack(leaves)),
                           *[{k: v for k, v in bodies[b].items() if not (new_head and k == "head")} for b in body_of])
    if not new_head:
        return start_M
    policy = [heads or r["head"] for r in rows]
    # jit lets XLA drop the body initialisation: only the heads are materialised.
    draw_heads = jax.jit(jax.vmap(lambda k: model.init(k)["head"]))
    head_M = jax.tree.map(np.array, draw_heads(keys["head"]))  # per_seed; the other policies overwrite their rows
    shared = jax.tree.map(lambda a: np.asarray(a[0]), draw_heads(train.shared_head_key(cfg.finetune.seed_offset)))
    fixed = {"shared": shared, "zero": jax.tree.map(np.zeros_like, shared)}
    need_probe = sorted({b for b, h in zip(body_of, policy) if h == "probe"}, key=str)
    if need_probe:
        body_U = jax.tree.map(lambda *leaves: jnp.asarray(np.stack(leaves)), *[
            {**bodies[b], "head": fixed["zero"]} for b in need_probe])
        head_U = fit_probe_heads(model, body_U, train_split, cfg.finetune.probe_steps, cfg.finetune.probe_l2)
        fixed.update({("probe", b): jax.tree.map(lambda a, u=u: np.asarray(a[u]), head_U)
                      for u, b in enumerate(need_probe)})
    for m, (b, h) in enumerate(zip(body_of, policy)):
        if h != "per_seed":
            chosen = fixed[("probe", b) if h == "probe" else h]
            for leaf_M, leaf in zip(jax.tree.leaves(head_M), jax.tree.leaves(chosen)):
                leaf_M[m] = leaf
    start_M["head"] = jax.tree.map(jnp.asarray, head_M)
    return start_M


# The probes a process has fitted, by a digest of everything they depend on: a study's barrier and sharpness stages
# ask for the same probes, and on a large fine-tuning split fitting them is a sizeable share of a stage.
_PROBES: dict[str, dict] = {}
_PROBES_KEPT = 4


def _probe_key(model: models.Model, params_U: dict, split: data.Split, steps: int, l2: float) -> str:
    digest = hashlib.sha256(repr((model.kind, model.cfg, model.input_shape, model.num_classes, model.per_token,
                                  jax.tree.structure(params_U), steps, l2, split.num_classes)).encode())
    for leaf in (*jax.tree.leaves(params_U), split.x, split.y):
        array = np.ascontiguousarray(np.asarray(leaf))
        digest.update(repr((array.dtype, array.shape)).encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def fit_probe_heads(model: models.Model, params_U: dict, split: data.Split, steps: int, l2: float) -> dict:
    """head_U: for each of U bodies, the linear head (kernel D×C, bias C) minimising the mean cross-entropy on the
    split's features of the frozen body plus l2·‖kernel‖², by `steps` full-batch L-BFGS iterations from zero. The
    same bodies, split and settings again in one process return the heads fitted the first time."""
    key = _probe_key(model, params_U, split, steps, l2)
    if key not in _PROBES:
        if len(_PROBES) >= _PROBES_KEPT:
            _PROBES.pop(next(iter(_PROBES)))
        _PROBES[key] = jax.tree.map(np.asarray, _fit_probe_heads(model, params_U, split, steps, l2))
    return jax.tree.map(jnp.asarray, _PROBES[key])


def _fit_probe_heads(model: models.Model, params_U: dict, split: data.Split, steps: int, l2: float) -> dict:
    if set(jax.eval_shape(model.init, jax.random.key(0))["head"]) != {"kernel", "bias"}:
        raise TypeError(f"model kind {model.kind.name!r}: its head is not a linear layer (kernel, bias)")
    x, y = jnp.asarray(split.x), jnp.asarray(split.y)
    num_classes = split.num_classes

    def fit(params):
        features_NxD = model.features(params, x)
        head = {"kernel": jnp.zeros((features_NxD.shape[-1], num_classes)), "bias": jnp.zeros((num_classes,))}

        def objective(h):
            logits = features_NxD @ h["kernel"] + h["bias"][None]
            return train.cross_entropy(logits, y).mean() + l2 * jnp.sum(jnp.square(h["kernel"]))

        solver = optax.lbfgs()
        value_and_grad = optax.value_and_grad_from_state(objective)

        def step(carry, _):
            h, state = carry
            value, grad = value_and_grad(h, state=state)
            updates, state = solver.update(grad, state, h, value=value, grad=grad, value_fn=objective)
            return (optax.apply_updates(h, updates), state), None

        (head, _), _ = lax.scan(step, (head, solver.init(head)), None, length=steps)
        return head

    return jax.jit(jax.vmap(fit))(params_U)


def evaluate_members(cfg: Config, model: models.Model, task: tasks.Task, params_M, start_M) -> dict[str, np.ndarray]:
    """Per-member train (fixed subset) / test / OOD / validation loss and accuracy (NaN for a set the task lacks),
    and distance from the starting point."""
    out = {}
    evaluate = train.make_evaluate(model)
    mesh = shard.mesh_of(params_M)  # evaluation data replicated beside sharded members
    for name, eval_set in tasks.eval_sets(cfg, task, validation=True).items():
        loss_M, acc_M = evaluate(params_M, shard.replicate(eval_set, mesh))
        out[f"{name}_loss"], out[f"{name}_acc"] = shard.to_host(loss_M), shard.to_host(acc_M)
    for name in ("ood", "val"):
        if f"{name}_acc" not in out:
            nan = np.full(len(out["test_acc"]), np.nan)
            out[f"{name}_loss"], out[f"{name}_acc"] = nan, nan
    out["dist_from_init"] = shard.to_host(train.distance_from(params_M, shard.shard_members(start_M, mesh)))
    return out


def load_member(out: str, index: int, step: int | None = None) -> dict:
    """One fine-tuned member's parameters (host arrays) from a run directory's latest (or given) checkpoint."""
    params_M = rundir.RunDir(out).restore_params(rundir.CHECKPOINTS, step)
    num_members = jax.tree.leaves(params_M)[0].shape[0]
    if not 0 <= index < num_members:
        raise IndexError(f"member {index} out of range: the run has {num_members} members")
    return jax.tree.map(lambda a: a[index], params_M)
