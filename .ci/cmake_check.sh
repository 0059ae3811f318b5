#!/usr/bin/env bash
# Build _C with CMake (torch's CMake config) and check the library registers its ops.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
python=${1:-$repo/.venv/bin/python}
build=$(mktemp -d)
trap 'rm -rf "$build"' EXIT
cmake -S "$repo" -B "$build" -DPython3_EXECUTABLE="$python" -DDST_KERNELS_INSTALL_DIR="$build/out" >/dev/null
cmake --build "$build" -j "${MAX_JOBS:-2}"
cmake --install "$build" >/dev/null
lib=$(ls "$build"/out/_C*.so)
# A fresh interpreter that loads only the CMake-built library (not the package's own _C).
"$python" - "$lib" <<'PY'
import sys

import torch

torch.ops.load_library(sys.argv[1])
info = torch.ops.dst_kernels.build_info()
x = torch.tensor([-2.0, -0.7, -0.1, 0.0, 0.5, 1.0])
got = torch.ops.dst_kernels.estimator(x)
assert torch.equal(got, torch.tensor([0.0, 0.4, 1.6, 2.0, 0.4, 0.4])), got
assert f"torch={torch.__version__}" in info, info
print("cmake-check:", sys.argv[1].rsplit("/", 1)[-1], info)
PY
