"""The mask op family: ``dst_kernels::dst_mask`` (native) against the reference and docs/maths.md."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import DEVICES, assert_close_rel, make_case, rederive, spec_mask

import dst_kernels as dst
from dst_kernels import _ops, native
from dst_kernels import reference as ref

pytestmark = pytest.mark.skipif(
    os.environ.get("DST_KERNELS_NO_EXTENSION") == "1", reason="pure-Python install requested"
)


DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
SHAPES = [(1, 1), (1, 17), (7, 13), (31, 17), (5, 123), (64, 1), (300, 784), (8, 3, 3, 3), (13, 2, 5, 7)]


def test_native_ops_are_built():
    assert _ops.loaded(), _ops.LOAD_ERROR
    assert _ops.has_op("dst_mask") and _ops.has_op("dst_weight_grad")
    assert "native" in dst.available_backends("cpu")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_dst_mask_matches_reference(shape, dtype, device):
    weight, threshold = make_case(shape, dtype)
    weight, threshold = weight.to(device), threshold.to(device)
    masked, t_eff = torch.ops.dst_kernels.dst_mask(weight, threshold, None)
    expected_mask = spec_mask(weight, threshold).to(device)
    assert torch.equal(masked != 0, expected_mask & (weight != 0)), "mask differs"
    assert torch.equal(masked, weight * ref.mask(weight, threshold)), "P = W * M differs"
    assert torch.equal(t_eff, threshold)
    assert t_eff.data_ptr() != threshold.data_ptr(), "t_eff must not alias the input"


def test_dst_mask_channels_last_weight():
    weight, threshold = make_case((12, 5, 3, 3), torch.float32)
    weight_cl = weight.to(memory_format=torch.channels_last)
    masked, _ = torch.ops.dst_kernels.dst_mask(weight_cl, threshold, None)
    assert masked.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(masked, weight * ref.mask(weight, threshold))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dst_mask_reset_rule(dtype, device):
    weight = torch.randn(29, 31, dtype=dtype, device=device)
    # Keep exactly 1 % or less: thresholds above every |W| except a handful.
    threshold = torch.full((29,), 10.0, dtype=dtype, device=device)
    threshold[3] = 0.0  # row 3 keeps its 31 nonzero weights: 31 / 899 > 1 %
    masked, t_eff = torch.ops.dst_kernels.dst_mask(weight, threshold, 0.01)
    assert torch.equal(t_eff, threshold), "3.4 % kept: no reset"
    assert torch.equal(masked, weight * ref.mask(weight, threshold))
    threshold[3] = 10.0
    threshold[4] = weight[4].abs().sort().values[-9]  # 8 kept of 899 <= 1 %
    masked, t_eff = torch.ops.dst_kernels.dst_mask(weight, threshold, 0.01)
    assert torch.equal(t_eff, torch.zeros_like(threshold)), "the whole vector resets"
    assert torch.equal(masked, weight), "the mask is recomputed with t = 0"
    masked, t_eff = torch.ops.dst_kernels.dst_mask(weight, threshold, None)
    assert torch.equal(t_eff, threshold), "min_density=None turns the rule off"


def test_reset_boundary_matches_reference():
    # kept == min_density * numel exactly: the rule fires (<=) in both implementations.
    weight = torch.ones(10, 10)
    threshold = torch.full((10,), 2.0)
    threshold[0] = 0.5  # row 0 keeps 10 of 100
    t_ref = threshold.clone()
    ref.reset_thresholds_(weight, t_ref, 0.1)
    _, t_eff = torch.ops.dst_kernels.dst_mask(weight, threshold, 0.1)
    assert torch.equal(t_eff, t_ref) and torch.equal(t_eff, torch.zeros(10))
    _, t_eff = torch.ops.dst_kernels.dst_mask(weight, threshold, 0.099)
    assert torch.equal(t_eff, threshold)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(7, 13), (8, 3, 3, 3)])
def test_masked_weight_gradients_native(shape, device):
    weight, threshold = make_case(shape, torch.float64)
    weight = weight.to(device).requires_grad_(True)
    threshold = threshold.to(device).requires_grad_(True)
    grad = torch.randn(shape, dtype=torch.float64, device=device)
    masked = native.masked_weight(weight, threshold)
    gw, gt = torch.autograd.grad(masked, (weight, threshold), grad)
    p, ew, et = rederive(weight.cpu(), threshold.cpu(), grad.cpu())
    assert torch.equal(masked.detach().cpu(), p)
    assert_close_rel(gw, ew, 1e-12, "dW")
    assert_close_rel(gt, et, 1e-12, "dt")


def test_native_masked_weight_resets_in_place():
    weight = torch.randn(16, 16, requires_grad=True)
    threshold = torch.nn.Parameter(torch.full((16,), 100.0))
    masked = native.masked_weight(weight, threshold, 0.01)
    assert torch.equal(threshold.detach(), torch.zeros(16))
    masked.sum().backward()
    # The gradient is taken at the effective (reset) thresholds.
    _, _, et = rederive(weight, torch.zeros(16), torch.ones(16, 16))
    assert_close_rel(threshold.grad, et.float(), 1e-5, "dt")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck_dst_mask(dtype):
    weight, threshold = make_case((7, 13), dtype)
    weight.requires_grad_(True)
    threshold.requires_grad_(True)
    for min_density in (None, 0.01, 0.9):
        torch.library.opcheck(torch.ops.dst_kernels.dst_mask.default, (weight, threshold, min_density))
    conv_w, conv_t = make_case((6, 2, 3, 3), dtype)
    torch.library.opcheck(
        torch.ops.dst_kernels.dst_mask.default,
        (conv_w.to(memory_format=torch.channels_last), conv_t, None),
    )


@pytest.mark.parametrize(
    "args, match",
    [
        ((torch.ones(3, 4, dtype=torch.int32), torch.zeros(3, dtype=torch.int32), None), "floating-point"),
        ((torch.ones(3, 4), torch.zeros(4), None), r"threshold must have shape \[3\]"),
        ((torch.ones(3, 4), torch.zeros(3, dtype=torch.float64), None), "threshold has dtype"),
        ((torch.ones(4), torch.zeros(4), None), "at least 2 dimensions"),
        ((torch.ones(0, 4), torch.zeros(0), None), "must not be empty"),
        ((torch.ones(4, 3).t(), torch.zeros(3), None), "contiguous"),
        ((torch.ones(3, 4), torch.zeros(3), 1.5), "min_density"),
    ],
)
def test_dst_mask_bad_input(args, match):
    with pytest.raises(RuntimeError, match=match):
        torch.ops.dst_kernels.dst_mask(*args)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_dst_mask_cpu_rejects_non_finite_thresholds(bad):
    threshold = torch.tensor([0.0, bad, 0.1])
    with pytest.raises(ValueError, match="threshold contains NaN or inf"):
        torch.ops.dst_kernels.dst_mask(torch.ones(3, 4), threshold, None)
