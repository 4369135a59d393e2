#!/usr/bin/env bash
# The whole GPU check in one device call, for a lease of 15 device minutes (one call of <= 10
# minutes after the machine's start): run from the repo root with the call's timeout_s >= BUDGET + 30.
#   1. install + the GPU tests (ops, model, compile/graphs, optimize, CLI), no sanitizer;
#   2. the headline model cases, BERT-base bf16, without max-autotune (minutes of autotuning each);
#   3. the kernel microbenchmarks in bf16, with whatever time is left.
# Each step runs under a deadline so the script always ends, and packs its logs, inside BUDGET
# seconds: $OUT gets session.tgz (every log and results.json) + the two results.json, since only 8
# files come back from a call. On the CPU machine:
#   python benchmarks/report.py model/results.json micro/results.json --markdown ... --plot ...
set -u
BUDGET=${BUDGET:-560}
OUT_ROOT=${OUT:-build/gpu}
start=$SECONDS
# Seconds until $1 after the start, at least 5 (`timeout 0` would mean no limit at all).
left() { local t=$(( $1 - (SECONDS - start) )); echo $(( t > 5 ? t : 5 )); }
cd "$(dirname "$0")/.."

OUT=$OUT_ROOT/test SANITIZER=0 TEST_TIMEOUT=150 benchmarks/run_gpu.sh test \
  tests/ops tests/test_model.py tests/test_model_triton.py tests/test_compile_and_graphs.py \
  tests/test_optimize.py tests/test_cli.py tests/test_bad_inputs.py
echo "gpu_session.sh: tests exit $? at $((SECONDS - start)) s"

micro_time=$(( BUDGET / 5 ))
OUT=$OUT_ROOT/model FASTBERT_BENCH_QUICK=1 BENCH_TIMEOUT=$(left $(( BUDGET - micro_time - 15 ))) \
  benchmarks/run_gpu.sh bench benchmarks/bench_model.py \
  -k "not max-autotune and (1x128 or 32x128 or 32x512 or varlen16x512)"
echo "gpu_session.sh: model benchmarks exit $? at $((SECONDS - start)) s"

OUT=$OUT_ROOT/micro BENCH_TIMEOUT=$(left $(( BUDGET - 15 ))) benchmarks/run_gpu.sh bench \
  benchmarks/bench_attention.py benchmarks/bench_bias_residual_layer_norm.py \
  benchmarks/bench_bias_activation.py benchmarks/bench_embeddings.py -k bf16
echo "gpu_session.sh: microbenchmarks exit $? at $((SECONDS - start)) s"

cd "$OUT_ROOT" && tar czf session.tgz test model micro
for step in model micro; do [ -f "$step/results.json" ] && cp "$step/results.json" "$step-results.json"; done
rm -rf test model micro
ls -la
