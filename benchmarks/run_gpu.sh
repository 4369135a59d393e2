#!/usr/bin/env bash
# One command per GPU-machine call (each well under its 10-minute limit), run from the repo root:
#   benchmarks/run_gpu.sh test    # the test suite on CUDA tensors (+ one compute-sanitizer pass)
#   benchmarks/run_gpu.sh bench [pytest args]   # pytest benchmarks/ --benchmark-only -> $OUT/results.json
# A GPU session of 15 device minutes runs benchmarks/gpu_session.sh (these steps under deadlines) in
# one call; with more time, one call each:
#   benchmarks/run_gpu.sh test
#   FASTBERT_BENCH_QUICK=1 benchmarks/run_gpu.sh bench benchmarks/bench_model.py   # the headline cases
#   benchmarks/run_gpu.sh bench -k "not bert-base-bf16"                             # everything else
# Environment: TEST_TIMEOUT, BENCH_TIMEOUT (seconds per step), SANITIZER=0 (skip compute-sanitizer),
# DEADLINE (seconds since the epoch: no step runs past it, whatever its own timeout, since the install
# before the steps takes part of a caller's time; gpu_session.sh sets it).
# The machine has no network: the project installs from this source tree with the packages its
# image already has; tests that need a package it lacks (the embedded MiniLM checkpoint, for one) skip.
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
python3 -c "import setuptools; print('setuptools', setuptools.__version__)" 2>&1 | tee -a "$OUT/environment.txt"
# The tests import fastbert from this tree, but fastbert.kernels (kernels/) and fastbert._C exist only
# through the editable install: without it nothing below can run, so stop with the installer's log.
# A warm machine (a second call) keeps the first call's install: reinstalling would rebuild nothing.
if python3 -c "import os, fastbert, fastbert._C, fastbert.kernels.attention
assert fastbert.__file__.startswith(os.getcwd())" 2>/dev/null; then
  echo "fastbert already installed from this tree" >>"$OUT/install.log"
elif ! timeout 150 python3 -m pip install --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 \
    || ! python3 -c "import fastbert.kernels.attention, fastbert._C" >>"$OUT/install.log" 2>&1; then
  grep -v "^WARNING: Location" "$OUT/install.log" | tail -40
  echo "run_gpu.sh: installing fastbert from this tree failed (full log: install.log)" >&2
  exit 3
fi
python3 -m fastbert.cli info 2>&1 | tee -a "$OUT/environment.txt"

# A step's limit: its own, or what is left until DEADLINE if that is sooner (at least 5 s: `timeout 0`
# would mean no limit at all).
limit() {
  local t=$1 rest
  if [ -n "${DEADLINE:-}" ]; then rest=$(( DEADLINE - $(date +%s) )); t=$(( rest < t ? rest : t )); fi
  echo $(( t > 5 ? t : 5 ))
}

# pytest-xdist (in the GPU image) spreads the tests over the cores; the GPU tests are small.
PARALLEL=()
python3 -c "import xdist" 2>/dev/null && PARALLEL=(-n 8)

case "${1:-}" in
  test)
    # Extra arguments select tests (pytest's own: paths, -k); by default the whole suite.
    shift
    [ "$#" -eq 0 ] && set -- tests
    # The Triton-interpreter cases are the CPU machine's proof of the kernels; here the kernels run
    # for real on the same cases, so they are left out (Triton 3.6's interpreter also cannot run
    # with the NumPy 2.5 of the GPU image).
    # A caller's own -k is added to "not interpreter" (pytest keeps only the last -k it is given).
    select="not interpreter"
    args=()
    while [ "$#" -gt 0 ]; do
      if [ "$1" = -k ] && [ "$#" -gt 1 ]; then select="$select and ($2)"; shift 2; else args+=("$1"); shift; fi
    done
    timeout "$(limit "${TEST_TIMEOUT:-300}")" python3 -m pytest -q -p no:cacheprovider "${PARALLEL[@]}" \
      -k "$select" "${args[@]}" \
      -rs --junitxml="$OUT/junit.xml" 2>&1 | tee "$OUT/test.log" | tail -40
    status=${PIPESTATUS[0]}
    if [ "${SANITIZER:-1}" = 1 ] && command -v compute-sanitizer >/dev/null; then
      # memcheck slows every launch many times over: the hand-written CUDA kernel (the embeddings
      # extension, its own indexing) gets it; Triton's masked accesses are generated.
      timeout "$(limit 120)" compute-sanitizer --tool memcheck --error-exitcode 1 python3 -m pytest -q -x \
        tests/ops/test_embeddings.py -k "cuda_extension" -p no:cacheprovider >"$OUT/sanitizer.log" 2>&1
      sanitizer=$?
      tail -30 "$OUT/sanitizer.log"
      if grep -q "Device not supported" "$OUT/sanitizer.log"; then
        # Under some container runtimes the tool refuses the device itself: that is not a finding.
        echo "run_gpu.sh: compute-sanitizer cannot run on this machine (sanitizer.log)"
      elif [ "$sanitizer" -eq 124 ]; then
        echo "run_gpu.sh: compute-sanitizer did not finish in its time: incomplete, not a pass (sanitizer.log)"
      else
        status=$(( status || sanitizer ))
      fi
    fi
    exit "$status"
    ;;
  bench)
    # Extra arguments select cases (pytest's own: files, -k); by default the model suite comes first,
    # then the kernel microbenchmarks. results.json is rewritten after every case, so a run stopped
    # at its limit keeps what it measured; report.py merges the results.json of several calls.
    shift
    asked=$([ "$#" -gt 0 ] && printf ' %q' "$@")  # for the table: the command as typed
    # No benchmark file named (only options such as -k): the whole suite, else pytest would collect
    # its default testpaths (tests/) and benchmark nothing.
    named=0
    for arg in "$@"; do case "$arg" in benchmarks/*) named=1 ;; esac; done
    if [ "$named" -eq 0 ]; then
      set -- benchmarks/bench_model.py $(ls benchmarks/bench_*.py | grep -v bench_model.py) "$@"
    fi
    export FASTBERT_BENCH_JSON="$OUT/results.json"
    timeout "$(limit "${BENCH_TIMEOUT:-450}")" python3 -m pytest --benchmark-only -q -p no:cacheprovider -rs \
      --benchmark-json="$OUT/pytest-benchmark.json" "$@" 2>&1 | tee "$OUT/bench.log" | tail -30
    status=${PIPESTATUS[0]}
    # Last, so that the call's reply carries it: fastbert's rows with their ratios to each peer.
    command="${FASTBERT_BENCH_QUICK:+FASTBERT_BENCH_QUICK=1 }benchmarks/run_gpu.sh bench${asked}"
    [ -f "$OUT/results.json" ] && python3 benchmarks/report.py "$OUT/results.json" --command "$command" \
      | tee "$OUT/table.md"
    exit "$status"
    ;;
  *)
    echo "usage: $0 test|bench" >&2
    exit 2
    ;;
esac
