"""Time ``num_edges``, ``in_degree()`` and ``graph_attention`` on the union of implicit
longformer(256, 16 globals) and dilated_window(w, d), with whichever attngraph is imported
(point PYTHONPATH at a checkout to time that revision). One thread, two runs each.

    PYTHONPATH=/path/to/checkout python benchmarks/compose_before_after.py
"""
import time

import torch

import attngraph as ag
from attngraph import masks as M


def main(n: int = 100_000) -> None:
    torch.set_num_threads(1)
    print(ag.__file__)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(n, 1, 64, generator=gen) for _ in range(3))
    for w, d in ((4, 100), (8, 127)):
        res = []
        for _ in range(2):
            times = []
            for op in (lambda u: u.num_edges, lambda u: u.in_degree(),
                       lambda u: ag.graph_attention(q, k, v, u)):
                u = (M.longformer(n, 256, range(16), implicit=True)
                     | M.dilated_window(n, w, d, implicit=True))
                t = time.perf_counter()
                op(u)
                times.append(time.perf_counter() - t)
            res.append(times)
        print(f"dilated_window({w}, {d}): " + "  ".join(
            f"{name} {res[0][i]:.3f} {res[1][i]:.3f}"
            for i, name in enumerate(("num_edges", "in_degree", "graph_attention"))),
            flush=True)


if __name__ == "__main__":
    main()
