#!/usr/bin/env bash
# The checks only a GPU can make, in one command that fits a short loan (< 8 minutes):
#   1. the `gpu`-marked tests (among them the tiles on FlexAttention, forward and backward,
#      tests/test_flex_tiles.py);
#   2. compute-sanitizer's memcheck, racecheck, initcheck and synccheck, each over a small
#      fused forward + backward (benchmarks/gpu_sanitize_case.py);
#   3. the `gpu` benchmark preset at N = 64k (the fused kernels, the tiles on FlexAttention
#      with the residual on the fused kernels, and FlexAttention) beside the traffic model's
#      predicted times (benchmarks/results/model/model.json; attngraph-flex beside the
#      model's hybrid column);
#   4. if time is left, the NVRTC compile gate for the machine's own architecture.
# Every step has its own time limit and log; a failing step does not stop the others. The
# last screen is a table: step, status, seconds, the key line of its log.
#
# Usage, at the repository root of a machine with one NVIDIA GPU:
#   bash benchmarks/gpu_check.sh
# Environment: OUT (results folder; default benchmarks/results/gpu_check/<UTC date>),
# PYTHON (default python3), BUDGET_S (whole run, default 450), SANITIZER_KERNELS (a kernel
# name substring for compute-sanitizer to check, e.g. attn; default: every kernel),
# BENCH_ARGS (replaces the benchmark's flags after --preset gpu).
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
py="${PYTHON:-python3}"
out="${OUT:-benchmarks/results/gpu_check/$(date -u +%Y%m%d-%H%M%S)}"
budget="${BUDGET_S:-450}"
mkdir -p "$out" || exit 2

rows=()

reserve=5   # seconds of the budget kept for the steps after the current one

# run_step NAME LIMIT_S KEY_REGEX CMD...: runs CMD with its output in $out/NAME.log, under
# `timeout` (LIMIT_S, or what is left of the budget), and records a summary row whose key
# line is the last line of the log matching KEY_REGEX (else its last line).
run_step() {
  local name=$1 limit=$2 key_re=$3
  shift 3
  local log="$out/$name.log" left=$((budget - SECONDS - reserve))
  if ((left < 10)); then
    rows+=("$name|SKIPPED|0|no time left in the ${budget} s budget")
    return
  fi
  ((limit > left)) && limit=$left
  echo "== $name (limit ${limit} s): $*" | tee "$log"
  local t0=$SECONDS rc
  timeout --kill-after=10 "$limit" "$@" >>"$log" 2>&1
  rc=$?
  local status=PASS
  case $rc in
    0) ;;
    124 | 137) status="TIMEOUT" ;;
    *) status="FAIL(rc=$rc)" ;;
  esac
  local key
  key=$(tail -n +2 "$log" | grep -E "$key_re" | tail -n 1 | sed -E 's/^[= ]+//' | cut -c1-90)
  [[ -z $key ]] && key=$(tail -n +2 "$log" | grep -v '^[[:space:]]*$' | tail -n 1 | cut -c1-90)
  [[ -z $key ]] && key="(no output)"
  rows+=("$name|$status|$((SECONDS - t0))|${key//|//}")
  echo "-- $name: $status in $((SECONDS - t0)) s"
}

# ---------------------------------------------------------------- 0. the machine
run_step env 20 'torch .* device' bash -c "
  nvidia-smi -L; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  $py -c 'import torch, sys; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"device\", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)'
  $py -c 'import cupy; print(\"cupy\", cupy.__version__)' || true
  command -v compute-sanitizer nvcc ncu || true
  git log -1 --oneline"

# ---------------------------------------------------------------- 1. gpu tests
run_step pytest-gpu 120 '(passed|failed|error|no tests ran)' \
  "$py" -m pytest -m gpu -q -p no:cacheprovider

# ---------------------------------------------------------------- 2. compute-sanitizer
filter=()
if [[ -n ${SANITIZER_KERNELS:-} ]]; then
  filter=(--kernel-name "kns=$SANITIZER_KERNELS")
fi
# Without torch's caching allocator every tensor is its own allocation, so memcheck sees an
# access past a tensor's end (inside a cached block it would not).
if command -v compute-sanitizer >/dev/null; then
  for tool in memcheck racecheck initcheck synccheck; do
    run_step "sanitizer-$tool" 50 '(SUMMARY|[Ee]rror|not finite)' \
      env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
      compute-sanitizer --tool "$tool" --error-exitcode 9 --print-limit 20 "${filter[@]}" \
      "$py" benchmarks/gpu_sanitize_case.py --device cuda
  done
else
  rows+=("sanitizer|SKIPPED|0|compute-sanitizer is not on the PATH")
fi

# ---------------------------------------------------------------- 3. benchmark beside the model
bench_out="$out/bench"
# shellcheck disable=SC2206  # BENCH_ARGS is split into flags on purpose
bench_args=(${BENCH_ARGS:---n 64k --dim 64 --peers attngraph-cupy,attngraph-flex,flex --repeats 10 --warmup 2 --max-seconds 2})
reserve=25
run_step bench-gpu 130 '(Traceback|Error|[0-9]+ (jobs|records))' \
  "$py" -m benchmarks --preset gpu "${bench_args[@]}" --name gpu_check --no-plots --quiet \
  --out "$bench_out"

reserve=2
run_step bench-vs-model 20 '(measured/model|no |missing)' "$py" - "$bench_out" <<'EOF'
"""Measured medians of the gpu preset beside the traffic model's predicted times."""
import json
import sys
from pathlib import Path

bench = sorted(Path(sys.argv[1]).glob("*/gpu_check.json"))
model_file = Path("benchmarks/results/model/model.json")
try:
    from benchmarks.presets import PRESETS
    print("presets:", ", ".join(f"{k}{' (model)' if v.get('model') else ''}" for k, v in PRESETS.items()))
except Exception as e:  # noqa: BLE001 - report what exists, whatever broke
    print("benchmarks.presets does not import:", e)
if not model_file.is_file():
    print(f"missing {model_file}: no model prediction to compare with "
          "(python3 -m benchmarks --preset model writes it)")
if not bench:
    print("no benchmark results (the gpu preset step wrote no gpu_check.json)")
if not bench or not model_file.is_file():
    sys.exit(1)
data = json.loads(bench[0].read_text())
model = json.loads(model_file.read_text())
mm = model["meta"]
meta = data["meta"]
print(f"measured: {meta.get('device_name')} torch {meta.get('torch')} -- {bench[0]}")
dev = mm["device"].get("name") if isinstance(mm["device"], dict) else mm["device"]
print(f"model: {dev}, N = {mm['n']}, H = {mm['heads']}, {mm['dtype']} -- {model_file} "
      "(predicted, not measured; FlexAttention: forward only; attngraph-flex: the hybrid)")
rows = {(r["mask"], r["dim"]): r for r in model["rows"]}
ms = lambda t: "-" if t is None else f"{1e3 * t:.3g}"  # noqa: E731
print(f"{'mask':22s} {'D':>4s} {'peer':15s} {'fwd ms':>8s} {'model fwd lo/L2/hi':>22s} "
      f"{'fwdbwd ms':>9s} {'model fwdbwd lo/L2/hi':>24s} {'measured/model(L2)':>18s}")
worst = []
for rec in data["records"]:
    m = rows.get((rec["mask"], rec["dim"]))
    modes = rec.get("modes", {})
    got = {k: modes.get(k, {}).get("median_s") for k in ("fwd", "fwdbwd")}
    same = m is not None and rec["n"] == m["n"] and rec["heads"] == mm["heads"]
    if rec["peer"] == "flex" and same:
        pred = {"fwd": (m["flex_fwd"],) * 3, "fwdbwd": (None,) * 3}
    elif rec["peer"] == "attngraph-cupy" and same:
        pred = {k: (m[k]["t_lo"], m[k]["t_mid"], m[k]["t_hi"]) for k in ("fwd", "fwdbwd")}
    elif rec["peer"] == "attngraph-flex" and same and "hybrid_fwd" in m:
        pred = {k: (m[f"hybrid_{k}"],) * 3 for k in ("fwd", "fwdbwd")}
    else:
        pred = {"fwd": (None,) * 3, "fwdbwd": (None,) * 3}
    ratio = "-" if not (got["fwd"] and pred["fwd"][1]) else f"{got['fwd'] / pred['fwd'][1]:.2f}x"
    span = {k: ms(p[0]) if len(set(p)) == 1 else "/".join(ms(t) for t in p) for k, p in pred.items()}
    if ratio != "-":
        worst.append((got["fwd"] / pred["fwd"][1], rec["mask"], rec["peer"]))
    print(f"{rec['mask']:22s} {rec['dim']:4d} {rec['peer']:15s} {ms(got['fwd']):>8s} "
          f"{span['fwd']:>22s} {ms(got['fwdbwd']):>9s} {span['fwdbwd']:>24s} {ratio:>18s}"
          + ("" if rec.get("status") == "ok" else f"  ({rec.get('status')})"))
if worst:
    r, mask, peer = max(worst)
    print(f"measured/model(L2) fwd: {min(worst)[0]:.2f}x .. {r:.2f}x (largest: {peer} on {mask})")
else:
    print("no record matched a model row (same mask, D, N, H): nothing to compare")
EOF

# ---------------------------------------------------------------- 4. NVRTC gate, this arch
reserve=0
run_step nvrtc-gate 60 '(kernel instantiations|[Ee]rror)' bash -c "
  arch=\$($py -c 'import torch; m, n = torch.cuda.get_device_capability(); print(f\"sm_{m}{n}\")') || exit 1
  $py -m attngraph.ops.cuda --arch \$arch --fail-on-spill"

# ---------------------------------------------------------------- summary
{
  echo
  echo "gpu_check: $(date -u '+%Y-%m-%d %H:%M UTC'), ${SECONDS} s, logs in $out"
  printf '%-20s %-12s %5s  %s\n' step status s "key line"
  for row in "${rows[@]}"; do
    IFS='|' read -r name status secs key <<<"$row"
    printf '%-20s %-12s %5s  %s\n' "$name" "$status" "$secs" "$key"
  done
} | tee "$out/summary.txt"
grep -q -E 'FAIL|TIMEOUT' "$out/summary.txt" && exit 1
exit 0
