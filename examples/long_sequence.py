"""Global tokens carry information past a local window: a tiny Longformer-style model.

Task: a sequence of filler tokens hides one "value" token (one of ``--classes``) somewhere
in its first quarter; the last token is a QUERY whose answer is that value. The
value lies far outside the query's local window, so with two layers of sliding-window
attention the answer cannot reach the query. A Longformer graph adds one global token
(position 0) that every token sees and that sees every token: in layer 1 it reads the
value, in layer 2 the query reads it.

The same model is trained twice from the same initial weights, on the Longformer graph
(``attngraph.masks.longformer(L, w, global_indices=(0,))``) and, as a control, on the
sliding window alone (``attngraph.masks.sliding_window(L, w)``). Only the first learns:

    python examples/long_sequence.py            # L = 256, 400 steps
    python examples/long_sequence.py --quick    # L = 64, 150 steps: CI-sized, seconds
"""
import argparse
import copy
import math
import time

import torch
from torch import nn

import attngraph as ag
from attngraph.nn import SparseSelfAttention

GLOBAL, QUERY, FIRST_VALUE = 0, 1, 2


class Block(nn.Module):
    """Pre-norm transformer block whose attention is restricted to a token graph."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SparseSelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor, graph: ag.TokenGraph) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), graph)
        return x + self.mlp(self.norm2(x))


class Retriever(nn.Module):
    """Embeddings, two graph-attention blocks, a classifier read at the last token."""

    def __init__(self, vocab: int, length: int, classes: int, dim: int, heads: int,
                 layers: int = 2):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(length, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens: torch.Tensor, graph: ag.TokenGraph) -> torch.Tensor:
        x = self.tok(tokens) + self.pos.weight[:tokens.size(1)]
        for block in self.blocks:
            x = block(x, graph)
        return self.head(self.norm(x[:, -1]))                     # [B, classes]


def make_batch(batch: int, length: int, classes: int, noise: int, gen: torch.Generator):
    """Tokens ``[B, L]`` and answers ``[B]``: value token at a position in ``[1, L/4)``,
    filler elsewhere, GLOBAL first and QUERY last."""
    tokens = torch.randint(FIRST_VALUE + classes, FIRST_VALUE + classes + noise,
                           (batch, length), generator=gen)
    tokens[:, 0] = GLOBAL
    tokens[:, -1] = QUERY
    answer = torch.randint(0, classes, (batch,), generator=gen)
    where = torch.randint(1, max(2, length // 4), (batch,), generator=gen)
    tokens[torch.arange(batch), where] = FIRST_VALUE + answer
    return tokens, answer


def train(model: nn.Module, graph: ag.TokenGraph, args) -> tuple:
    """Train on fresh batches; returns (first loss, mean loss of the last 10 steps, s/step)."""
    gen = torch.Generator().manual_seed(args.seed + 1)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    losses = []
    start = time.perf_counter()
    for _ in range(args.steps):
        tokens, answer = make_batch(args.batch, args.length, args.classes, args.noise, gen)
        loss = nn.functional.cross_entropy(model(tokens, graph), answer)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    per_step = (time.perf_counter() - start) / args.steps
    return losses[0], sum(losses[-10:]) / len(losses[-10:]), per_step


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=int, default=256, help="tokens per sequence")
    parser.add_argument("--window", type=int, default=2, help="local window (each side)")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--classes", type=int, default=8)
    parser.add_argument("--noise", type=int, default=1,
                        help="distinct filler tokens (more make the value harder to find)")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="CI size: --length 64 --steps 150")
    args = parser.parse_args(argv)
    if args.quick:
        args.length, args.steps = 64, 150
    torch.manual_seed(args.seed)

    L, w = args.length, args.window
    graphs = {
        "longformer (window + global token 0)": ag.masks.longformer(L, w, global_indices=(0,)),
        "sliding window only (control)": ag.masks.sliding_window(L, w),
    }
    print(f"task: answer at position {L - 1} is a value hidden in positions 1..{L // 4 - 1}; "
          f"window {w}, 2 layers; chance loss ln({args.classes}) = "
          f"{math.log(args.classes):.3f}")
    model = Retriever(FIRST_VALUE + args.classes + args.noise, L, args.classes, args.dim,
                      args.heads)
    for name, graph in graphs.items():
        first, last, per_step = train(copy.deepcopy(model), graph, args)
        print(f"{name}: {graph.num_edges} edges, loss {first:.3f} -> {last:.3f} "
              f"({1e3 * per_step:.1f} ms/step)")


if __name__ == "__main__":
    main()
