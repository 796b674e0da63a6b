"""Transformer training throughput: jaxlmc vmapped vs a loop of single-member runs vs a PyTorch torch.func ensemble.

The model is configs/tinylm.toml's language model: a decoder-only pre-LayerNorm transformer (width 32, 2 blocks,
4 heads, MLP 4×, vocabulary 16, context 32) trained on next-token loss at every position, batch 32 sequences, Adam.
All three contenders train the same architecture on the same data shapes, side by side in this one run:

* vmapped — jaxlmc's compiled chunk (`lax.scan` over steps, state donated) for N members at once;
* loop — the same compiled chunk for one member, run N times one after another (one process, compiled
  once; one member runs on one device, both cores on each op);
* torch.func — the same transformer written as a torch.nn.Module, `stack_module_state` +
  `vmap(grad(functional_call))` + Adam on the stacked tensors (attention written out with an explicit causal mask,
  as jaxlmc does; torch's fused scaled_dot_product_attention has no vmap rule).

Data are random token ids (4000 sequences of 33): throughput does not depend on the values, and no TFDS is needed.
Prints member-steps/s and the ratios, and writes JSON.

    python -m bench.bench_transformer [--members 1 8 32 64] [--steps 50] [--out bench/results/transformer.json]
"""
from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench._record import write_record
from bench.bench_train import setup, timed_run
from jaxlmc import models, shard, train
from jaxlmc.config import ModelConfig

N_TRAIN, CONTEXT = 4000, 32


def torch_ensemble_seconds(cfg: ModelConfig, num_members: int, steps: int, batch: int) -> float | None:
    """The same training written with torch.func; None when torch is not installed."""
    try:
        import torch
        from torch.func import functional_call, grad, stack_module_state, vmap
    except ImportError:
        return None
    nn = torch.nn
    width, heads, vocab = cfg.width, cfg.heads, cfg.vocab_size

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
            self.qkv, self.o = nn.Linear(width, 3 * width), nn.Linear(width, width)
            self.fc1, self.fc2 = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

        def forward(self, h, mask):
            b, t, _ = h.shape
            q, k, v = self.qkv(self.ln1(h)).view(b, t, 3, heads, width // heads).unbind(2)  # B×T×H×d each
            scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / (width // heads) ** 0.5
            weights = torch.softmax(scores.masked_fill(~mask, torch.finfo(scores.dtype).min), dim=-1)
            h = h + self.o(torch.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, t, width))
            return h + self.fc2(nn.functional.gelu(self.fc1(self.ln2(h))))

    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.pos = nn.Embedding(vocab, width), nn.Embedding(CONTEXT, width)
            self.blocks = nn.ModuleList([Block() for _ in range(cfg.depth)])
            self.ln_f, self.head = nn.LayerNorm(width), nn.Linear(width, vocab)

        def forward(self, tokens):
            h = self.embed(tokens) + self.pos.weight[None, :tokens.shape[1]]
            mask = torch.tril(torch.ones(tokens.shape[1], tokens.shape[1], dtype=torch.bool))
            for block in self.blocks:
                h = block(h, mask)
            return self.head(self.ln_f(h))

    torch.manual_seed(0)
    nets = [LM() for _ in range(num_members)]
    params, _ = stack_module_state(nets)
    base = LM().to("meta")
    tokens = torch.randint(0, vocab, (N_TRAIN, CONTEXT + 1))

    def loss(p, x, y):
        logits = functional_call(base, p, (x,))
        return nn.functional.cross_entropy(logits.reshape(-1, vocab), y.reshape(-1))

    grads_fn = vmap(grad(loss))
    names = list(params)
    leaves = [nn.Parameter(params[name]) for name in names]
    optimizer = torch.optim.Adam(leaves, lr=1e-3)  # elementwise: Adam on stacked tensors is Adam per member

    def step():
        seqs = tokens[torch.randint(0, N_TRAIN, (num_members, batch))]
        g = grads_fn(dict(zip(names, leaves)), seqs[..., :-1], seqs[..., 1:])
        for leaf, name in zip(leaves, names):
            leaf.grad = g[name]
        optimizer.step()

    for _ in range(3):
        step()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--steps", type=int, default=50, help="timed steps per run (after one warm-up chunk)")
    parser.add_argument("--chunk", type=int, default=25)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "transformer.json"))
    args = parser.parse_args()
    shard.use_cpu_cores()  # as the jaxlmc command: members split over one CPU device per core

    cfg = ModelConfig(kind="transformer", width=args.width, depth=args.depth, heads=args.heads, vocab_size=16)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, (N_TRAIN, CONTEXT + 1))
    data = {"x": jnp.asarray(tokens[:, :-1].astype(np.float32)), "y": jnp.asarray(tokens[:, 1:].astype(np.int32))}
    model = models.build(cfg, (CONTEXT,), cfg.vocab_size, per_token=True)
    chunk_fn = train.make_train_chunk(model, "adamw", 0.9, args.batch, N_TRAIN, args.chunk)
    params = models.param_count(model.init(jax.random.key(0)))

    print(f"transformer {args.depth}×{args.width}, {args.heads} heads ({params:,} params), context {CONTEXT}, "
          f"batch {args.batch}, {args.steps} timed steps, device {jax.devices()[0].device_kind}")
    print(f"{'N':>5} {'vmapped':>9} {'loop':>9} {'torch.func':>11} {'vs loop':>8} {'vs torch':>9}   (member-steps/s)")
    results = []
    for n in args.members:
        vmapped_s = timed_run(chunk_fn, *setup(model, n, N_TRAIN), data, args.steps, args.chunk)
        loop_s = sum(timed_run(chunk_fn, *setup(model, 1, N_TRAIN), data, args.steps, args.chunk) for _ in range(n))
        torch_s = torch_ensemble_seconds(cfg, n, args.steps, args.batch)
        row = {"members": n, "vmapped_member_steps_per_s": n * args.steps / vmapped_s,
               "loop_member_steps_per_s": n * args.steps / loop_s,
               "torch_func_member_steps_per_s": n * args.steps / torch_s if torch_s else None}
        row["ratio_vs_loop"] = row["vmapped_member_steps_per_s"] / row["loop_member_steps_per_s"]
        row["ratio_vs_torch_func"] = (row["vmapped_member_steps_per_s"] / row["torch_func_member_steps_per_s"]
                                      if torch_s else None)
        results.append(row)
        torch_text = f"{row['torch_func_member_steps_per_s']:>11,.0f}" if torch_s else f"{'—':>11}"
        vs_torch = f"{row['ratio_vs_torch_func']:>8.2f}×" if torch_s else f"{'—':>9}"
        print(f"{n:>5} {row['vmapped_member_steps_per_s']:>9,.0f} {row['loop_member_steps_per_s']:>9,.0f} "
              f"{torch_text} {row['ratio_vs_loop']:>7.2f}× {vs_torch}", flush=True)

    write_record(args.out, "transformer_train_throughput",
                 model={"kind": "transformer", "width": args.width, "depth": args.depth, "heads": args.heads,
                        "vocab_size": cfg.vocab_size, "context": CONTEXT, "params": params},
                 batch_size=args.batch, timed_steps=args.steps, torch_threads=_torch_threads(), results=results)


def _torch_threads() -> int | None:
    try:
        import torch
    except ImportError:
        return None
    return torch.get_num_threads()


if __name__ == "__main__":
    main()
