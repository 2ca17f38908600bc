"""Context parallel attention: processes started here (spawn, gloo on loopback), each run
with a time limit, compared with one process in float64."""
import socket

import pytest
import torch
import torch.multiprocessing as mp

import attngraph as ag
from attngraph import distributed as agd, masks

import dist_worker

TIME_LIMIT = 240


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world, scenario, tmp_path):
    """Run ``dist_worker.main`` on ``world`` ranks; their result dicts, by rank."""
    ctx = mp.start_processes(dist_worker.main, args=(world, _port(), scenario, str(tmp_path)),
                             nprocs=world, join=False, start_method="spawn")
    import time

    deadline = time.monotonic() + TIME_LIMIT
    while not ctx.join(timeout=max(1.0, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{scenario} on {world} ranks did not finish in {TIME_LIMIT} s")
    results = [torch.load(tmp_path / f"{scenario}-{r}.pt") for r in range(world)]
    for r, res in enumerate(results):
        assert "exception" not in res, f"rank {r}:\n{res['exception']}"
    return results


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_attention_equals_one_process(world, tmp_path):
    results = launch(world, "attention", tmp_path)
    for rank, res in enumerate(results):
        for name, case in res.items():
            for key, err in case["err"].items():
                assert err < 1e-10, f"rank {rank} {name} {key}: {err}"
            assert case["bitwise"], f"rank {rank} {name}: two runs differ"
    # the masks that bound the halo do: no halo at all / every remote key
    for rank, res in enumerate(results):
        assert res["no_halo"]["halo"] == 0
        assert res["every_key"]["halo"] == dist_worker.N - res["every_key"]["own"]
        assert 0 < res["sliding_window"]["halo"] <= 2 * 4
        # a shipped row pulls no keys: every row shipped leaves no halo at all
        assert res["every_row_shipped"]["halo"] == 0
        assert res["every_row_shipped"]["guests"] > 0
        assert res["longformer_shipped"]["halo"] < res["longformer"]["halo"]
    assert results[0]["one_global_shipped"]["guests"] == 0
    assert results[0]["one_global_shipped"]["shipped"] == world - 1
    # the ranks owning the global rows 0 and N - 1 ship them
    assert results[0]["longformer_shipped"]["shipped"] > 0
    assert results[-1]["longformer_shipped"]["shipped"] > 0


def test_sparse_self_attention_with_a_process_group(tmp_path):
    for res in launch(2, "layer", tmp_path):
        assert res["err"] < 1e-10


@pytest.mark.parametrize("kind, says", [("shard_size", "rank 1: ValueError: q has"),
                                        ("graph", "different graphs"),
                                        ("ranges", "different graphs or ranges")])
def test_bad_input_raises_on_every_rank(kind, says, tmp_path):
    results = launch(3, kind, tmp_path)
    for rank, res in enumerate(results):
        assert res["raised"] is not None, f"rank {rank} did not raise"
        assert says in res["raised"], res["raised"]


# ---------------------------------------------------------------------------- one process
def test_shard_ranges_balance_edges_and_tokens():
    g = masks.longformer(100, 2, [0])            # row 0 holds 100 edges
    by_edges = agd.shard_ranges(g, 4)
    by_tokens = agd.shard_ranges(g, 4, balance="tokens")
    assert by_tokens == [(0, 25), (25, 50), (50, 75), (75, 100)]
    assert by_edges[0][0] == 0 and by_edges[-1][1] == 100
    assert all(a[1] == b[0] for a, b in zip(by_edges, by_edges[1:]))
    deg = g.in_degree() + 1
    costs = [int(deg[a:b].sum()) for a, b in by_edges]
    assert max(costs) < max(int(deg[a:b].sum()) for a, b in by_tokens)
    few = agd.shard_ranges(2, 4)                 # more ranks than tokens: empty ranges
    assert few[0][0] == 0 and few[-1][1] == 2 and sum(b - a for a, b in few) == 2
    with pytest.raises(ValueError, match="balance"):
        agd.shard_ranges(g, 2, balance="flops")
    with pytest.raises(ValueError, match="world_size"):
        agd.shard_ranges(g, 0)


def test_no_process_group_is_a_clear_error():
    g = masks.sliding_window(10, 2)
    q = torch.randn(10, 1, 4)
    with pytest.raises(RuntimeError, match="init_process_group"):
        agd.graph_attention(q, q, q, g)


def test_ring_and_allgather_bytes():
    assert agd.ring_bytes(1000, 4, 2, 64, 64, 2) == 750 * 2 * 128 * 2
    assert agd.allgather_bytes(1000, 4, 2, 64, 64, 2) == (750 * 2 * 128 * 2,
                                                          1000 * 2 * 128 * 2)


@pytest.mark.parametrize("build", [
    lambda imp: masks.longformer(3000, 8, [0, 1500, 2999], implicit=imp),
    lambda imp: masks.document([100, 2500, 30, 370], causal=True, implicit=imp),
    lambda imp: masks.hash_buckets(torch.randint(0, 8, (3000,), generator=torch.Generator()
                                                 .manual_seed(0)), implicit=imp)])
def test_shard_ranges_of_an_implicit_graph_streams_its_degrees(build, monkeypatch):
    """An implicit graph's ranges are read from its rule a row chunk at a time (here 256
    rows): the same cuts and edge counts as the explicit graph's, and edge balance beats
    token balance wherever rows are uneven."""
    from attngraph import chunks

    monkeypatch.setattr(chunks, "ROW_CHUNK", 256)
    explicit, implicit = build(False), build(True)
    for world in (2, 3, 4, 7):
        ranges = agd.shard_ranges(implicit, world)
        assert ranges == agd.shard_ranges(explicit, world)
        edges = agd.shard_edges(implicit, ranges)
        assert edges == agd.shard_edges(explicit, ranges)
        assert sum(edges) == explicit.num_edges
        # the balanced cost is edges + tokens (a row's work): each cut misses its share by
        # at most half a row, so a range exceeds the mean by less than the heaviest row
        cost = [e + b - a for e, (a, b) in zip(edges, ranges)]
        heaviest = int(explicit.in_degree().max()) + 1
        assert max(cost) <= sum(cost) / world + heaviest
        even = agd.shard_ranges(explicit, world, balance="tokens")
        cost_even = [e + b - a for e, (a, b) in zip(agd.shard_edges(explicit, even), even)]
        assert max(cost) <= max(cost_even) + heaviest
    assert not getattr(implicit, "_explicit", None)          # never materialised


# ---------------------------------------------------------------------------- implicit graphs
@pytest.mark.parametrize("world", [2, 3])
def test_implicit_graphs_sharded_equal_one_process(world, tmp_path):
    """Every implicit family (windows, dilated, strided, Longformer / global tokens pulled or
    shipped, documents, hash buckets, QK drop, a union), an implicit graph with an edge
    bias, and an explicit graph of which each rank holds only its rows: forward and every
    gradient equal one process within 1e-10 (float64), two runs and a run without overlap
    are bitwise equal, and no
    rank materialises the graph or asks for another rank's rows (beyond the fingerprint's
    16 sample rows, each counted, then read where it has at most 1024 keys)."""
    results = launch(world, "implicit", tmp_path)
    for rank, res in enumerate(results):
        assert set(res) == set(dist_worker.implicit_cases())
        for name, case in res.items():
            for key, err in case["err"].items():
                assert err < 1e-10, f"rank {rank} {name} {key}: {err}"
            assert case["bitwise"], f"rank {rank} {name}: two runs differ"
            assert case["materialised"] == 0, f"rank {rank} {name} materialised the graph"
            assert case["foreign_rows"] <= 32, f"rank {rank} {name}: {case['foreign_rows']}"
        # the rule stays a rule where no bias asks for the canonical edge order
        assert res["window"]["own_implicit"] and res["hash"]["own_implicit"]
        assert not res["longformer_bias"]["own_implicit"]
        assert 0 < res["window"]["halo"] <= 2 * 4
        assert res["longformer_shipped"]["halo"] < res["longformer_pulled"]["halo"]
    assert sum(r["longformer_shipped"]["shipped"] for r in results) > 0
    assert sum(r["rows_only"]["guests"] for r in results) > 0


@pytest.mark.parametrize("kind, says", [("implicit_shard_size", "ValueError: q has"),
                                        ("implicit_graph", "different graphs"),
                                        ("rows_only_size", "rank 0: ValueError: graph must")])
def test_bad_implicit_or_rows_only_input_raises_on_every_rank(kind, says, tmp_path):
    for rank, res in enumerate(launch(3, kind, tmp_path)):
        assert res["raised"] is not None, f"rank {rank} did not raise"
        assert says in res["raised"], res["raised"]


@pytest.mark.parametrize("world", [2, 3])
def test_a_killed_rank_leaves_the_others_raising(world, tmp_path):
    """The last rank is killed (SIGKILL) as it enters the halo exchange: every other rank
    raises a RuntimeError naming the exchange that failed, within the group's timeout; none
    hangs."""
    timeout_s = 10
    ctx = mp.get_context("spawn")
    port = _port()
    procs = [ctx.Process(target=dist_worker.kill_main,
                         args=(r, world, port, str(tmp_path), timeout_s))
             for r in range(world)]
    for p in procs:
        p.start()
    import time

    deadline = time.monotonic() + TIME_LIMIT
    for p in procs:
        p.join(max(1.0, deadline - time.monotonic()))
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    assert not alive, "a rank hung after its peer died"
    assert procs[-1].exitcode == -9
    for r in range(world - 1):
        assert procs[r].exitcode == 0
        res = torch.load(tmp_path / f"kill-{r}.pt")
        assert res["raised"] is not None and res["raised"].startswith("RuntimeError"), res
        assert "attngraph.distributed: the " in res["raised"], res
        assert "failed on rank" in res["raised"] and "a peer may have died" in res["raised"]
        assert res["seconds"] < timeout_s + 5, res


# ---------------------------------------------------------------------------- memory at scale
def test_memory_at_4m_tokens_over_4_ranks(tmp_path):
    """Implicit sliding_window(N, 256), H = 1, D = 64, float32, 4 ranks (spawned, gloo). The
    explicit graph would have 2.15e9 edges (34 GB of int64 ids: the whole graph on every
    rank does not fit this machine). Peak resident memory each step adds to a rank (its high
    water mark, reset before the step, minus the memory before it):

    * forward at N = 4M: at most 3x the rank's rows of q + 600 MB (q, k, v are 3x; out, the
      halo and the work fit in the 600 MB);
    * forward + backward at N = 1M: at most 3x its rows of q, k, v and out + 600 MB (out,
      the gradients of q, k, v and of out, and the work)."""
    import json

    import dist_memory

    M = 1 << 20
    jobs = [(1 * M, True), (4 * M, False)]
    ctx = mp.start_processes(dist_memory.main, args=(4, _port(), str(tmp_path), jobs),
                             nprocs=4, join=False, start_method="spawn")
    import time

    deadline = time.monotonic() + 900
    while not ctx.join(timeout=max(1.0, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the memory test did not finish in 900 s")
    for rank in range(4):
        backward, forward = json.loads((tmp_path / f"mem-{rank}.json").read_text())
        assert "error" not in backward and "error" not in forward, (backward, forward)
        rows = forward["rows_bytes"]
        assert rows == (1 << 20) * 64 * 4
        assert forward["peak"] <= 3 * rows + 600e6, forward
        assert backward["peak"] <= 3 * 4 * backward["rows_bytes"] + 600e6, backward
        assert forward["halo"] <= 2 * 256 and forward["plan_bytes"] < 2e6
