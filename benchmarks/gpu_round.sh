#!/usr/bin/env bash
# The GPU round, for a machine with a CUDA GPU and torch installed: build the extension,
# run the whole test suite (CUDA tests included), run the benchmark suite at GPU size,
# and leave everything under OUT:
#   OUT/build.log, OUT/tests-<gpu>-<date>.log, OUT/<gpu>-<date>.json (the suite's schema),
#   OUT/bench/{report.md,ratios.png}
# Usage: bash benchmarks/gpu_round.sh OUT [STEP ...]
# STEPs: build, test, bench (default: all three, in that order). Running them as separate
# commands keeps each under a per-command time limit; test and bench reuse the build.
set -u
out=${1:?usage: bash benchmarks/gpu_round.sh OUT [build] [test] [bench]}
shift
steps=${*:-build test bench}
mkdir -p "$out"
python - <<'PY' || { echo "gpu_round: needs torch with a CUDA GPU" >&2; exit 2; }
import torch
assert torch.cuda.is_available()
PY
gpu=$(python -c "import torch; print(torch.cuda.get_device_name().lower().replace(' ', '-'))")
day=$(date +%F)
rc=0
for step in $steps; do
  case $step in
    build)
      python -m pip install --no-build-isolation --no-deps -e . > "$out/build.log" 2>&1 \
        || { tail -50 "$out/build.log"; exit 1; }
      python -c "import dst_kernels; print('gpu_round: built', dst_kernels._ops.build_info())"
      ;;
    test)
      python -m pytest tests -q -rs -p no:cacheprovider > "$out/tests-$gpu-$day.log" 2>&1
      t=$?
      tail -3 "$out/tests-$gpu-$day.log"
      echo "gpu_round: tests exit $t"
      rc=$((rc || t))
      ;;
    bench)
      python -m pytest benchmarks -q -p no:cacheprovider -o python_files='bench_*.py' \
        --bench-size gpu --bench-out "$out/bench" > "$out/bench.log" 2>&1
      b=$?
      [ -f "$out/bench/results.json" ] && cp "$out/bench/results.json" "$out/$gpu-$day.json"
      echo "gpu_round: benchmarks exit $b"
      rc=$((rc || b))
      ;;
    *)
      echo "gpu_round: unknown step $step (build, test, bench)" >&2
      exit 2
      ;;
  esac
done
echo "gpu_round: results in $out"
exit $rc
