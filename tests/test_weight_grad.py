"""The weight-gradient op family: ``dst_kernels::dst_weight_grad`` against docs/maths.md and the reference."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import DEVICES, assert_close_rel, make_case, make_generator, rederive, row_length, tol_for

import dst_kernels as dst
from dst_kernels import reference as ref

pytestmark = pytest.mark.skipif(
    os.environ.get("DST_KERNELS_NO_EXTENSION") == "1", reason="pure-Python install requested"
)


SHAPES = [(1, 1), (1, 17), (7, 13), (31, 17), (5, 123), (64, 1), (300, 784), (8, 3, 3, 3), (13, 2, 5, 7)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_weight_grad_matches_spec(shape, dtype, device):
    weight, threshold = make_case(shape, dtype)
    grad = torch.randn(shape, dtype=torch.float64).to(dtype)
    gw, gt = torch.ops.dst_kernels.dst_weight_grad(grad.to(device), weight.to(device), threshold.to(device))
    assert (
        gw.dtype == dtype and gt.dtype == dtype and gw.shape == weight.shape and gt.shape == threshold.shape
    )
    _, ew, et = rederive(weight, threshold, grad)
    tol = tol_for(dtype)
    assert_close_rel(gw, ew, tol, "dW")
    # dt is a row reduction: the tolerance grows with the row length (docs/maths.md section 4).
    assert_close_rel(gt, et, tol * max(1.0, row_length(weight) ** 0.5), "dt")
    # Against the reference implementation (same precision): dW agrees element for element.
    rw, rt = ref.weight_grad(grad, weight, threshold)
    assert torch.equal(gw.cpu(), rw), "dW differs from the reference"
    assert_close_rel(gt, rt, tol * max(1.0, row_length(weight) ** 0.5), "dt vs reference")


def test_weight_grad_estimator_regions():
    # One row, threshold 0: Q = |W| covers every branch of H, plus ties and zeros.
    w = torch.tensor([[-2.0, -0.7, -0.1, 0.0, 0.5, 1.0, 0.4, -1.0, 1.5]])
    t = torch.zeros(1)
    g = torch.ones_like(w)
    gw, gt = torch.ops.dst_kernels.dst_weight_grad(g, w, t)
    h = torch.tensor([[0.0, 0.4, 1.6, 2.0, 0.4, 0.4, 0.4, 0.4, 0.0]])
    m = (w.abs() > 0).float()
    assert torch.allclose(gw, m + w.abs() * h, atol=0, rtol=1e-6)
    assert torch.allclose(gt, -(w * h).sum(1), atol=1e-6)


def test_weight_grad_channels_last_and_noncontiguous_grad():
    weight, threshold = make_case((12, 5, 3, 3), torch.float32)
    grad = torch.randn(12, 5, 3, 3)
    rw, rt = ref.weight_grad(grad, weight, threshold)
    gw, gt = torch.ops.dst_kernels.dst_weight_grad(
        grad, weight.to(memory_format=torch.channels_last), threshold
    )
    assert gw.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(gw.contiguous(), rw)
    assert_close_rel(gt, rt, 1e-5 * 7, "dt")
    w2, t2 = make_case((9, 11), torch.float32)
    g2 = torch.randn(11, 9).t()  # non-contiguous gradient
    gw2, _ = torch.ops.dst_kernels.dst_weight_grad(g2, w2, t2)
    assert torch.equal(gw2, ref.weight_grad(g2, w2, t2)[0])


def test_weight_grad_is_deterministic():
    weight, threshold = make_case((257, 1031), torch.float32)
    grad = torch.randn(257, 1031)
    first = torch.ops.dst_kernels.dst_weight_grad(grad, weight, threshold)
    for _ in range(3):
        again = torch.ops.dst_kernels.dst_weight_grad(grad, weight, threshold)
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck_dst_weight_grad(dtype):
    weight, threshold = make_case((7, 13), dtype)
    grad = torch.randn(7, 13, dtype=dtype)
    torch.library.opcheck(torch.ops.dst_kernels.dst_weight_grad.default, (grad, weight, threshold))


@pytest.mark.parametrize(
    "args, match",
    [
        ((torch.ones(3, 5), torch.ones(3, 4), torch.zeros(3)), "grad_masked must have the shape"),
        ((torch.ones(3, 4, dtype=torch.float64), torch.ones(3, 4), torch.zeros(3)), "grad_masked has dtype"),
        ((torch.ones(3, 4), torch.ones(3, 4), torch.zeros(2)), r"threshold must have shape \[3\]"),
    ],
)
def test_weight_grad_bad_input(args, match):
    with pytest.raises(RuntimeError, match=match):
        torch.ops.dst_kernels.dst_weight_grad(*args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (300, 784), (8, 3, 3, 3)])
def test_weight_grad_inplace_matches_out_of_place(shape, dtype, device):
    weight, threshold = make_case(shape, dtype)
    weight, threshold = weight.to(device), threshold.to(device)
    grad = torch.randn(shape, dtype=torch.float64).to(dtype).to(device)
    gw, gt = torch.ops.dst_kernels.dst_weight_grad(grad, weight, threshold)
    buffer = grad.clone()
    dt = torch.ops.dst_kernels.dst_weight_grad_(buffer, weight, threshold)
    assert torch.equal(buffer, gw), "dW is written over grad_masked"
    assert torch.equal(dt, gt)


def test_weight_grad_inplace_rejects_other_layouts():
    weight, threshold = make_case((6, 5), torch.float32)
    with pytest.raises(RuntimeError, match="memory layout of weight"):
        torch.ops.dst_kernels.dst_weight_grad_(torch.randn(5, 6).t(), weight, threshold)
    with pytest.raises(RuntimeError, match="memory layout of weight"):
        torch.ops.dst_kernels.dst_weight_grad_(torch.randn(1, 5).expand(6, 5), weight, threshold)


def test_opcheck_dst_weight_grad_inplace():
    weight, threshold = make_case((7, 13), torch.float32)
    grad = torch.randn(7, 13)
    torch.library.opcheck(torch.ops.dst_kernels.dst_weight_grad_.default, (grad, weight, threshold))


def _estimator_inputs(dtype: torch.dtype) -> torch.Tensor:
    g = make_generator()
    special = [-2.0, -1.0, -0.7, -0.4, -0.1, -0.0, 0.0, 0.1, 0.4, 0.5, 1.0, 2.0, 1e-30, -1e30]
    x = torch.cat(
        [
            torch.tensor(special, dtype=torch.float64),
            torch.linspace(-1.5, 1.5, 30001, dtype=torch.float64),
            torch.randn(40000, generator=g, dtype=torch.float64),  # > one parallel_for grain
        ]
    ).to(dtype)
    # The neighbours of the breakpoints in this dtype.
    bps = torch.tensor([-1.0, -0.4, 0.4, 1.0], dtype=dtype)
    near = torch.cat([torch.nextafter(bps, bps * 2), torch.nextafter(bps, bps * 0), bps])
    return torch.cat([x, near])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_estimator_at_its_breakpoints_matches_the_reference_exactly(dtype):
    """``H`` of the shared kernel maths (csrc/include/dst/estimator.h) at and next to its
    breakpoints +-0.4 and +-1, through the native weight-gradient pass: Q = |W| - t with t = 0
    and G = 1, so dW = M + |W| H(|W|) elementwise, exactly as the reference computes it."""
    if "native" not in dst.available_backends("cpu"):
        pytest.skip("the native extension is not built")
    x = _estimator_inputs(dtype)
    weight = x.reshape(1, -1).contiguous()
    threshold = torch.zeros(1, dtype=dtype)
    grad = torch.ones_like(weight)
    dw, dt = torch.ops.dst_kernels.dst_weight_grad(grad, weight, threshold)
    ref_dw, _ = ref.weight_grad(grad, weight, threshold)
    assert torch.equal(dw, ref_dw)
