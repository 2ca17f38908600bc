"""Mask generators: each returns a :class:`~attngraph.TokenGraph` (edge ``j -> i``: query i
attends to key j), built vectorised in canonical order.

One module per family: ``windows`` (full, causal, sliding / dilated windows, strided),
``global_tokens`` (global tokens, Longformer), ``random`` (random keys, BigBird),
``blocks`` (block layouts, Sparse Transformer fixed, LongNet dilated blocks),
``documents`` (packed documents), ``dynamic`` (SCFA hash buckets, query/key dropping),
``neighborhood`` (NATTEN neighbourhoods on 1-, 2- and 3-D grids) and ``rectangles``
(prefix-LM, unions of full / causal query x key rectangles).
"""
from attngraph.graph import batch
from attngraph.masks.blocks import block_sparse, dilated_block, fixed
from attngraph.masks.documents import document
from attngraph.masks.dynamic import hash_buckets, lsh_buckets, qk_drop
from attngraph.masks.global_tokens import global_tokens, longformer
from attngraph.masks.neighborhood import neighborhood
from attngraph.masks.random import bigbird, random
from attngraph.masks.rectangles import from_ranges, prefix_lm
from attngraph.masks.windows import causal, dilated_window, full, sliding_window, strided
from attngraph.stacked import stack

__all__ = [
    "batch",
    "full",
    "causal",
    "sliding_window",
    "dilated_window",
    "dilated_block",
    "strided",
    "global_tokens",
    "longformer",
    "random",
    "bigbird",
    "block_sparse",
    "fixed",
    "document",
    "hash_buckets",
    "qk_drop",
    "lsh_buckets",
    "prefix_lm",
    "neighborhood",
    "from_ranges",
    "stack",
]
