"""``python -m attngraph.ops.cuda``: the NVRTC compile gate on the command line.

Compiles every kernel instantiation registered in ``loader.MODULES`` for each ``--arch``, as
CuPy would on such a GPU, and prints ptxas' registers / spills / stack / static shared
memory per (kernel, arch). No GPU or driver is needed.

Exit status: 0 when everything compiled within the bounds; 1 on a compile error (its log is
printed) or, with ``--fail-on-spill``, on any spill; 2 when a kernel spills more than
``--max-spill`` bytes (or on a usage error); 3 when CuPy / libnvrtc are not installed.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import List, Optional, Sequence

from attngraph.ops.cuda import gate, loader

EXIT_OK, EXIT_COMPILE, EXIT_SPILL_BOUND, EXIT_UNAVAILABLE = 0, 1, 2, 3

_COLUMNS = (("module", "module"), ("kernel", "kernel"), ("arch", "arch"),
            ("regs", "registers"), ("spill_st", "spill_stores"), ("spill_ld", "spill_loads"),
            ("stack", "stack_frame"), ("smem", "static_smem"))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m attngraph.ops.cuda",
        description="Compile every CUDA kernel instantiation of attngraph through NVRTC for "
                    "the given architectures (no GPU needed) and print ptxas' resource usage.")
    p.add_argument("--arch", nargs="+", default=["sm_80", "sm_90"], metavar="SM",
                   help="real architectures, e.g. sm_80 sm_90 (default: %(default)s)")
    p.add_argument("--module", nargs="+", default=None, metavar="NAME",
                   help="registered modules to compile (default: all of loader.MODULES)")
    p.add_argument("--json", default=None, metavar="FILE",
                   help="also write the rows, options and errors as JSON to FILE")
    p.add_argument("--max-spill", type=int, default=None, metavar="BYTES",
                   help="exit 2 if a kernel's spill stores + loads exceed BYTES")
    p.add_argument("--fail-on-spill", action="store_true",
                   help="exit 1 if any kernel spills at all")
    return p


def _table(rows: List[gate.GateRow]) -> str:
    cells = [[h for h, _ in _COLUMNS]]
    for r in rows:
        d = {"module": r.module, "kernel": r.usage.name_expression, **vars(r.usage)}
        cells.append([str(d[k]) for _, k in _COLUMNS])
    widths = [max(len(c[i]) for c in cells) for i in range(len(_COLUMNS))]
    # names left-aligned, numbers right-aligned
    lines = []
    for c in cells:
        parts = [c[i].ljust(widths[i]) if i < 3 else c[i].rjust(widths[i])
                 for i in range(len(c))]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the gate with command-line ``argv``; returns the exit status (module docstring)."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        archs = [gate.check_arch(a) for a in args.arch]
        mods = gate.select_modules(args.module)
    except ValueError as e:
        parser.error(str(e))
    try:
        version = ".".join(map(str, gate.nvrtc_version()))
    except gate.GateUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_UNAVAILABLE

    if not mods:
        print("no kernel modules registered in attngraph.ops.cuda.loader.MODULES: "
              "nothing to compile")
    rows: List[gate.GateRow] = []
    errors = []
    start = time.perf_counter()
    for mod in mods:
        for arch in archs:
            try:
                rows += gate.gate_module(mod, arch)
            except gate.GateError as e:
                # keep going: one broken instantiation should not hide the others' report
                errors.append({"module": mod.name, "arch": arch,
                               "message": str(e).split("\n")[0], "log": e.log})
    seconds = time.perf_counter() - start

    if rows:
        print(_table(rows))
    for err in errors:
        print(f"\nerror: module {err['module']!r}: {err['message']}\n{err['log']}",
              file=sys.stderr)

    spilling = [r for r in rows if r.usage.spills]
    over = [r for r in rows if args.max_spill is not None and r.usage.spills > args.max_spill]
    summary = (f"{_count(len(rows), 'kernel instantiation')} ({_count(len(mods), 'module')} x "
               f"{_count(len(archs), 'arch')}) compiled by NVRTC {version} in {seconds:.1f} s")
    if rows:
        top = max(rows, key=lambda r: r.usage.registers)
        summary += (f"; max {top.usage.registers} registers ({top.usage.name_expression}, "
                    f"{top.usage.arch})")
    n = len(spilling)
    summary += (f"; {_count(n, 'instantiation')} spill{'s' if n == 1 else ''}" if n
                else "; no spills")
    if errors:
        summary += f"; {_count(len(errors), 'compile error')}"
    print(summary)
    for r in over:
        print(f"error: {r.module}: {r.usage.name_expression} on {r.usage.arch} spills "
              f"{r.usage.spills} bytes (stores {r.usage.spill_stores}, loads "
              f"{r.usage.spill_loads}) > --max-spill {args.max_spill}", file=sys.stderr)

    if args.json:
        options = {m.name: {a: list(gate.nvrtc_options(m.options, a)) for a in archs}
                   for m in mods}
        with open(args.json, "w") as f:
            json.dump({"nvrtc_version": version, "archs": archs,
                       "rows": [r.as_dict() for r in rows], "options": options,
                       "errors": errors}, f, indent=2)

    if errors or (args.fail_on_spill and spilling):
        return EXIT_COMPILE
    if over:
        return EXIT_SPILL_BOUND
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
