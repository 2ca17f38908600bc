"""The example scripts run end to end at CI size (``--quick``) and print what they promise."""
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name: str) -> str:
    # One intra-op thread: the --quick models are tiny, and spinning OpenMP workers on a
    # busy shared CI machine cost far more than they save.
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(EXAMPLES / name), "--quick"], env=env,
                          capture_output=True, text=True, timeout=600, cwd=EXAMPLES.parent)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


@pytest.mark.slow
def test_node_classification_trains_both_layers_alike():
    out = run_example("node_classification.py")
    diff = float(re.search(r"max \|logit difference\| before training: (\S+)", out).group(1))
    assert diff < 1e-4, out
    acc = {m.group(1): float(m.group(2))
           for m in re.finditer(r"^(\w+)\s+test accuracy (\S+), (\S+) ms/epoch", out, re.M)}
    assert set(acc) == {"TransformerConv", "GraphAttentionConv"}, out
    assert acc["TransformerConv"] > 0.5, out                       # 5 classes: chance 0.2
    assert abs(acc["TransformerConv"] - acc["GraphAttentionConv"]) < 0.05, out


@pytest.mark.slow
def test_long_sequence_learns_only_through_the_global_token():
    out = run_example("long_sequence.py")
    chance = math.log(8)
    losses = {m.group(1): (float(m.group(2)), float(m.group(3)))
              for m in re.finditer(r"^(\w[\w ]*?) \(.*?\): \d+ edges, loss (\S+) -> (\S+)",
                                   out, re.M)}
    assert set(losses) == {"longformer", "sliding window only"}, out
    start, end = losses["longformer"]
    assert end < 0.25 * start and end < 0.5, out
    _, control_end = losses["sliding window only"]
    assert control_end > 0.85 * chance, out                        # cannot see the value


def test_scfa_lm_trains_every_variant(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(EXAMPLES / "scfa_lm.py"), "--quick", "--out",
                           str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=600, cwd=EXAMPLES.parent)
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = (tmp_path / "scfa_lm.md").read_text()
    rows = re.findall(r"^\| 128 \| (\w[\w.]*) \| (\S+) \|", table, re.M)
    assert [r[0] for r in rows] == ["dense", "hash4", "drop0.3"], table
    assert all(0 < float(bpb) < 9 for _, bpb in rows), table      # 8 bits: a uniform guess
    # timed interleaved: each variant's per-step speed-up over dense, median and spread
    spread = re.findall(r"\| (\d+\.\d+)x \| (\d+\.\d+)-(\d+\.\d+) \| "
                        r"(\d+\.\d+)-(\d+\.\d+) \|$", table, re.M)
    assert len(spread) == 3, table
    assert all(float(lo) <= float(q1) <= float(med) <= float(q3) <= float(hi)
               for med, q1, q3, lo, hi in spread), table
    assert (tmp_path / "scfa_lm.png").stat().st_size > 1000


def test_hf_sparse_lm_trains_sdpa_and_attngraph(tmp_path):
    """The transformers Llama trains with a Longformer graph beside SDPA, timed interleaved."""
    pytest.importorskip("transformers")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(EXAMPLES / "hf_sparse_lm.py"), "--quick",
                           "--out", str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=600, cwd=EXAMPLES.parent)
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = (tmp_path / "hf_sparse_lm.md").read_text()
    rows = re.findall(r"^\| (\w+) \| ([^|]+) \| (\S+) \| (\S+) % \| (\S+) \| (\d+) \|", table,
                      re.M)
    assert [r[0] for r in rows] == ["sdpa", "attngraph"], table
    assert "longformer" in rows[1][1], table
    assert all(0 < float(r[2]) < 9 and int(r[5]) == 4 for r in rows), table   # 8: uniform
    # the same initial weights and batches: the two start (and stay, 4 steps) close
    assert abs(float(rows[1][3])) < 5, table
    spread = re.findall(r"\| (\d+\.\d+)x \| (\d+\.\d+)-(\d+\.\d+) \| "
                        r"(\d+\.\d+)-(\d+\.\d+) \|$", table, re.M)
    assert len(spread) == 2, table
    assert all(float(lo) <= float(q1) <= float(med) <= float(q3) <= float(hi)
               for med, q1, q3, lo, hi in spread), table
    record = json.loads((tmp_path / "hf_sparse_lm.json").read_text())
    assert [r["name"] for r in record["results"]] == ["sdpa", "attngraph"]
    assert all(len(r["step_s"]) == 4 for r in record["results"])
