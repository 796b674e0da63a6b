"""Fine-tuning members with Pythia's exact shapes: member-steps/s, memory per member, and the largest N that fits.

The model is the gpt_neox kind with the shapes of a Pythia checkpoint (70m: hidden 512, 6 blocks, 8 heads, MLP 2048,
vocabulary 50,304, rotary on a quarter of each head; 14m; or "tiny" to rehearse on a CPU), randomly initialised (the
cost does not depend on the values; no hub, no TFDS), fine-tuned as a sequence classifier (a new 2-class head on the
last token in place of the language-modelling head: 44.7M parameters for 70m's shapes) with AdamW on random token
sequences — the study's fine-tuning program (`train.make_train_chunk`). For each N, side by side in this one run:

* vmapped — N members in one compiled chunk (`lax.scan` over steps, state donated);
* one — the same program for a single member, whose member-steps/s the vmapped ones are compared against;
* memory — XLA's memory analysis of the compiled chunk (arguments + outputs + scratch) at 1 and 2 members: memory is
  affine in N, so its slope is the memory per member and the free device memory gives the largest N that fits
  (`jaxlmc.memory.largest_fit`, as the study sizes its parts).

    python -m bench.bench_pythia [--shape 70m] [--members 1 8 32] [--steps 20] [--chunk 10] [--context 128]
                                 [--batch 32] [--dtype bfloat16] [--remat] [--out bench/results/pythia.json]
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench._record import write_record
from bench.bench_train import setup
from jaxlmc import memory, models, train
from jaxlmc.models.gpt_neox import GPTNeoXArgs
from jaxlmc.settings import ModelConfig

SHAPES = {  # Pythia's config.json values (EleutherAI/pythia-70m, -14m); "tiny" rehearses the script on a CPU
    "70m": GPTNeoXArgs(vocab_size=50304, hidden_size=512, num_hidden_layers=6, num_attention_heads=8,
                       intermediate_size=2048, rotary_pct=0.25),
    "14m": GPTNeoXArgs(vocab_size=50304, hidden_size=128, num_hidden_layers=6, num_attention_heads=4,
                       intermediate_size=512, rotary_pct=0.25),
    "tiny": GPTNeoXArgs(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=256, rotary_pct=0.25),
}
N_TRAIN, CLASSES = 2048, 2


def member_steps_per_s(chunk_fn, model, n: int, data, steps: int, chunk: int) -> float:
    state, consts = setup(model, n, N_TRAIN)
    state, loss, _ = chunk_fn(state, consts, data, chunk)  # compile and warm up
    loss.block_until_ready()
    start = time.perf_counter()
    for _ in range(steps // chunk):
        state, loss, _ = chunk_fn(state, consts, data, chunk)
    loss.block_until_ready()
    return n * (steps // chunk) * chunk / (time.perf_counter() - start)


def compiled_bytes(chunk_fn, model, n: int, data, chunk: int) -> int | None:
    """Arguments + outputs + scratch of the compiled chunk for n members (None where the backend gives no analysis)."""
    state, consts = jax.eval_shape(lambda: setup(model, n, N_TRAIN))
    analysis = chunk_fn.lower(state, consts, jax.eval_shape(lambda: data), chunk).compile().memory_analysis()
    if analysis is None:
        return None
    return analysis.temp_size_in_bytes + analysis.argument_size_in_bytes + analysis.output_size_in_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="70m")
    parser.add_argument("--members", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per run (after one warm-up chunk)")
    parser.add_argument("--chunk", type=int, default=10)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    parser.add_argument("--remat", action="store_true", help="gradient checkpointing of the blocks")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "pythia.json"))
    args = parser.parse_args()

    shape = dataclasses.replace(SHAPES[args.shape], remat=args.remat)
    model = models.build(ModelConfig(kind="gpt_neox", args=shape), (args.context,), CLASSES)
    num_params = models.param_count(jax.eval_shape(model.init, jax.random.key(0)))
    rng = np.random.default_rng(0)
    data = {"x": jnp.asarray(rng.integers(0, shape.vocab_size, (N_TRAIN, args.context)).astype(np.float32)),
            "y": jnp.asarray(rng.integers(0, CLASSES, N_TRAIN).astype(np.int32))}
    chunk_fn = train.make_train_chunk(model, "adamw", 0.9, args.batch, N_TRAIN, args.chunk,
                                      compute_dtype=args.dtype)
    one_b, two_b = (compiled_bytes(chunk_fn, model, n, data, args.chunk) for n in (1, 2))
    per_member = None if one_b is None else two_b - one_b
    free = memory.available_memory_bytes()
    largest = None if one_b is None else memory.largest_fit(
        lambda n: one_b + (n - 1) * per_member, 0.9 * free, limit=1 << 20)
    print(f"Pythia-{args.shape} shapes: {num_params:,} parameters; context {args.context}, batch {args.batch}, "
          f"{args.dtype}{', remat' if args.remat else ''}; {jax.devices()[0].device_kind}")
    if per_member is not None:
        print(f"compiled chunk: {one_b / 2**30:.2f} GiB at 1 member, {per_member / 2**30:.2f} GiB per further member; "
              f"largest N in 90% of {free / 2**30:.1f} GiB free: {largest}")
    one = member_steps_per_s(chunk_fn, model, 1, data, args.steps, args.chunk)
    rows = []
    for n in args.members:
        rate = one if n == 1 else member_steps_per_s(chunk_fn, model, n, data, args.steps, args.chunk)
        rows.append({"members": n, "member_steps_per_s": rate, "vs_one_member": rate / one,
                     "tokens_per_s": rate * args.batch * args.context})
        print(f"N={n:5d}  {rate:10.2f} member-steps/s  ({rate / one:5.2f}× one member's)  "
              f"{rate * args.batch * args.context:,.0f} tokens/s")
    write_record(args.out, "pythia", shape=args.shape, args=vars(args), parameters=num_params,
                 compiled_bytes_one_member=one_b, bytes_per_member=per_member, free_bytes=free,
                 largest_members=largest, rows=rows)


if __name__ == "__main__":
    main()
