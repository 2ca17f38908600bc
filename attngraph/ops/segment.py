"""Reductions over contiguous segments (CSR rows) of an edge tensor.

torch_scatter's CSR kernels are used when installed (``USE_TORCH_SCATTER``, which tests
switch off to exercise the fallback), except for sums of wide rows on CPU, where torch's
``index_add_`` is faster; otherwise torch's scatter ops over a row index. Under
torch.compile the torch_scatter kernels are called through ``attngraph::segment_*`` custom
ops, since torch_scatter registers no fake (shape) kernels that tracing could use.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from attngraph.capabilities import WITH_TORCH_SCATTER

if WITH_TORCH_SCATTER:
    import torch_scatter as _torch_scatter
else:  # pragma: no cover - depends on the environment
    _torch_scatter = None

# Whether to use torch_scatter when it is installed (tests toggle it).
USE_TORCH_SCATTER = WITH_TORCH_SCATTER

__all__ = ["segment_sum", "segment_max", "WITH_TORCH_SCATTER"]

# On CPU a sum over rows at least this wide takes torch's ``index_add_`` on 2-D views even
# where torch_scatter is installed: it is faster there (benchmarks/results/cpu/constants.md).
_WIDE_ROW = 32


def _expand_index(index: Tensor, like: Tensor) -> Tensor:
    return index.view(-1, *([1] * (like.dim() - 1))).expand_as(like)


def segment_sum(x: Tensor, ptr: Tensor, index: Optional[Tensor] = None) -> Tensor:
    """Sum ``x [E, ...]`` over rows ``ptr [R + 1]`` -> ``[R, ...]`` (0 for empty rows).

    ``index [E]`` (the row of each element) is used by the torch fallback; it is derived
    from ``ptr`` when not given.
    """
    if USE_TORCH_SCATTER and _torch_scatter is not None:
        if torch.compiler.is_compiling():
            return _segment_sum_op(x, ptr)
        if not (x.device.type == "cpu" and x.dim() > 1 and x.shape[1:].numel() >= _WIDE_ROW):
            return _torch_scatter.segment_csr(x, ptr, reduce="sum")
    if index is None:
        index = _rows_of(ptr, x.size(0))
    out = x.new_zeros((ptr.numel() - 1,) + tuple(x.shape[1:]))
    # 2-D views: torch's CPU index_add_ is much slower on higher-dimensional tensors
    width = x.shape[1:].numel()
    out.view(out.size(0), width).index_add_(0, index, x.reshape(x.size(0), width))
    return out


def segment_max(x: Tensor, ptr: Tensor, index: Optional[Tensor] = None) -> Tensor:
    """Max of ``x [E, ...]`` over rows ``ptr [R + 1]`` -> ``[R, ...]``.

    Empty rows get an unspecified finite or ``-inf`` value: callers never read them through
    an edge, and set such rows' log-sum-exp to ``-inf`` themselves.
    """
    if USE_TORCH_SCATTER and _torch_scatter is not None:
        if torch.compiler.is_compiling():
            return _segment_max_op(x, ptr)
        return _torch_scatter.segment_csr(x, ptr, reduce="max")
    if index is None:
        index = _rows_of(ptr, x.size(0))
    out = x.new_full((ptr.numel() - 1,) + tuple(x.shape[1:]), float("-inf"))
    return out.scatter_reduce_(0, _expand_index(index, x), x, "amax", include_self=True)


def _rows_of(ptr: Tensor, num_edges: int) -> Tensor:
    """Row id of every element of a CSR with offsets ``ptr``."""
    counts = ptr.diff()
    return torch.repeat_interleave(torch.arange(counts.numel(), device=ptr.device), counts,
                                   output_size=num_edges)


# ---------------------------------------------------------------------------- compiled calls
@torch.library.custom_op("attngraph::segment_sum", mutates_args=())
def _segment_sum_op(x: Tensor, ptr: Tensor) -> Tensor:
    return _torch_scatter.segment_csr(x, ptr, reduce="sum")


@_segment_sum_op.register_fake
def _(x, ptr):
    return x.new_empty((ptr.size(0) - 1,) + tuple(x.shape[1:]))


@torch.library.custom_op("attngraph::gather_rows", mutates_args=())
def _gather_rows_op(y: Tensor, ptr: Tensor, num_edges: int) -> Tensor:
    """``y[row of e]`` for each element ``e`` of a CSR (the adjoint of segment_sum)."""
    return _torch_scatter.gather_csr(y, ptr)


@_gather_rows_op.register_fake
def _(y, ptr, num_edges):
    return y.new_empty((num_edges,) + tuple(y.shape[1:]))


def _sum_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])
    ctx.num_edges = inputs[0].size(0)


def _sum_backward(ctx, grad):
    (ptr,) = ctx.saved_tensors
    return _gather_rows_op(grad.contiguous(), ptr, ctx.num_edges), None


def _gather_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])


def _gather_backward(ctx, grad):
    (ptr,) = ctx.saved_tensors
    return _segment_sum_op(grad.contiguous(), ptr), None, None


_segment_sum_op.register_autograd(_sum_backward, setup_context=_sum_setup)
_gather_rows_op.register_autograd(_gather_backward, setup_context=_gather_setup)


@torch.library.custom_op("attngraph::segment_max", mutates_args=())
def _segment_max_op(x: Tensor, ptr: Tensor) -> Tensor:
    return _torch_scatter.segment_csr(x, ptr, reduce="max")


@_segment_max_op.register_fake
def _(x, ptr):
    return x.new_empty((ptr.size(0) - 1,) + tuple(x.shape[1:]))
