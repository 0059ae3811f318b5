"""The reference backend (dst_kernels.reference) against docs/maths.md section 1, re-derived in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    H_CHECK_X,
    H_CHECK_Y,
    assert_close_rel,
    make_case,
    make_generator,
    no_host_sync,
    rederive,
    row_length,
    spec_estimator,
    spec_mask,
    spec_masked_weight,
    tol_for,
)

from dst_kernels import reference

SHAPES = [
    (1, 1),
    (7, 13),
    (31, 17),
    (2, 1),
    (1, 29),
    (8, 3, 3, 3),  # conv, groups=1
    (6, 1, 3, 3),  # depthwise conv (groups = channels)
    (12, 2, 5, 3),  # grouped conv, non-square kernel
    (5, 7, 1, 1),  # 1x1 conv
]
DTYPES = [torch.float64, torch.float32]


# ----------------------------------------------------------------------------- estimator


@pytest.mark.parametrize("dtype", DTYPES)
def test_estimator_check_values_exact(dtype):
    x = torch.tensor(H_CHECK_X, dtype=dtype)
    assert torch.equal(reference.estimator(x), torch.tensor(H_CHECK_Y, dtype=dtype))
    # The independent helper agrees too (guards the helper itself).
    assert torch.equal(spec_estimator(x).to(dtype), torch.tensor(H_CHECK_Y, dtype=dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_estimator_matches_spec_everywhere(dtype):
    g = make_generator()
    x = torch.cat(
        [
            torch.linspace(-1.5, 1.5, 3001, dtype=torch.float64),
            torch.randn(500, generator=g, dtype=torch.float64) * 2,
            torch.tensor([-1.0, -0.4, 0.4, 1.0, -0.0, 1e-300, -3.0, 3.0], dtype=torch.float64),
        ]
    ).to(dtype)
    out = reference.estimator(x)
    assert out.dtype == dtype and out.shape == x.shape
    assert_close_rel(out, spec_estimator(x), tol_for(dtype))
    # The breakpoints belong to the inner piece: H(+-0.4) = 0.4, H(+-1) = 0.4.
    assert torch.equal(
        reference.estimator(torch.tensor([1.0, -1.0], dtype=dtype)), torch.full((2,), 0.4, dtype=dtype)
    )
    bp = reference.estimator(torch.tensor([0.4, -0.4], dtype=dtype))
    assert_close_rel(bp, torch.full((2,), 0.4, dtype=torch.float64), tol_for(dtype))
    just_out = torch.nextafter(torch.tensor([1.0, -1.0], dtype=dtype), torch.tensor([2.0, -2.0], dtype=dtype))
    assert torch.equal(reference.estimator(just_out), torch.zeros(2, dtype=dtype))


def test_estimator_nan_and_inf_give_zero():
    x = torch.tensor([float("nan"), float("inf"), -float("inf")])
    assert torch.equal(reference.estimator(x), torch.zeros(3))


# ----------------------------------------------------------------------------- mask


def test_mask_explicit_ties_negative_thresholds_and_zeros():
    weight = torch.tensor(
        [
            [0.5, -0.5, 0.25, 0.0],  # t = 0.5: ties at +-0.5 are masked out
            [0.0, -0.0, 1e-8, -3.0],  # t < 0: everything kept, zeros included
            [0.0, 0.1, -0.2, 0.3],  # t = 0: only the zero is dropped (|0| == 0 is a tie)
            [0.7, -0.7, 0.7, 0.6999],  # t = 0.7: all ties or below
        ]
    )
    threshold = torch.tensor([0.5, -0.01, 0.0, 0.7])
    expected = torch.tensor(
        [
            [False, False, False, False],
            [True, True, True, True],
            [False, True, True, True],
            [False, False, False, False],
        ]
    )
    m = reference.mask(weight, threshold)
    assert m.dtype == torch.bool
    assert torch.equal(m, expected)
    assert torch.equal(reference.masked_weight(weight, threshold), weight * expected)
    assert reference.density(weight, threshold).item() == pytest.approx(7 / 16)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_mask_exact(shape, dtype):
    weight, threshold = make_case(shape, dtype)
    m = reference.mask(weight, threshold)
    assert m.dtype == torch.bool and m.shape == weight.shape
    assert torch.equal(m, spec_mask(weight, threshold))
    rows = m.reshape(shape[0], -1)
    w_rows = weight.reshape(shape[0], -1)
    for i in range(shape[0]):
        if i % 3 == 0:  # the tied element is masked out
            assert not rows[i, (i * 7) % rows.shape[1]]
        elif i % 3 == 1:  # negative threshold: all kept, zeros included
            assert bool(rows[i].all())
    if shape[0] > 1 and bool((w_rows[1] == 0).any()):
        assert bool(rows[1][w_rows[1] == 0].all())
    d = reference.density(weight, threshold)
    assert d.dim() == 0 and d.dtype == torch.float32
    assert d.item() == pytest.approx(m.sum().item() / m.numel())


# ----------------------------------------------------------------------------- masked weight + gradients


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_masked_weight_and_grads_match_rederivation(shape, dtype):
    weight, threshold = make_case(shape, dtype)
    grad = torch.randn(shape, generator=make_generator(7), dtype=torch.float64).to(dtype)
    w = weight.clone().requires_grad_(True)
    t = threshold.clone().requires_grad_(True)
    p = reference.masked_weight(w, t)
    assert p.dtype == dtype and p.shape == weight.shape
    p.backward(grad)

    p_ref, gw_ref, gt_ref = rederive(weight, threshold, grad)
    # Forward is exact: W * M with an exact mask.
    assert torch.equal(p.detach(), weight * spec_mask(weight, threshold).to(dtype))
    assert torch.equal(p.detach().to(torch.float64), p_ref)
    tol = tol_for(dtype)
    assert w.grad.dtype == dtype and t.grad.dtype == dtype
    assert_close_rel(w.grad, gw_ref, tol, "dL/dW")
    assert_close_rel(t.grad, gt_ref, tol * row_length(weight), "dL/dt")

    # weight_grad is the same function, called directly.
    gw, gt = reference.weight_grad(grad, weight, threshold)
    assert_close_rel(gw, gw_ref, tol, "weight_grad dW")
    assert_close_rel(gt, gt_ref, tol * row_length(weight), "weight_grad dt")


def test_weight_grad_formula_on_hand_computed_values():
    # One row, t = 0.3: Q = |W| - 0.3 for W = [0.5, -0.5, 0.3, 0.0, 2.0, -0.1]
    weight = torch.tensor([[0.5, -0.5, 0.3, 0.0, 2.0, -0.1]], dtype=torch.float64)
    threshold = torch.tensor([0.3], dtype=torch.float64)
    grad = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]], dtype=torch.float64)
    q = torch.tensor([0.2, 0.2, 0.0, -0.3, 1.7, -0.2], dtype=torch.float64)
    h = torch.tensor([2 - 0.8, 2 - 0.8, 2.0, 2 - 1.2, 0.0, 2 - 0.8], dtype=torch.float64)
    m = torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0, 0.0], dtype=torch.float64)
    sign = torch.tensor([1.0, -1.0, 1.0, 0.0, 1.0, -1.0], dtype=torch.float64)
    g = grad[0]
    w = weight[0]
    exp_w = g * m + g * w * h * sign
    exp_t = -(g * w * h).sum()
    assert torch.allclose(spec_estimator(q), h)
    gw, gt = reference.weight_grad(grad, weight, threshold)
    assert torch.allclose(gw[0], exp_w, rtol=0, atol=1e-12)
    assert torch.allclose(gt, exp_t.reshape(1), rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_weights_sign_zero_path(dtype):
    """sign(0) = 0: a zero weight's gradient is just G * M, and nothing is NaN."""
    weight = torch.zeros(3, 5, dtype=dtype)
    weight[0, 0] = 0.2  # make row 0 non-trivial
    threshold = torch.tensor([-0.5, 0.0, 0.3], dtype=dtype)  # kept / tie / masked
    grad = torch.arange(1.0, 16.0, dtype=dtype).reshape(3, 5)
    w = weight.clone().requires_grad_(True)
    t = threshold.clone().requires_grad_(True)
    p = reference.masked_weight(w, t)
    p.backward(grad)
    assert not torch.isnan(w.grad).any() and not torch.isnan(t.grad).any()
    # Row 0: everything kept -> G (the zero weights contribute no W*H*sign term).
    expected_row0 = grad[0].clone()
    expected_row0[0] = grad[0, 0] * (1 + 0.2 * 0.4)  # Q = 0.2 + 0.5 = 0.7 -> H = 0.4
    assert_close_rel(w.grad[0], expected_row0, tol_for(dtype))
    # Rows 1 and 2: all weights are 0 and masked out -> zero gradient, zero threshold gradient.
    assert torch.equal(w.grad[1:], torch.zeros(2, 5, dtype=dtype))
    assert torch.equal(t.grad[1:], torch.zeros(2, dtype=dtype))
    assert torch.equal(p.detach()[1:], torch.zeros(2, 5, dtype=dtype))
    _, gw_ref, gt_ref = rederive(weight, threshold, grad)
    assert_close_rel(w.grad, gw_ref, tol_for(dtype))
    assert_close_rel(t.grad, gt_ref, tol_for(dtype) * 5)


def test_needs_input_grad_gating():
    weight, threshold = make_case((7, 13), torch.float64)
    w = weight.clone().requires_grad_(True)
    p = reference.masked_weight(w, threshold)  # threshold does not require grad
    grad = torch.randn(7, 13, dtype=torch.float64)
    p.backward(grad)
    _, gw_ref, _ = rederive(weight, threshold, grad)
    assert_close_rel(w.grad, gw_ref, 1e-12)
    assert threshold.grad is None

    t = threshold.clone().requires_grad_(True)
    p = reference.masked_weight(weight, t)
    p.backward(grad)
    _, _, gt_ref = rederive(weight, threshold, grad)
    assert_close_rel(t.grad, gt_ref, 1e-12)


# ----------------------------------------------------------------------------- linear / conv2d


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (31, 17)], ids=lambda s: "x".join(map(str, s)))
def test_linear_matches_rederivation(shape, dtype):
    weight, threshold = make_case(shape, dtype)
    x = torch.randn(5, shape[1], dtype=dtype)
    bias = torch.randn(shape[0], dtype=dtype)
    leaves = [v.clone().requires_grad_(True) for v in (x, weight, threshold, bias)]
    y = reference.linear(*leaves)
    gy = torch.randn_like(y)
    y.backward(gy)

    x64, w64, t64, b64 = [v.detach().double().requires_grad_(True) for v in (x, weight, threshold, bias)]
    y_ref = F.linear(x64, spec_masked_weight(w64, t64), b64)
    y_ref.backward(gy.double())
    tol = tol_for(dtype)
    assert_close_rel(y, y_ref, tol, "y")
    for name, a, e in zip(("x", "weight", "bias"), [leaves[0], leaves[1], leaves[3]], (x64, w64, b64)):
        assert_close_rel(a.grad, e.grad, tol, f"d{name}")
    assert_close_rel(leaves[2].grad, t64.grad, tol * row_length(weight), "dthreshold")


CONV_CASES = [
    # (weight shape, groups, stride, padding, dilation)
    ((8, 3, 3, 3), 1, 1, 1, 1),
    ((6, 1, 3, 3), 6, 1, 1, 1),  # depthwise
    ((12, 2, 5, 3), 2, (2, 1), (2, 1), (1, 2)),
    ((5, 7, 1, 1), 1, 2, 0, 1),
    ((4, 3, 3, 3), 1, 1, "same", 2),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "x".join(map(str, c[0])) + f"-g{c[1]}")
def test_conv2d_matches_rederivation(case, dtype):
    shape, groups, stride, padding, dilation = case
    weight, threshold = make_case(shape, dtype)
    x = torch.randn(2, shape[1] * groups, 9, 11, dtype=dtype)
    bias = torch.randn(shape[0], dtype=dtype)
    leaves = [v.clone().requires_grad_(True) for v in (x, weight, threshold, bias)]
    y = reference.conv2d(*leaves, stride, padding, dilation, groups)
    gy = torch.randn_like(y)
    y.backward(gy)

    x64, w64, t64, b64 = [v.detach().double().requires_grad_(True) for v in (x, weight, threshold, bias)]
    y_ref = F.conv2d(x64, spec_masked_weight(w64, t64), b64, stride, padding, dilation, groups)
    y_ref.backward(gy.double())
    tol = tol_for(dtype)
    assert_close_rel(y, y_ref, tol, "y")
    for name, a, e in zip(("x", "weight", "bias"), [leaves[0], leaves[1], leaves[3]], (x64, w64, b64)):
        assert_close_rel(a.grad, e.grad, tol, f"d{name}")
    assert_close_rel(leaves[2].grad, t64.grad, tol * row_length(weight), "dthreshold")


def test_gradcheck_linear_input_path():
    weight, threshold = make_case((7, 13), torch.float64)
    x = torch.randn(3, 13, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, b: reference.linear(x, weight, threshold, b), (x, bias))
    assert torch.autograd.gradgradcheck(lambda x, b: reference.linear(x, weight, threshold, b), (x, bias))


@pytest.mark.parametrize("groups", [1, 2])
def test_gradcheck_conv2d_input_path(groups):
    weight, threshold = make_case((4, 4 // groups, 3, 3), torch.float64)
    x = torch.randn(1, 4, 5, 4, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4, dtype=torch.float64, requires_grad=True)

    def f(x, b):
        return reference.conv2d(x, weight, threshold, b, stride=(2, 1), padding=1, dilation=1, groups=groups)

    assert torch.autograd.gradcheck(f, (x, bias))


# ----------------------------------------------------------------------------- reset rule


def _weight_with_kept(kept: int, total_rows: int = 10, cols: int = 10):
    """A [rows, cols] weight of distinct magnitudes and thresholds that keep exactly ``kept``."""
    weight = (torch.arange(total_rows * cols, dtype=torch.float32) + 1).reshape(total_rows, cols) / 100
    weight[::2] *= -1
    threshold = torch.full((total_rows,), 10.0)
    # Row 0 keeps its `kept` largest entries; all other rows keep nothing.
    row = weight[0].abs().sort().values
    threshold[0] = row[cols - kept - 1] if kept < cols else -1.0
    return weight, threshold


@pytest.mark.parametrize(
    ("kept", "min_density", "reset"),
    [
        (0, 0.01, True),
        (1, 0.01, True),  # density == min_density -> reset (<=)
        (2, 0.01, False),
        (5, 0.05, True),
        (6, 0.05, False),
        (0, 0.0, True),
        (1, 0.0, False),
    ],
)
def test_reset_thresholds_whole_vector(kept, min_density, reset):
    weight, threshold = _weight_with_kept(kept)
    assert int(reference.mask(weight, threshold).sum()) == kept
    before = threshold.clone()
    with no_host_sync():
        out = reference.reset_thresholds_(weight, threshold, min_density)
    assert isinstance(out, torch.Tensor) and out.dim() == 0 and out.dtype == torch.bool
    assert bool(out) is reset
    if reset:
        assert torch.equal(threshold, torch.zeros(10))  # the WHOLE vector, not just the empty rows
    else:
        assert torch.equal(threshold, before)


def test_reset_thresholds_functional_entry_point():
    from dst_kernels import functional as DF

    weight, threshold = _weight_with_kept(0)
    before = threshold.clone()
    assert DF.reset_thresholds_(weight, threshold, None) is None  # rule off
    assert torch.equal(threshold, before)
    out = DF.reset_thresholds_(weight, threshold, 0.01)
    assert out.dim() == 0 and bool(out)
    assert torch.equal(threshold, torch.zeros(10))


def test_reset_thresholds_on_parameter_in_place():
    weight, threshold = _weight_with_kept(0)
    t = torch.nn.Parameter(threshold.clone())
    reference.reset_thresholds_(weight, t, 0.01)
    assert isinstance(t, torch.nn.Parameter) and t.requires_grad
    assert torch.equal(t.detach(), torch.zeros(10))


def test_no_host_sync_helper_catches_syncs():
    t = torch.ones(3)
    for read in (lambda: bool(t.sum() > 0), lambda: t.sum().item(), lambda: float(t[0]), t.tolist):
        with pytest.raises(AssertionError, match="host synchronisation"), no_host_sync():
            read()


def test_mask_density_reset_on_meta_device():
    """Any host read of a meta tensor raises: these run entirely as tensor ops."""
    weight = torch.empty(7, 13, device="meta")
    threshold = torch.empty(7, device="meta")
    assert reference.mask(weight, threshold).shape == (7, 13)
    assert reference.density(weight, threshold).shape == ()
    out = reference.reset_thresholds_(weight, threshold, 0.01)
    assert out.device.type == "meta" and out.shape == () and out.dtype == torch.bool


def test_reset_thresholds_compiles_without_graph_break():
    torch._dynamo.reset()
    compiled = torch.compile(reference.reset_thresholds_, fullgraph=True, backend="aot_eager")
    for kept, reset in ((0, True), (1, True), (3, False)):
        weight, threshold = _weight_with_kept(kept)
        before = threshold.clone()
        out = compiled(weight, threshold, 0.01)
        assert bool(out) is reset
        assert torch.equal(threshold, torch.zeros(10) if reset else before)
