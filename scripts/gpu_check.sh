#!/usr/bin/env bash
# One prepared GPU session, for a CUDA machine that already has torch, triton and transformers (the
# `device` tool's H200 image has them): no install, no C++ build (the CPU extension is not needed here).
#   1. the GPU tests (every test marked gpu): every Triton kernel vs the float64 reference on CUDA, the
#      property tests' triton:cuda backend, opcheck, measured dispatch, torch.compile(fullgraph) of
#      compressed models, the CUDA checkpoint round trip, calibration of a CPU-resident model on the GPU;
#   2. the kernel benchmark (--quick: 7B and SmolLM2 shapes) and end-to-end decode, JSON + log.
# Results go to $OUT (the device tool's return folder) or bench/results/. About 6-8 minutes on an H200.
#   bash scripts/gpu_check.sh            # all of it
#   QUICK= bash scripts/gpu_check.sh     # the full benchmark sweep instead of --quick (longer)
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
out="${OUT:-$root/bench/results}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1 PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET

# nothing is installed here: the CPU extension and the test extras may be missing, which the suite
# otherwise counts as a failure; -m gpu below selects only the tests that need the GPU
export QRUNTIME_TEST_SKIP_MISSING=1
python3 - <<'EOF' 2>&1 | tee "$out/gpu_env.txt"
import subprocess, torch, triton, transformers
print("torch", torch.__version__, "| triton", triton.__version__, "| transformers", transformers.__version__)
print("gpu", torch.cuda.get_device_name(0), torch.cuda.get_device_properties(0))
print(subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip() or "no git")
EOF
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem --format=csv 2>&1 | tee -a "$out/gpu_env.txt"

# every test that needs CUDA carries the gpu mark (tests/conftest.py refuses one that does not)
timeout 300 python3 -m pytest -q -m gpu -p no:cacheprovider tests \
  2>&1 | tee "$out/gpu_tests.log" | tail -25

# the file name as bench_gpu_kernels.py would give it: gpu_kernels_<GPU name, lowercase, runs of other characters as "-">.json
slug=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr 'A-Z' 'a-z' | sed -E 's/[^a-z0-9]+/-/g; s/^-+|-+$//g' || true)
timeout 420 python3 bench/bench_gpu_kernels.py ${QUICK---quick} --e2e --out "$out/gpu_kernels_${slug:-gpu}.json" \
  2>&1 | tee "$out/gpu_bench.log" | tail -80
