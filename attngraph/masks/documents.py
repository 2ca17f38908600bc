"""Document masks: packed sequences where tokens attend only inside their own document."""
from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import Tensor

from attngraph.graph import TokenGraph
from attngraph.masks._common import Range, as_index_tensor, check_bool, from_runs

__all__ = ["document"]


def document(lengths: Union[Sequence[int], Tensor], *, causal: bool = False) -> TokenGraph:
    """Block-diagonal mask over packed documents: query i attends to key j when both lie
    in the same document (and ``j <= i`` with ``causal``).

    Args:
        lengths: token count of every document, in packing order (list, tuple or 1-D
            integer tensor); zero-length documents are allowed and take no tokens.
        causal: keep only ``j <= i``.

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
    if lengths.numel() and int(lengths.min()) < 0:
        raise ValueError(f"lengths must be >= 0, got {int(lengths.min())} at position "
                         f"{int(torch.argmin(lengths))}")
    n = int(lengths.sum())
    doc = torch.repeat_interleave(torch.arange(lengths.numel()), lengths, output_size=n)
    first = (torch.cumsum(lengths, 0) - lengths)[doc]
    count = torch.arange(n) - first + 1 if causal else lengths[doc]
    return from_runs(n, n, [Range(first, count)])
