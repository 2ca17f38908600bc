"""What the mask generators share beyond the core's runs (:mod:`attngraph.runs`) and
checks (:mod:`attngraph.checks`): a rule turned into a graph, implicit or built."""
from __future__ import annotations

from typing import Optional

import torch

from attngraph.graph import TokenGraph
from attngraph.implicit import ImplicitGraph
from attngraph.runs import from_runs


def rule_graph(num_src: int, num_dst: int, runs, *, implicit: bool, name: str,
               state: Optional[dict] = None) -> TokenGraph:
    """The graph of a rule ``runs(rows, state) -> [Run, ...]``: kept as the rule
    (:class:`attngraph.implicit.ImplicitGraph`) with ``implicit``, else built at once by
    :func:`attngraph.runs.from_runs` over every row."""
    state = {} if state is None else state
    if implicit:
        return ImplicitGraph(runs, num_src, num_dst, name=name, state=state)
    return from_runs(num_src, num_dst, runs(torch.arange(num_dst, dtype=torch.long), state))


# The run types under the name the CUDA launchers import them by.
from attngraph.runs import Range, Take  # noqa: E402,F401
