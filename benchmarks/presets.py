"""Named sweeps. A preset is a list of (masks x sizes) groups plus shared settings; any
command-line flag overrides the matching setting (``--n`` replaces every group's sizes)."""
from __future__ import annotations

K = 1024
M = 1024 * K

PRESETS = {
    # CI: seconds. Every peer but flex (its first compile takes a minute on a cold cache).
    "tiny": dict(
        groups=[dict(masks=["longformer(8,g2)"], n=[256])],
        heads=[2], dim=[16], dtype=["float32"],
        peers=["attngraph", "attngraph-cupy", "pyg", "sdpa"],
        repeats=2, max_seconds=1.0,
        about="CI smoke run: a window with global tokens, every peer except flex"),
    # `make bench`: what everyone without a GPU runs; under 10 minutes on 2 cores.
    "cpu": dict(
        groups=[dict(masks=["sliding_window(16)", "random(16)", "longformer(16,g2)",
                            "bigbird(16)"], n=[1 * K, 2 * K, 4 * K])],
        heads=[2], dim=[32], dtype=["float32"],
        peers=["attngraph", "attngraph-cupy", "pyg", "sdpa", "flex"],
        repeats=3, max_seconds=2.0,
        about="every peer on four masks at N = 1k..4k, H = 2, D = 32, float32"),
    # graph_attention vs the PyG way and dense masked SDPA. The 80k / 160k points
    # put E near 1e7; 4k and 8k give the PyG way's memory-per-edge fit.
    "pyg_scale": dict(
        groups=[dict(masks=["sliding_window(64)"], n=[4 * K, 8 * K, 16 * K, 64 * K, 80000,
                                                      256 * K]),
                dict(masks=["random(64)"], n=[4 * K, 8 * K, 16 * K, 64 * K, 160000, 256 * K])],
        heads=[4], dim=[64], dtype=["float32"],
        peers=["attngraph", "pyg", "sdpa"],
        repeats=3, max_seconds=60.0, timeout=3600.0,
        about="attngraph (torch backend) vs the PyG TransformerConv way and dense "
              "masked SDPA, H = 4, D = 64, float32"),
    # The GPU run (bf16, H = 8, D = 64 / 128, N = 16k .. 1M). --quick shrinks N for a CPU
    # smoke test of the same code path.
    "gpu": dict(
        groups=[dict(masks=["sliding_window(256)", "random(64)", "longformer(256,g16)",
                            "bigbird(64)"], n=[16 * K, 64 * K, 256 * K, 1024 * K])],
        heads=[8], dim=[64, 128], dtype=["bfloat16"],
        peers=["attngraph", "attngraph-cupy", "attngraph-flex", "pyg", "sdpa-efficient",
               "sdpa-math", "flex"],
        repeats=20, warmup=3, max_seconds=5.0,
        quick_n=[1 * K, 2 * K],
        about="GPU sweep: bf16, H = 8, D = 64/128, N = 16k..1M"),
    # graph_attention compiled (torch.compile, fullgraph) vs eager, same kernels.
    "compile": dict(
        groups=[dict(masks=["sliding_window(64)", "random(64)", "longformer(64,g4)"],
                     n=[8 * K])],
        heads=[4], dim=[64], dtype=["float32"],
        peers=["attngraph", "attngraph-compiled"],
        repeats=5, max_seconds=30.0, quick_n=[1 * K],
        about="torch.compile(graph_attention, fullgraph=True) vs eager on the torch backend, "
              "H = 4, D = 64, float32"),
    # Dense tiles vs per edge vs FlexAttention: structured, random, hashed and mixed masks.
    "tiles": dict(
        groups=[dict(masks=["sliding_window(128)", "longformer(128,g16)", "bigbird(64)",
                            "random(32)", "hash(64)", "window_random(128,16)"],
                     n=[4 * K, 8 * K, 16 * K, 32 * K]),
                # 2-D neighbourhood attention on a 128 x 128 grid, kernel 13, tokens in
                # row-major and in Hilbert order (FlexAttention given the same order)
                dict(masks=["neighborhood(13)", "neighborhood_hilbert(13)"], n=[16 * K])],
        heads=[4], dim=[64], dtype=["float32"],
        peers=["attngraph-tiles", "attngraph-flex", "attngraph", "flex", "sdpa"],
        base_peer="attngraph-tiles",
        repeats=3, max_seconds=20.0, quick_n=[1 * K],
        about="dense tiles + per-edge residual (attngraph-tiles; the tiles on FlexAttention: "
              "attngraph-flex) vs the per-edge path (attngraph), compiled FlexAttention and "
              "dense SDPA, H = 4, D = 64, float32"),
    # Context parallel attention, P processes on this machine (gloo), implicit graphs:
    # bytes against ring attention and an all-gather, balance, step time with and without
    # overlap; then the longest context (4 ranks, window 256, H = 1, D = 64).
    "distributed": dict(
        distributed=True,
        masks=["sliding_window(256)", "longformer(256,g16)", "documents(512)", "hash(64)"],
        n=[64 * K], world=[4], heads=[1], dim=[64], dtype=["float32"], repeats=3,
        quick_n=[8 * K],
        longest=dict(world=4, window=256, dim=64, start=(2 * M, 1 * M), cap=(8 * M, 4 * M),
                     memory_share=0.6, max_seconds=900),
        about="context parallel: halo exchange vs ring / all-gather bytes, balance, overlap, "
              "longest context"),
    # The traffic model of the fused kernels (benchmarks/model.py): emulator counts at
    # N_e = 1k extrapolated to N = 64k on an H100 roofline, next to FlexAttention and
    # FlashAttention-2 on the same roofline. Every figure is a model.
    "model": dict(
        model=True, n=[64 * K], n_emulated=1 * K, heads=[8], dim=[64, 128],
        dtype=["bfloat16"], quick_n=[4 * K], quick_n_emulated=256,
        about="traffic model: predicted H100 times of the fused kernels (model, not measured)"),
}

# The longest-context setting of the graph-processing paper (160 M tokens on one 80 GB
# A100: one head, D = 64, fp16, a local window); the CPU default shrinks the window and
# the budget so the search takes minutes.
LONGEST = {
    "gpu": dict(mask="sliding_window(256)", dtype="float16", heads=1, dim=64,
                peers=["attngraph", "attngraph-cupy", "pyg", "sdpa-efficient", "flex"],
                modes=["fwd", "fwdbwd"], start_n=1 << 20),
    "cpu": dict(mask="sliding_window(16)", dtype="float16", heads=1, dim=64,
                peers=["attngraph", "pyg", "sdpa"], modes=["fwd", "fwdbwd"], start_n=1 << 14,
                budget_gb=2.0),
}
