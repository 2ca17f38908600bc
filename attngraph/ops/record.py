"""Which backend ran: a record that the backends write when they run.

``explain()`` says which backend a call *would* take; :func:`recording` says which one
*did*, eagerly or in code compiled by torch.compile (the backends' operators write the
record when they run, not when they are traced)::

    with recording() as ran:
        graph_attention(q, k, v, graph)
    ran            # ["tiles"]

A backend that hands part of its work to another (the tile path's per-edge residual) is
recorded once, under its own name.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, List

__all__ = ["recording", "running"]

_open: List[List[str]] = []
_depth = 0


@contextmanager
def recording() -> Iterator[List[str]]:
    """A list that collects the name of every backend that runs a
    :func:`~attngraph.graph_attention` call while the block is open, in order."""
    ran: List[str] = []
    _open.append(ran)
    try:
        yield ran
    finally:
        _open.remove(ran)


@contextmanager
def running(name: str) -> Iterator[None]:
    """Marks a backend's forward pass: recorded in every open :func:`recording` unless it
    runs inside another backend's."""
    global _depth
    if _depth == 0:
        for ran in _open:
            ran.append(name)
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
