"""attngraph's benchmark harness: one command, every peer, CPU and GPU.

``python -m benchmarks --preset cpu`` sweeps masks x N x H x D x dtype x peers, forward and
forward+backward, each (peer, configuration) in a fresh process; checks every peer's output
against a float64 reference; records median time, peak memory, effective TFLOP/s and GB/s;
writes JSON, a markdown table and PNG plots under ``benchmarks/results/<device>/``.
``python -m benchmarks longest ...`` finds the largest context that fits a memory budget.
See ``benchmarks/README.md``.
"""
