"""Shared numerics (attngraph.ops.numerics): the log-sum-exp merge and the backward
preamble every backend starts from."""
import torch

from attngraph.ops.numerics import backward_preamble, compute_dtype, merge, merge_many

INF = float("inf")


def _part(scores, values):
    """Normalised attention and lse of one query row over a set of edges."""
    if not scores.numel():
        empty_out = torch.zeros(values.size(-1), dtype=torch.float64)
        return empty_out, torch.tensor(-INF, dtype=torch.float64)
    p = torch.softmax(scores, 0)
    return p @ values, torch.logsumexp(scores, 0)


def test_merge_of_disjoint_parts_is_the_whole():
    gen = torch.Generator().manual_seed(0)
    s = torch.randn(7, generator=gen, dtype=torch.float64)
    v = torch.randn(7, 3, generator=gen, dtype=torch.float64)
    whole = _part(s, v)
    for cut in range(8):
        a, b = _part(s[:cut], v[:cut]), _part(s[cut:], v[cut:])
        out, lse = merge(a[0].view(1, 1, 3), a[1].view(1, 1), b[0].view(1, 1, 3),
                         b[1].view(1, 1))
        torch.testing.assert_close(out.view(3), whole[0])
        torch.testing.assert_close(lse.view(()), whole[1])


def test_merge_keeps_empty_rows_empty_without_nan_gradients():
    out_a = torch.zeros(2, 1, 3, requires_grad=True)
    lse_a = torch.tensor([[-INF], [0.0]], requires_grad=True)
    out_b = torch.zeros(2, 1, 3, requires_grad=True)
    lse_b = torch.full((2, 1), -INF, requires_grad=True)
    out, lse = merge(out_a, lse_a, out_b, lse_b)
    assert lse[0, 0] == -INF and torch.equal(out[0], torch.zeros(1, 3))
    (out.sum() + torch.where(torch.isinf(lse), 0.0, lse).sum()).backward()
    for t in (out_a, lse_a, out_b, lse_b):
        assert not torch.isnan(t.grad).any()


def test_backward_preamble():
    out = torch.tensor([[[1.0, 2.0]], [[0.0, 0.0]]])
    dout = torch.tensor([[[3.0, 4.0]], [[5.0, 6.0]]])
    lse = torch.tensor([[0.5], [-INF]])
    dlse = torch.tensor([[1.0], [7.0]])
    delta, lse_safe, dlse_safe = backward_preamble(out, dout, lse, dlse)
    assert torch.equal(delta, torch.tensor([[11.0 - 1.0], [0.0]]))
    assert torch.equal(lse_safe, torch.tensor([[0.5], [INF]]))
    assert torch.equal(dlse_safe, torch.tensor([[1.0], [0.0]]))
    d64, _, _ = backward_preamble(out, dout, lse, None, dtype=torch.float64)
    assert d64.dtype == torch.float64
    assert backward_preamble(out, dout, lse, dlse, delta=False)[0] is None
    assert compute_dtype(torch.bfloat16) == torch.float32
    assert compute_dtype(torch.float64) == torch.float64


def test_merge_many_agrees_with_pairwise_merges():
    gen = torch.Generator().manual_seed(1)
    R, P, H, D = 5, 3, 2, 4
    out = torch.randn(R, P, H, D, generator=gen, dtype=torch.float64)
    lse = torch.randn(R, P, H, generator=gen, dtype=torch.float64)
    lse[0] = -INF                                        # a row empty in every part
    lse[1, 1] = -INF                                     # a part without edges
    out[lse.isinf()] = 0
    many_out, many_lse = merge_many(out, lse)
    pair_out, pair_lse = out[:, 0], lse[:, 0]
    for p in range(1, P):
        pair_out, pair_lse = merge(pair_out, pair_lse, out[:, p], lse[:, p])
    torch.testing.assert_close(many_out, pair_out)
    torch.testing.assert_close(many_lse, pair_lse)
