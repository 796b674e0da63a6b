"""The functional core of the vectorised trainer.

Everything here is a pure function over pytrees whose leaves carry a leading member axis M:

    state  = {"params": params_M, "opt": opt_state_M, "perm": perm_MxN, "diverged": diverged_M, "step": ()}
    consts = {"lr": lr_MxT, "wd": wd_M, "data_key": data_key_M,          # per-member hyperparameters, never donated
              "dropout": dropout_M, "noise_key": noise_key_M}           #   (the last two only if a member drops)
    data   = {"x": x_NxF…, "y": y_N}                                    # device-resident training split

The constants are built from the grid's declarations (jaxlmc.grid.member_consts). One member's update is written for
a single model and `jax.vmap`-ed over M, with the member's slice of the whole `consts` pytree; a chunk of steps is a
`lax.scan` inside one jit-compiled function that donates the state. The step counter is shared by all members (it is not batched),
so "start a new epoch" is a real `lax.cond`, not a select evaluated for every member on every step.
"""
from __future__ import annotations

import glob
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import PartitionSpec

from jaxlmc import optimizers, shard
from jaxlmc.models import Model, mup, tree_l2


def make_tx(kind: str, momentum: float, lr, weight_decay) -> optax.GradientTransformation:
    """One member's optimiser, by its registered name (jaxlmc.optimizers). `lr` and `weight_decay` may be traced
    scalars (per member, per step)."""
    return optimizers.make(kind, momentum, lr, weight_decay)


def schedule(kind: str, peak_lr: float, steps: int, warmup_steps: int) -> optax.Schedule:
    """An optax schedule: linear warm-up from 0 over `warmup_steps`, then constant, cosine or linear decay to 0."""
    decay_steps = max(steps - warmup_steps, 1)
    main = {
        "constant": optax.constant_schedule(peak_lr),
        "cosine": optax.cosine_decay_schedule(peak_lr, decay_steps),
        "linear": optax.linear_schedule(peak_lr, 0.0, decay_steps),
    }[kind]
    if warmup_steps == 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, peak_lr, warmup_steps), main], [warmup_steps])


def lr_table(peak_lrs: list[float], kinds: list[str], steps: int, warmup_steps: int) -> np.ndarray:
    """lr_MxT: every member's learning rate at every step, evaluated once on the host from optax schedules."""
    t = np.arange(max(steps, 1))
    return np.stack([np.broadcast_to(np.asarray(schedule(k, lr, steps, warmup_steps)(t), np.float32), t.shape)
                     for lr, k in zip(peak_lrs, kinds)])


# Every random stream jaxlmc draws, by phase. A phase's streams of seed s are fold_in(fold_in(key(s), phase), stream):
# pretraining with seed 0 and fine-tuning seed 0 never share a key (they did once: the pretrained body's init key was
# fine-tuning seed 0's head key). "shared" holds the one head every member of a `shared`-head cell starts from.
STREAMS: dict[str, tuple[str, ...]] = {
    "pretrain": ("init", "data"),
    "finetune": ("head", "data", "noise", "init"),
    "shared": ("head",),
}


def stream_keys(phase: str, seeds) -> dict:
    """{stream: keys_S}: the key streams of `phase` for each seed (see STREAMS)."""
    phase_index = list(STREAMS).index(phase)
    base = jax.vmap(lambda s: jax.random.fold_in(jax.random.key(s), phase_index))(jnp.asarray(seeds, jnp.uint32))
    return {name: jax.vmap(lambda k, i=i: jax.random.fold_in(k, i))(base) for i, name in enumerate(STREAMS[phase])}


def member_keys(seeds, offset: int = 0) -> dict:
    """Isolated randomness of fine-tuning members: separate key streams for head initialisation, data order, other
    noise (dropout), and the whole initialisation of from-scratch controls; seed s draws from key s + `offset`
    (finetune.seed_offset)."""
    return stream_keys("finetune", [s + offset for s in seeds])


def shared_head_key(offset: int = 0):
    """The key of the one head every member of a `shared`-head cell starts from."""
    return stream_keys("shared", [offset])["head"]


def init_state(params_M: dict, opt_kind: str, momentum: float, n_train: int) -> dict:
    num_members = jax.tree.leaves(params_M)[0].shape[0]
    opt_M = jax.vmap(make_tx(opt_kind, momentum, 0.0, 0.0).init)(params_M)
    return {
        "params": params_M,
        "opt": opt_M,
        "perm": jnp.zeros((num_members, n_train), jnp.int32),  # filled at step 0 (a new epoch)
        "diverged": jnp.zeros((num_members,), bool),
        "step": jnp.zeros((), jnp.int32),
    }


def cross_entropy(logits_BxC, y_B):
    """Cross-entropy per label; a per-position label below 0 (jaxlmc.tokens.IGNORED: a masked language model's
    unmasked positions) contributes 0."""
    if y_B.ndim < 2:  # one class per example: always a real one (and the computation stays what it always was)
        return optax.softmax_cross_entropy_with_integer_labels(logits_BxC, y_B)
    return jnp.where(y_B >= 0, optax.softmax_cross_entropy_with_integer_labels(logits_BxC, jnp.maximum(y_B, 0)), 0.0)


def per_example(value_BxT, y_BxT):
    """A per-position value (loss, error) as each example's mean over its counted positions (labels ≥ 0); an example
    without any scores 0. Per-example values pass through."""
    if y_BxT.ndim < 2:
        return value_BxT
    counted = (y_BxT >= 0).reshape(y_BxT.shape[0], -1)
    total = jnp.where(counted, value_BxT.reshape(counted.shape), 0.0).sum(axis=1)
    return total / jnp.maximum(counted.sum(axis=1), 1)


def mean_loss(logits_BxC, y_B):
    """The mean cross-entropy over counted labels (every class label; per-position labels ≥ 0)."""
    if y_B.ndim < 2:
        return cross_entropy(logits_BxC, y_B).mean()
    counted = y_B >= 0
    return cross_entropy(logits_BxC, y_B).sum() / jnp.maximum(counted.sum(), 1)


def mean_accuracy(logits_BxC, y_B):
    hit = jnp.argmax(logits_BxC, -1) == y_B
    if y_B.ndim < 2:
        return hit.mean()
    counted = y_B >= 0
    return (hit & counted).sum() / jnp.maximum(counted.sum(), 1)


def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)]))


def _cache_bytes() -> int:
    """The size of the CPU's last-level cache as Linux reports it (sysfs), or 32 MiB where it does not."""
    sizes = {}
    for index in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*"):
        try:
            with open(os.path.join(index, "level")) as f, open(os.path.join(index, "size")) as g:
                level, size = int(f.read()), g.read().strip()
        except (OSError, ValueError):
            continue
        units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
        if size[:-1].isdigit() and size[-1] in units:
            sizes[level] = int(size[:-1]) * units[size[-1]]
    return sizes[max(sizes)] if sizes else 32 << 20


# Members per group on a CPU (`member_group_size`). `python -m bench.bench_groups` (one run, 2-core CPU,
# bench/results/groups.json): for `python -m bench`'s MLP 2×256, 8 is the best of 2, 4, 8, 16 (1.29× one group at
# N = 32, 2.21× at N = 512); for the small transformer every group beats one group at N = 64 (1.07–1.24×; 2 best in
# that run, 8 best in an earlier one: the ordering between sizes is within its run-to-run noise).
CPU_MEMBER_GROUP = 8
# One device per core (`cpu_member_mesh`): smaller groups win (`python -m bench.bench_groups`, 2-core CPU,
# 2026-12-04: groups of 2 gave the MLP 2×256 1.06–1.12× groups of 8 at N = 32, 128; groups of 1, 0.75–0.81×).
CORE_MEMBER_GROUP = 2


def member_group_size(num_members: int, state_bytes_per_member: int, requested: int = 0) -> int:
    """How many members a chunk trains together before moving on to the next group (`make_train_chunk`).

    `requested` > 0: the largest divisor of the member count not above it. 0 (auto): on one CPU device,
    CPU_MEMBER_GROUP, or fewer when their training state (parameters, gradients, optimiser state) would fill more
    than half of the last-level cache, so that a group stays in the cache for a whole chunk of steps instead of
    streaming through memory at every step (`python -m bench.profile_step`); on a CPU split into one device per core
    (`cpu_member_mesh`: `num_members` is then one device's share), CORE_MEMBER_GROUP; on accelerators all of them.
    """
    if requested <= 0:
        if jax.default_backend() != "cpu":
            return num_members
        requested = (CORE_MEMBER_GROUP if jax.device_count() > 1 else
                     max(1, min(CPU_MEMBER_GROUP, _cache_bytes() // 2 // max(state_bytes_per_member, 1))))
    return max(g for g in range(1, min(requested, num_members) + 1) if num_members % g == 0)


def cpu_member_mesh(num_members: int):
    """The mesh a chunk splits its members over when the CPU is several devices (`jax_num_cpu_devices`, one per
    core: `shard.use_cpu_cores`), so that each core trains its own members' groups; None on one device, on
    accelerators (where XLA partitions the vmapped step itself) and for a member count no device count divides."""
    if jax.default_backend() != "cpu" or jax.device_count() == 1:
        return None
    return shard.member_mesh(num_members)


def group_of(state: dict, requested: int = 0) -> int:
    """`member_group_size` for a training state: per member, its parameters and optimiser state, and gradients
    (counted as half as much again)."""
    num_members = state["diverged"].shape[0]
    per_member = sum(leaf.size // num_members * leaf.dtype.itemsize
                     for leaf in jax.tree.leaves((state["params"], state["opt"])))
    return member_group_size(num_members, per_member + per_member // 2, requested)


def make_train_chunk(model: Model, opt_kind: str, momentum: float, batch_size: int, n_train: int,
                     chunk_steps: int, member_group: int = 0, compute_dtype: str = "float32"):
    """jit(state, consts, data, n_active) -> (state, loss_LxM, acc_LxM): up to `chunk_steps` steps of every member.

    Steps past `n_active` are skipped (a real cond on the shared step index), so chunks of any length up to
    `chunk_steps` reuse one compiled program. The returned metrics are the training-batch loss and accuracy of each
    member at each step (NaN for skipped steps). When `consts` holds "dropout" (and "noise_key"), each member drops
    hidden units at its own rate, with masks from its own key stream folded with the step; without it (no member
    uses dropout) the program draws no masks at all. The pytree's structure is static, so this is decided at trace
    time.

    `compute_dtype` "bfloat16" runs the training pass on bfloat16 copies of the parameters; the parameters and the
    optimiser state stay float32 (mixed precision with float32 master weights).

    Members are independent, so a chunk may run group after group of them (`member_group_size`: G members, all
    `chunk_steps` steps, then the next G) instead of all M members step after step: on a CPU a group's state then
    stays in the cache for the whole chunk. A member does the same arithmetic in any grouping, but XLA may pick
    other kernels for another batch shape: bit for bit equal in the tests' small model, equal to float rounding (which
    training then amplifies, as it does across machines) in the default study. On a CPU that is one device per core
    (`cpu_member_mesh`) the members are split over the devices with `jax.shard_map`, each running its own groups.
    """
    steps_per_epoch = n_train // batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"batch size {batch_size} exceeds the {n_train} training examples")

    dtype = jnp.dtype(compute_dtype)
    # Per-parameter factors of the update (µP's per-layer rates); None when every parameter trains at the member's rate.
    scale = (mup.update_factors(model, optimizers.update_rule(opt_kind))
             if mup.width_ratio(model.cfg) != 1.0 else None)

    def loss_fn(params, x_BxF, y_B, drop):
        # Mixed precision: the pass on low-precision copies (the cast is differentiated, so gradients arrive in
        # float32 for float32 parameters), the loss in float32. Inputs are not cast: token ids stay exact.
        if dtype != jnp.float32:
            params = jax.tree.map(lambda a: a.astype(dtype), params)
        logits_BxC = model.apply(params, x_BxF, drop).astype(jnp.float32)
        return mean_loss(logits_BxC, y_B), mean_accuracy(logits_BxC, y_B)

    def member_update(params, opt, perm_N, diverged, hp, step, x_all, y_all):
        """One member's step; `hp` is its slice of the per-member constants."""
        idx_B = lax.dynamic_slice_in_dim(perm_N, (step % steps_per_epoch) * batch_size, batch_size)
        drop = (hp["dropout"], jax.random.fold_in(hp["noise_key"], step)) if "dropout" in hp else None
        (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, x_all[idx_B], y_all[idx_B], drop)
        # A member whose loss or gradients stop being finite is frozen and flagged: its parameters stay bit for bit
        # at their last finite values, and its optimiser sees zero gradients (no NaN reaches its state). Decided
        # before the update, so the freeze fuses into it: deciding it from the new parameters instead cost a
        # second pass over the state, 15 % of the step (`python -m bench.profile_step`); an update that overflows a
        # finite parameter shows in the next step's loss. Per member, so nothing leaks into the others.
        frozen = diverged | ~(jnp.isfinite(loss) & _all_finite(grads))
        grads = jax.tree.map(lambda g: jnp.where(frozen, jnp.zeros_like(g), g), grads)
        updates, new_opt = make_tx(opt_kind, momentum, hp["lr"][step], hp["wd"]).update(grads, opt, params)
        if scale is not None:
            updates = jax.tree.map(lambda u, s: u * s, updates, scale)
        new_params = jax.tree.map(lambda p, u: jnp.where(frozen, p, p + u.astype(p.dtype)), params, updates)
        # The step where a member froze reports a NaN loss even when only its gradients were not finite: the curves
        # and the host (which halts a pretraining) see where it diverged.
        loss = jnp.where(frozen & ~diverged, jnp.nan, loss)
        return new_params, new_opt, frozen, loss, acc

    def one_step(state, consts, data):
        step = state["step"]
        epoch = step // steps_per_epoch

        def new_order():
            return jax.vmap(lambda k: jax.random.permutation(jax.random.fold_in(k, epoch), n_train))(
                consts["data_key"]).astype(jnp.int32)

        perm_MxN = lax.cond(step % steps_per_epoch == 0, new_order, lambda: state["perm"])
        def member(params, opt, perm_N, diverged, hp):  # every argument carries the member axis; step and data do not
            return member_update(params, opt, perm_N, diverged, hp, step, data["x"], data["y"])

        params, opt, diverged, loss_M, acc_M = jax.vmap(member)(state["params"], state["opt"], perm_MxN,
                                                                state["diverged"], consts)
        new_state = {"params": params, "opt": opt, "perm": perm_MxN, "diverged": diverged, "step": step + 1}
        return new_state, (loss_M, acc_M)

    def all_steps(state, consts, data, n_active):
        num_members = state["diverged"].shape[0]
        skipped = (jnp.full((num_members,), jnp.nan), jnp.full((num_members,), jnp.nan))

        def body(state, i):
            return lax.cond(i < n_active, lambda s: one_step(s, consts, data), lambda s: (s, skipped), state)

        state, (loss_LxM, acc_LxM) = lax.scan(body, state, jnp.arange(chunk_steps))
        return state, loss_LxM, acc_LxM

    def chunk(state, consts, data, n_active):
        mesh = cpu_member_mesh(state["diverged"].shape[0])
        if mesh is None:
            return grouped(state, consts, data, n_active)
        members, same = PartitionSpec(shard.MEMBERS), PartitionSpec()
        state_specs = {key: same if key == "step" else members for key in state}
        per_step = PartitionSpec(None, shard.MEMBERS)
        split = jax.shard_map(grouped, mesh=mesh, in_specs=(state_specs, members, same, same),
                              out_specs=(state_specs, per_step, per_step), check_vma=False)
        return split(state, consts, data, n_active)

    def grouped(state, consts, data, n_active):
        num_members = state["diverged"].shape[0]
        group = group_of(state, member_group)
        if group == num_members:
            return all_steps(state, consts, data, n_active)
        num_groups = num_members // group
        members_GxK = jax.tree.map(lambda a: a.reshape(num_groups, group, *a.shape[1:]),
                                   ({k: v for k, v in state.items() if k != "step"}, consts))

        def one_group(members):
            part, part_consts = members
            part, loss_LxK, acc_LxK = all_steps({**part, "step": state["step"]}, part_consts, data, n_active)
            return {k: v for k, v in part.items() if k != "step"}, part["step"], loss_LxK, acc_LxK

        part_G, step_G, loss_GxLxK, acc_GxLxK = lax.map(one_group, members_GxK)
        merged = jax.tree.map(lambda a: a.reshape(num_members, *a.shape[2:]), part_G)
        as_LxM = lambda a: a.transpose(1, 0, 2).reshape(chunk_steps, num_members)  # noqa: E731
        return {**merged, "step": step_G[0]}, as_LxM(loss_GxLxK), as_LxM(acc_GxLxK)

    return jax.jit(chunk, donate_argnums=0)


def batch_eval_set(x_NxF, y_N, batch_size: int, resample_weights_RxN=None) -> tuple:
    """An evaluation set padded and reshaped once, on the host, into (x_NBxBxF…, y_NBxB, mask_NBxB) device arrays.

    With `resample_weights_RxN` (e.g. bootstrap counts of the examples, `resample_counts`) a fourth array
    weights_NBxBxR comes along, and `loss_and_error` also returns the R reweighted means: the same evaluation under R
    resamplings of its examples, at the cost of one small matrix product per batch.
    """
    n = len(y_N)
    batch = min(batch_size, n)
    num_batches = math.ceil(n / batch)
    pad = num_batches * batch - n
    x = np.concatenate([np.asarray(x_NxF, np.float32), np.zeros((pad, *np.shape(x_NxF)[1:]), np.float32)])
    y = np.concatenate([np.asarray(y_N, np.int32), np.zeros((pad, *np.shape(y_N)[1:]), np.int32)])
    mask = np.arange(num_batches * batch) < n
    out = (jnp.asarray(x.reshape(num_batches, batch, *x.shape[1:])),
           jnp.asarray(y.reshape(num_batches, batch, *y.shape[1:])),
           jnp.asarray(mask.reshape(num_batches, batch)))
    if resample_weights_RxN is None:
        return out
    weights = np.asarray(resample_weights_RxN, np.float32)
    weights = np.concatenate([weights, np.zeros((len(weights), pad), np.float32)], axis=1)
    return (*out, jnp.asarray(weights.T.reshape(num_batches, batch, len(weights))))


def resample_counts(num_examples: int, num_resamples: int, seed: int = 0) -> np.ndarray:
    """counts_RxN: how often each example is drawn in each of R bootstrap resamples (each sums to N)."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, num_examples, (num_resamples, num_examples))
    return np.stack([np.bincount(d, minlength=num_examples) for d in draws]).astype(np.float32)


def loss_and_error(model: Model, params: dict, eval_set: tuple):
    """Mean loss and error (1 − accuracy) of one model over a batched evaluation set (lax.map over batches).

    The ensemble's evaluation vmaps this over members and the barrier pass over interpolated models. For a set with
    resample weights (`batch_eval_set`), loss and error are vectors [1 + R]: the plain mean first, then the R
    reweighted means.
    """
    x_NBxBxF, y_NBxB, mask_NBxB = eval_set[:3]
    weights_NBxBxR = eval_set[3] if len(eval_set) > 3 else None

    def batch_sums(args):
        x_BxF, y_B, mask_B, *weights = args
        logits_BxC = model.apply(params, x_BxF)
        # A per-token task (labels B×T, logits B×T×C) scores each sequence by its mean over counted positions: every
        # sequence has as many (all T; a masked-LM set masks the same number in each), so the mean over sequences is
        # the mean per token, and resampling draws sequences.
        loss_B = jnp.where(mask_B, per_example(cross_entropy(logits_BxC, y_B), y_B), 0.0)
        wrong_B = jnp.where(mask_B, per_example((jnp.argmax(logits_BxC, -1) != y_B).astype(jnp.float32), y_B), 0.0)
        if not weights:
            return loss_B.sum(), wrong_B.sum()
        return (jnp.concatenate([loss_B.sum()[None], loss_B @ weights[0]]),
                jnp.concatenate([wrong_B.sum()[None], wrong_B @ weights[0]]))

    batches = (x_NBxBxF, y_NBxB, mask_NBxB) + (() if weights_NBxBxR is None else (weights_NBxBxR,))
    loss, wrong = lax.map(batch_sums, batches)
    n_examples = mask_NBxB.sum()
    if weights_NBxBxR is None:
        return loss.sum() / n_examples, wrong.sum() / n_examples
    totals = jnp.concatenate([n_examples[None].astype(jnp.float32), weights_NBxBxR.sum(axis=(0, 1))])
    return loss.sum(axis=0) / totals, wrong.sum(axis=0) / totals


def make_evaluate(model: Model):
    """jit(params_M, eval_set) -> (loss_M, acc_M): every member on a whole evaluation set from `batch_eval_set`."""

    def evaluate(params_M, eval_set):
        loss_M, err_M = jax.vmap(loss_and_error, in_axes=(None, 0, None))(model, params_M, eval_set)
        return loss_M, 1.0 - err_M

    return jax.jit(evaluate)


@jax.jit
def distance_from(params_M: dict, start_M: dict) -> jax.Array:
    """dist_M: each member's L2 distance from its own starting point."""
    return jax.vmap(tree_l2)(params_M, start_M)


def eval_sets(named: dict[str, tuple], batch_size: int = 1000, resamples: int = 0) -> dict[str, tuple]:
    """{name: (x, y)} batched on the device once (batch_eval_set); with `resamples` > 0 each set carries that
    many bootstrap resamplings of its examples (a fixed draw per set, by its position), for the noise floors."""
    return {name: batch_eval_set(x, y, batch_size,
                                       resample_counts(len(y), resamples, seed=k) if resamples else None)
            for k, (name, (x, y)) in enumerate(named.items())}
