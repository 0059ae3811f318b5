"""The Triton implicit-GEMM conv2d (``dst_kernels.triton.conv2d_igemm``) against the re-derivation
of docs/maths.md section 1."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close_rel, make_case, rederive, row_length, tol_for

import dst_kernels as dst
from dst_kernels import reference as ref

# On a GPU machine these run on the GPU (marker cuda); elsewhere in the Triton interpreter.
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        "triton" not in dst.available_backends("cpu") and not torch.cuda.is_available(),
        reason="triton is not installed",
    ),
]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

CASES = [
    # (N, C_in, H, W, C_out, k, stride, padding, dilation, groups)
    (1, 1, 1, 1, 1, 1, 1, 0, 1, 1),
    (2, 3, 7, 6, 5, 3, 1, 1, 1, 1),
    (1, 4, 9, 8, 6, 3, 2, 0, 2, 2),
    (2, 5, 5, 5, 5, 3, 1, 1, 1, 5),  # depthwise
    (3, 2, 4, 4, 7, 1, 1, 0, 1, 1),
    (1, 3, 11, 13, 4, (3, 2), (2, 1), (1, 0), (1, 2), 1),
]


def _pair(v):
    return list(v) if isinstance(v, tuple) else [v, v]


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)).replace(" ", ""))
def test_igemm_conv_matches_spec(case, dtype, channels_last):
    from dst_kernels.triton import conv2d_igemm

    n, c_in, h, w, c_out, k, stride, padding, dilation, groups = case
    kh, kw = _pair(k)
    weight, threshold = make_case((c_out, c_in // groups, kh, kw), dtype)
    x = torch.randn(n, c_in, h, w, dtype=torch.float64).to(dtype)
    bias = torch.randn(c_out, dtype=torch.float64).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
        weight = weight.to(memory_format=torch.channels_last)
    leaves = [t.to(DEVICE).requires_grad_(True) for t in (x, weight, threshold, bias)]
    args = (_pair(stride), _pair(padding), _pair(dilation), groups)
    y = conv2d_igemm(*leaves, *args)
    assert y.dtype == dtype and y.is_contiguous(memory_format=_fmt(channels_last))
    grad_y = torch.randn(y.shape, dtype=torch.float64)
    grads = torch.autograd.grad(y, leaves, grad_y.to(dtype).to(DEVICE))
    # docs/maths.md: P from the re-derivation, then plain autograd through conv2d in float64.
    p_mask = ref.mask(weight.double(), threshold.double())
    x64 = x.double().requires_grad_(True)
    p64 = (weight.double() * p_mask).requires_grad_(True)
    b64 = bias.double().requires_grad_(True)
    g64 = grad_y.to(dtype).double()
    y_ref = F.conv2d(x64, p64, b64, *args)
    gx_ref, gp_ref, gb_ref = torch.autograd.grad(y_ref, (x64, p64, b64), g64)
    _, gw_ref, gt_ref = rederive(weight.double(), threshold.double(), gp_ref)
    tol = tol_for(dtype)
    assert_close_rel(y, y_ref, tol, "y")
    assert_close_rel(grads[0], gx_ref, tol, "dx")
    assert_close_rel(grads[1], gw_ref, tol, "dW")
    assert_close_rel(grads[2], gt_ref, tol * max(1.0, row_length(weight) ** 0.5), "dt")
    assert_close_rel(grads[3], gb_ref, tol, "db")


def _fmt(channels_last):
    return torch.channels_last if channels_last else torch.contiguous_format


def test_igemm_conv_reset_rule_and_bad_input():
    from dst_kernels.triton import conv2d_igemm

    weight = torch.randn(4, 3, 3, 3, device=DEVICE)
    threshold = torch.full((4,), 50.0, device=DEVICE)
    x = torch.randn(2, 3, 5, 5, device=DEVICE)
    y = conv2d_igemm(x, weight, threshold, None, 1, 1, min_density=0.01)
    assert torch.equal(threshold, torch.zeros_like(threshold)), "whole vector reset"
    assert_close_rel(y, F.conv2d(x.double(), weight.double(), None, 1, 1), 1e-5, "mask recomputed with t = 0")
    with pytest.raises(ValueError, match="padding must be integers"):
        conv2d_igemm(x, weight, threshold, None, 1, "same")
    with pytest.raises(ValueError, match="x has 3 channels"):
        conv2d_igemm(x, weight, threshold, None, 1, 1, 1, 2)
    with pytest.raises(TypeError, match="x has dtype"):
        conv2d_igemm(x.double(), weight, threshold)


@pytest.mark.cuda
@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA GPU (the Triton interpreter cannot run on fake tensors)",
)
def test_opcheck_triton_ops_cuda():
    def leaf(*shape, scale=1.0):
        return (torch.randn(*shape, device="cuda") * scale).requires_grad_(True)

    t6 = (torch.rand(6, device="cuda") * 0.3).requires_grad_(True)
    cases = [
        (
            torch.ops.dst_kernels.triton_conv2d_igemm.default,
            (leaf(2, 4, 6, 5), leaf(6, 2, 3, 3), t6, leaf(6), [1, 2], [1, 0], [1, 1], 2),
        ),
        (torch.ops.dst_kernels.triton_linear.default, (leaf(3, 5), leaf(6, 5), t6, None)),
        (torch.ops.dst_kernels.triton_masked_weight.default, (leaf(6, 5), t6)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)
