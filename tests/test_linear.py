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


def _plain_case(n, k, density, tokens=6, seed=3):
    """A weight without exact zeros, thresholds keeping about ``density`` of each row."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, k, generator=g)
    threshold = torch.quantile(weight.abs(), 1.0 - density, dim=1) if density < 1 else -torch.ones(n)
    return weight, threshold.contiguous(), torch.randn(n, generator=g), torch.randn(tokens, k, generator=g)


@pytest.mark.parametrize("mode", ["always", "never"])
@pytest.mark.parametrize("n, k", [(7, 13), (300, 784)])
def test_dst_linear_second_backward_recomputes_the_released_p(mode, n, k):
    # The CPU backward gives P back once dX is computed; a second backward (retain_graph)
    # recomputes it from W and the saved thresholds: the same gradients, bit for bit.
    weight, threshold, bias, x = _plain_case(n, k, 0.05)
    leaves = [t.requires_grad_(True) for t in (x, weight, threshold, bias)]
    grad_y = torch.randn(x.shape[0], n)
    with dst.sparse.sparse_mode(mode):
        y = torch.ops.dst_kernels.dst_linear(leaves[0], leaves[1], leaves[2], leaves[3], None)[0]
        first = torch.autograd.grad(y, leaves, grad_y, retain_graph=True)
        second = torch.autograd.grad(y, leaves, grad_y)
    for name, a, b in zip(("dx", "dW", "dt", "db"), first, second):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("density", [0.05, 1.0])
def test_dst_linear_without_dx_gives_the_same_weight_gradients(density):
    # P is kept for the backward only when x needs a gradient (the first layer's input does
    # not): dW, dt and db do not depend on it.
    weight, threshold, bias, x = _plain_case(300, 784, density)
    params = [t.requires_grad_(True) for t in (weight, threshold, bias)]
    grad_y = torch.randn(x.shape[0], 300)
    y = torch.ops.dst_kernels.dst_linear(x, *params[:2], params[2], None)[0]
    without = torch.autograd.grad(y, params, grad_y)
    x_leaf = x.clone().requires_grad_(True)
    y = torch.ops.dst_kernels.dst_linear(x_leaf, *params[:2], params[2], None)[0]
    with_dx = torch.autograd.grad(y, [*params, x_leaf], grad_y)
    for name, a, b in zip(("dW", "dt", "db"), without, with_dx):
        assert torch.equal(a, b), name


def test_dst_linear_saved_tensor_hooks_see_p_and_checkpointing_gives_the_same_gradients():
    # Under saved-tensor hooks P is saved for them to pack (as activation checkpointing and
    # offloading expect); the gradients are those of the plain backward, bit for bit.
    weight, threshold, bias, x = _plain_case(31, 17, 0.3, tokens=5)
    p = torch.ops.dst_kernels.dst_mask(weight, threshold, None)[0]

    def grads(run):
        leaves = [t.clone().requires_grad_(True) for t in (x, weight, threshold, bias)]
        y = run(leaves)
        return torch.autograd.grad(y, leaves, torch.ones_like(y))

    def op(leaves):
        return torch.ops.dst_kernels.dst_linear(*leaves, None)[0]

    plain = grads(op)
    packed = []

    def pack(t):
        packed.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        hooked = grads(op)
    assert any(t.shape == p.shape and torch.equal(t, p) for t in packed)
    checkpointed = grads(lambda leaves: torch.utils.checkpoint.checkpoint(op, leaves, use_reentrant=False))
    for a, b, c in zip(plain, hooked, checkpointed):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_weight_sized_cpu_buffers_are_recycled_within_bounds():
    # P and dW of the linear kernels come from a pool of freed buffers of their size (past
    # 64 KiB; at most 4 of a size and 64 MiB idle), so a training loop does not page-fault on
    # memory the C allocator gave back to the system.
    idle, release = torch.ops.dst_kernels.cpu_recycled_bytes, torch.ops.dst_kernels.cpu_recycled_release
    release()
    assert idle() == 0
    weight, threshold, bias, x = _plain_case(300, 784, 0.5)
    nbytes = weight.numel() * weight.element_size()
    masked = torch.ops.dst_kernels.dst_linear(x, weight, threshold, bias, None)[1]
    first = masked.data_ptr()
    del masked
    assert idle() == nbytes
    again = torch.ops.dst_kernels.dst_linear(x, weight, threshold, bias, None)[1]
    assert again.data_ptr() == first and idle() == 0
    p = torch.ops.dst_kernels.dst_mask(weight, threshold, None)[0]
    assert torch.equal(again, p)  # the recycled buffer holds this call's P
    del again
    held = [torch.ops.dst_kernels.dst_linear(x, weight, threshold, bias, None)[1] for _ in range(7)]
    del held
    assert idle() == 4 * nbytes  # at most 4 of a size
    # Small layers keep the allocator's own bins.
    small_w, small_t, small_b, small_x = _plain_case(7, 13, 0.5)
    out = torch.ops.dst_kernels.dst_linear(small_x, small_w, small_t, small_b, None)[1]
    del out
    assert idle() == 4 * nbytes
    assert release() == 4 * nbytes and idle() == 0


def test_recycled_buffers_make_room_for_the_newest_size():
    # At most 64 MiB idle: a freed buffer of a new size evicts buffers of other sizes (those a
    # changed shape left behind) rather than going back unused.
    idle, release = torch.ops.dst_kernels.cpu_recycled_bytes, torch.ops.dst_kernels.cpu_recycled_release
    release()
    cap = 64 << 20
    ptrs = {}
    for extra in range(4):  # four sizes of about 20 MiB each
        weight = torch.randn(1000, 5000 + extra)
        threshold = torch.zeros(1000)
        masked = torch.ops.dst_kernels.dst_linear(
            torch.randn(1, 5000 + extra), weight, threshold, None, None
        )[1]
        ptrs[extra] = (masked.data_ptr(), weight, threshold)
        del masked
        assert 0 < idle() <= cap
    # The newest size was kept: its next buffer is the one just freed.
    ptr, weight, threshold = ptrs[3]
    masked = torch.ops.dst_kernels.dst_linear(torch.randn(1, 5003), weight, threshold, None, None)[1]
    assert masked.data_ptr() == ptr
    del masked
    release()


def test_functional_dst_linear_shortcut_equals_the_checked_path(monkeypatch):
    # A common eager call skips the Python checks (each one holds) and calls the op directly:
    # the same op as the checked path, so the same results bit for bit, with and without the
    # reset rule.
    weight, threshold, bias, x = _plain_case(31, 17, 0.3, tokens=5)
    assert DF._native_cpu_linear_ok(x, weight, threshold, bias, None)
    assert DF._native_cpu_linear_ok(x, weight, threshold, None, 0.01)

    def run(min_density):
        leaves = [t.clone().requires_grad_(True) for t in (x, weight, threshold, bias)]
        y = DF.dst_linear(*leaves, backend="native", min_density=min_density)
        return [y, *torch.autograd.grad(y, leaves, torch.ones_like(y)), leaves[2].detach()]

    for min_density in (None, 0.5):
        fast = run(min_density)
        with monkeypatch.context() as m:
            m.setattr(DF, "_native_cpu_linear_ok", lambda *a: False)
            checked = run(min_density)
        for a, b in zip(fast, checked):
            assert torch.equal(a, b)
    # The reset rule fired (density 0.3 < 0.5) and wrote the zeroed thresholds back.
    assert torch.equal(fast[-1], torch.zeros(31))


def test_functional_dst_linear_shortcut_leaves_every_unusual_call_to_the_checks():
    weight, threshold, bias, x = _plain_case(7, 5, 0.5, tokens=3)
    ok = DF._native_cpu_linear_ok
    assert ok(x, weight, threshold, bias, None)
    assert ok(x[0], weight, threshold, bias, None)  # a 1-D input
    unusual = {
        "x float64": (x.double(), weight, threshold, bias, None),
        "x wrong features": (torch.randn(3, 6), weight, threshold, bias, None),
        "x empty": (torch.randn(0, 5), weight, threshold, bias, None),
        "x a list": ([[1.0] * 5], weight, threshold, bias, None),
        "x 0-d": (torch.tensor(1.0), weight, threshold, bias, None),
        "weight transposed": (x, weight.t().contiguous().t(), threshold, bias, None),
        "weight 3-D": (x, weight[:, None], threshold, bias, None),
        "weight int": (x, weight.int(), threshold.int(), bias, None),
        "weight empty": (torch.randn(3, 0), torch.randn(7, 0), threshold, bias, None),
        "threshold short": (x, weight, threshold[:3], bias, None),
        "threshold 2-D": (x, weight, threshold[:, None], bias, None),
        "threshold strided": (x, weight, torch.randn(14)[::2], bias, None),
        "threshold float64": (x, weight, threshold.double(), bias, None),
        "bias short": (x, weight, threshold, bias[:3], None),
        "bias float64": (x, weight, threshold, bias.double(), None),
        "bias 2-D": (x, weight, threshold, bias[None], None),
        "min_density int": (x, weight, threshold, bias, 0),
        "min_density 1.0": (x, weight, threshold, bias, 1.0),
        "min_density negative": (x, weight, threshold, bias, -0.1),
        "min_density str": (x, weight, threshold, bias, "0.1"),
        "min_density bool": (x, weight, threshold, bias, True),
    }
    for name, args in unusual.items():
        assert not ok(*args), name
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not ok(x, weight, threshold, bias, None)
    # Where the shortcut stands aside, the checks still name the argument.
    with pytest.raises(ValueError, match="threshold must have shape"):
        DF.dst_linear(x, weight, threshold[:3], bias, backend="native")
    with pytest.raises(TypeError, match="min_density"):
        DF.dst_linear(x, weight, threshold, bias, backend="native", min_density="0.1")


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
