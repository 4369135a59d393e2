#!/usr/bin/env bash
# One command per GPU-machine call (each well under its 10-minute limit), run from the repo root:
#   benchmarks/run_gpu.sh test    # the test suite on CUDA tensors (+ one compute-sanitizer pass)
#   benchmarks/run_gpu.sh bench   # pytest benchmarks/ --benchmark-only -> $OUT/results.json
# The machine has no network: the project installs from this source tree with the packages its
# image already has (no matplotlib, sentence-transformers or hypothesis there: those tests skip).
# Back on the CPU machine: python benchmarks/report.py <results.json> --markdown ... --plot ...
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-build/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
unset TRITON_INTERPRET

{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
} 2>&1 | tee "$OUT/environment.txt"

# The CUDA extension builds for the GPU that is here (fast) unless told otherwise.
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$(python3 -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")}
export MAX_JOBS=${MAX_JOBS:-16}
timeout 240 python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -5 | tee "$OUT/install.log"
python3 -m fastbert.cli info 2>&1 | tee -a "$OUT/environment.txt"

case "${1:-}" in
  test)
    timeout 420 python3 -m pytest tests -q -p no:cacheprovider \
      --junitxml="$OUT/junit.xml" 2>&1 | tee "$OUT/test.log" | tail -40
    status=${PIPESTATUS[0]}
    if command -v compute-sanitizer >/dev/null; then
      timeout 120 compute-sanitizer --tool memcheck --error-exitcode 1 python3 -m pytest -q -x \
        tests/ops -k "cuda" -p no:cacheprovider 2>&1 | tail -30 | tee "$OUT/sanitizer.log"
      status=$(( status || PIPESTATUS[0] ))
    fi
    exit "$status"
    ;;
  bench)
    export FASTBERT_BENCH_JSON="$OUT/results.json"
    timeout 540 python3 -m pytest benchmarks --benchmark-only -q -p no:cacheprovider \
      --benchmark-json="$OUT/pytest-benchmark.json" 2>&1 | tail -60 | tee "$OUT/bench.log"
    exit "${PIPESTATUS[0]}"
    ;;
  *)
    echo "usage: $0 test|bench" >&2
    exit 2
    ;;
esac
