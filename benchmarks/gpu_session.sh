#!/usr/bin/env bash
# The whole GPU check in one device call, for a lease of 15 device minutes (one call of <= 10
# minutes after the machine's start): run from the repo root with the call's timeout_s >= BUDGET + 30.
#   1. install + the GPU tests (ops, model, compile/graphs, optimize, CLI), no sanitizer; a probe of
#      the C++ extension's exceptions (under cuda-gdb);
#   2. a profile of one eager forward and of graph replays (benchmarks/profile_model.py), the headline model cases, BERT-base bf16, without max-autotune (minutes of autotuning each),
#      and `fastbert embed`'s job (benchmarks/bench_embed.py, whatever MODEL_K says: about 20 s);
#   3. the kernel microbenchmarks in bf16 with whatever time is left: attention first (its tile
#      changed after the first run; the sweep decides), then the fused linear + GELU GEMM (without
#      its torch.compile peer: minutes of compiling), then the memory-bound kernels.
# STEPS picks and orders the steps (default "test profile model micro"); MODEL_K and MICRO_K replace
# the model and microbenchmark steps' -k expressions, TESTS and TEST_TIMEOUT the test step's files
# and limit (defaults below). Each step ends early enough to leave the steps after it their usual
# need (reserve_after: profile 80 s, model 150 s, micro BUDGET / 5). E.g. the
# max-autotune peers first, then the LayerNorm and attention sweeps:
#   STEPS="model micro profile" MODEL_K="torch.compile and (32x128 or 32x512)" \
#   MICRO_K="(bf16 and (bias_residual_layer_norm or attention)) or pack_padded_batch" BUDGET=555 \
#   benchmarks/gpu_session.sh
# Each step runs under a deadline so the script always ends, and packs its logs, inside BUDGET
# seconds: $OUT gets session.tgz (every log and results.json) + the two results.json, since only 8
# files come back from a call. On the CPU machine:
#   python benchmarks/report.py model-results.json micro-results.json --markdown ... --plot ...
set -u
BUDGET=${BUDGET:-560}
OUT_ROOT=${OUT:-build/gpu}
start=$SECONDS
# Seconds until $1 after the start, at least 5 (`timeout 0` would mean no limit at all).
left() { local t=$(( $1 - (SECONDS - start) )); echo $(( t > 5 ? t : 5 )); }
cd "$(dirname "$0")/.."

STEPS=${STEPS:-test profile model micro}
MODEL_K=${MODEL_K:-not max-autotune and (1x128 or 32x128 or 32x512 or varlen16x512 or sentences32)}
MICRO_K=${MICRO_K:-(bf16 or pack_padded_batch) and not (test_linear_activation and torch-compile)}
mkdir -p "$OUT_ROOT/test" "$OUT_ROOT/model" "$OUT_ROOT/micro"

TESTS=${TESTS:-tests/ops tests/test_model.py tests/test_encoder_fast_path.py \
tests/test_compile_and_graphs.py tests/test_optimize.py tests/test_cli.py tests/test_embed_graphs.py tests/test_bad_inputs.py}
TEST_TIMEOUT=${TEST_TIMEOUT:-200}

# The epoch second by which a step must end to leave the steps after it their usual need ($1: seconds).
deadline() { echo $(( $(date +%s) + $(left "$1") )); }

step_test() {
  # The install and the tests end in time for the probe (90 s) and the steps after this one.
  # shellcheck disable=SC2086  # TESTS is a list of paths
  OUT=$OUT_ROOT/test SANITIZER=0 TEST_TIMEOUT=$TEST_TIMEOUT \
    DEADLINE=$(deadline $(( BUDGET - $(reserve_after test) - 90 ))) benchmarks/run_gpu.sh test $TESTS
  echo "gpu_session.sh: tests exit $? at $((SECONDS - start)) s"
  local probe; probe=$(left $(( BUDGET - $(reserve_after test) )))
  probe=$(( probe < 90 ? probe : 90 ))

  # On the first H200 run (2026-11-26) any exception thrown by the C++ extension crashed the process.
  # The probe makes it raise once; under cuda-gdb (the image has no gdb) a crash leaves a native backtrace.
  if command -v cuda-gdb >/dev/null; then
    timeout "$probe" cuda-gdb -q -batch -ex run -ex bt -ex "info sharedlibrary" --args python3 -X faulthandler \
      tests/extension_raise_probe.py >"$OUT_ROOT/test/probe.log" 2>&1
  else
    timeout "$probe" python3 -X faulthandler tests/extension_raise_probe.py >"$OUT_ROOT/test/probe.log" 2>&1
  fi
  echo "gpu_session.sh: extension raise probe exit $? (test/probe.log):"
  grep -E "raised|SIG|^#[0-9]+ " "$OUT_ROOT/test/probe.log" | head -30
}

# Where the time of one eager forward goes (device time per kernel; host time per operator), and
# of PaddedCUDAGraphRunner calls (the kernels a replay runs, their times, and the wall time beside them).
# Seconds a step leaves for the steps after it in STEPS (each step's usual need: the profile 80 s,
# the headline model cases 150 s, the microbenchmarks BUDGET / 5), so an early step cannot take them.
reserve_after() {
  local seen=0 total=15 s
  for s in $STEPS; do
    if [ "$seen" = 1 ]; then
      case $s in profile) total=$(( total + 80 ));; model) total=$(( total + 150 ));;
                 micro) total=$(( total + BUDGET / 5 ));; esac
    fi
    [ "$s" = "$1" ] && seen=1
  done
  echo "$total"
}

step_profile() {
  local limit; limit=$(left $(( BUDGET - $(reserve_after profile) )))
  timeout $(( limit < 180 ? limit : 180 )) python3 benchmarks/profile_model.py --out "$OUT_ROOT/test" >/dev/null \
    2>"$OUT_ROOT/test/profile.err"
  echo "gpu_session.sh: profile exit $? at $((SECONDS - start)) s (test/profile.txt)"
}

step_model() {
  OUT=$OUT_ROOT/model FASTBERT_BENCH_QUICK=1 BENCH_TIMEOUT=$(left $(( BUDGET - $(reserve_after model) ))) \
    DEADLINE=$(deadline $(( BUDGET - $(reserve_after model) ))) \
    benchmarks/run_gpu.sh bench benchmarks/bench_model.py benchmarks/bench_embed.py -k "($MODEL_K) or test_embed"
  echo "gpu_session.sh: model benchmarks exit $? at $((SECONDS - start)) s"
}

step_micro() {
  OUT=$OUT_ROOT/micro BENCH_TIMEOUT=$(left $(( BUDGET - $(reserve_after micro) ))) \
    DEADLINE=$(deadline $(( BUDGET - $(reserve_after micro) ))) benchmarks/run_gpu.sh bench \
    benchmarks/bench_attention.py benchmarks/bench_linear_activation.py benchmarks/bench_bias_activation.py \
    benchmarks/bench_bias_residual_layer_norm.py benchmarks/bench_embeddings.py benchmarks/bench_pack_padded_batch.py \
    -k "$MICRO_K"
  echo "gpu_session.sh: microbenchmarks exit $? at $((SECONDS - start)) s"
}

for step in $STEPS; do
  case $step in
    test|profile|model|micro) "step_$step";;
    *) echo "gpu_session.sh: unknown step '$step' (test, profile, model, micro)" >&2;;
  esac
done

cd "$OUT_ROOT" && tar czf session.tgz test model micro
for step in model micro; do [ -f "$step/results.json" ] && cp "$step/results.json" "$step-results.json"; done
rm -rf test model micro
ls -la
