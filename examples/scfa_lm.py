"""Hash-sparse and QK-drop attention against dense causal attention, in LM training.

The setting of SCFA (Pagliardini et al., 2023), at a size a CPU trains: a small
decoder-only transformer learns bytes of real text that needs no download (the Python
standard library's own source files, read from this interpreter's installation), once with
dense causal ``scaled_dot_product_attention`` and once per sparse variant:

* ``hash<b>``: each head hashes its queries and keys into ``b`` buckets (angular LSH with
  a per-head rotation drawn anew at every step, ``attngraph.masks.lsh_buckets``); a query
  attends to the earlier keys of its bucket (``hash_buckets``, causal on the original
  positions) — one graph per (sequence, head), one ``graph_attention`` call per layer.
* ``drop<p>``: each head drops a random fraction ``p`` of its queries and keys at every
  step (``qk_drop``); kept queries attend to kept earlier keys.

Same data order, initialisation, optimiser and steps for every variant. The variants of one
length train interleaved, one step each in turn, so that noise from other work on the
machine falls on all of them alike; each sparse variant's speed-up is read per step (dense's
step s over its step s) and reported as a median with its quartiles and range. Printed and
written to ``--out`` (JSON, a markdown table, a PNG of the curves): training and held-out
loss in bits per byte, the median time per step and the per-step speed-up, per length.

    python examples/scfa_lm.py --lengths 2048,4096 --steps 300      # the comparison
    python examples/scfa_lm.py --quick                              # seconds (CI)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import attngraph as ag


# ---------------------------------------------------------------------------- data
def stdlib_bytes(limit: int) -> tuple:
    """``(train, held_out)`` uint8 tensors: the standard library's ``*.py`` files in sorted
    order, every tenth file held out, at most ``limit`` bytes in all."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)
    train, held = bytearray(), bytearray()
    for i, path in enumerate(files):
        if len(train) + len(held) >= limit:
            break
        try:
            data = path.read_bytes()
        except OSError:
            continue
        (held if i % 10 == 9 else train).extend(data)
    if not train or not held:
        raise SystemExit(f"found too little text under {root}")
    return (torch.frombuffer(train, dtype=torch.uint8).long(),
            torch.frombuffer(held, dtype=torch.uint8).long())


def batches(data: torch.Tensor, length: int, batch: int, seed: int):
    """Endless random windows ``(x, y)`` of ``length + 1`` bytes, reproducible by seed."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        start = torch.randint(0, data.numel() - length - 1, (batch,), generator=gen)
        idx = start.unsqueeze(1) + torch.arange(length + 1)
        chunk = data[idx]
        yield chunk[:, :-1], chunk[:, 1:]


# ---------------------------------------------------------------------------- model
class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, variant: str):
        super().__init__()
        self.heads, self.variant = heads, variant
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.step_seed = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, E = x.shape
        H = self.heads
        q, k, v = self.qkv(x).view(B, L, 3, H, E // H).unbind(2)          # [B, L, H, D]
        if self.variant == "dense":
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                               v.transpose(1, 2), is_causal=True)
            o = o.transpose(1, 2)
        else:
            o = ag.graph_attention(q, k, v, self.graph(q, k))
        return self.out(o.reshape(B, L, E))

    def graph(self, q: torch.Tensor, k: torch.Tensor):
        """This step's mask, one graph per (sequence, head)."""
        self.step_seed += 1
        if self.variant.startswith("hash"):
            nb = int(self.variant[4:])
            seed = self.step_seed                     # a fresh rotation at every step
            return ag.masks.hash_buckets(ag.masks.lsh_buckets(q, nb, seed=seed),
                                         ag.masks.lsh_buckets(k, nb, seed=seed),
                                         implicit=True)
        rate = float(self.variant[4:])
        gen = torch.Generator().manual_seed(self.step_seed)
        B, L, H, _ = q.shape
        keep_q = torch.rand(B, H, L, generator=gen) >= rate
        keep_k = torch.rand(B, H, L, generator=gen) >= rate
        keep_k[..., 0] = True                         # every kept query sees a key
        return ag.masks.qk_drop(keep_q, keep_k, implicit=True)


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, variant: str):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, variant)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class ByteLM(nn.Module):
    def __init__(self, dim: int, heads: int, layers: int, length: int, variant: str):
        super().__init__()
        self.embed = nn.Embedding(256, dim)
        self.pos = nn.Embedding(length, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, variant) for _ in range(layers))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 256)

    def forward(self, x):
        h = self.embed(x) + self.pos(torch.arange(x.size(1)))
        for block in self.blocks:
            h = block(h)
        return self.head(self.ln(h))


def bits_per_byte(model, x, y) -> torch.Tensor:
    return F.cross_entropy(model(x).flatten(0, 1), y.flatten()) / math.log(2)


# ---------------------------------------------------------------------------- training
class Run:
    """One variant's model, optimiser, data stream and record, advanced one step at a time
    so that several variants can take turns (interleaved timing)."""

    def __init__(self, variant: str, length: int, args, data):
        train_data, held = data
        self.variant, self.length, self.args = variant, length, args
        torch.manual_seed(args.seed)     # the same initial weights for every variant
        self.model = ByteLM(args.dim, args.heads, args.layers, length, variant)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=args.lr, weight_decay=0.01)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: min(1.0, (s + 1) / args.warmup) * 0.5 * (1 + math.cos(
                math.pi * min(s, args.steps) / args.steps)))
        self.stream = batches(train_data, length, args.batch, args.seed)
        self.held_batches = [next(batches(held, length, args.batch, args.seed + 1 + i))
                             for i in range(args.eval_batches)]
        self.curve, self.evals, self.times = [], [], []

    def step(self) -> None:
        """One training step, timed (mask drawing included, held-out evaluation not)."""
        args, model = self.args, self.model
        x, y = next(self.stream)
        t = time.perf_counter()
        loss = bits_per_byte(model, x, y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        self.opt.step()
        self.sched.step()
        self.times.append(time.perf_counter() - t)
        self.curve.append(float(loss.detach()))
        step = len(self.curve)
        if step % args.eval_every == 0 or step == args.steps:
            with torch.no_grad():
                held_bpb = statistics.fmean(float(bits_per_byte(model, x, y))
                                            for x, y in self.held_batches)
            self.evals.append((step, held_bpb))
            print(f"  {self.variant:>8} L={self.length:<6} step {step:>5}  train "
                  f"{self.curve[-1]:.3f}  held-out {held_bpb:.3f} bpb  "
                  f"{statistics.median(self.times) * 1e3:.0f} ms/step", flush=True)

    def result(self) -> dict:
        curve = self.curve
        return dict(variant=self.variant, length=self.length, train_bpb=curve,
                    held_out=self.evals, final_held_out_bpb=self.evals[-1][1],
                    final_train_bpb=statistics.fmean(curve[-max(1, len(curve) // 10):]),
                    ms_per_step=statistics.median(self.times[1:] or self.times) * 1e3,
                    step_s=self.times)


def quantiles(xs: list) -> dict:
    """Median, quartiles and range of ``xs``."""
    xs = sorted(xs)
    q1, med, q3 = (statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1
                   else (xs[0],) * 3)
    return dict(median=med, q1=q1, q3=q3, min=xs[0], max=xs[-1], n=len(xs))


def train_interleaved(variants: list, length: int, args, data) -> list:
    """Train every variant at ``length``, taking turns one step each.

    Step ``s`` of every variant runs within one round, and the order of the round rotates
    by one variant per step, so machine noise (other processes, frequency changes) falls on
    dense and sparse alike. Each sparse variant's speed-up is read per step,
    ``dense step s / variant step s``; its median and spread are in ``speedup``. The first
    step (allocator and kernel warm-up) is left out of the timing."""
    runs = [Run(v, length, args, data) for v in variants]
    for step in range(args.steps):
        shift = step % len(runs)
        for run in runs[shift:] + runs[:shift]:
            run.step()
    results = [r.result() for r in runs]
    dense = next((r for r in results if r["variant"] == "dense"), None)
    for r in results:
        if dense is not None:
            ratios = [d / s for d, s in zip(dense["step_s"][1:], r["step_s"][1:])] or [
                dense["step_s"][0] / r["step_s"][0]]
            r["speedup"] = quantiles(ratios)
    return results


PAPER = """SCFA (Pagliardini et al., 2023) on an A100, for comparison: GPT-2-small-like LM
(12 layers, 12 heads) trained 2.0x faster at 8k tokens and 3.3x at 16k with hash-sparse
attention at the perplexity of dense; their kernels (fwd+bwd, vs causal SDPA) are 3.15x
faster with 32 buckets at 32k tokens, 11.8x dropping 80 % of queries and keys at 32k, and
slower than dense at 4k with little sparsity."""


def _variant_order(name: str):
    """dense, then hash by buckets, then drop by rate."""
    if name == "dense":
        return (0, 0.0)
    return ({"hash": 1, "drop": 2}.get(name[:4], 3), float(name[4:]))


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def run_meta(argv, load_before) -> dict:
    """What ran where: the command, date, CPU, threads and the load average around it."""
    return dict(command=" ".join(argv), date_utc=time.strftime("%Y-%m-%d %H:%M UTC",
                                                               time.gmtime()),
                cpu=_cpu_model(), cpu_count=os.cpu_count(), threads=torch.get_num_threads(),
                torch=torch.__version__, load_before=load_before,
                load_after=list(os.getloadavg()))


def _spread(r: dict) -> tuple:
    s = r.get("speedup")
    if s is None:
        return "-", "-", "-"
    return (f"{s['median']:.2f}x", f"{s['q1']:.2f}-{s['q3']:.2f}",
            f"{s['min']:.2f}-{s['max']:.2f}")


def report(results: list, out: Path, args, runs=()) -> str:
    results = sorted(results, key=lambda r: (r["length"], _variant_order(r["variant"])))
    dense = {r["length"]: r for r in results if r["variant"] == "dense"}
    lines = ["| L | variant | held-out bpb | vs dense | train bpb | steps | ms / step | "
             "speed-up (median) | IQR | min-max |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        d = dense.get(r["length"])
        rel = (f"{100 * (r['final_held_out_bpb'] / d['final_held_out_bpb'] - 1):+.1f} %"
               if d else "-")
        med, iqr, rng = _spread(r)
        lines.append(f"| {r['length']} | {r['variant']} | {r['final_held_out_bpb']:.3f} | "
                     f"{rel} | {r['final_train_bpb']:.3f} | {len(r['train_bpb'])} | "
                     f"{r['ms_per_step']:.0f} | {med} | {iqr} | {rng} |")
    table = "\n".join(lines)
    out.mkdir(parents=True, exist_ok=True)
    (out / "scfa_lm.json").write_text(json.dumps(dict(args=vars(args), runs=list(runs),
                                                      results=results),
                                                 indent=1, default=str))
    cmds = "\n".join(f"    python examples/scfa_lm.py {m['command']}" for m in runs)
    where = "\n".join(
        f"- `{m['command']}`: {m['date_utc']}, {m['cpu']} ({m['cpu_count']} cores), "
        f"{m['threads']} torch threads, torch {m['torch']}; load average (1, 5, 15 min) "
        f"{', '.join(f'{x:.1f}' for x in m['load_before'])} before, "
        f"{', '.join(f'{x:.1f}' for x in m['load_after'])} after" for m in runs)
    (out / "scfa_lm.md").write_text(
        f"# Hash-sparse and QK-drop vs dense attention, byte-level LM\n\n{cmds}\n\n{where}\n\n"
        f"Model dim {args.dim}, {args.heads} heads, {args.layers} layers, batch {args.batch}. "
        f"The variants of one length train interleaved: one step each in turn, the order "
        f"rotating every step. Held-out loss after the last step, read after the same "
        f"tokens for every variant; train bpb is the mean of the last tenth of the steps; "
        f"ms / step is the median step (mask drawing included, the first step left out). "
        f"Speed-up is dense's step s over the variant's step s, per step: its median, "
        f"interquartile range and range over the steps.\n\n{table}\n\n{PAPER}\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return table
    lengths = sorted({r["length"] for r in results})
    fig, axes = plt.subplots(1, len(lengths), figsize=(5 * len(lengths), 3.6), squeeze=False)
    for ax, L in zip(axes[0], lengths):
        for r in (r for r in results if r["length"] == L):
            steps, bpb = zip(*r["held_out"])
            ax.plot(steps, bpb, marker="o", ms=3, label=f"{r['variant']} "
                    f"({r['ms_per_step']:.0f} ms/step)")
        ax.set_title(f"L = {L}", fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("held-out bits per byte")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "scfa_lm.png", dpi=90)
    plt.close(fig)
    return table


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", default="2048,4096")
    p.add_argument("--variants", default="dense,hash8,hash16,drop0.3,drop0.5")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-batches", type=int, default=4)
    p.add_argument("--text-mb", type=float, default=16.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", type=Path, default=Path("examples/results/scfa_lm"))
    p.add_argument("--append", action="store_true",
                   help="add to the results already in --out (others kept, same runs replaced)")
    p.add_argument("--quick", action="store_true", help="CI size: seconds")
    args = p.parse_args(argv)
    if args.quick:
        args.lengths, args.steps, args.dim, args.layers = "128", 4, 32, 1
        args.eval_every, args.eval_batches, args.text_mb = 2, 1, 0.5
        args.variants = "dense,hash4,drop0.3"
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = list(os.getloadavg())
    data = stdlib_bytes(int(args.text_mb * 1e6))
    print(f"text: {data[0].numel():,} training bytes, {data[1].numel():,} held out "
          f"(the standard library's *.py files)")
    results = [r for L in args.lengths.split(",")
               for r in train_interleaved(args.variants.split(","), int(L), args, data)]
    runs = []
    old = args.out / "scfa_lm.json"
    if args.append and old.exists():
        saved = json.loads(old.read_text())
        done = {(r["variant"], r["length"]) for r in results}
        results = [r for r in saved["results"]
                   if (r["variant"], r["length"]) not in done] + results
        runs = [m for m in saved.get("runs", [])
                if m["command"] != " ".join(sys.argv[1:] if argv is None else argv)]
    runs.append(run_meta(sys.argv[1:] if argv is None else argv, load_before))
    print(report(results, args.out, args, runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
