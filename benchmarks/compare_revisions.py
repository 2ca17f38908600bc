"""The same benchmark on two checkouts of attngraph, interleaved: before and after a change.

Each round runs the benchmark once on every checkout, in turn (so machine noise hits both
alike); a point's time is the median over its rounds, and the ratio after / before is
printed with the spread of the per-round ratios.

    python -m benchmarks.compare_revisions BEFORE_ROOT AFTER_ROOT --rounds 2 \\
        -- --preset tiles --n 4k --masks 'sliding_window(128),random(32)' \\
           --peers attngraph-tiles,attngraph --repeats 5

Each run is ``python -m benchmarks ARGS --out DIR`` with the checkout first on PYTHONPATH,
from the checkout's root (so that checkout's attngraph and benchmark code run).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def run(root: Path, bench_args, out: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    subprocess.run([sys.executable, "-m", "benchmarks", *bench_args, "--out", str(out),
                    "--no-plots", "--quiet"], cwd=root, env=env, check=True,
                   stdout=subprocess.DEVNULL)
    times = {}
    for f in out.rglob("*.json"):
        for r in json.loads(f.read_text()).get("records", []):
            for mode, m in r.get("modes", {}).items():
                if m.get("status") == "ok":
                    times[(r["mask"], r["n"], r["peer"], mode)] = m["median_s"]
    return times


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("before", type=Path)
    p.add_argument("after", type=Path)
    p.add_argument("--rounds", type=int, default=2)
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    args, bench = p.parse_args(argv[:cut]), argv[cut + 1:]
    rounds = {"before": [], "after": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.rounds):
            for name in ("before", "after"):
                root = getattr(args, name).resolve()
                rounds[name].append(run(root, bench, Path(tmp, f"{name}-{i}")))
    keys = sorted(set.intersection(*(set(t) for t in rounds["before"] + rounds["after"])))
    print(f"`python -m benchmarks.compare_revisions {args.before} {args.after} "
          f"--rounds {args.rounds} -- {' '.join(bench)}`\n")
    print("| mask | N | peer | mode | before ms | after ms | after / before (per-round range) |")
    print("|---|---:|---|---|---:|---:|---:|")
    for key in keys:
        b = [r[key] for r in rounds["before"]]
        a = [r[key] for r in rounds["after"]]
        per_round = [x / y for x, y in zip(a, b)]
        print(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {statistics.median(b) * 1e3:.1f} "
              f"| {statistics.median(a) * 1e3:.1f} | {statistics.median(a) / statistics.median(b):.2f} "
              f"({min(per_round):.2f}–{max(per_round):.2f}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
