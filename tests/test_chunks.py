"""The one row chunker's contract (attngraph.chunks.row_chunks)."""
import pytest
import torch

from attngraph.chunks import row_chunks


def _ptr(degrees):
    ptr = torch.zeros(len(degrees) + 1, dtype=torch.long)
    ptr[1:] = torch.cumsum(torch.tensor(degrees, dtype=torch.long), 0)
    return ptr


@pytest.mark.parametrize("degrees", [[], [0], [0, 0, 0], [3, 1, 4, 1, 5, 9, 2, 6],
                                     [100], [1, 100, 1], [0, 7, 0, 0, 7, 0]],
                         ids=["no-rows", "one-empty", "all-empty", "mixed", "one-long",
                              "long-middle", "empty-between"])
@pytest.mark.parametrize("max_edges", [1, 4, 10, 1000])
def test_chunks_cover_every_row_once_and_stay_within_the_budget(degrees, max_edges):
    ptr = _ptr(degrees)
    chunks = row_chunks(ptr, max_edges)
    assert [r for r0, r1 in chunks for r in range(r0, r1)] == list(range(len(degrees)))
    for r0, r1 in chunks:
        assert r1 > r0
        edges = int(ptr[r1] - ptr[r0])
        assert edges <= max_edges or r1 - r0 == 1     # a longer row alone


def test_chunks_start_anywhere_in_a_csr():
    ptr = _ptr([2, 2, 2, 2])[1:3] + 10          # rows of a slice: ptr[0] != 0
    assert row_chunks(ptr, 2) == [(0, 1)]
