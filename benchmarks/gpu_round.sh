#!/usr/bin/env bash
# The GPU round in one command, for a machine with a CUDA GPU and torch installed:
# build the extension, run the whole test suite (CUDA tests included), run the
# benchmark suite at GPU size, and leave everything under OUT:
#   OUT/build.log, OUT/tests-<gpu>-<date>.log, OUT/<gpu>-<date>.json (the suite's schema),
#   OUT/bench/{report.md,ratios.png}
# Usage: bash benchmarks/gpu_round.sh OUT
set -u
out=${1:?usage: bash benchmarks/gpu_round.sh OUT}
mkdir -p "$out"
python - <<'PY' || { echo "gpu_round: needs torch with a CUDA GPU" >&2; exit 2; }
import torch
assert torch.cuda.is_available()
PY
gpu=$(python -c "import torch; print(torch.cuda.get_device_name().lower().replace(' ', '-'))")
day=$(date +%F)
python -m pip install --no-build-isolation --no-deps -e . > "$out/build.log" 2>&1 \
  || { tail -50 "$out/build.log"; exit 1; }
python -m pytest tests -q -rs -p no:cacheprovider > "$out/tests-$gpu-$day.log" 2>&1
tests_rc=$?
python -m pytest benchmarks -q -p no:cacheprovider -o python_files='bench_*.py' \
  --bench-size gpu --bench-out "$out/bench" > "$out/bench.log" 2>&1
bench_rc=$?
[ -f "$out/bench/results.json" ] && cp "$out/bench/results.json" "$out/$gpu-$day.json"
tail -3 "$out/tests-$gpu-$day.log"
echo "gpu_round: tests exit $tests_rc, benchmarks exit $bench_rc; results in $out"
exit $(( tests_rc || bench_rc ))
