"""The benchmark harness (benchmarks/): presets run end to end, peers agree with the float64
reference, the longest-context search brackets an out-of-memory point, and the flex
mask_mods compute exactly the attngraph masks they stand for."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import attngraph as ag
from attngraph import masks

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import report, specs  # noqa: E402
from benchmarks.__main__ import _list, _sizes  # noqa: E402
from benchmarks.harness import static_result  # noqa: E402
from benchmarks.longest import ceiling, memory_model  # noqa: E402


def _run(args, timeout=240):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "benchmarks", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_tiny_preset_runs_every_peer_and_checks_pass(tmp_path):
    _run(["--preset", "tiny", "--device", "cpu", "--out", str(tmp_path), "--quiet"])
    data = json.loads((tmp_path / "cpu" / "tiny.json").read_text())
    by_peer = {r["peer"]: r for r in data["records"]}
    assert set(by_peer) == {"attngraph", "attngraph-cupy", "pyg", "sdpa"}
    for peer in ("attngraph", "pyg", "sdpa"):
        for mode in ("fwd", "fwdbwd"):
            m = by_peer[peer]["modes"][mode]
            assert m["status"] == "ok", (peer, mode, m)
            assert m["check"]["passed"], (peer, mode, m["check"])
            assert m["median_s"] > 0 and m["peak_bytes"] >= 0
            assert m["tflops"] > 0 and m["gbps"] > 0
    cupy = by_peer["attngraph-cupy"]["modes"]["fwd"]
    assert cupy["status"] == "n/a" and "CUDA" in cupy["reason"]
    assert data["meta"]["torch"] == torch.__version__
    assert data["meta"]["command"].startswith("python -m benchmarks --preset tiny")
    md = (tmp_path / "cpu" / "tiny.md").read_text()
    for peer in by_peer:
        assert f"| {peer} |" in md
    assert "attngraph ÷ peer" in md
    assert (tmp_path / "cpu" / "tiny_time_vs_n.png").stat().st_size > 0


def test_gpu_preset_runs_at_toy_size_on_cpu(tmp_path):
    """The GPU sweep's code path (bfloat16, its peers) end to end at N = 256."""
    _run(["--preset", "gpu", "--quick", "--device", "cpu", "--n", "256",
          "--masks", "bigbird(64)", "--dim", "64",
          "--peers", "attngraph,pyg,sdpa-efficient,sdpa-math", "--repeats", "1",
          "--out", str(tmp_path), "--quiet", "--no-plots"])
    data = json.loads((tmp_path / "cpu" / "gpu_quick.json").read_text())
    by_peer = {r["peer"]: r for r in data["records"]}
    assert by_peer["sdpa-efficient"]["modes"]["fwd"]["status"] == "n/a"
    for peer in ("attngraph", "pyg", "sdpa-math"):
        for mode in ("fwd", "fwdbwd"):
            m = by_peer[peer]["modes"][mode]
            assert m["status"] == "ok" and m["check"]["passed"], (peer, mode, m)
    assert data["records"][0]["dtype"] == "bfloat16" and data["records"][0]["heads"] == 8


def test_longest_context_search_brackets_the_budget(tmp_path):
    _run(["longest", "--device", "cpu", "--mask", "sliding_window(4)", "--dtype", "float32",
          "--heads", "1", "--dim", "16", "--peers", "attngraph", "--modes", "fwd",
          "--budget-gb", "0.3", "--start-n", "32k", "--resolution", "1.0", "--max-trials", "6",
          "--out", str(tmp_path), "--name", "longest", "--quiet"])
    data = json.loads((tmp_path / "cpu" / "longest.json").read_text())
    (res,) = data["results"]
    statuses = {t["status"] for t in res["trials"]}
    assert "ok" in statuses and statuses <= {"ok", "oom", "crashed"}, res["trials"]
    assert res["max_n"] >= 32 * 1024
    assert res["first_failing_n"] is None or res["first_failing_n"] > res["max_n"]
    assert res["model_ceiling"]["as_implemented"] > 0
    assert "largest N" in (tmp_path / "cpu" / "longest.md").read_text()


def test_longest_by_graph_kind_implicit_goes_furthest(tmp_path):
    """The search by graph kind at toy size: an implicit window fits more tokens than the
    same window as an int32 edge list, which fits at least as many as int64; peaks stay near the
    floor for the implicit graph and every trial's rows check out."""
    _run(["longest", "--graphs", "implicit,int64,int32", "--masks", "sliding_window(64)",
          "--dtypes", "float32", "--modes", "fwd", "--heads", "1", "--dim", "16",
          "--budget-gb", "0.25", "--resolution", "0.5", "--max-trials", "6",
          "--out", str(tmp_path), "--name", "graphs", "--quiet"])
    data = json.loads((tmp_path / "cpu" / "graphs.json").read_text())
    res = {r["graph"]: r for r in data["results"]}
    assert set(res) == {"implicit", "int64", "int32"}
    for r in res.values():
        assert r["max_n"] and r["check_at_max"] < 1e-4, r
        assert {t["status"] for t in r["trials"]} <= {"ok", "oom", "crashed"}, r["trials"]
    assert res["implicit"]["max_n"] > res["int32"]["max_n"] >= res["int64"]["max_n"]
    imp = res["implicit"]
    assert imp["peak_bytes_at_max"] < 2.0 * imp["floor_bytes_at_max"]
    assert {s["graph"] for s in data["same_n"]} == {"implicit", "int64"}
    md = (tmp_path / "cpu" / "graphs.md").read_text()
    assert "paper scale" in md and "peak / floor" in md


def test_cupy_peer_reports_the_dispatch_reason():
    res = static_result(dict(mask="random(4)", n=64, heads=2, dim=8, dtype="float32",
                             peer="attngraph-cupy", modes=["fwd"], device="cpu", budget=1e9))
    assert res["modes"]["fwd"]["status"] == "n/a"
    assert "CUDA" in res["modes"]["fwd"]["reason"]


@pytest.mark.parametrize("mask", ["sliding_window(3)", "longformer(2,g3)", "bigbird(4)",
                                  "causal", "random(5)", "neighborhood(5)",
                                  "neighborhood_hilbert(3)"])
def test_flex_mask_mod_matches_the_graph(mask):
    spec = specs.parse_mask(mask)
    n = spec.valid_n(40)
    g = spec.build(n)
    fn, how = spec.mask_mod(g, "cpu", dense_limit_bytes=1 << 20)
    q = torch.arange(n).view(-1, 1)
    kv = torch.arange(n).view(1, -1)
    assert torch.equal(fn(None, None, q, kv).expand(n, n), g.to_dense()), how
    assert spec.expected_edges(n) >= g.num_edges


def test_neighborhood_specs_are_a_square_grid_in_two_orders():
    row_major = specs.parse_mask("neighborhood(13)")
    hilbert = specs.parse_mask("neighborhood_hilbert(13)")
    assert row_major.valid_n(16384) == hilbert.valid_n(16200) == 16384
    assert row_major.valid_n(1000) == 32 * 32
    g, h = row_major.build(1024), hilbert.build(1024)
    assert g.equal(masks.neighborhood((32, 32), 13)) and h.equal(g)
    assert g.order is None
    assert torch.equal(h.order, ag.reorder(g, "hilbert", shape=(32, 32)))
    assert row_major.expected_edges(1024) == g.num_edges
    assert hilbert.build(1024, graph="implicit").is_implicit
    assert not row_major.flex_in_order and hilbert.flex_in_order


def test_flex_peer_runs_in_the_graphs_order(monkeypatch):
    """For neighborhood_hilbert, FlexAttention's block mask is the mask in Hilbert order and
    each call permutes q, k, v in and the output back: the same result as in token order."""
    from torch.nn.attention import flex_attention as fa

    from benchmarks import peers

    monkeypatch.setattr(peers, "_compiled", lambda name: getattr(fa, name))   # eager
    spec = specs.parse_mask("neighborhood_hilbert(3)")
    n = spec.valid_n(64)
    g = spec.build(n)
    ctx = peers.Context(spec, g, n, 2, 8, torch.float32, torch.device("cpu"), int(1e9))
    peer = peers.FlexPeer()
    info = peer.setup(ctx)
    assert "graph's order" in info["mask_mod"]
    q_idx = torch.arange(n).view(-1, 1)
    kv_idx = torch.arange(n).view(1, -1)
    got = peer.block_mask.mask_mod(None, None, q_idx, kv_idx)
    assert torch.equal(got.expand(n, n), g.permuted().to_dense())
    q, k, v = (torch.randn(n, 2, 8) for _ in range(3))
    out = peer.to_node_major(peer.forward(*(peer.to_native(x) for x in (q, k, v))))
    torch.testing.assert_close(out, ag.graph_attention(q, k, v, g, backend="torch"),
                               rtol=1e-4, atol=1e-5)


def test_random_mask_mod_refuses_over_the_dense_limit():
    spec = specs.parse_mask("random(2)")
    fn, how = spec.mask_mod(spec.build(64), "cpu", dense_limit_bytes=100)
    assert fn is None and "dense" in how


@pytest.mark.parametrize("text, kind, args", [
    ("sliding_window(64)", "sliding_window", (64,)),
    ("sliding_window:64", "sliding_window", (64,)),
    ("longformer(256, g16)", "longformer", (256, 16)),
    ("bigbird(64)", "bigbird", (64,)),
    ("causal", "causal", ()),
])
def test_parse_mask(text, kind, args):
    spec = specs.parse_mask(text)
    assert (spec.kind, spec.args) == (kind, args)
    assert specs.parse_mask(spec.label) == spec


@pytest.mark.parametrize("bad", ["window(3)", "random(a)", "sliding_window(1,2)"])
def test_parse_mask_rejects(bad):
    with pytest.raises(ValueError):
        specs.parse_mask(bad)


def test_cli_lists_and_sizes():
    assert _list("sliding_window(64),longformer(256,g16)") == ["sliding_window(64)",
                                                               "longformer(256,g16)"]
    assert _sizes("16k,80000,1M") == [16384, 80000, 1 << 20]


def test_flops_and_bytes_models():
    assert specs.flops(10, 2, 8, "fwd") == 640
    assert specs.flops(10, 2, 8, "fwdbwd") == 3.5 * 640
    # fwd: Q, K, V, O (4 N H D elements) + lse (4 N H bytes) + 8 bytes per edge
    assert specs.min_bytes(4, 10, 2, 8, 2, "fwd") == 4 * 4 * 2 * 8 * 2 + 4 * 4 * 2 + 80


def test_memory_model_ceiling_is_consistent():
    spec = specs.parse_mask("sliding_window(256)")
    model = memory_model(spec, torch.float16, 1, 64, "fwd")
    c = ceiling(model, 80e9)
    # an implicit mask stores no edges: about 80 GB / 524 B per token ~ 150 M tokens
    assert 1.4e8 < c["implicit_mask"] < 1.6e8
    assert c["as_implemented"] < c["ideal_fused"] < c["implicit_mask"]


def _rec(peer, n, e, t, mem, status="ok"):
    mode = ({"status": "ok", "median_s": t, "peak_bytes": mem} if status == "ok"
            else {"status": status, "reason": status})
    return {"mask": "m", "heads": 1, "dim": 8, "dtype": "float32", "n": n, "peer": peer,
            "num_edges": e, "status": "ok", "modes": {"fwdbwd": mode}}


def test_ratios_extrapolate_an_over_budget_peer():
    records = [_rec("attngraph", 1, 100, 1.0, 10), _rec("pyg", 1, 100, 2.0, 100),
               _rec("attngraph", 2, 200, 2.0, 20), _rec("pyg", 2, 200, 4.0, 200),
               _rec("attngraph", 4, 400, 4.0, 40), _rec("pyg", 4, 400, 0, 0, "over budget")]
    rows = {r["n"]: r["fwdbwd"] for r in report.ratios(records)}
    assert rows[1] == {"time": 0.5, "mem": 0.1, "extrapolated": False, "check": None}
    assert rows[4]["extrapolated"]
    assert rows[4]["time"] == pytest.approx(0.5) and rows[4]["mem"] == pytest.approx(0.1)


# ---------------------------------------------------------------------------- traffic model
def test_model_tiles_and_imbalance():
    from benchmarks import model

    assert model.tiles(masks.sliding_window(256, 1)) == 4          # 2 x 2 blocks of 128
    assert model.tiles(masks.sliding_window(512, 0)) == 4          # the diagonal only
    even = torch.tensor([[0, 0, 10, -1], [1, 10, 20, -1], [2, 20, 30, -1], [3, 30, 40, -1]])
    assert model.imbalance(even, 2) == 1.0
    skew = torch.tensor([[0, 0, 99, -1], [1, 99, 100, -1]])
    assert model.imbalance(skew, 2) == pytest.approx(100 / 51)
    assert model.resident_warps(64) == 132 * 32 and model.resident_warps(255) == 132 * 8


def test_model_preset_writes_labelled_predictions(tmp_path, monkeypatch):
    """A small run of the traffic model: every figure labelled a model, both ratios there."""
    from benchmarks import model

    cfg = model.Config(n=2048, n_emulated=128, heads=2, dims=(32,),
                       masks=("sliding_window(256)", "random(64)", "longformer(256,g16)"))
    data = model.run(cfg)
    assert [r["mask"] for r in data["rows"]] == list(cfg.masks)
    for r in data["rows"]:
        f = r["fwd"]
        assert 0 < f["t_lo"] <= f["t_mid"] <= f["t_hi"] and f["t_floor"] > 0
        assert r["flex_fwd"] > 0 and r["fa2_fwd"] > 0
        kernels = {x["kernel"].split("<")[0] for x in r["launches"]}
        assert {"attn_fwd_vec", "attn_bwd_dq_vec", "attn_bwd_dkdv_vec"} <= kernels
        assert all(x["warp_instructions"] > 0 for x in r["launches"]
                   if x["kernel"].startswith(("attn_fwd_vec", "attn_bwd")))
        # bf16, D = 32: a K and a V row are 2 sectors each
        assert r["ideal_sectors_per_edge"] == 4 and r["sectors_per_edge_fwd"] >= 4
    s = data["summary"]
    assert set(s) == {"random64_flex_over_graph_D32", "longformer_over_window_per_edge_D32"}
    md = model.markdown(data)
    assert "Every time below is a model, not a measurement" in md and "REFERENCES.md" in md
    paths = model.write(data, tmp_path / "model")
    assert [p.name for p in paths] == ["model.json", "model.md"] and all(p.exists() for p in paths)


def test_model_l2_reuse_credits_locality():
    """A window's re-reads hit L2 (its waves share rows); random keys over more rows than L2
    holds miss."""
    from attngraph.ops.cuda import fused
    from benchmarks import model

    def rho(g, row_bytes):
        p = fused.plan(g)
        return model.reuse(p.rows.items, p.arrays.col.long(), g.num_src, 512, row_bytes)

    assert rho(masks.sliding_window(8192, 64), 256) < 0.01
    assert rho(masks.random(8192, 64, seed=0), 64 * 2 ** 20) > 0.9     # rows far beyond L2
    assert rho(masks.random(8192, 64, seed=0), 256) < 0.01             # all rows fit in L2


def test_distributed_preset_counts_halo_and_ring_bytes(tmp_path):
    """Two gloo ranks on a window mask and a longformer mask at toy size: the window's halo
    is 2·w K/V rows per interior boundary, the global rows are shipped, and both stay far
    below ring attention's bytes."""
    from benchmarks import distributed

    preset = dict(masks=["sliding_window(4)", "longformer(4,g2)"], n=[512], quick_n=[512],
                  world=[2], heads=[1], dim=[8], repeats=1)
    md, = [p for p in distributed.run(preset, quick=False, out_dir=tmp_path,
                                      log=lambda s: None) if p.suffix == ".md"]
    data = json.loads((tmp_path / "distributed.json").read_text())
    window, longformer = data["results"]
    row = 1 * 2 * 8 * 4                                   # K and V of one token, float32
    assert [r["halo_tokens"] for r in window["ranks"]] == [4, 4]
    assert window["halo_bytes_max"] == 4 * row
    assert window["ring_bytes"] == 256 * row
    assert sum(r["shipped"] for r in longformer["ranks"]) > 0
    assert longformer["halo_bytes_max"] < longformer["ring_bytes"] / 4
    assert "ring / ours" in md.read_text()


def test_scfa_cells_counts_the_cells_each_mask_allows():
    from argparse import Namespace

    from benchmarks.scfa_cells import measure, table

    args = Namespace(batch=1, heads=2, dim=8, rounds=2, seed=0, breakdown=True)
    rows = measure(256, ["dense", "hash4", "drop0.5"], args)
    by = {r["variant"]: r for r in rows}
    assert by["dense"]["cells"] == 2 * 256 * 257 // 2
    assert 0.15 < by["hash4"]["density"] < 0.4             # about 1/4 of the causal cells
    assert 0.15 < by["drop0.5"]["density"] < 0.35          # about (1/2)^2
    for r in rows:
        med, q1, q3, lo, hi = r["cost_ratio"]
        assert 0 < lo <= q1 <= med <= q3 <= hi
    for r in rows[1:]:                  # --breakdown: computed cells and the time's shares
        assert r["computed"] >= 1.0
        assert abs(sum(r["shares"].values()) - 1.0) < 1e-9
        assert all(0.0 <= share <= 1.0 for share in r["shares"].values())
    assert "computed" not in rows[0]
    text = table(rows)
    assert text.split("\n\n")[0].count("\n") == 4        # the cost table: 3 rows
    assert text.count("| 256 | hash4 |") == 2              # and a breakdown row per sparse
    assert text.count("| 256 | drop0.5 |") == 2             # variant


def test_rounds_table_takes_ratios_within_each_round(tmp_path):
    from benchmarks import rounds

    def write(name, times):
        records = [dict(mask=m, peer=p, modes={"fwd": {"status": "ok", "median_s": t}})
                   for (m, p), t in times.items()]
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"meta": {}, "records": records}))
        return path

    files = [write("r1", {("a", "x"): 1.0, ("a", "y"): 2.0}),
             write("r2", {("a", "x"): 4.0, ("a", "y"): 4.0}),
             write("r3", {("a", "x"): 3.0, ("a", "y"): 12.0})]
    text = rounds.tables([rounds.load(f) for f in files],
                         [(("a", "x", "fwd"), ("a", "y", "fwd"))])
    assert "| a | x | fwd | 1000, 4000, 3000 | 3000 (1000–4000) |" in text
    # per-round ratios 0.5, 1.0, 0.25: median 0.5, not 3000 / 4000
    assert "| 0.50, 1.00, 0.25 | 0.50 (0.25–1.00) |" in text


def test_longest_context_command_line_writes_its_table(tmp_path):
    from benchmarks.distributed import _tokens, main

    assert (_tokens("8M"), _tokens("512k"), _tokens("4096")) == (8 * 1024 ** 2, 512 * 1024,
                                                                  4096)
    main(["--start", "4K,2K", "--cap", "8K,2K", "--memory-share", "0.5",
          "--out", str(tmp_path)])
    record = json.loads((tmp_path / "longest.json").read_text())
    steps = [(s["n"], s["backward"]) for s in record["steps"] if "skipped" not in s]
    assert steps == [(4096, False), (8192, False), (2048, True)]
    # at this size a step may add nothing to a rank's high-water mark: peak >= 0
    assert all(r["peak"] >= 0 and r["seconds"] > 0 and r["tokens"] == s["n"] // 4
               for s in record["steps"] if "ranks" in s for r in s["ranks"])
    md = (tmp_path / "longest.md").read_text()
    assert "--start 4K,2K --cap 8K,2K" in md and "| forward + backward | 2,048 |" in md
