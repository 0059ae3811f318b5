"""The linear op family: ``dst_kernels::dst_linear`` (mask op + GEMM, fused backward)."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import (
    DEVICES,
    TRITON_DEVICE,
    assert_close_rel,
    make_case,
    rederive,
    row_length,
    tol_for,
    triton_test,
)

import dst_kernels as dst
from dst_kernels import functional as DF
from dst_kernels import reference as ref

pytestmark = pytest.mark.skipif(
    os.environ.get("DST_KERNELS_NO_EXTENSION") == "1", reason="pure-Python install requested"
)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("x_shape, n", [((1, 1), 1), ((5, 13), 7), ((2, 3, 31), 17), ((64, 784), 300)])
def test_dst_linear_op_matches_spec(x_shape, n, with_bias, device):
    k = x_shape[-1]
    weight, threshold = make_case((n, k), torch.float64)
    x = torch.randn(x_shape, dtype=torch.float64)
    bias = torch.randn(n, dtype=torch.float64) if with_bias else None
    grad_y = torch.randn(*x_shape[:-1], n, dtype=torch.float64)
    leaves = [t.to(device).requires_grad_(True) for t in (x, weight, threshold)]
    b = bias.to(device).requires_grad_(True) if with_bias else None
    y, masked, t_eff = torch.ops.dst_kernels.dst_linear(*leaves, b, None)
    assert not masked.requires_grad and not t_eff.requires_grad
    grads = torch.autograd.grad(y, leaves + ([b] if with_bias else []), grad_y.to(device))
    # The re-derivation of docs/maths.md section 1: P, then plain autograd through linear.
    p, gw_ref, gt_ref = rederive(weight, threshold, grad_y.reshape(-1, n).t() @ x.reshape(-1, k))
    y_ref = torch.nn.functional.linear(x, p, bias)
    assert torch.equal(masked.cpu(), p)
    assert_close_rel(y, y_ref, 1e-12, "y")
    assert_close_rel(grads[0], grad_y @ p, 1e-12, "dx")
    assert_close_rel(grads[1], gw_ref, 1e-12, "dW")
    assert_close_rel(grads[2], gt_ref, 1e-12 * row_length(weight), "dt")
    if with_bias:
        assert_close_rel(grads[3], grad_y.reshape(-1, n).sum(0), 1e-12, "db")


def test_dst_linear_only_requested_gradients():
    weight, threshold = make_case((5, 7), torch.float32)
    weight.requires_grad_(True)
    x = torch.randn(3, 7)
    y, _, _ = torch.ops.dst_kernels.dst_linear(x, weight, threshold, None, None)
    (gw,) = torch.autograd.grad(y.sum(), (weight,))
    assert gw.shape == weight.shape


def test_dst_linear_reset_rule():
    weight = torch.randn(9, 11)
    threshold = torch.full((9,), 50.0)
    _, masked, t_eff = torch.ops.dst_kernels.dst_linear(torch.randn(2, 11), weight, threshold, None, 0.01)
    assert torch.equal(t_eff, torch.zeros(9)) and torch.equal(masked, weight)


@pytest.mark.parametrize("min_density", [None, 0.01])
def test_opcheck_dst_linear(min_density):
    weight, threshold = make_case((7, 13), torch.float64)
    x = torch.randn(5, 13, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(7, dtype=torch.float64, requires_grad=True)
    weight.requires_grad_(True)
    threshold.requires_grad_(True)
    torch.library.opcheck(torch.ops.dst_kernels.dst_linear.default, (x, weight, threshold, bias, min_density))
    torch.library.opcheck(torch.ops.dst_kernels.dst_linear.default, (x, weight, threshold, None, min_density))


# Shapes on both sides of the CPU kernel's fused-block rule (tiny layers and one thread take the
# GEMM and then the pass; 300x784 runs one block per thread), with odd row counts.
WEIGHT_GRAD_CASES = [
    ((1, 1), 1),
    ((5, 13), 7),
    ((2, 3, 31), 17),
    ((64, 784), 300),
    ((3, 127), 263),
    ((1, 400), 97),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("x_shape, n", WEIGHT_GRAD_CASES)
def test_dst_linear_weight_grad_matches_the_gemm_and_the_pass(x_shape, n, dtype):
    """(dW, dt) against the re-derivation from G = dY^T X (float64), for every thread count."""
    k = x_shape[-1]
    weight, threshold = make_case((n, k), dtype)
    x = torch.randn(x_shape, dtype=torch.float64).to(dtype)
    grad_y = torch.randn(*x_shape[:-1], n, dtype=torch.float64).to(dtype)
    x64, g64 = x.double(), grad_y.double()
    _, gw_ref, gt_ref = rederive(weight, threshold, g64.reshape(-1, n).t() @ x64.reshape(-1, k))
    tol = tol_for(dtype)
    threads = torch.get_num_threads()
    try:
        for count in sorted({1, 2, threads}):
            torch.set_num_threads(count)
            gw, gt = torch.ops.dst_kernels.dst_linear_weight_grad(grad_y, x, weight, threshold)
            assert gw.shape == weight.shape and gw.is_contiguous() and gt.shape == threshold.shape
            assert_close_rel(gw, gw_ref, tol, f"dW, {count} threads")
            assert_close_rel(gt, gt_ref, tol * max(1.0, row_length(weight) ** 0.5), f"dt, {count} threads")
    finally:
        torch.set_num_threads(threads)


def test_dst_linear_weight_grad_equals_dst_weight_grad_of_the_product():
    """The fused op equals dst_weight_grad(dY^T X) within float64 rounding at a size that runs one
    block per thread (the blocks' GEMM calls may sum in another order than one call)."""
    weight, threshold = make_case((300, 784), torch.float64)
    x = torch.randn(64, 784, dtype=torch.float64)
    grad_y = torch.randn(64, 300, dtype=torch.float64)
    gw, gt = torch.ops.dst_kernels.dst_linear_weight_grad(grad_y, x, weight, threshold)
    rw, rt = torch.ops.dst_kernels.dst_weight_grad(grad_y.t() @ x, weight, threshold)
    assert_close_rel(gw, rw, 1e-12, "dW")
    assert_close_rel(gt, rt, 1e-12, "dt")


def test_dst_linear_weight_grad_rejects_bad_arguments():
    weight, threshold = make_case((7, 13), torch.float32)
    x, g = torch.randn(5, 13), torch.randn(5, 7)
    op = torch.ops.dst_kernels.dst_linear_weight_grad
    with pytest.raises(RuntimeError, match="as many rows"):
        op(torch.randn(4, 7), x, weight, threshold)
    with pytest.raises(RuntimeError, match="grad_y must have 7 features"):
        op(torch.randn(5, 6), x, weight, threshold)
    with pytest.raises(RuntimeError, match="x must have 13 features"):
        op(g, torch.randn(5, 12), weight, threshold)
    with pytest.raises(RuntimeError, match="share a dtype"):
        op(g.double(), x, weight, threshold)
    with pytest.raises(RuntimeError, match="threshold must have shape"):
        op(g, x, weight, threshold[:3])


@pytest.mark.parametrize("x_shape, n", [((5, 13), 7), ((64, 784), 300)])
def test_opcheck_dst_linear_weight_grad(x_shape, n):
    weight, threshold = make_case((n, x_shape[-1]), torch.float32)
    x = torch.randn(x_shape)
    grad_y = torch.randn(*x_shape[:-1], n)
    torch.library.opcheck(
        torch.ops.dst_kernels.dst_linear_weight_grad.default, (grad_y, x, weight, threshold)
    )


# ----------------------------------------------------------------------------- triton

TRITON = triton_test


@TRITON
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("x_shape, n", [((1, 1), 1), ((5, 13), 7), ((2, 3, 31), 17), ((37, 40), 19)])
def test_triton_linear_matches_spec(x_shape, n, with_bias, dtype):
    """Forward and all four gradients against the re-derivation (docs/maths.md section 1) (float64)."""

    k = x_shape[-1]
    weight, threshold = make_case((n, k), dtype)
    x = torch.randn(x_shape, dtype=torch.float64).to(dtype)
    bias = torch.randn(n, dtype=torch.float64).to(dtype) if with_bias else None
    grad_y = torch.randn(*x_shape[:-1], n, dtype=torch.float64).to(dtype)
    leaves = [t.to(TRITON_DEVICE).requires_grad_(True) for t in (x, weight, threshold)]
    b = bias.to(TRITON_DEVICE).requires_grad_(True) if with_bias else None
    y = DF.dst_linear(*leaves, b, backend="triton")
    grads = torch.autograd.grad(y, leaves + ([b] if with_bias else []), grad_y.to(TRITON_DEVICE))
    x64, g64 = x.double(), grad_y.double()
    p, gw_ref, gt_ref = rederive(weight, threshold, g64.reshape(-1, n).t() @ x64.reshape(-1, k))
    tol = tol_for(dtype)
    assert_close_rel(y, torch.nn.functional.linear(x64, p, bias.double() if with_bias else None), tol, "y")
    assert_close_rel(grads[0], g64 @ p, tol, "dx")
    assert_close_rel(grads[1], gw_ref, tol, "dW")
    assert_close_rel(grads[2], gt_ref, tol * max(1.0, row_length(weight) ** 0.5), "dt")
    if with_bias:
        assert_close_rel(grads[3], g64.reshape(-1, n).sum(0), tol, "db")


@TRITON
def test_triton_linear_reset_rule_in_the_same_forward():
    weight = torch.randn(9, 11, device=TRITON_DEVICE)
    threshold = torch.full((9,), 50.0, device=TRITON_DEVICE)
    x = torch.randn(3, 11, device=TRITON_DEVICE)
    y = DF.dst_linear(x, weight, threshold, None, backend="triton", min_density=0.01)
    assert torch.equal(threshold, torch.zeros_like(threshold)), "whole vector reset"
    assert_close_rel(y, x.double() @ weight.double().t(), 1e-5, "mask recomputed with t = 0")
    # At the boundary (kept == min_density * numel) the rule fires, as in the reference.
    weight = torch.ones(10, 10, device=TRITON_DEVICE)
    threshold = torch.full((10,), 2.0, device=TRITON_DEVICE)
    threshold[0] = 0.5
    expected = threshold.clone()
    ref.reset_thresholds_(weight, expected, 0.1)
    DF.dst_linear(
        torch.randn(1, 10, device=TRITON_DEVICE), weight, threshold, None, backend="triton", min_density=0.1
    )
    assert torch.equal(threshold, expected)


@TRITON
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (17, 70), (6, 2, 3, 3)])
def test_triton_masked_weight_matches_reference(shape, dtype):
    from dst_kernels.triton import masked_weight

    weight, threshold = make_case(shape, dtype)
    weight = weight.to(TRITON_DEVICE).requires_grad_(True)
    threshold = threshold.to(TRITON_DEVICE).requires_grad_(True)
    p = masked_weight(weight, threshold)
    assert torch.equal(p.detach().cpu(), (weight * ref.mask(weight, threshold)).detach().cpu())
    grad = torch.randn(shape, dtype=torch.float64).to(dtype).to(TRITON_DEVICE)
    gw, gt = torch.autograd.grad(p, (weight, threshold), grad)
    _, ew, et = rederive(weight.detach().cpu(), threshold.detach().cpu(), grad.cpu())
    assert_close_rel(gw, ew, tol_for(dtype), "dW")
    assert_close_rel(gt, et, tol_for(dtype) * max(1.0, row_length(weight) ** 0.5), "dt")


@pytest.mark.cuda
@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (the interpreter's bf16 dot is wrong)"
)
@pytest.mark.parametrize("shape", [(256, 1024, 1024), (17, 4096, 11008)])
def test_triton_linear_bf16_autocast_cuda(shape):
    m, k, n = shape
    layer = dst.DSTLinear(k, n, backend="triton", device="cuda")
    ref_layer = dst.DSTLinear(k, n, backend="reference", device="cuda")
    ref_layer.load_state_dict(layer.state_dict())
    x = torch.randn(m, k, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y, yr = layer(x), ref_layer(x)
    assert y.dtype == torch.bfloat16
    assert_close_rel(y, yr, 1e-2, "y")
    y.float().square().mean().backward()
    yr.float().square().mean().backward()
    assert_close_rel(layer.weight.grad, ref_layer.weight.grad, 1e-2, "dW")
