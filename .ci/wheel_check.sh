#!/usr/bin/env bash
# The wheel in dist/ installs into a new virtual environment with the same torch as the build
# (the interpreter given as $1) and works from outside the source tree: the compiled ops are
# registered, a DSTLinear trains a step on the native backend, dst-train starts. The wheel
# carries LICENSE and py.typed, and the sdist builds (make wheel wrote it).
set -euo pipefail
build_py=${1:?usage: wheel_check.sh PYTHON}
root=$(cd "$(dirname "$0")/.." && pwd)
wheel=$(ls "$root"/dist/dst_kernels-*.whl)
ls "$root"/dist/dst_kernels-*.tar.gz > /dev/null
torch_version=$("$build_py" -c "import torch; print(torch.__version__)")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m venv "$work/venv"
pip=("$work/venv/bin/python" -m pip --disable-pip-version-check)
# The build's torch release (a local build such as 2.13.0+cpu is installed as 2.13.0: on these
# machines that is the CPU wheel on disk).
"${pip[@]}" install -q "torch==${torch_version%%+*}"
"${pip[@]}" install -q "${wheel}[train]"
cd "$work"
"$work/venv/bin/python" - "$wheel" <<'PY'
import sys
import zipfile

import torch

import dst_kernels as dst
from dst_kernels import _ops

names = zipfile.ZipFile(sys.argv[1]).namelist()
assert "dst_kernels/py.typed" in names, "py.typed missing from the wheel"
assert any(n.endswith(".dist-info/licenses/LICENSE") or n.endswith(".dist-info/LICENSE") for n in names), names
assert dst.__file__.startswith(sys.prefix), f"imported from {dst.__file__}, not the installed wheel"
assert _ops.has_op("dst_mask") and _ops.has_op("dst_linear"), "compiled ops not registered"
built = _ops.build_info()["torch"]
assert built.split("+")[0] == torch.__version__.split("+")[0], (built, torch.__version__)
layer = dst.DSTLinear(13, 7, backend="native")
x = torch.randn(5, 13)
loss = layer(x).square().sum() + 1e-3 * dst.sparsity_loss(layer)
loss.backward()
assert layer.threshold.grad is not None and torch.isfinite(layer.weight.grad).all()
print(f"wheel check: dst_kernels {dst.__version__} for torch {built}, ops registered, a step ran")
PY
"$work/venv/bin/dst-train" --help > /dev/null
echo "wheel check: dst-train --help ran"
