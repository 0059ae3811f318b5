"""TF32: the tests' policy (tests/conftest.py) and what every backend does with PyTorch's switches.

Every backend follows the switches PyTorch's own kernels follow: float32 GEMMs use TF32 inputs
when ``torch.backends.cuda.matmul.allow_tf32`` is on (``set_float32_matmul_precision("high")``),
convolutions when ``torch.backends.cudnn.allow_tf32`` is on. The tests pin both off unless marked
``tf32``; the CUDA tests below turn them on and compare with the TF32 tolerance of docs/maths.md section 4.
"""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from conftest import TOL_TF32, assert_close_rel, make_case

import dst_kernels as dst
from dst_kernels import functional as DF


def CUDA(test):
    return pytest.mark.cuda(
        pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")(test)
    )


def test_unmarked_tests_run_in_full_fp32():
    assert not torch.backends.cuda.matmul.allow_tf32
    assert not torch.backends.cudnn.allow_tf32


@pytest.mark.tf32
def test_tf32_marked_tests_allow_tf32():
    assert torch.backends.cuda.matmul.allow_tf32
    assert torch.backends.cudnn.allow_tf32


def test_triton_precision_follows_pytorchs_switches(monkeypatch):
    pytest.importorskip("triton", reason="the Triton backend needs triton")
    gemm_mod = importlib.import_module("dst_kernels.triton._gemm")
    monkeypatch.setattr(gemm_mod, "interpreting", lambda: False)
    for matmul, cudnn in [(False, False), (True, False), (False, True), (True, True)]:
        # Plain assignments: the autouse _fp32_precision fixture restores both afterwards.
        torch.backends.cuda.matmul.allow_tf32 = matmul
        torch.backends.cudnn.allow_tf32 = cudnn
        assert gemm_mod.precision(torch.float32) == ("tf32" if matmul else "ieee")
        assert gemm_mod.precision(torch.float32, conv=True) == ("tf32" if cudnn else "ieee")
        for dtype in (torch.float16, torch.bfloat16, torch.float64):
            assert gemm_mod.precision(dtype) == "ieee"


def _linear_case(m=256, k=512, n=384):
    weight, threshold = make_case((n, k), torch.float32)
    x = torch.randn(m, k)
    p = weight.double() * (weight.abs() > threshold[:, None])
    return x, weight, threshold, p


def _backends_cuda():
    return [b for b in ("reference", "native", "triton") if b in dst.available_backends("cuda")]


@CUDA
@pytest.mark.parametrize("tf32", [False, pytest.param(True, marks=pytest.mark.tf32)])
@pytest.mark.parametrize("backend", ["reference", "native", "triton"])
def test_linear_fp32_cuda_with_and_without_tf32(backend, tf32):
    if backend not in _backends_cuda():
        pytest.skip(f"backend {backend!r} is not available on CUDA here")
    x, weight, threshold, p = _linear_case()
    grad_y = torch.randn(x.shape[0], weight.shape[0])
    leaves = [t.cuda().requires_grad_(True) for t in (x, weight, threshold)]
    y = DF.dst_linear(*leaves, backend=backend)
    gx, _, _ = torch.autograd.grad(y, leaves, grad_y.cuda())
    tol = TOL_TF32 if tf32 else 1e-5
    assert_close_rel(y, x.double() @ p.t(), tol, "y")
    assert_close_rel(gx, grad_y.double() @ p, tol, "dx")


@CUDA
@pytest.mark.parametrize("tf32", [False, pytest.param(True, marks=pytest.mark.tf32)])
@pytest.mark.parametrize("impl", ["native", "triton", "triton-igemm"])
def test_conv_fp32_cuda_with_and_without_tf32(impl, tf32):
    backend = "triton" if impl.startswith("triton") else impl
    if backend not in _backends_cuda():
        pytest.skip(f"backend {backend!r} is not available on CUDA here")
    weight, threshold = make_case((32, 16, 3, 3), torch.float32)
    x = torch.randn(8, 16, 12, 12)
    p = weight.double() * (weight.abs() > threshold[:, None, None, None])
    xd, wd, td = x.cuda(), weight.cuda(), threshold.cuda()
    if impl == "triton-igemm":
        from dst_kernels.triton import conv2d_igemm

        y = conv2d_igemm(xd, wd, td, None, 1, 1)
    else:
        y = DF.dst_conv2d(xd, wd, td, None, 1, 1, backend=backend)
    assert_close_rel(y, F.conv2d(x.double(), p, None, 1, 1), TOL_TF32 if tf32 else 1e-5, "y")
