#!/usr/bin/env bash
# Time the emulated fused-kernel suite (tests/test_cuda_fused.py) under each sanitizer check
# and schedule, relative to plain emulation. Builds are warmed first (compile time is not
# counted), and each configuration is timed right after a plain run of its own, so machine
# noise hits both alike; the ratio is taken within each pair.
# Usage: bash benchmarks/sanitizer_times.sh [python] > benchmarks/results/sanitizer/fused_suite_times.md
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
SUITE=tests/test_cuda_fused.py
SELECT=${SELECT:-}   # e.g. SELECT=every_mask_family: a -k expression, to time part of the suite
run() {   # run CHECK SCHEDULE -> seconds
  local start end
  start=$(date +%s.%N)
  if ! ATTNGRAPH_EMU_CHECK="$1" ATTNGRAPH_EMU_SCHEDULE="$2" "$PY" -m pytest -q -p no:cacheprovider \
      "$SUITE" ${SELECT:+-k "$SELECT"} >/tmp/sanitizer_times.log 2>&1; then
    echo "FAILED: check='$1' schedule='$2'" >&2
    tail -20 /tmp/sanitizer_times.log >&2
    return 1
  fi
  end=$(date +%s.%N)
  echo "$end - $start" | bc
}
# warm both builds (plain and instrumented)
ATTNGRAPH_EMU_CHECK='' "$PY" -m pytest -q -p no:cacheprovider "$SUITE" -k "window-fp32" >/dev/null 2>&1
ATTNGRAPH_EMU_CHECK=all "$PY" -m pytest -q -p no:cacheprovider "$SUITE" -k "window-fp32" >/dev/null 2>&1
echo "# The fused-kernel suite under the emulator's checks and schedules"
echo
echo "\`SELECT='$SELECT' bash benchmarks/sanitizer_times.sh\` on $(nproc) CPU cores, $(date -u +%Y-%m-%d): $SUITE${SELECT:+ -k $SELECT} with"
echo "ATTNGRAPH_CUDA_EMULATE=1 (set by the suite), builds warm, each row timed right after a plain"
echo "run of its own."
echo
echo "| ATTNGRAPH_EMU_CHECK | ATTNGRAPH_EMU_SCHEDULE | plain s | this s | ratio |"
echo "|---|---|---:|---:|---:|"
for cfg in "memcheck forward" "racecheck forward" "initcheck forward" "synccheck forward" \
           "all forward" "- reverse" "- random:1" "- random:2" "all random:1"; do
  check=${cfg% *}; sched=${cfg##* }
  [[ $check == - ]] && check=''
  base=$(run '' forward)
  t=$(run "$check" "$sched")
  printf "| %s | %s | %.1f | %.1f | %.2fx |\n" "${check:-(none)}" "$sched" "$base" "$t" \
    "$(echo "$t / $base" | bc -l)"
done
