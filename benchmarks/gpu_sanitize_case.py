"""A small fused forward + backward of ``graph_attention``, the case compute-sanitizer runs.

A few hundred tokens, a sliding-window and a random mask, float32 and bfloat16, GQA
(H = 4 query heads over H_kv = 2) with a per-edge, per-head bias; each case runs the forward
(out ``[N, H, D]``, lse ``[N, H]``) and ``.backward()`` into q, k, v and the bias. On CUDA
the fused kernels run (``backend="cupy"``); ``--device cpu`` runs the same case through the
torch backend. Prints one line per case and exits 1 if any output or gradient is not finite.

    compute-sanitizer --tool memcheck python3 benchmarks/gpu_sanitize_case.py
    python3 benchmarks/gpu_sanitize_case.py --device cpu
"""
from __future__ import annotations

import argparse
import sys
from typing import List

import torch

import attngraph as ag
from attngraph import masks

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def graphs(n: int, window: int, seed: int):
    return {f"sliding_window({window})": masks.sliding_window(n, window),
            f"random({window})": masks.random(n, window, seed=seed)}


def run_case(graph, dtype: torch.dtype, device: torch.device, backend: str, heads: int,
             kv_heads: int, dim: int, seed: int) -> List[float]:
    """Forward and backward once; returns the max |value| of out, lse (finite part) and each
    gradient (NaN where something is not finite)."""
    g = graph.to(device)
    gen = torch.Generator(device).manual_seed(seed)
    n = g.num_dst

    def rand(*shape):
        return torch.randn(*shape, generator=gen, device=device).to(dtype).requires_grad_()

    q, k, v = rand(n, heads, dim), rand(g.num_src, kv_heads, dim), rand(g.num_src, kv_heads, dim)
    bias = rand(g.num_edges, heads)
    out, lse = ag.graph_attention(q, k, v, g, edge_bias=bias, return_lse=True, backend=backend)
    dout = torch.randn(out.shape, generator=gen, device=device).to(out.dtype)
    loss = (out.float() * dout.float()).sum() + lse[torch.isfinite(lse)].sum()
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    values = [out, lse[torch.isfinite(lse)], q.grad, k.grad, v.grad, bias.grad]
    return [t.float().abs().max().item() if bool(torch.isfinite(t).all()) else float("nan")
            for t in values]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    p.add_argument("--backend", help="default: cupy on CUDA, torch on CPU")
    p.add_argument("--n", type=int, default=320, help="tokens (default 320)")
    p.add_argument("--window", type=int, default=16, help="window / random degree (16)")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --device cpu", file=sys.stderr)
        return 2
    backend = args.backend or ("cupy" if device.type == "cuda" else "torch")
    failed = 0
    for name, graph in graphs(args.n, args.window, args.seed).items():
        for dt in args.dtypes.split(","):
            vals = run_case(graph, DTYPES[dt.strip()], device, backend, args.heads,
                            args.kv_heads, args.dim, args.seed)
            ok = all(x == x for x in vals)
            failed += not ok
            print(f"{name:22s} {dt.strip():9s} E={graph.num_edges:<6d} backend={backend} "
                  f"max|out|={vals[0]:.3g} max|dq|={vals[2]:.3g} max|dk|={vals[3]:.3g} "
                  f"max|dv|={vals[4]:.3g} max|dbias|={vals[5]:.3g} {'ok' if ok else 'NOT FINITE'}")
    print(f"gpu_sanitize_case: {'all finite' if not failed else f'{failed} case(s) not finite'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
