"""Hugging Face transformers attention backend: ``attn_implementation="attngraph"``.

Importing this module registers ``"attngraph"`` with transformers' ``AttentionInterface``
(the attention function, :func:`graph_attention_forward`) and ``AttentionMaskInterface``
(:func:`padding_mask`: the model builds only the 2-D padding mask for it, never a dense
``[B, 1, L_q, L_k]`` one). A model made with it takes ``attention_graph=`` in ``forward``;
transformers passes extra ``forward`` keywords down through its decoder layers to the
attention function, which reads the graph there::

    import attngraph.integrations.transformers   # registers "attngraph"
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="attngraph")
    model(input_ids, attention_graph=g)          # g: the mask of every layer

``attention_graph`` replaces the model's own mask in every layer (sliding-window layers
included) and is one of:

* a :class:`~attngraph.TokenGraph` over the ``L`` tokens (``num_dst = num_src = L``),
  shared by every sequence and head, explicit or implicit (``implicit=True``);
* a :class:`~attngraph.stacked.StackedGraph` of shape ``(1, H)`` (per head), ``(B, H)``
  (per sequence and head) or ``(B, 1)`` (per sequence), ``H`` the query heads; with GQA
  each query head reads its key/value head, which is never repeated;
* ``None``: causal attention (with the layer's sliding window where the model gives one;
  full attention in a layer that is not causal).

For a forward over a cache (``L_q`` new tokens after ``L_k - L_q`` cached ones) a graph is
bipartite, ``num_dst = L_q`` and ``num_src = L_k``; the default is causal, aligned at the
last key (query ``i`` sees keys ``j <= i + L_k - L_q``).

A 2-D padding ``attention_mask [B, L_k]`` (1 = token, 0 = padding) is honoured: padded keys
are taken out of the graph of each sequence, and a query left without keys (a padded query
under left padding) gets output 0, never NaN. The intersection is built once per forward
and shared by the layers: for the default causal mask it stays a rule (a per-sequence
:func:`~attngraph.masks.qk_drop`, ``O(B L)`` memory); a given graph is materialised as
``B x H_g`` explicit graphs (``B`` times its edges).

Packed sequences: as transformers' own masks do, without a graph, a padding mask or a
cache, ``position_ids`` that restart (a step other than +1) split each row into
documents, and the default mask becomes causal within each
(:func:`~attngraph.masks.document`).

Not supported, each raising ``ValueError``: attention dropout in training (set the
config's ``attention_dropout`` to 0), logit soft-capping, attention sinks, 4-D masks
(give them as ``attention_graph``). ``output_attentions`` returns ``None`` weights. The
model's other mask variations are not applied: image-token overlays, caches that return
more keys than tokens seen (static caches); express such masks as ``attention_graph``.

``torch.compile`` of the model: with an explicit :class:`~attngraph.TokenGraph` and no
``attention_mask`` the whole model compiles as one graph (``fullgraph=True``), the
attention as :func:`attngraph.graph_attention`'s ``torch.library`` ops.
``graph_attention`` does not trace implicit graphs or stacks, and building the default,
padded or packed graphs is data-dependent: in those cases each layer's attention runs
eagerly between compiled pieces (graph breaks) and the rest of the model is compiled.
"""
from __future__ import annotations

import functools
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from attngraph.graph import TokenGraph
from attngraph.masks import causal as _causal, full as _full, qk_drop, sliding_window
from attngraph.ops.functional import graph_attention
from attngraph.stacked import StackedGraph

try:
    from transformers.masking_utils import AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("attngraph.integrations.transformers needs transformers >= 4.53 "
                      "(AttentionInterface and AttentionMaskInterface): "
                      "pip install 'attngraph[hf]'") from e

__all__ = ["NAME", "graph_attention_forward", "padding_mask", "drop_keys"]

NAME = "attngraph"

Graph = Union[TokenGraph, StackedGraph]

# The per-sequence graphs built for one padding mask live on that mask tensor: the model
# hands the same tensor to every layer of one forward, and the cache dies with it.
_CACHE_ATTR = "_attngraph_padded_graphs"


def padding_mask(batch_size: Optional[int] = None, *, attention_mask: Optional[Tensor] = None,
                 kv_length: Optional[int] = None, **kwargs) -> Optional[Tensor]:
    """The mask a model builds for ``"attngraph"``: its 2-D padding mask, or ``None``.

    transformers calls it (``AttentionMaskInterface``) in place of building a dense mask.

    Args:
        batch_size: ``B`` (unused: the padding mask has it).
        attention_mask: bool ``[B, T]`` padding mask (True = token), or ``None``.
        kv_length: ``L_k``, the keys of the attention: the mask's last ``L_k`` columns
            are kept.
        **kwargs: the other mask arguments (mask function, offsets), unused: the mask
            pattern is ``attention_graph`` or the default of the attention function.

    Returns:
        bool ``[B, L_k]``, or ``None`` where nothing is padded.
    """
    if attention_mask is None:
        return None
    mask = attention_mask if kv_length is None else attention_mask[:, -kv_length:]
    # Checking every token is data-dependent: under torch.compile the mask stays.
    if not torch.compiler.is_compiling() and bool(mask.all()):
        return None
    return mask.bool()


def graph_attention_forward(module: torch.nn.Module, query: Tensor, key: Tensor,
                            value: Tensor, attention_mask: Optional[Tensor],
                            scaling: Optional[float] = None, dropout: float = 0.0, *,
                            attention_graph: Optional[Graph] = None,
                            sliding_window: Optional[int] = None, softcap=None, s_aux=None,
                            is_causal: Optional[bool] = None, **kwargs
                            ) -> Tuple[Tensor, None]:
    """transformers' attention function for ``attn_implementation="attngraph"``.

    Args:
        module: the attention layer (its ``is_causal`` and ``training`` are read).
        query: ``[B, H, L_q, D]``.
        key: ``[B, H_kv, L_k, D]`` (``H % H_kv == 0``: GQA without repeating K/V).
        value: ``[B, H_kv, L_k, D_v]``.
        attention_mask: bool ``[B, L_k]`` padding mask from :func:`padding_mask`, or
            ``None``.
        scaling: score scale, default ``1 / sqrt(D)``.
        dropout: attention dropout; only 0 is supported.
        attention_graph: the mask (see the module docstring); ``None``: causal.
        sliding_window: the layer's window ``w`` (causal: keys ``i - w < j <= i``;
            otherwise ``|i - j| <= w``), used when no graph is given.
        softcap, s_aux: logit soft-capping and attention sinks: unsupported.
        is_causal: overrides ``module.is_causal`` for the default mask.
        **kwargs: the model's other keywords, unused.

    Returns:
        ``(out [B, L_q, H, D_v], None)``; a query without keys gets ``out = 0``.
    """
    if dropout and module.training:
        raise ValueError(f"attn_implementation='attngraph' has no attention dropout, got "
                         f"dropout={dropout} in training; set the config's "
                         f"attention_dropout to 0.0")
    if softcap is not None:
        raise ValueError(f"attn_implementation='attngraph' does not soft-cap logits, got "
                         f"softcap={softcap}; use attn_implementation='eager' for this model")
    if s_aux is not None:
        raise ValueError("attn_implementation='attngraph' has no attention sinks (s_aux); "
                         "use attn_implementation='eager' for this model")
    B, H, L_q = query.shape[:3]
    L_k = key.size(2)
    keep = _check_padding(attention_mask, B, L_k)
    if attention_graph is not None:
        _check_graph(attention_graph, B, H, L_q, L_k, query.device)
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    if keep is None and isinstance(attention_graph, TokenGraph) and \
            not attention_graph.is_implicit:
        return graph_attention(q, k, v, attention_graph, scale=scaling), None
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    # As transformers' own masks: restarting position ids without a padding mask or a
    # cache are packed sequences, each attending only to itself.
    position_ids = kwargs.get("position_ids")
    packed = (position_ids if attention_graph is None and keep is None and L_q == L_k
              and isinstance(position_ids, Tensor) and position_ids.dim() == 2
              and position_ids.size(1) == L_q and not kwargs.get("use_cache") else None)
    return _attend(q, k, v, attention_graph, keep, bool(causal), sliding_window,
                   scaling, packed), None


# graph_attention traces (torch.compile) on an explicit TokenGraph only: the default and
# padded graphs are built here, and implicit graphs and stacks run here too, eagerly
# between the compiled pieces of a compiled model.
@torch.compiler.disable
def _attend(q: Tensor, k: Tensor, v: Tensor, graph: Optional[Graph], keep: Optional[Tensor],
            causal: bool, window: Optional[int], scale: Optional[float],
            position_ids: Optional[Tensor] = None) -> Tensor:
    L_q, L_k = q.size(1), k.size(1)
    if graph is None and position_ids is not None:
        graph = _cached(position_ids, (causal, window),
                        lambda: _packed_graph(position_ids, q.size(0), causal, window))
    if graph is None:
        graph = _default_graph(L_q, L_k, causal, window, q.device, keep)
    elif keep is not None:
        graph = _cached(keep, graph, lambda: drop_keys(graph, keep))
    return graph_attention(q, k, v, graph, scale=scale)


# ---------------------------------------------------------------------------- checks
def _check_graph(graph, B: int, H: int, L_q: int, L_k: int, device: torch.device) -> None:
    if not isinstance(graph, (TokenGraph, StackedGraph)):
        raise ValueError(f"attention_graph must be an attngraph.TokenGraph over the sequence "
                         f"or a StackedGraph per head / per (sequence, head), got "
                         f"{type(graph).__name__}")
    if (graph.num_dst, graph.num_src) != (L_q, L_k):
        over = (f"over the sequence length ({L_k} tokens)" if L_q == L_k else
                f"bipartite with num_dst={L_q} (new tokens) and num_src={L_k} (cached and "
                f"new tokens)")
        raise ValueError(f"attention_graph has num_dst={graph.num_dst}, "
                         f"num_src={graph.num_src}, but the model attends {L_q} queries to "
                         f"{L_k} keys; build the graph {over}, e.g. "
                         f"masks.sliding_window({L_k}, 64, causal=True)")
    if isinstance(graph, StackedGraph):
        B_g, H_g = graph.shape
        if B_g not in (1, B) or H_g not in (1, H):
            raise ValueError(f"attention_graph is a StackedGraph of shape {graph.shape}, but "
                             f"the model runs {B} sequences with {H} query heads; stack "
                             f"(1, {H}) graphs per head or ({B}, {H}) per sequence and head")
    if graph.device != device:
        raise ValueError(f"attention_graph is on {graph.device} but the model's tensors are "
                         f"on {device}; pass attention_graph.to({str(device)!r})")


def _check_padding(mask, B: int, L_k: int) -> Optional[Tensor]:
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise ValueError(f"attn_implementation='attngraph' takes a 2-D padding "
                         f"attention_mask, got {type(mask).__name__}")
    if mask.dim() != 2:
        raise ValueError(f"attn_implementation='attngraph' takes a 2-D padding attention_mask "
                         f"[B, L] (1 = token, 0 = padding), got shape {list(mask.shape)}; "
                         f"give other masks as attention_graph= (e.g. "
                         f"attngraph.TokenGraph.from_dense(mask))")
    if tuple(mask.shape) != (B, L_k):
        raise ValueError(f"the padding attention_mask has shape {list(mask.shape)}, expected "
                         f"[{B}, {L_k}] (batch, keys)")
    return mask.bool()


# ---------------------------------------------------------------------------- graphs
@functools.lru_cache(maxsize=32)
def _default_unpadded(L_q: int, L_k: int, causal: bool, window: Optional[int],
                      device: torch.device) -> TokenGraph:
    """The model's own mask as a graph: causal or full, within a sliding window."""
    if L_q == L_k:
        if window is None:
            return (_causal(L_k, implicit=True) if causal else
                    _full(L_k, implicit=True)).to(device)
        return sliding_window(L_k, max(window - 1, 0) if causal else window, causal=causal,
                              implicit=True).to(device)
    off = L_k - L_q     # queries are the last L_q tokens

    def mask_mod(i, j):
        i = i + off
        seen = j <= i if causal else torch.ones_like(j, dtype=torch.bool)
        if window is not None:
            seen = seen & ((i - j < window) if causal else ((i - j).abs() <= window))
        return seen

    return TokenGraph.from_mask_mod(mask_mod, L_q, L_k, device=device)


def _default_graph(L_q: int, L_k: int, causal: bool, window: Optional[int],
                   device: torch.device, keep: Optional[Tensor]) -> Graph:
    if window is not None and window >= L_k:
        window = None
    if keep is None:
        return _default_unpadded(L_q, L_k, causal, window, device)
    if L_q == L_k and window is None:
        # Stays a rule: each sequence's kept keys, and each query's prefix of them.
        return _cached(keep, ("qk_drop", causal), lambda: qk_drop(
            torch.ones_like(keep).unsqueeze(1), keep.unsqueeze(1), causal=causal,
            implicit=True))
    base = _default_unpadded(L_q, L_k, causal, window, device)
    return _cached(keep, base, lambda: drop_keys(base, keep))


def _cached(carrier: Tensor, graph, build):
    """``build()``, kept on ``carrier`` (the padding mask or the position ids of one
    forward) for the other layers; ``graph``: the graph it derives from (compared by
    identity), or the settings it depends on (compared by value), or None."""
    if isinstance(graph, StackedGraph):
        key = (graph.graph, graph.shape)
    elif isinstance(graph, TokenGraph):
        key = (graph, None)
    else:
        key = (None, graph)
    entries = getattr(carrier, _CACHE_ATTR, None)
    if entries is None:
        entries = []
        setattr(carrier, _CACHE_ATTR, entries)
    for k, result in entries:
        if k[0] is key[0] and k[1] == key[1]:
            return result
    result = build()
    entries.append((key, result))
    return result


def _packed_graph(position_ids: Tensor, B: int, causal: bool,
                  window: Optional[int]) -> Optional[Graph]:
    """The documents of packed sequences, from ``position_ids [1 or B, L]`` that restart
    (a step other than +1 starts a document); None where no sequence restarts."""
    from attngraph.masks import document, stack

    pos = position_ids.expand(B, -1)
    L = pos.size(1)
    starts = torch.ones(B, L, dtype=torch.bool, device=pos.device)
    starts[:, 1:] = pos[:, 1:] - pos[:, :-1] != 1
    if L < 2 or not bool(starts[:, 1:].any()):
        return None
    rows = []
    for b in range(B):
        first = starts[b].nonzero().view(-1).cpu()
        rows.append(torch.diff(first, append=torch.tensor([L])))

    def docs(lengths):
        g = document(lengths, causal=causal, implicit=window is None)
        if window is not None and window < L:
            g = g & sliding_window(L, max(window - 1, 0) if causal else window,
                                   causal=causal)
        return g.to(pos.device)

    if all(torch.equal(r, rows[0]) for r in rows):
        return docs(rows[0])
    return stack([docs(r).materialize() for r in rows], shape=(B, 1))


def drop_keys(graph: Graph, keep: Tensor) -> StackedGraph:
    """The graph of each sequence without the keys it does not keep.

    Args:
        graph: a :class:`TokenGraph` (shared by the batch and the heads) or a
            :class:`StackedGraph` of shape ``(1 or B, H_g)``; an implicit graph is
            materialised.
        keep: bool ``[B, num_src]``: ``keep[b, j]`` False removes every edge from key ``j``
            in sequence ``b``.

    Returns:
        StackedGraph of shape ``(B, H_g)``: slice ``(b, h)`` holds the edges of
        ``graph[b, h]`` whose key sequence ``b`` keeps.
    """
    if isinstance(graph, StackedGraph):
        base, (B_g, H_g) = graph.graph, graph.shape
    else:
        base, B_g, H_g = graph, 1, 1
    n_src, n_dst = graph.num_src, graph.num_dst
    B = keep.size(0)
    src, dst, ptr = base.src, base.dst, base.ptr
    per_seq = H_g * n_dst                   # query nodes of one sequence's slices
    srcs, dsts = [], []
    for b in range(B):
        b_g = b if B_g > 1 else 0
        e0, e1 = int(ptr[b_g * per_seq]), int(ptr[(b_g + 1) * per_seq])
        s, d = src[e0:e1], dst[e0:e1]
        local = s - (d // max(n_dst, 1)) * n_src          # key position within its slice
        kept = keep[b, local]
        shift = b - b_g                                    # sequences shifted to slot b
        srcs.append(s[kept] + shift * H_g * n_src)
        dsts.append(d[kept] + shift * per_seq)
    stacked = TokenGraph._from_canonical(torch.cat(srcs), torch.cat(dsts),
                                         B * H_g * n_src, B * per_seq)
    return StackedGraph(stacked, (B, H_g), n_src, n_dst)


AttentionInterface.register(NAME, graph_attention_forward)
AttentionMaskInterface.register(NAME, padding_mask)
