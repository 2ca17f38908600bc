#!/usr/bin/env bash
# The checks only a GPU can make, in one short run (a lent machine is scarce): the `gpu`
# tests of the CUDA kernels, a compute-sanitizer memcheck of one of them, the NVRTC gate for
# the machine's own arch, and the GPU benchmark preset at its quick sizes beside the model.
# Usage, from the repository root on a machine with a GPU, torch and cupy:
#   bash benchmarks/gpu_check.sh [OUT_DIR]
set -uo pipefail
out="${1:-benchmarks/results}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
py="${PYTHON:-python3}"
status=0
nvidia-smi -L || true
"$py" -m pytest -q -m gpu tests/test_cuda_gpu.py || status=1
if command -v compute-sanitizer >/dev/null; then
  compute-sanitizer --tool memcheck --error-exitcode 9 \
    "$py" -m pytest -q -m gpu tests/test_cuda_gpu.py -k "longformer and bf16" || status=1
fi
arch=$("$py" -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'sm_{m}{n}')")
"$py" -m attngraph.ops.cuda --arch "$arch" --fail-on-spill > "$out/gate_$arch.txt" || status=1
"$py" -m benchmarks --preset gpu --quick --out "$out" --quiet || status=1
exit $status
