"""A Hugging Face Llama trained with a sparse attention graph, beside transformers' SDPA.

A small Llama-architecture model (``transformers.LlamaConfig``, random initialisation, byte
vocabulary, grouped-query attention) learns bytes of the Python standard library's own
source (the data of ``scfa_lm.py``: no download), twice from the same initial weights and
the same batches:

* ``sdpa``: ``attn_implementation="sdpa"``, transformers' dense causal attention;
* ``attngraph``: ``attn_implementation="attngraph"`` (``attngraph.integrations.
  transformers``) with ``attention_graph=`` a causal Longformer mask (a sliding window
  plus global tokens, ``attngraph.masks.longformer(..., causal=True, implicit=True)``), one
  rule shared by every layer, sequence and head.

The two train interleaved, one step each in turn, so noise from other work on the machine
falls on both alike; the speed-up is read per step (sdpa's step s over attngraph's step s)
and reported as a median with its quartiles and range, beside the held-out loss in bits per
byte of each after the same steps (so the same tokens). Written to ``--out``: a markdown
table and the JSON record.

Sizes: the defaults (4096 tokens, 2 layers, width 64, 4 heads of 16, 100 steps, batch 1)
keep the run within about 20 minutes on a heavily shared 2-core CPU (one torch thread: 18
minutes at load average 16-28); at 4096 tokens and this width, dense attention is most of
a step's time. ``--steps 300`` trains longer where the machine allows. ``--quick`` runs in
seconds (CI).

    python examples/hf_sparse_lm.py --threads 1 --eval-every 25     # the comparison
    python examples/hf_sparse_lm.py --quick           # seconds
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

import attngraph as ag

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scfa_lm import batches, quantiles, run_meta, stdlib_bytes  # noqa: E402


def make_model(args, implementation: str):
    """The Llama of this comparison, its weights drawn from ``args.seed``."""
    import attngraph.integrations.transformers  # noqa: F401  (registers "attngraph")
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=256, hidden_size=args.dim, intermediate_size=2 * args.dim,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                      num_key_value_heads=args.kv_heads, max_position_embeddings=args.length,
                      attention_dropout=0.0, tie_word_embeddings=True)
    torch.manual_seed(args.seed)              # the same initial weights for both
    return AutoModelForCausalLM.from_config(cfg, attn_implementation=implementation)


def sparse_mask(args):
    """The causal Longformer mask of the ``attngraph`` model: ``args.window`` keys back and
    ``args.globals`` global tokens spread over the sequence, as a rule (no edge list)."""
    L = args.length
    glob = sorted({round(i * L / args.globals) for i in range(args.globals)})
    return ag.masks.longformer(L, args.window, glob, causal=True, implicit=True)


class Run:
    """One model, optimiser and record, advanced one step at a time (interleaved)."""

    def __init__(self, name: str, args, data):
        train, held = data
        self.name, self.args = name, args
        self.model = make_model(args, "sdpa" if name == "sdpa" else "attngraph")
        self.graph = None if name == "sdpa" else sparse_mask(args)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=args.lr, weight_decay=0.01)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: min(1.0, (s + 1) / args.warmup) * 0.5 * (1 + math.cos(
                math.pi * min(s, args.steps) / args.steps)))
        self.stream = batches(train, args.length - 1, args.batch, args.seed)
        self.held = [next(batches(held, args.length - 1, args.batch, args.seed + 1 + i))
                     for i in range(args.eval_batches)]
        self.curve, self.evals, self.times = [], [], []

    def loss(self, x, y) -> torch.Tensor:
        """Bits per byte of the next-byte prediction over the window ``x`` + last of ``y``."""
        ids = torch.cat([x, y[:, -1:]], 1)                     # args.length bytes
        kw = {} if self.graph is None else {"attention_graph": self.graph}
        return self.model(ids, labels=ids, **kw).loss / math.log(2)

    def step(self) -> None:
        x, y = next(self.stream)
        self.model.train()
        t = time.perf_counter()
        loss = self.loss(x, y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.sched.step()
        self.times.append(time.perf_counter() - t)
        self.curve.append(float(loss.detach()))
        step = len(self.curve)
        if step % self.args.eval_every == 0 or step == self.args.steps:
            self.model.eval()
            with torch.no_grad():
                held = statistics.fmean(float(self.loss(x, y)) for x, y in self.held)
            self.evals.append((step, held))
            print(f"  {self.name:>9} step {step:>4}  train {self.curve[-1]:.3f}  held-out "
                  f"{held:.3f} bpb  {statistics.median(self.times) * 1e3:.0f} ms/step",
                  flush=True)

    def result(self) -> dict:
        c = self.curve
        return dict(name=self.name, held_out=self.evals, final_held_out_bpb=self.evals[-1][1],
                    final_train_bpb=statistics.fmean(c[-max(1, len(c) // 10):]),
                    ms_per_step=statistics.median(self.times[1:] or self.times) * 1e3,
                    step_s=self.times, train_bpb=c)


def train(args, data, on_eval=None) -> list:
    """Both models, one step each in turn, the order swapping every step; ``on_eval(results)``
    after every evaluation (the record so far)."""
    runs = [Run("sdpa", args, data), Run("attngraph", args, data)]
    for step in range(args.steps):
        for run in (runs if step % 2 == 0 else runs[::-1]):
            run.step()
        if on_eval is not None and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            on_eval(summarize(runs))
    return summarize(runs)


def summarize(runs) -> list:
    """Each run's record, with its per-step speed-up over sdpa."""
    results = [r.result() for r in runs]
    dense = results[0]["step_s"]
    for r in results:                          # the first step (warm-up) left out
        ratios = [d / s for d, s in zip(dense[1:], r["step_s"][1:])] or [
            dense[0] / r["step_s"][0]]
        r["speedup"] = quantiles(ratios)
    return results


def report(results: list, args, meta: dict) -> str:
    g = sparse_mask(args)
    density = g.num_edges / (args.length * (args.length + 1) / 2)
    done = len(results[0]["train_bpb"])
    lines = ["| attention | mask | held-out bpb | vs sdpa | train bpb | steps | ms / step | "
             "speed-up (median) | IQR | min-max |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    base = results[0]["final_held_out_bpb"]
    for r in results:
        s = r["speedup"]
        mask = ("causal (dense)" if r["name"] == "sdpa" else
                f"longformer: window {args.window}, {args.globals} global, "
                f"{100 * density:.1f} % of causal")
        lines.append(f"| {r['name']} | {mask} | {r['final_held_out_bpb']:.3f} | "
                     f"{100 * (r['final_held_out_bpb'] / base - 1):+.1f} % | "
                     f"{r['final_train_bpb']:.3f} | {len(r['train_bpb'])} | "
                     f"{r['ms_per_step']:.0f} | {s['median']:.2f}x | {s['q1']:.2f}-{s['q3']:.2f}"
                     f" | {s['min']:.2f}-{s['max']:.2f} |")
    table = "\n".join(lines)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "hf_sparse_lm.json").write_text(json.dumps(
        dict(args=vars(args), run=meta, results=results), indent=1, default=str))
    (out / "hf_sparse_lm.md").write_text(
        f"# A Hugging Face Llama with a sparse attention graph vs SDPA\n\n"
        f"    python examples/hf_sparse_lm.py {meta['command']}\n\n"
        f"{meta['date_utc']}, {meta['cpu']} ({meta['cpu_count']} cores), {meta['threads']} "
        f"torch threads, torch {meta['torch']}; load average (1, 5, 15 min) "
        f"{', '.join(f'{x:.1f}' for x in meta['load_before'])} before, "
        f"{', '.join(f'{x:.1f}' for x in meta['load_after'])} after.\n\n"
        f"LlamaConfig: {args.layers} layers, hidden {args.dim}, {args.heads} heads, "
        f"{args.kv_heads} key/value heads, vocabulary 256 (bytes), random initialisation; "
        f"{args.length} tokens, batch {args.batch}, AdamW lr {args.lr}. The two train "
        f"interleaved from the same weights on the same batches, one step each in turn. "
        f"Held-out loss after the last step (the same tokens for both); train bpb is the "
        f"mean of the last tenth of the steps; ms / step is the median step (the first "
        f"left out). Speed-up is sdpa's step s over attngraph's step s, per step: median, "
        f"interquartile range and range.\n\n"
        + ("" if done == args.steps else f"(Partial record: {done} of {args.steps} steps.)\n\n")
        + f"{table}\n")
    return table


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--window", type=int, default=128, help="keys back of the sliding window")
    p.add_argument("--globals", type=int, default=4, help="global tokens, spread evenly")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-batches", type=int, default=2)
    p.add_argument("--text-mb", type=float, default=16.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", type=Path, default=Path("examples/results/hf_sparse_lm"))
    p.add_argument("--quick", action="store_true", help="CI size: seconds")
    args = p.parse_args(argv)
    if args.quick:
        args.length, args.steps, args.dim, args.layers, args.window = 128, 4, 32, 1, 16
        args.eval_every, args.eval_batches, args.text_mb, args.warmup = 2, 1, 0.5, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = list(os.getloadavg())
    data = stdlib_bytes(int(args.text_mb * 1e6))
    print(f"text: {data[0].numel():,} training bytes, {data[1].numel():,} held out")
    cmd = sys.argv[1:] if argv is None else argv
    results = train(args, data, lambda partial: report(partial, args, run_meta(cmd, load_before)))
    print(report(results, args, run_meta(cmd, load_before)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
