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
# The mask op and the estimator gradient of the shared maths (docs/maths.md section 1):
# W = |Q| + t with t = 0 and G = 1, so dW = M + |W| H(|W|) at H's check values.
w = torch.tensor([[2.0, 0.7, 0.1, 0.0, 0.5, 1.0]])
t = torch.zeros(1)
p, _ = torch.ops.dst_kernels.dst_mask(w, t, None)
assert torch.equal(p, w * (w > 0)), p
dw, _ = torch.ops.dst_kernels.dst_weight_grad(torch.ones_like(w), w, t)
h = torch.tensor([0.0, 0.4, 1.6, 2.0, 0.4, 0.4])
assert torch.allclose(dw, (w > 0).float() + w * h), dw
for op in ("dst_linear", "dst_linear_grad_input", "dst_conv2d", "dst_sparse_mm", "cpu_isa"):
    assert hasattr(torch.ops.dst_kernels, op), op
assert f"torch={torch.__version__}" in info, info
print("cmake-check:", sys.argv[1].rsplit("/", 1)[-1], info)
PY
