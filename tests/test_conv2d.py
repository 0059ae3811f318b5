"""The conv2d op family: ``dst_kernels::dst_conv2d`` (mask op + ATen convolution, fused backward)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICES, assert_close_rel, make_case, rederive, row_length

import dst_kernels  # noqa: F401  (loads the extension's ops)

pytestmark = pytest.mark.skipif(
    os.environ.get("DST_KERNELS_NO_EXTENSION") == "1", reason="pure-Python install requested"
)

CASES = [
    # (C_in, C_out, k, stride, padding, dilation, groups)
    (3, 5, 3, 1, 1, 1, 1),
    (4, 6, 3, 2, 0, 2, 2),
    (5, 5, 3, 1, 1, 1, 5),  # depthwise
    (2, 7, 1, 1, 0, 1, 1),
    (3, 4, (3, 2), (2, 1), (1, 0), (1, 2), 1),
]


def _pair(v):
    return list(v) if isinstance(v, tuple) else [v, v]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("case", CASES)
def test_dst_conv2d_op_matches_spec(case, channels_last, device):
    c_in, c_out, k, stride, padding, dilation, groups = case
    kh, kw = _pair(k)
    weight, threshold = make_case((c_out, c_in // groups, kh, kw), torch.float64)
    x = torch.randn(2, c_in, 9, 11, dtype=torch.float64)
    bias = torch.randn(c_out, dtype=torch.float64)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
        weight = weight.to(memory_format=torch.channels_last)
    leaves = [t.to(device).requires_grad_(True) for t in (x, weight, threshold, bias)]
    args = (_pair(stride), _pair(padding), _pair(dilation), groups)
    y, masked, t_eff = torch.ops.dst_kernels.dst_conv2d(*leaves, *args, None)
    grad_y = torch.randn(y.shape, dtype=torch.float64)
    gx, gw, gt, gb = torch.autograd.grad(y, leaves, grad_y.to(device))
    # docs/maths.md: P from the re-derivation, then plain autograd through conv2d.
    w64 = weight.contiguous().requires_grad_(True)
    x64 = x.clone().requires_grad_(True)
    b64 = bias.clone().requires_grad_(True)
    p = (w64 * (masked.detach().cpu() != 0)).detach().requires_grad_(True)
    y_ref = F.conv2d(x64, p, b64, *args)
    gx_ref, gp_ref, gb_ref = torch.autograd.grad(y_ref, (x64, p, b64), grad_y)
    _, gw_ref, gt_ref = rederive(weight, threshold, gp_ref)
    assert_close_rel(y, y_ref, 1e-12, "y")
    assert_close_rel(gx, gx_ref, 1e-12, "dx")
    assert_close_rel(gw, gw_ref, 1e-12, "dW")
    assert_close_rel(gt, gt_ref, 1e-12 * row_length(weight), "dt")
    assert_close_rel(gb, gb_ref, 1e-12, "db")
    assert torch.equal(t_eff.cpu(), threshold)


@pytest.mark.parametrize("min_density", [None, 0.5])
def test_opcheck_dst_conv2d(min_density):
    weight, threshold = make_case((6, 2, 3, 3), torch.float64)
    x = torch.randn(2, 4, 7, 6, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(6, dtype=torch.float64, requires_grad=True)
    weight.requires_grad_(True)
    threshold.requires_grad_(True)
    args = ([1, 2], [1, 0], [1, 1], 2, min_density)
    torch.library.opcheck(torch.ops.dst_kernels.dst_conv2d.default, (x, weight, threshold, bias, *args))
    torch.library.opcheck(torch.ops.dst_kernels.dst_conv2d.default, (x, weight, threshold, None, *args))


class _OpLog(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        shapes = [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]
        self.calls.append((str(func.overloadpacket), shapes))
        return out


def _run_layer_op(op, x_grad):
    torch.manual_seed(0)
    weight, threshold = make_case((6, 4, 3, 3), torch.float64)
    weight.requires_grad_(True)
    threshold.requires_grad_(True)
    bias = torch.randn(6, dtype=torch.float64, requires_grad=True)
    if op == "conv2d":
        x = torch.randn(2, 4, 7, 6, dtype=torch.float64, requires_grad=x_grad)
        y = torch.ops.dst_kernels.dst_conv2d(x, weight, threshold, bias, [1, 1], [1, 1], [1, 1], 1, None)[0]
    else:
        weight, threshold = make_case((6, 5), torch.float64)
        weight.requires_grad_(True)
        threshold.requires_grad_(True)
        x = torch.randn(3, 5, dtype=torch.float64, requires_grad=x_grad)
        y = torch.ops.dst_kernels.dst_linear(x, weight, threshold, bias, None)[0]
    log = _OpLog()
    with log:
        y.backward(torch.ones_like(y))
    return log.calls, [t.grad for t in (weight, threshold, bias)]


@pytest.mark.parametrize("op", ["conv2d", "linear"])
def test_backward_recomputes_the_mask_only_for_dx(op):
    """The backward materialises no weight-sized zero gradient for the P output, and recomputes P
    only when the input needs a gradient; the parameter gradients do not depend on it."""
    grads = {}
    for x_grad in (True, False):
        calls, grads[x_grad] = _run_layer_op(op, x_grad)
        # P is recomputed inside dst_conv2d_grad_input / dst_linear_grad_input (dX = dY P)
        recompute = ("dst_kernels.dst_conv2d_grad_input", "dst_kernels.dst_linear_grad_input")
        masks = [c for c in calls if c[0] in recompute]
        assert len(masks) == (1 if x_grad else 0), calls
        zero_fills = {"aten.zeros", "aten.zero_", "aten.fill_", "aten.zeros_like", "aten.new_zeros"}
        assert not [c for c in calls if c[0] in zero_fills], calls
    for a, b in zip(grads[True], grads[False]):
        assert torch.equal(a, b)
