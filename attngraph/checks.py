"""Argument checks shared by the core types, the mask generators and the operators.

User errors raise ``TypeError`` / ``ValueError`` that quote what was given and what was
expected; these helpers return the value in canonical form (a Python int, an int64 tensor).
"""
from __future__ import annotations

import math
import operator
from typing import Optional

import torch
from torch import Tensor

__all__ = ["MAX_NODES", "check_int", "check_nodes", "check_count", "check_bool",
           "as_index_tensor", "check_1d_tensor", "check_perm", "check_edge_index",
           "check_bias_values"]

# Most key or query nodes a graph may have: node ids must fit int32 (the kernels' column
# indices), and CSR offsets for more would take tens of GB before any edge exists.
MAX_NODES = 2 ** 31 - 1


def check_int(name: str, value, *, minimum: int = 0, maximum: Optional[int] = None) -> int:
    """``value`` as a Python int in ``[minimum, maximum]``; TypeError for non-integers
    (bool included)."""
    if isinstance(value, bool) or isinstance(value, float):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {value!r} "
                        f"({type(value).__name__})") from None
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return value


def check_nodes(name: str, value) -> int:
    """A token count: an int in ``[0, MAX_NODES]``."""
    value = check_int(name, value)
    if value > MAX_NODES:
        raise ValueError(f"{name}={value} exceeds the {MAX_NODES:,} tokens a TokenGraph can "
                         f"hold (int32 node ids)")
    return value


def check_count(name: str, value, *, allow_none: bool = False) -> Optional[int]:
    """A node count as :class:`~attngraph.TokenGraph` takes it: an int or a one-element
    integer tensor in ``[0, MAX_NODES]`` (``None`` with ``allow_none``)."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) and not (
            isinstance(value, Tensor) and value.numel() == 1 and not value.is_floating_point()):
        raise TypeError(f"{name} must be a non-negative int, got {value!r} "
                        f"({type(value).__name__})")
    value = int(value)
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    if value > MAX_NODES:
        raise ValueError(f"{name}={value} exceeds the {MAX_NODES:,} nodes a TokenGraph can "
                         f"hold (int32 node ids; its CSR offsets alone would take "
                         f"{8 * (value + 1) / 1e9:.3g} GB)")
    return value


def check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r} "
                        f"({type(value).__name__})")
    return value


def as_index_tensor(name: str, value, *, device=None) -> Tensor:
    """A list / tuple / range / 1-D integer tensor of ids as a 1-D int64 tensor."""
    if isinstance(value, Tensor):
        if value.dtype == torch.bool or value.is_floating_point() or value.is_complex():
            raise TypeError(f"{name} must hold integers, got a {value.dtype} tensor")
        if value.dim() != 1:
            raise ValueError(f"{name} must be 1-D, got shape {list(value.shape)}")
        return value.to(device=device, dtype=torch.long)
    if not isinstance(value, (list, tuple, range)):
        raise TypeError(f"{name} must be a list, tuple or 1-D integer tensor, got "
                        f"{type(value).__name__}")
    items = [check_int(f"{name}[{k}]", v, minimum=-(1 << 63)) for k, v in enumerate(value)]
    return torch.tensor(items, dtype=torch.long, device=device)


def check_1d_tensor(name: str, value, kind: str) -> Tensor:
    """A 1-D tensor holding integers (``kind="int"``) or booleans (``kind="bool"``)."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a 1-D torch.Tensor of {kind}s, got "
                        f"{type(value).__name__}")
    if kind == "bool" and value.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor (True = keep), got {value.dtype}; "
                        f"use {name} != 0")
    if kind == "int" and (value.dtype == torch.bool or value.is_floating_point()
                          or value.is_complex()):
        raise TypeError(f"{name} must be an integer tensor, got {value.dtype}")
    if value.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {list(value.shape)}")
    return value


def check_perm(name: str, perm, n: int, device) -> Tensor:
    """``perm`` as an int64 permutation of ``0..n-1`` on ``device``."""
    if not isinstance(perm, Tensor):
        raise TypeError(f"{name} must be a 1-D integer tensor (a permutation of 0..{n - 1}), "
                        f"got {type(perm).__name__}")
    if perm.dtype == torch.bool or perm.is_floating_point() or perm.is_complex():
        raise TypeError(f"{name} must hold integers, got {perm.dtype}")
    if perm.dim() != 1 or perm.numel() != n:
        raise ValueError(f"{name} must have shape [{n}], got {list(perm.shape)}")
    perm = perm.to(device=device, dtype=torch.long)
    seen = torch.zeros(n, dtype=torch.bool, device=device)
    if n and (int(perm.min()) < 0 or int(perm.max()) >= n):
        raise ValueError(f"{name} holds ids outside [0, {n})")
    seen[perm] = True
    if not bool(seen.all()):
        raise ValueError(f"{name} is not a permutation of 0..{n - 1} (an id repeats)")
    return perm


def check_edge_index(edge_index) -> Tensor:
    """``edge_index`` (a ``[2, E]`` integer tensor or PyG ``EdgeIndex``) as a plain int64
    tensor. Its values are read on the host, so it must hold data (not the meta device)."""
    from torch_geometric import EdgeIndex

    if not isinstance(edge_index, Tensor):
        raise TypeError(f"edge_index must be a torch.Tensor of shape [2, E], got "
                        f"{type(edge_index).__name__}")
    if edge_index.is_floating_point() or edge_index.is_complex() or edge_index.dtype == torch.bool:
        raise TypeError(f"edge_index must hold integers (torch.int32 or torch.int64), got "
                        f"{edge_index.dtype}")
    if edge_index.dim() != 2 or edge_index.size(0) != 2:
        raise ValueError(f"edge_index must have shape [2, E] (row 0 = keys/sources, row 1 = "
                         f"queries/targets), got shape {list(edge_index.shape)}")
    if edge_index.device.type == "meta":
        raise ValueError("edge_index is on the meta device: a TokenGraph sorts and checks its "
                         "edges, which needs their values; build it from a CPU or CUDA "
                         "tensor (or build the graph first and move it with graph.to(device))")
    if isinstance(edge_index, EdgeIndex):
        edge_index = edge_index.as_tensor()
    return edge_index.long()


def check_bias_values(edge_bias: Tensor) -> None:
    """NaN has no meaning as a score and +inf no finite softmax: both are errors (-inf is how
    an edge is masked out)."""
    ok = edge_bias < math.inf                    # False for NaN and +inf: one pass
    if not ok.all():
        first = int((~ok).nonzero()[0, 0])
        kind = "NaN" if torch.isnan(edge_bias.flatten()[first]) else "+inf"
        raise ValueError(f"edge_bias contains {kind} (at edge {first}); use -inf to mask an "
                         f"edge out")
