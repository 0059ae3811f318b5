#!/usr/bin/env bash
# The GPU round: build the CUDA extension, run the GPU tests, run the quick GPU benchmark, in
# ONE command (a lent GPU machine starts bare on every call), everything under OUT:
#   OUT/build.log                      the build (nvcc, sm_90)
#   OUT/tests-<gpu>-<date>.log, .xml   pytest -m cuda (the GPU-relevant tests), in parallel
#   OUT/bench.log, OUT/bench/          the benchmark suite at --bench-size gpu-quick
#   OUT/<gpu>-<date>.json              the suite's results (schema of benchmarks/run.py)
#   OUT/round.log                      this script's own lines, with each step's time
#
# Usage: bash benchmarks/gpu_round.sh [--dry-run] OUT [build] [test] [bench]
#   --dry-run   on any machine: print the steps and commands, the tests `-m cuda` selects, the
#               benchmark cases, and count the Triton specializations the tests ask for (the
#               cuda-marked Triton tests run in the interpreter with benchmarks/triton_compiles.py;
#               DRY_COUNT=0 skips that count).
#
# Budget (the device gives one command at most 10 minutes; the whole task 15 minutes, start
# included): each step has a time cap, so a hang in one still leaves the others' output.
#   build  <= 180 s  DST_KERNELS_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16, 9 C++/CUDA files
#   test   <= 180 s  pytest -m cuda -n 8; Triton autotuning limited to 1 config
#                    (DST_KERNELS_TRITON_MAX_CONFIGS=1, set by tests/conftest.py)
#   bench  <= 180 s  --bench-size gpu-quick: 16 cases (linear 4096x4096x4096 and 8192x4096x4096,
#                    conv 3x3 VGG 64@32 / ResNet 64@56, 256@14 at batch 128, LSTM-b, the mask
#                    and weight-grad ops at 4096x4096; bf16 and fp32), Triton limited to 2
#                    configs (BENCH_TRITON_CONFIGS, default 2)
# Compile estimate, counted on a CPU machine with --dry-run (2026-11-26): `-m cuda` selects 286
# tests (234 of them run only on a GPU; 3 of those start dst-train --fsdp in subprocesses, with
# a plain CUDA run to compare against); the Triton tests that also run in the interpreter
# ask for 54 kernel specializations (fwd 10, dx 4, dw 5, implicit-GEMM conv 23, mask 5, reset 3,
# weight-grad 4); the GPU-only Triton tests (bf16 autocast, TF32, opcheck) add roughly 25 more:
# about 80 compiles at 1 config, some 2-10 s of CPU each (fp32 "ieee" GEMMs are the slow ones),
# spread over 8 workers. The quick benchmark compiles about 22 (3 GEMM kernels x 2 dtypes x 2
# configs, the conv kernel x 2 x 2, the elementwise kernels x 2). Real timings: see the note of
# the round that ran it.
set -u
set -f  # no globbing: the commands below are expanded unquoted
set -o pipefail

dry=0
if [ "${1:-}" = "--dry-run" ]; then
  dry=1
  shift
fi
out=${1:?usage: bash benchmarks/gpu_round.sh [--dry-run] OUT [build] [test] [bench]}
shift
steps=${*:-build test bench}
PY=${PYTHON:-python3}
BUILD_CAP=${BUILD_CAP:-180}
TEST_CAP=${TEST_CAP:-180}
BENCH_CAP=${BENCH_CAP:-180}
WORKERS=${WORKERS:-8}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
day=$(date +%F)

say() { echo "gpu_round: $*" | tee -a "$out/round.log"; }

test_cmd() {
  local par=""
  if $PY -c "import xdist" 2>/dev/null; then par="-n $WORKERS"; fi
  # pytest-timeout, where installed: a hung test fails alone instead of eating the step's cap
  if $PY -c "import pytest_timeout" 2>/dev/null; then par="$par --timeout 120"; fi
  echo "$PY -m pytest tests -m cuda $par -q -rs -p no:cacheprovider --junitxml $out/tests-$1.xml"
}
BENCH_CMD="$PY -m pytest benchmarks -q -p no:cacheprovider -o python_files=bench_*.py --bench-size gpu-quick --bench-out $out/bench"
BUILD_ENV="DST_KERNELS_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16"

if [ $dry = 1 ]; then
  say "dry run on $(uname -n): steps: $steps"
  say "build (cap ${BUILD_CAP}s): $BUILD_ENV $PY -m pip install --no-index --no-build-isolation --no-deps -e ."
  say "test  (cap ${TEST_CAP}s): $(test_cmd GPU-DATE)"
  say "bench (cap ${BENCH_CAP}s): DST_KERNELS_TRITON_MAX_CONFIGS=${BENCH_TRITON_CONFIGS:-2} $BENCH_CMD"
  say "tests selected by -m cuda:"
  $PY -m pytest tests -m cuda --collect-only -q -p no:cacheprovider 2>&1 | tail -1 | tee -a "$out/round.log"
  say "benchmark cases:"
  $PY -m benchmarks.run --size gpu-quick --list 2>&1 | tee -a "$out/round.log"
  if [ "${DRY_COUNT:-1}" = 1 ]; then
    say "counting Triton specializations (cuda-marked Triton tests in the interpreter)..."
    TRITON_INTERPRET=1 $PY -m pytest tests -m cuda -q -p no:cacheprovider -p benchmarks.triton_compiles 2>&1 \
      | grep -E "triton specializations|passed|failed" | tee -a "$out/round.log"
  fi
  exit 0
fi

$PY - <<'PY' || { say "needs torch with a CUDA GPU"; exit 2; }
import torch
assert torch.cuda.is_available()
PY
gpu=$($PY -c "import torch; print(torch.cuda.get_device_name().lower().replace(' ', '-'))")
say "$gpu, $($PY -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)')"
rc=0
for step in $steps; do
  t0=$(date +%s)
  case $step in
    build)
      if ! command -v nvcc >/dev/null && [ ! -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ]; then
        say "build: no nvcc on PATH or in CUDA_HOME: cannot build the CUDA kernels"
        exit 1
      fi
      $PY -c "import ninja" 2>/dev/null || say "build: no ninja: the CUDA files compile one at a time"
      env $BUILD_ENV timeout -k 10 "$BUILD_CAP" $PY -m pip install --no-index --disable-pip-version-check \
        --no-build-isolation --no-deps -e . > "$out/build.log" 2>&1
      b=$?
      left=$((BUILD_CAP - ($(date +%s) - t0)))
      if [ $b != 0 ] && [ $b != 124 ] && [ $left -gt 30 ]; then  # pip itself failed: build in place
        say "build: pip exit $b, trying setup.py build_ext --inplace within the ${left}s left"
        env $BUILD_ENV timeout -k 10 "$left" $PY setup.py build_ext --inplace >> "$out/build.log" 2>&1
        b=$?
      fi
      tail -5 "$out/build.log"
      $PY -c "import dst_kernels; print('gpu_round: built', dst_kernels._ops.build_info())" 2>&1 \
        | tee -a "$out/round.log"
      $PY -c "import dst_kernels as d; assert 'native' in d.available_backends('cuda'), 'no CUDA kernels'" \
        || b=1
      if [ $b != 0 ]; then say "build failed (exit $b): see $out/build.log"; exit 1; fi
      ;;
    test)
      log="$out/tests-$gpu-$day.log"
      timeout -s INT -k 20 "$TEST_CAP" $(test_cmd "$gpu-$day") > "$log" 2>&1
      t=$?
      tail -15 "$log"
      say "tests exit $t (124: hit the ${TEST_CAP}s cap)"
      rc=$((rc || t))
      ;;
    bench)
      # SIGINT at the cap: pytest stops and still writes what it measured.
      DST_KERNELS_TRITON_MAX_CONFIGS=${BENCH_TRITON_CONFIGS:-2} timeout -s INT -k 20 "$BENCH_CAP" $BENCH_CMD \
        > "$out/bench.log" 2>&1
      b=$?
      tail -5 "$out/bench.log"
      [ -f "$out/bench/results.json" ] && cp "$out/bench/results.json" "$out/$gpu-$day.json"
      [ -f "$out/bench/report.md" ] && cat "$out/bench/report.md"
      say "benchmarks exit $b (124: hit the ${BENCH_CAP}s cap)"
      rc=$((rc || b))
      ;;
    *)
      say "unknown step $step (build, test, bench)"
      exit 2
      ;;
  esac
  say "$step took $(($(date +%s) - t0)) s"
done
say "results in $out"
exit $rc
