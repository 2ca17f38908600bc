"""Median and spread over rounds: the same sweep run several times, one after another, so
that every configuration meets the machine's load in turn (interleaved timing).

    python -m benchmarks.rounds RESULTS.json [RESULTS.json ...] [--ratio A/B ...]

Each ``RESULTS.json`` is one round (``python -m benchmarks ... --name roundK``). The
table lists each (mask, peer, mode)'s time per round and the median with min–max across
rounds. ``--ratio "MASK|PEER|MODE / MASK|PEER|MODE"`` adds the ratio of two rows, taken
within each round first (both sides met the same load), then its median and min–max.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Dict, List, Tuple

Key = Tuple[str, str, str]


def load(path: Path) -> Dict[Key, float]:
    """Milliseconds of every ``ok`` (mask, peer, mode) of one round."""
    data = json.loads(Path(path).read_text())
    out = {}
    for r in data["records"]:
        for mode, v in r.get("modes", {}).items():
            if v.get("status") == "ok":
                out[(r["mask"], r["peer"], mode)] = v["median_s"] * 1e3
    return out


def spread(xs: List[float], digits: int) -> str:
    return (f"{statistics.median(xs):.{digits}f} ({min(xs):.{digits}f}–"
            f"{max(xs):.{digits}f})")


def tables(rounds: List[Dict[Key, float]], ratios: List[Tuple[Key, Key]]) -> str:
    lines = ["| mask | peer | mode | ms per round | median (min–max) ms |",
             "|---|---|---|---|---:|"]
    for key in sorted({k for r in rounds for k in r}):
        xs = [r[key] for r in rounds if key in r]
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | "
                     f"{', '.join(f'{x:.0f}' for x in xs)} | {spread(xs, 0)} |")
    if ratios:
        lines += ["", "| ratio (within each round) | per round | median (min–max) |",
                  "|---|---|---:|"]
        for a, b in ratios:
            xs = [r[a] / r[b] for r in rounds if a in r and b in r]
            if not xs:
                raise ValueError(f"no round has both {a} and {b}")
            lines.append(f"| {' '.join(a)} ÷ {' '.join(b)} | "
                         f"{', '.join(f'{x:.2f}' for x in xs)} | {spread(xs, 2)} |")
    return "\n".join(lines)


def _key(text: str) -> Key:
    parts = [p.strip() for p in text.split("|")]
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"expected MASK|PEER|MODE, got {text!r}")
    return tuple(parts)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.rounds", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("json", type=Path, nargs="+", help="one results file per round")
    p.add_argument("--ratio", action="append", default=[],
                   help='"MASK|PEER|MODE / MASK|PEER|MODE"')
    args = p.parse_args(argv)
    ratios = []
    for text in args.ratio:
        if "/" not in text.replace("|", ""):
            p.error(f"--ratio needs 'A / B', got {text!r}")
        a, b = text.rsplit(" / ", 1) if " / " in text else text.rsplit("/", 1)
        ratios.append((_key(a), _key(b)))
    print(tables([load(f) for f in args.json], ratios))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
