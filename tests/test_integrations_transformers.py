"""The transformers backend: models with ``attn_implementation="attngraph"`` against eager.

Tiny random-weight models built from configs (nothing is downloaded), in float64. The
reference is the same model with ``attn_implementation="eager"`` and the same weights,
given the expected mask as a 4-D additive mask. Eager takes its softmax in float32, so
the tolerances are float32's.
"""
import pytest
import torch

transformers = pytest.importorskip("transformers")

import attngraph as ag  # noqa: E402
from attngraph import masks  # noqa: E402
from attngraph.integrations import transformers as hf  # noqa: E402
from attngraph.stacked import StackedGraph  # noqa: E402

L = 24          # tokens per sequence
B = 2           # sequences
H = 4           # query heads
WINDOW = 6      # the Mistral config's own sliding window (keys i - 6 < j <= i)

ARCHS = {
    "llama": (transformers.LlamaConfig, {}),
    "mistral": (transformers.MistralConfig, {"sliding_window": WINDOW}),
}


def make_config(arch: str, kv_heads: int, implementation: str):
    cls, extra = ARCHS[arch]
    return cls(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
               num_attention_heads=H, num_key_value_heads=kv_heads,
               max_position_embeddings=64, attention_dropout=0.0, **extra,
               attn_implementation=implementation)


def make_models(arch: str, kv_heads: int):
    """The attngraph model and an eager one with the same weights; one config each, as
    the implementation is stored on the config."""
    torch.manual_seed(0)
    models = []
    for impl in ("attngraph", "eager"):
        config = make_config(arch, kv_heads, impl)
        models.append(transformers.AutoModelForCausalLM.from_config(
            config, attn_implementation=impl).double())
    ours, eager = models
    eager.load_state_dict(ours.state_dict())
    assert (ours.config._attn_implementation, eager.config._attn_implementation) == (
        "attngraph", "eager")
    return ours, eager


def default_mask(arch: str) -> torch.Tensor:
    """bool ``[L, L]``: the model's own mask (causal, within the config's window)."""
    i = torch.arange(L).view(-1, 1)
    j = torch.arange(L).view(1, -1)
    mask = j <= i
    if ARCHS[arch][1].get("sliding_window"):
        mask &= i - j < WINDOW
    return mask


def additive(allowed: torch.Tensor) -> torch.Tensor:
    """bool ``[B, H or 1, L, L]`` -> 0 / min float mask. float32's min: eager's softmax runs
    in float32, where float64's min would be -inf and make rows without keys NaN."""
    return torch.zeros(allowed.shape, dtype=torch.float64).masked_fill(
        ~allowed, torch.finfo(torch.float32).min)


def graph_dense(graph) -> torch.Tensor:
    """bool ``[B or 1, H or 1, L, L]`` of a TokenGraph or StackedGraph."""
    if isinstance(graph, StackedGraph):
        B_g, H_g = graph.shape
        return torch.stack([torch.stack([graph[b, h].to_dense() for h in range(H_g)])
                            for b in range(B_g)])
    return graph.to_dense()[None, None]


def _stack_per_head():
    return masks.stack([masks.causal(L), masks.sliding_window(L, 2, causal=True),
                        masks.strided(L, 5), masks.random(L, 4, seed=3, causal=True)])


def _stack_per_sequence_and_head():
    graphs = [masks.sliding_window(L, 1 + b + h, causal=True) for b in range(B)
              for h in range(H)]
    return masks.stack(graphs, shape=(B, H))


# name -> graph builder (None: no graph, the model's own mask)
GRAPHS = {
    "no-graph": lambda: None,
    "sliding-window": lambda: masks.sliding_window(L, 3, causal=True),
    "implicit-longformer": lambda: masks.longformer(L, 2, [0], causal=True, implicit=True),
    "implicit-sliding": lambda: masks.sliding_window(L, 4, causal=True, implicit=True),
    "per-head-stack": _stack_per_head,
    "per-sequence-head-stack": _stack_per_sequence_and_head,
}

# name -> 2-D padding mask (1 = token), or None
PADDING = {
    "unpadded": None,
    "left-and-right-padded": torch.tensor([[0] * 5 + [1] * (L - 5),
                                           [1] * (L - 3) + [0] * 3]),
}


def run(model, ids, *, weights, valid, **kwargs):
    """Logits at the valid positions and the gradients of a random projection of them
    with respect to every parameter."""
    model.zero_grad()
    logits = model(ids, **kwargs).logits
    loss = (logits * weights)[valid].sum()
    loss.backward()
    grads = {n.removeprefix("_orig_mod."): p.grad.clone()       # a compiled model's names
             for n, p in model.named_parameters() if p.grad is not None}
    return logits, grads


def assert_close(a, b):
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("padding", list(PADDING), ids=list(PADDING))
@pytest.mark.parametrize("graph_name", list(GRAPHS), ids=list(GRAPHS))
@pytest.mark.parametrize("arch,kv_heads", [("llama", 2), ("llama", 4), ("mistral", 2)],
                         ids=["llama-gqa", "llama-mha", "mistral-gqa"])
def test_logits_and_gradients_equal_eager(arch, kv_heads, graph_name, padding):
    ours, eager = make_models(arch, kv_heads)
    graph = GRAPHS[graph_name]()
    pad = PADDING[padding]
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 61, (B, L), generator=gen)
    weights = torch.randn(B, L, 61, generator=gen, dtype=torch.float64)

    allowed = (default_mask(arch)[None, None] if graph is None else graph_dense(graph))
    allowed = allowed.expand(B, -1, L, L)
    valid = torch.ones(B, L, dtype=torch.bool)
    kwargs = {}
    if graph is not None:
        kwargs["attention_graph"] = graph
    if pad is not None:
        kwargs["attention_mask"] = pad
        valid = pad.bool()
        allowed = allowed & valid[:, None, None, :]
    # Queries without any key: ours give 0, eager a mean over all keys; neither reaches
    # a valid query (it never attends a padded key), so only valid positions compare.
    got, got_grads = run(ours, ids, weights=weights, valid=valid, **kwargs)
    want, want_grads = run(eager, ids, weights=weights, valid=valid,
                           attention_mask=additive(allowed))
    assert torch.isfinite(got).all()
    assert_close(got[valid], want[valid])
    assert got_grads.keys() == want_grads.keys()
    for name in want_grads:
        assert_close(got_grads[name], want_grads[name])


def test_full_and_sliding_layers_keep_their_own_masks():
    """Without a graph each layer runs the model's mask for it: Qwen2 with a full layer
    then a sliding-window one, against eager's own masks."""
    torch.manual_seed(0)
    models = []
    for impl in ("attngraph", "eager"):
        config = transformers.Qwen2Config(
            vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=H, num_key_value_heads=2, use_sliding_window=True,
            sliding_window=WINDOW, max_window_layers=1, attn_implementation=impl)
        models.append(transformers.AutoModelForCausalLM.from_config(
            config, attn_implementation=impl).double())
    ours, eager = models
    eager.load_state_dict(ours.state_dict())
    assert ours.config.layer_types == ["full_attention", "sliding_attention"]
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 61, (B, L), generator=gen)
    weights = torch.randn(B, L, 61, generator=gen, dtype=torch.float64)
    valid = torch.ones(B, L, dtype=torch.bool)
    got, got_grads = run(ours, ids, weights=weights, valid=valid)
    want, want_grads = run(eager, ids, weights=weights, valid=valid)
    assert_close(got, want)
    for name in want_grads:
        assert_close(got_grads[name], want_grads[name])
    # and the window matters: causal everywhere would differ
    ours.config.layer_types = ["full_attention", "full_attention"]
    ours.model.layers[1].self_attn.sliding_window = None
    assert not torch.allclose(ours(ids).logits, want)


def _positions(*lengths):
    return torch.cat([torch.arange(n) for n in lengths])


PACKINGS = {
    "one-packing": torch.stack([_positions(10, 9, 5)] * B),
    "a-packing-per-sequence": torch.stack([_positions(10, 14), _positions(3, 8, 13)]),
    "shared-row": _positions(7, 17).unsqueeze(0),
}


@pytest.mark.parametrize("packing", list(PACKINGS), ids=list(PACKINGS))
@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_packed_sequences_attend_within_their_document(arch, packing):
    """Restarting position ids without padding or cache: as eager's own masks, each
    packed sequence attends causally to itself only (within the window, for Mistral)."""
    ours, eager = make_models(arch, 2)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 61, (B, L), generator=gen)
    weights = torch.randn(B, L, 61, generator=gen, dtype=torch.float64)
    valid = torch.ones(B, L, dtype=torch.bool)
    kwargs = {"position_ids": PACKINGS[packing], "use_cache": False}
    got, got_grads = run(ours, ids, weights=weights, valid=valid, **kwargs)
    want, want_grads = run(eager, ids, weights=weights, valid=valid, **kwargs)
    assert_close(got, want)
    for name in want_grads:
        assert_close(got_grads[name], want_grads[name])
    unpacked = ours(ids, position_ids=PACKINGS[packing], use_cache=False,
                    attention_graph=masks.causal(L)).logits
    assert not torch.allclose(unpacked, want)


def test_no_dense_mask_is_built():
    """The model hands the attention function its 2-D padding mask, sliced to the keys,
    or None when nothing is padded: never a [B, 1, L, L] mask."""
    pad = PADDING["left-and-right-padded"].bool()
    assert torch.equal(hf.padding_mask(B, attention_mask=pad, kv_length=L), pad)
    assert torch.equal(hf.padding_mask(B, attention_mask=pad, kv_length=L - 4), pad[:, 4:])
    assert hf.padding_mask(B, attention_mask=torch.ones(B, L, dtype=torch.bool),
                           kv_length=L) is None
    assert hf.padding_mask(B, attention_mask=None, kv_length=L) is None

    seen = []

    def spy(module, query, key, value, attention_mask, **kwargs):
        seen.append(attention_mask)
        return hf.graph_attention_forward(module, query, key, value, attention_mask,
                                          **kwargs)

    ours, _ = make_models("llama", 2)
    transformers.AttentionInterface.register("attngraph-spy", spy)
    transformers.AttentionMaskInterface.register("attngraph-spy", hf.padding_mask)
    try:
        ours.set_attn_implementation("attngraph-spy")
        ids = torch.randint(0, 61, (B, L))
        ours(ids)
        ours(ids, attention_mask=PADDING["left-and-right-padded"])
    finally:
        for interface in (transformers.AttentionInterface, transformers.AttentionMaskInterface):
            interface._global_mapping.pop("attngraph-spy", None)
    assert seen[:2] == [None, None]
    assert all(m.shape == (B, L) and m.dtype == torch.bool for m in seen[2:])


def test_padded_queries_without_keys_give_finite_outputs_and_gradients():
    """Left padding leaves the padded queries of a causal mask without keys: 0, not NaN."""
    ours, _ = make_models("llama", 2)
    pad = torch.tensor([[0] * (L - 2) + [1] * 2, [1] * L])
    ids = torch.randint(0, 61, (B, L))
    for graph in (None, masks.sliding_window(L, 2, causal=True)):
        ours.zero_grad()
        logits = ours(ids, attention_mask=pad, attention_graph=graph).logits
        logits.sum().backward()
        assert torch.isfinite(logits).all()
        assert all(torch.isfinite(p.grad).all() for p in ours.parameters()
                   if p.grad is not None)


def test_padding_graph_is_built_once_per_forward(monkeypatch):
    calls = []
    drop = hf.drop_keys
    monkeypatch.setattr(hf, "drop_keys", lambda *a: calls.append(1) or drop(*a))
    ours, _ = make_models("llama", 2)
    ids = torch.randint(0, 61, (B, L))
    ours(ids, attention_mask=PADDING["left-and-right-padded"],
         attention_graph=masks.sliding_window(L, 3, causal=True))
    assert len(calls) == 1          # two layers, one padded graph


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_a_cached_forward_equals_the_full_forward(arch):
    """Decoding over a cache: the default mask is causal, aligned at the last key."""
    ours, _ = make_models(arch, 2)
    ids = torch.randint(0, 61, (B, L))
    full = ours(ids).logits
    prefix = ours(ids[:, :-2], use_cache=True)
    step = ours(ids[:, -2:], cache=prefix.cache, use_cache=True).logits
    assert_close(step, full[:, -2:])


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_greedy_generation_with_left_padding_equals_eager(arch):
    """generate(): a padded prefill, then one query per step over the cache."""
    ours, eager = make_models(arch, 2)
    ours, eager = ours.float().eval(), eager.float().eval()
    ids = torch.randint(1, 61, (B, 12))
    pad = torch.ones(B, 12, dtype=torch.long)
    pad[0, :4] = 0
    outs = [m.generate(ids, attention_mask=pad, max_new_tokens=6, do_sample=False,
                       pad_token_id=0, output_scores=True, return_dict_in_generate=True)
            for m in (ours, eager)]
    assert torch.equal(outs[0].sequences, outs[1].sequences)
    for got, want in zip(outs[0].scores, outs[1].scores):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_a_bipartite_graph_runs_over_a_cache():
    ours, _ = make_models("llama", 2)
    ids = torch.randint(0, 61, (B, L))
    g = masks.sliding_window(L, 3, causal=True)
    full = ours(ids, attention_graph=g).logits
    prefix = ours(ids[:, :-1], attention_graph=masks.sliding_window(L - 1, 3, causal=True),
                  use_cache=True)
    last_row = ag.TokenGraph.from_dense(g.to_dense()[-1:])         # 1 query over L keys
    step = ours(ids[:, -1:], cache=prefix.cache, use_cache=True,
                attention_graph=last_row).logits
    assert_close(step, full[:, -1:])


BAD_GRAPHS = {
    "wrong-size": (lambda: masks.causal(L + 1), "num_dst=25"),
    "bipartite-wrong-size": (lambda: ag.TokenGraph.from_dense(
        torch.ones(L, L - 1, dtype=torch.bool)), "num_src=23"),
    "dense-tensor": (lambda: masks.causal(L).to_dense(), "got Tensor"),
    "stack-wrong-heads": (lambda: masks.stack([masks.causal(L)] * 3), "shape (1, 3)"),
    "stack-wrong-batch": (lambda: masks.stack([masks.causal(L)] * 3, shape=(3, 1)),
                          "shape (3, 1)"),
}


@pytest.mark.parametrize("name", list(BAD_GRAPHS), ids=list(BAD_GRAPHS))
def test_a_wrong_graph_is_a_value_error_naming_attention_graph(name):
    ours, _ = make_models("llama", 2)
    build, detail = BAD_GRAPHS[name]
    with pytest.raises(ValueError, match="attention_graph") as info:
        ours(torch.randint(0, 61, (B, L)), attention_graph=build())
    assert detail in str(info.value)


def test_unsupported_features_are_value_errors():
    ours, _ = make_models("llama", 2)
    ids = torch.randint(0, 61, (B, L))
    with pytest.raises(ValueError, match="2-D padding attention_mask"):
        ours(ids, attention_mask=additive(default_mask("llama")[None, None].expand(
            B, 1, L, L)))
    ours.config.attention_dropout = 0.1
    for layer in ours.model.layers:
        layer.self_attn.attention_dropout = 0.1
    ours.train()
    with pytest.raises(ValueError, match="attention_dropout"):
        ours(ids)


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.slow
def test_model_with_an_explicit_graph_compiles_fullgraph(fresh_dynamo):
    ours, _ = make_models("llama", 2)
    ids = torch.randint(0, 61, (B, L))
    g = masks.sliding_window(L, 3, causal=True)
    assert torch._dynamo.explain(ours)(ids, attention_graph=g).graph_break_count == 0
    torch._dynamo.reset()
    weights = torch.randn(B, L, 61, dtype=torch.float64)
    valid = torch.ones(B, L, dtype=torch.bool)
    want, want_grads = run(ours, ids, weights=weights, valid=valid, attention_graph=g)
    compiled = torch.compile(ours, backend="aot_eager", fullgraph=True)
    got, got_grads = run(compiled, ids, weights=weights, valid=valid, attention_graph=g)
    assert_close(got, want)
    for name in want_grads:
        assert_close(got_grads[name], want_grads[name])


COMPILED_CASES = {
    "no-graph": {},
    "implicit": {"attention_graph": masks.sliding_window(L, 3, causal=True, implicit=True)},
    "per-head-stack": {"attention_graph": masks.stack([masks.causal(L)] * H)},
    "padded": {"attention_mask": PADDING["left-and-right-padded"]},
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(COMPILED_CASES), ids=list(COMPILED_CASES))
def test_compiled_model_equals_eager_mode(fresh_dynamo, case):
    """What graph_attention does not trace runs eagerly between compiled pieces."""
    ours, _ = make_models("llama", 2)
    ids = torch.randint(0, 61, (B, L))
    kwargs = COMPILED_CASES[case]
    want = ours(ids, **kwargs).logits
    got = torch.compile(ours, backend="aot_eager")(ids, **kwargs).logits
    assert_close(got, want)
