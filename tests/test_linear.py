"""The linear op family: ``dst_kernels::dst_linear`` (mask op + GEMM, fused backward)."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import DEVICES, assert_close_rel, make_case, rederive, row_length

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
    # The SPEC re-derivation: P, then plain autograd through linear.
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
