"""The one resumable trainer: pretraining, fine-tuning (in one program or in parts) and the library's checkpointed
`fit` all train through `train_resumable`.

It restores the newest intact checkpoint (jaxlmc.ckpt) into the prepared state, restores the training curves cut
back to that step, trains the rest in compiled chunks (jaxlmc.loop), and saves at the requested steps and at the end
— the curves first, so that after a kill they are at most ahead of the checkpoint, never behind. Rerun after an
interruption, it continues bit for bit as if it had never stopped.
"""
from __future__ import annotations

from typing import Callable, Iterable

from jaxlmc import loop, shard


def train_resumable(label: str, manager, state, chunk_fn, consts, device_data, steps: int, chunk_steps: int,
                    save_at: Iterable[int], curves_file: loop.TrainingCurvesFile, *, required: Iterable[int] = (),
                    save_start: bool = False, progress: loop.Progress | None = None, halt_on_divergence: bool = False,
                    on_resume: Callable[[int | None], None] | None = None) -> tuple[dict, loop.TrainingCurves]:
    """(state at `steps`, its training curves): `state` (initialised and sharded by the caller) restored from
    `manager`'s newest intact checkpoint — one that lacks a step of `required` is not a complete run to resume
    from —, then trained to `steps` with `chunk_fn` under a progress bar named `label`, saved at `save_at` and at the
    end. `save_start`: a fresh state is saved at step 0 too (a starting point others read). `on_resume(latest)` is
    told the step training resumes from (None: a fresh start) before it trains."""
    latest, restored = manager.resume(shard.abstract(state), required=list(required))
    state = state if restored is None else restored
    if on_resume is not None:
        on_resume(latest)
    curves = loop.TrainingCurves.from_arrays(curves_file.read() if latest is not None else None, upto=latest or 0)
    num_members = state["diverged"].shape[0]

    def save(step, state, curves):
        curves_file.write(curves.arrays(num_members))  # first: ahead of the checkpoint, never behind
        manager.save(step, state)

    if latest is None and save_start:
        save(0, state, curves)
    if latest != steps:
        state = loop.train_to(label, chunk_fn, state, consts, device_data, steps, chunk_steps, set(save_at), save,
                              progress, curves, halt_on_divergence)
    return state, curves
