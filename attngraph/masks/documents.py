"""Document masks: packed sequences where tokens attend only inside their own document."""
from __future__ import annotations

from functools import partial
from typing import Sequence, Union

import torch
from torch import Tensor

from attngraph.graph import TokenGraph
from attngraph.checks import as_index_tensor, check_bool, check_nodes
from attngraph.masks._common import rule_graph
from attngraph.runs import Range

__all__ = ["document"]


def _document_runs(i, state, *, causal):
    ends = state["ends"]                                    # cumulative lengths
    doc = torch.searchsorted(ends, i, right=True)          # first document ending after i
    first = (ends - state["lengths"])[doc]
    count = i - first + 1 if causal else state["lengths"][doc]
    return [Range(first, count)]


def document(lengths: Union[Sequence[int], Tensor], *, causal: bool = False,
             implicit: bool = False) -> TokenGraph:
    """Block-diagonal mask over packed documents: query i attends to key j when both lie
    in the same document (and ``j <= i`` with ``causal``).

    Args:
        lengths: token count of every document, in packing order (list, tuple or 1-D
            integer tensor); zero-length documents are allowed and take no tokens.
        causal: keep only ``j <= i``.
        implicit: keep the mask as its rule (:class:`attngraph.implicit.ImplicitGraph`):
            only the lengths are stored.

    Returns:
        TokenGraph over ``N = sum(lengths)`` nodes, ``E = sum(L^2)`` (``sum(L (L + 1) / 2)``
        when causal).

    Example::

        >>> document([2, 0, 3]).to_dense().int()
        tensor([[1, 1, 0, 0, 0],
                [1, 1, 0, 0, 0],
                [0, 0, 1, 1, 1],
                [0, 0, 1, 1, 1],
                [0, 0, 1, 1, 1]], dtype=torch.int32)
    """
    lengths = as_index_tensor("lengths", lengths).cpu()
    causal = check_bool("causal", causal)
    implicit = check_bool("implicit", implicit)
    if lengths.numel() and int(lengths.min()) < 0:
        raise ValueError(f"lengths must be >= 0, got {int(lengths.min())} at position "
                         f"{int(torch.argmin(lengths))}")
    n = int(lengths.sum())

    check_nodes("sum(lengths)", n)
    state = {"lengths": lengths, "ends": torch.cumsum(lengths, 0)}
    return rule_graph(n, n, partial(_document_runs, causal=causal), implicit=implicit,
                      name=f"document({lengths.numel()} documents, causal={causal})",
                      state=state)
