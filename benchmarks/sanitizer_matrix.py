"""Which emulator check finds which seeded bug: every kernel of the seeded-bug suite
(tests/test_cuda_sanitizer.py) under no check and under each tool alone, with the source line
the finding names.

    python -m benchmarks.sanitizer_matrix > benchmarks/results/sanitizer/bug_matrix.md
"""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from attngraph.ops.cuda.emulator import EmulatorError, RawModule, SanitizerError  # noqa: E402
from test_cuda_sanitizer import BUG_NAMES, BUGS  # noqa: E402

# (kernel, bug class, launch: grid, block, args, shared_mem, schedule)
CASES = [
    ("raw_across_warps", "shared read of another warp's write, no barrier",
     (1,), (64,), lambda: (torch.zeros(64),), 0, "forward"),
    ("war_across_warps", "write-after-read on shared memory (reverse schedule)",
     (1,), (64,), lambda: (torch.zeros(64),), 0, "reverse"),
    ("race_in_warp", "lanes of one warp exchange through shared memory, no __syncwarp",
     (1,), (32,), lambda: (torch.zeros(32), np.int32(0)), 0, "forward"),
    ("uninitialized_read", "read of shared memory no thread wrote",
     (1,), (64,), lambda: (torch.zeros(64),), 0, "forward"),
    ("half_barrier", "__syncthreads() only half the block reaches",
     (1,), (64,), lambda: (torch.zeros(64),), 0, "forward"),
    ("shuffle_in_branch", "full-mask __shfl_sync in a branch half the warp takes",
     (1,), (32,), lambda: (torch.zeros(32),), 0, "forward"),
    ("outside_mask", "warp collective run by lanes outside its mask",
     (1,), (32,), lambda: (torch.zeros(32),), 0, "forward"),
    ("past_dynamic", "write one element past the dynamic shared memory",
     (1,), (32,), lambda: (torch.zeros(32),), 32 * 4, "forward"),
    ("past_static", "write one element past a static __shared__ array",
     (1,), (32,), lambda: (torch.zeros(32),), 0, "forward"),
    ("past_tensor", "global read one element past the tensor (ag_load)",
     (1,), (32,), lambda: (torch.zeros(32), torch.zeros(32)), 0, "forward"),
    ("big_dynamic", "64 KiB of dynamic shared memory without the opt-in",
     (1,), (64,), lambda: (torch.zeros(64),), 64 * 1024, "forward"),
]
TOOLS = ("", "memcheck", "racecheck", "initcheck", "synccheck")


def outcome(kernel, launch, schedule: str, tool: str) -> str:
    os.environ["ATTNGRAPH_EMU_CHECK"] = tool
    os.environ["ATTNGRAPH_EMU_SCHEDULE"] = schedule
    mod = RawModule(code=BUGS, name_expressions=BUG_NAMES, name="bugs.cu")
    grid, block, args, smem = launch
    try:
        mod.get_function(kernel)(grid, block, args(), shared_mem=smem)
    except SanitizerError as e:
        lines = sorted(set(re.findall(r"bugs\.cu:(\d+)", str(e))), key=int)
        return f"**found** ({e.tool}, line {', '.join(lines) or '?'})"
    except EmulatorError as e:
        what = ("launch refused" if "invalid configuration" in str(e)
                else "deadlock error" if "deadlock" in str(e) else "error")
        return f"{what}"
    return "runs silently"


def main() -> None:
    print("# The seeded bugs and the emulator's checks\n")
    print("`python -m benchmarks.sanitizer_matrix`: each kernel of tests/test_cuda_sanitizer.py "
          "under no check and under each tool alone (`ATTNGRAPH_EMU_CHECK`); a finding names "
          "the line(s) of bugs.cu it reports.\n")
    print("| bug | " + " | ".join(t or "no check" for t in TOOLS) + " |")
    print("|---|" + "---|" * len(TOOLS))
    for kernel, what, grid, block, args, smem, schedule in CASES:
        cells = [outcome(kernel, (grid, block, args, smem), schedule, t) for t in TOOLS]
        print(f"| {what} (`{kernel}`) | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
