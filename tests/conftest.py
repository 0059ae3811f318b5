"""Shared test helpers: a float64 re-derivation of docs/maths.md section 1, and section 4's tolerance.

The re-derivation does not call ``dst_kernels``: it rebuilds the masked weight with plain
autograd so that the gradients PyTorch computes for it are exactly the formulas of docs/maths.md section 1::

    Q = |W| - t[row]                      (autograd: d|W|/dW = sign(W), sign(0) = 0)
    P = W * (S(Q) + (h(Q) - h(Q).detach()))

``S`` is the strict step (no gradient) and ``h`` an antiderivative of the estimator ``H``, so
the forward value is ``W * S(Q)`` exactly while the backward gives
``dP/dW = S(Q) + W * H(Q) * sign(W)`` and ``dP/dt = -W * H(Q)``.

Test modules import the helpers with ``from conftest import ...`` (pytest puts ``tests/`` on
``sys.path``).
"""

from __future__ import annotations

import contextlib
import math
import os

import pytest
import torch

# Without a GPU the Triton backend runs in the Triton interpreter; it must be chosen before
# triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# On a GPU, autotuning compiles every config for every specialization: the tests check results,
# so one config each (tests/test_triton_autotune.py checks what autotuning must not change).
os.environ.setdefault("DST_KERNELS_TRITON_MAX_CONFIGS", "1")
from torch.overrides import TorchFunctionMode

SEED = 1234

# docs/maths.md section 4: error relative to the norm of the reference. float64 is not in the contract; it
# compares two float64 computations of the same formula, so it only allows rounding.
TOL = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1e-2,
}

# docs/maths.md's check values of H.
H_CHECK_X = [-2.0, -0.7, -0.1, 0.0, 0.5, 1.0]
H_CHECK_Y = [0.0, 0.4, 1.6, 2.0, 0.4, 0.4]


# the tolerance of docs/maths.md section 4 for float32 computed with TF32 tensor-core inputs.
TOL_TF32 = 5e-3


@pytest.fixture(autouse=True)
def _fixed_seed():
    """Every test starts from the same RNG state, whatever ran before it."""
    torch.manual_seed(SEED)
    yield


@pytest.fixture(autouse=True)
def _fp32_precision(request):
    """The tests' TF32 policy, decided per test: float32 matmuls and cuDNN convolutions run in
    full fp32 on both sides of every comparison (PyTorch's defaults differ between the two and
    between versions), except in tests marked ``tf32``, which turn TF32 on for both and compare
    with ``TOL_TF32``."""
    tf32 = request.node.get_closest_marker("tf32") is not None
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def make_generator(seed: int = SEED) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- docs/maths.md section 1


def spec_estimator(x: torch.Tensor) -> torch.Tensor:
    """``H`` written from docs/maths.md section 1, element by element in float64 Python."""
    out = []
    for v in x.detach().to(torch.float64).flatten().tolist():
        a = abs(v)
        if a <= 0.4:
            out.append(2.0 - 4.0 * a)
        elif a <= 1.0:
            out.append(0.4)
        else:  # |x| > 1, and NaN (no comparison holds)
            out.append(0.0)
    return torch.tensor(out, dtype=torch.float64).reshape(x.shape)


def _estimator_antiderivative(q: torch.Tensor) -> torch.Tensor:
    """``h(q) = integral_0^q H``, written so that autograd's derivative is exactly ``H(q)``.

    ``torch.sign`` has zero gradient and ``torch.where`` routes the gradient to the chosen
    branch, so the gradient is ``2 - 4|q|`` for ``|q| <= 0.4`` (including ``q = 0``), ``0.4``
    for ``0.4 < |q| <= 1`` and ``0`` beyond.
    """
    a = q.abs()
    near = 2.0 * q - 2.0 * q * a  # d/dq = 2 - 2|q| - 2 q sign(q) = 2 - 4|q|
    mid = 0.4 * q + 0.32 * torch.sign(q)  # continuous with `near` at |q| = 0.4
    far = 0.72 * torch.sign(q)  # continuous with `mid` at |q| = 1
    return torch.where(a <= 0.4, near, torch.where(a <= 1.0, mid, far))


def spec_masked_weight(weight: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """``P = W * M`` of docs/maths.md section 1, differentiable through ``H`` (any weight rank)."""
    rows = weight.reshape(weight.shape[0], -1)
    q = rows.abs() - threshold.unsqueeze(1)
    step = (q.detach() > 0).to(q.dtype)  # strict: ties |W| == t are masked out
    h = _estimator_antiderivative(q)
    return (rows * (step + (h - h.detach()))).reshape(weight.shape)  # (h - h) == 0 exactly


def spec_mask(weight: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """``M = S(|W| - t[row])`` as a bool tensor, computed in float64."""
    rows = weight.detach().to(torch.float64).reshape(weight.shape[0], -1)
    q = rows.abs() - threshold.detach().to(torch.float64).unsqueeze(1)
    return (q > 0).reshape(weight.shape)


def rederive(weight: torch.Tensor, threshold: torch.Tensor, grad_masked: torch.Tensor):
    """``(P, dL/dW, dL/dt)`` of docs/maths.md section 1 in float64, by autograd on the re-derivation."""
    w = weight.detach().to(torch.float64).requires_grad_(True)
    t = threshold.detach().to(torch.float64).requires_grad_(True)
    p = spec_masked_weight(w, t)
    grad_w, grad_t = torch.autograd.grad(p, (w, t), grad_masked.detach().to(torch.float64))
    return p.detach(), grad_w, grad_t


def row_length(weight: torch.Tensor) -> int:
    return max(1, weight[0].numel()) if weight.shape[0] else 1


# ----------------------------------------------------------------------------- docs/maths.md section 4


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, tol: float, name: str = "") -> None:
    """docs/maths.md section 4: ``||actual - expected|| <= tol * ||expected||``; NaN never passes.

    Both are compared in float64. When the reference is exactly zero the actual value must be
    exactly zero too.
    """
    label = f"{name}: " if name else ""
    assert isinstance(actual, torch.Tensor), f"{label}expected a tensor, got {type(actual).__name__}"
    assert actual.shape == expected.shape, f"{label}shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    assert bool(torch.isfinite(e).all()), f"{label}the reference itself is not finite"
    assert not bool(torch.isnan(a).any()), f"{label}NaN in the result"
    assert bool(torch.isfinite(a).all()), f"{label}inf in the result"
    ref_norm = e.norm().item()
    err = (a - e).norm().item()
    assert not math.isnan(err)
    assert err <= tol * ref_norm, (
        f"{label}relative error {err / ref_norm if ref_norm else math.inf:.3e} > {tol:.1e} "
        f"(|err| = {err:.3e}, |ref| = {ref_norm:.3e})"
    )


def tol_for(dtype: torch.dtype) -> float:
    return TOL[dtype]


# ----------------------------------------------------------------------------- host syncs

# Python-level ways to read a tensor's value on the host: on a GPU each one is a synchronisation.
_HOST_READS = {
    torch.Tensor.item,
    torch.Tensor.__bool__,
    torch.Tensor.__int__,
    torch.Tensor.__float__,
    torch.Tensor.__index__,
    torch.Tensor.tolist,
    torch.Tensor.numpy,
    torch.is_nonzero,
    torch.equal,
    torch.allclose,
}


class _NoHostSync(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _HOST_READS:
            raise AssertionError(f"host synchronisation: {getattr(func, '__name__', func)} on a tensor")
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def no_host_sync():
    """Fail if the code inside reads a tensor value on the host (.item(), bool(), ...).

    ``torch.compile(fullgraph=True)`` is no such check in this torch: ``bool(t)`` / ``t.item()``
    inside a compiled function do not raise there. Tensors on the ``meta`` device are the
    other check: any host read of one raises.
    """
    with _NoHostSync():
        yield


# ----------------------------------------------------------------------------- cases


def make_case(shape, dtype: torch.dtype, seed: int = SEED):
    """A weight of ``shape`` and a threshold per row that exercise every mask rule.

    Row ``i % 3 == 0``: the threshold equals ``|W|`` of one element (a tie, masked out);
    row ``i % 3 == 1``: a negative threshold (everything kept, zeros included);
    row ``i % 3 == 2``: a random threshold in ``[-0.1, 0.6)``. About 10 % of the weights are
    exactly 0. Values are drawn in float64 and rounded to ``dtype`` before the ties are set.
    """
    g = make_generator(seed)
    weight = torch.randn(shape, generator=g, dtype=torch.float64) * 0.6
    weight = torch.where(torch.rand(shape, generator=g, dtype=torch.float64) < 0.1, 0.0, weight)
    weight = weight.to(dtype).contiguous()
    rows = weight.reshape(shape[0], -1)
    threshold = (torch.rand(shape[0], generator=g, dtype=torch.float64) * 0.7 - 0.1).to(dtype)
    for i in range(shape[0]):
        if i % 3 == 0:
            threshold[i] = rows[i, (i * 7) % rows.shape[1]].abs()
        elif i % 3 == 1:
            threshold[i] = -0.25
    return weight, threshold


# CPU always; CUDA as a marked parameter that runs only where a GPU is present.
CUDA_PARAM = pytest.param(
    "cuda",
    marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")],
)
DEVICES = ["cpu", CUDA_PARAM]


def triton_test(test):
    """A Triton test: on the GPU where there is one (marker cuda, run by the GPU round), else in
    the Triton interpreter; skipped where neither can run."""
    import dst_kernels as dst

    skip = pytest.mark.skipif(
        "triton" not in dst.available_backends("cpu") and not torch.cuda.is_available(),
        reason="triton is not installed",
    )
    return pytest.mark.cuda(skip(test))


TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
