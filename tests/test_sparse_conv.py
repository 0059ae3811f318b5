"""The sparse op family's convolutions: the direct sparse convolution over the kept taps of P
(``dst_sparse_conv2d``, the sparse path of the CPU ``dst_conv2d`` and
``dst_conv2d_grad_input``), and ``SparseConv2d`` / ``to_sparse`` for conv layers."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close_rel, rederive, row_length, tol_for
from torch import nn

import dst_kernels as dst
from dst_kernels.sparse import SparseConv2d, SparseLinear, sparse_mode
from dst_kernels.train.models import build_model

pytestmark = pytest.mark.skipif(
    os.environ.get("DST_KERNELS_NO_EXTENSION") == "1", reason="pure-Python install requested"
)

ops = torch.ops.dst_kernels

# (n, c, h, w, oc, k, stride, padding, dilation): 1s, primes, widths under, at and over one
# vector (8 / 16 lanes) and over the widest column chunk (64), strides 1-3, dilation 2, a
# padding of the whole dilated kernel, batches that do not fill an image group.
CASES = [
    (1, 1, 1, 1, 1, 1, 1, 0, 1),
    (2, 3, 7, 9, 5, 3, 1, 1, 1),
    (3, 5, 11, 13, 7, 3, 2, 1, 1),
    (4, 6, 12, 12, 9, 5, 1, 0, 1),
    (2, 4, 10, 7, 3, 5, 2, 2, 1),
    (2, 3, 9, 9, 4, 3, 1, 2, 2),
    (5, 7, 6, 5, 3, 1, 1, 0, 1),
    (3, 3, 8, 8, 4, 1, 2, 0, 1),
    (33, 4, 5, 5, 3, 3, 1, 1, 1),
    (2, 2, 17, 19, 3, 3, 3, 1, 1),
    (1, 3, 5, 67, 2, 3, 1, 1, 1),
    (3, 2, 9, 9, 3, 3, 1, 2, 1),
]
DENSITIES = [0.0, 0.05, 0.5, 1.0]


def at_density(shape, density: float, dtype=torch.float64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(shape, generator=g, dtype=torch.float64)
    rows = weight.reshape(shape[0], -1).abs()
    if density <= 0.0:
        threshold = rows.amax(1) + 1.0
    elif density >= 1.0:
        threshold = torch.full((shape[0],), -1.0, dtype=torch.float64)
    else:
        threshold = torch.quantile(rows, 1.0 - density, dim=1)
    return weight.to(dtype), threshold.to(dtype)


def _case(case, density, dtype=torch.float64, seed=0):
    n, c, h, w, oc, k, s, p, d = case
    weight, threshold = at_density((oc, c, k, k), density, dtype, seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(n, c, h, w, generator=g, dtype=torch.float64).to(dtype)
    bias = torch.randn(oc, generator=g, dtype=torch.float64).to(dtype)
    return x, weight, threshold, bias, [s, s], [p, p], [d, d]


def _p(weight, threshold):
    return weight * (weight.abs() > threshold.reshape(-1, 1, 1, 1))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("case", CASES)
def test_sparse_conv2d_matches_conv2d(case, density, dtype):
    x, weight, threshold, bias, s, p, d = _case(case, density, dtype)
    crow, col, values = ops.dst_sparse_mask(weight, threshold)
    k = list(weight.shape[2:])
    ref = F.conv2d(x.double(), _p(weight, threshold).double(), bias.double(), s, p, d)
    tol = tol_for(dtype)
    assert_close_rel(ops.dst_sparse_conv2d(x, crow, col, values, bias, k, s, p, d), ref, tol, "y")
    assert_close_rel(
        ops.dst_sparse_conv2d(x, crow, col, values, None, k, s, p, d),
        ref - bias.double().reshape(-1, 1, 1),
        tol,
    )


@pytest.mark.parametrize("mode", ["always", "never", "auto"])
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("case", CASES)
def test_dst_conv2d_sparse_path_matches_spec(case, density, mode):
    """Forward, dX (sparse below the crossover), dW and dt (dense + the estimator pass)."""
    x, weight, threshold, bias, s, p, d = _case(case, density)
    leaves = [t.clone().requires_grad_() for t in (x, weight, threshold, bias)]
    with sparse_mode(mode):
        y, masked, t_eff = ops.dst_conv2d(*leaves, s, p, d, 1, None)
        grad_y = torch.randn_like(y)
        grads = torch.autograd.grad(y, leaves, grad_y)
    pw = _p(weight, threshold)
    assert torch.equal(masked, pw) and torch.equal(t_eff, threshold)
    xr = x.clone().requires_grad_()
    y_ref = F.conv2d(xr, pw, bias, s, p, d)
    (dx_ref,) = torch.autograd.grad(y_ref, xr, grad_y)
    g_p = torch.nn.grad.conv2d_weight(x, weight.shape, grad_y, s, p, d)
    _, gw_ref, gt_ref = rederive(weight, threshold, g_p)
    assert_close_rel(y, y_ref, 1e-12, "y")
    assert_close_rel(grads[0], dx_ref, 1e-12, "dx")
    assert_close_rel(grads[1], gw_ref, 1e-12, "dW")
    assert_close_rel(grads[2], gt_ref, 1e-12 * row_length(weight), "dt")
    assert_close_rel(grads[3], grad_y.sum((0, 2, 3)), 1e-12, "db")


def test_sparse_conv_outputs_come_from_the_recycled_buffers():
    # The sparse convolution's output (several MB per step in a network) is recycled as the
    # linear layers' P and dW are: freed, it waits in the pool; the next call of that shape
    # takes it back, and computes what ATen's convolution does.
    idle = torch.ops.dst_kernels.cpu_recycled_bytes
    torch.ops.dst_kernels.cpu_recycled_release()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(8, 16, 12, 12, generator=g)
    weight = torch.randn(32, 16, 3, 3, generator=g)
    threshold = torch.quantile(weight.flatten(1).abs(), 0.9, dim=1).contiguous()
    with sparse_mode("always"):
        y = ops.dst_conv2d(x, weight, threshold, None, [1, 1], [1, 1], [1, 1], 1, None)[0]
        nbytes, first, before = y.numel() * y.element_size(), y.data_ptr(), idle()
        del y
        assert idle() == before + nbytes
        again = ops.dst_conv2d(x, weight, threshold, None, [1, 1], [1, 1], [1, 1], 1, None)[0]
    assert again.data_ptr() == first
    assert_close_rel(again, F.conv2d(x, _p(weight, threshold), None, 1, 1), 1e-5, "y")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_sparse_conv_low_precision(dtype):
    case = (4, 6, 12, 12, 9, 3, 1, 1, 1)
    x, weight, threshold, bias, s, p, d = _case(case, 0.2, dtype)
    gy = torch.randn(4, 9, 12, 12).to(dtype)
    with sparse_mode("always"):
        y = ops.dst_conv2d(x, weight, threshold, bias, s, p, d, 1, None)[0]
        dx = ops.dst_conv2d_grad_input(gy, x, weight, threshold, s, p, d, 1)
    assert y.dtype == dtype and dx.dtype == dtype
    pw = _p(weight, threshold).double()
    tol = tol_for(dtype)
    assert_close_rel(y, F.conv2d(x.double(), pw, bias.double(), s, p, d), tol, "y")
    xr = x.double().requires_grad_()
    (dx_ref,) = torch.autograd.grad(F.conv2d(xr, pw, None, s, p, d), xr, gy.double())
    assert_close_rel(dx, dx_ref, tol, "dx")


def test_sparse_conv_reset_rule():
    x, weight, threshold, bias, s, p, d = _case((2, 3, 7, 9, 5, 3, 1, 1, 1), 0.0)
    leaves = [t.clone().requires_grad_() for t in (x, weight, threshold)]
    with sparse_mode("always"):
        y, masked, t_eff = ops.dst_conv2d(*leaves, None, s, p, d, 1, 0.01)
        (dx,) = torch.autograd.grad(y.sum(), leaves[0])
    assert torch.equal(t_eff, torch.zeros_like(threshold)) and torch.equal(masked, weight)
    assert_close_rel(y, F.conv2d(x, weight, None, s, p, d), 1e-12, "y")
    xr = x.clone().requires_grad_()
    (dx_ref,) = torch.autograd.grad(F.conv2d(xr, weight, None, s, p, d).sum(), xr)
    assert_close_rel(dx, dx_ref, 1e-12, "dx")


@pytest.mark.parametrize(
    "case", [(32, 16, 8, 8, 24, 3, 1, 1, 1), (3, 16, 16, 16, 24, 3, 1, 1, 1), (7, 5, 12, 12, 11, 5, 2, 2, 1)]
)
def test_sparse_conv_deterministic_and_thread_independent(case):
    x, weight, threshold, bias, s, p, d = _case(case, 0.05, torch.float32)
    gy = torch.randn(F.conv2d(x, weight, None, s, p, d).shape)
    threads = torch.get_num_threads()
    out = []
    try:
        with sparse_mode("always"):
            for n in (2, 2, 1, 3):
                torch.set_num_threads(n)
                y = ops.dst_conv2d(x, weight, threshold, bias, s, p, d, 1, None)[0]
                dx = ops.dst_conv2d_grad_input(gy, x, weight, threshold, s, p, d, 1)
                out.append((y, dx))
    finally:
        torch.set_num_threads(threads)
    for y, dx in out[1:]:
        assert torch.equal(y, out[0][0]) and torch.equal(dx, out[0][1])


def test_sparse_conv_layouts_and_fallbacks():
    """Non-contiguous inputs and gradients, channels_last (dense path), groups (dense path)."""
    x, weight, threshold, bias, s, p, d = _case((3, 4, 9, 11, 6, 3, 1, 1, 1), 0.3)
    pw = _p(weight, threshold)
    crow, col, values = ops.dst_sparse_mask(weight, threshold)
    xt = x.transpose(2, 3).contiguous().transpose(2, 3)  # strided x
    assert not xt.is_contiguous()
    assert_close_rel(
        ops.dst_sparse_conv2d(xt, crow, col, values, bias, [3, 3], s, p, d),
        F.conv2d(x, pw, bias, s, p, d),
        1e-12,
    )
    with sparse_mode("always"):
        cl = x.contiguous(memory_format=torch.channels_last)
        y = ops.dst_conv2d(cl, weight, threshold, bias, s, p, d, 1, None)[0]
        assert y.is_contiguous(memory_format=torch.channels_last)
        assert_close_rel(y, F.conv2d(x, pw, bias, s, p, d), 1e-12, "channels_last")
        g = torch.ones(1, 1, 1, 1, dtype=torch.float64).expand(3, 6, 9, 11)  # stride-0 gradient
        xr = x.clone().requires_grad_()
        (dx_ref,) = torch.autograd.grad(F.conv2d(xr, pw, None, s, p, d), xr, g)
        assert_close_rel(
            ops.dst_conv2d_grad_input(g, x, weight, threshold, s, p, d, 1), dx_ref, 1e-12, "expanded dY"
        )
        wg, tg = at_density((6, 2, 3, 3), 0.3)
        y = ops.dst_conv2d(x, wg, tg, None, s, p, d, 2, None)[0]
        assert_close_rel(y, F.conv2d(x, _p(wg, tg), None, s, p, d, 2), 1e-12, "groups 2")


def test_sparse_conv2d_bad_input():
    x, weight, threshold, bias, s, p, d = _case((2, 3, 7, 9, 5, 3, 1, 1, 1), 0.3)
    crow, col, values = ops.dst_sparse_mask(weight, threshold)
    with pytest.raises(RuntimeError, match="x must be 4-D"):
        ops.dst_sparse_conv2d(x[0], crow, col, values, bias, [3, 3], s, p, d)
    with pytest.raises(RuntimeError, match="values have dtype"):
        ops.dst_sparse_conv2d(x.float(), crow, col, values, bias, [3, 3], s, p, d)
    with pytest.raises(RuntimeError, match=r"col_indices must lie in \[0, 18\)"):
        ops.dst_sparse_conv2d(x[:, :2], crow, col, values, bias, [3, 3], s, p, d)
    with pytest.raises(RuntimeError, match="bias must have shape"):
        ops.dst_sparse_conv2d(x, crow, col, values, bias[:2], [3, 3], s, p, d)
    with pytest.raises(RuntimeError, match="stride must be positive"):
        ops.dst_sparse_conv2d(x, crow, col, values, bias, [3, 3], [0, 1], p, d)
    with pytest.raises(RuntimeError, match="padding must be non-negative"):
        ops.dst_sparse_conv2d(x, crow, col, values, bias, [3, 3], s, [-1, 0], d)
    with pytest.raises(RuntimeError, match="smaller than the dilated kernel"):
        ops.dst_sparse_conv2d(x, crow, col, values, bias, [3, 3], s, [0, 0], [5, 5])
    with pytest.raises(RuntimeError, match="kernel_size must be"):
        ops.dst_sparse_conv2d(x, crow, col, values, bias, [0, 3], s, p, d)
    with pytest.raises(RuntimeError, match="grad_y must be 4-D"):
        ops.dst_conv2d_grad_input(
            torch.randn(2, 4, 7, 9, dtype=torch.float64), x, weight, threshold, s, p, d, 1
        )


# (case, pool window, pool stride): the 2 x 2 window of LeNet and VGG on even and odd output
# sizes (floor), wider than a vector (67), one output row or column; other windows and strides.
POOLS = [
    ((4, 6, 12, 12, 9, 5, 1, 0, 1), (2, 2), (2, 2)),
    ((2, 3, 7, 9, 5, 3, 1, 1, 1), (2, 2), (2, 2)),
    ((1, 3, 5, 67, 2, 3, 1, 1, 1), (2, 2), (2, 2)),
    ((33, 4, 5, 5, 3, 3, 1, 1, 1), (2, 2), (2, 2)),
    ((2, 2, 17, 19, 3, 3, 3, 1, 1), (2, 2), (2, 2)),
    ((3, 5, 11, 13, 7, 3, 2, 1, 1), (3, 3), (2, 2)),
    ((2, 3, 7, 9, 5, 3, 1, 1, 1), (2, 3), (1, 2)),
    ((2, 3, 9, 9, 4, 3, 1, 2, 2), (5, 1), (5, 1)),
    ((2, 3, 7, 9, 5, 3, 1, 1, 1), (1, 1), (1, 1)),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("case, window, stride", POOLS)
def test_sparse_conv2d_fused_relu_and_max_pool(case, window, stride, relu, dtype):
    """The epilogue selects the values max_pool2d(relu(y)) selects, bit for bit, NaN included."""
    x, weight, threshold, bias, s, p, d = _case(case, 0.3, dtype)
    x[0, 0, 0, 0] = float("nan")
    crow, col, values = ops.dst_sparse_mask(weight, threshold)
    conv = (x, crow, col, values, bias, [case[5]] * 2, s, p, d)
    unfused = ops.dst_sparse_conv2d(*conv)
    expected = F.max_pool2d(torch.relu(unfused) if relu else unfused, window, stride)
    got = ops.dst_sparse_conv2d(*conv, relu, list(window), list(stride))
    assert got.shape == expected.shape and got.is_contiguous()
    torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True)
    if relu:
        assert (got.nan_to_num(0.0) >= 0).all()
    with sparse_mode("always"):  # the training forward's kernel, with no epilogue
        y, _, _ = ops.dst_conv2d(x, weight, threshold, bias, s, p, d, 1, None)
    assert_close_rel(unfused.nan_to_num(0.0), y.nan_to_num(0.0), tol_for(dtype), "forward")


def test_sparse_conv2d_pool_bad_input():
    x, weight, threshold, bias, s, p, d = _case((2, 3, 7, 9, 5, 3, 1, 1, 1), 0.3)
    crow, col, values = ops.dst_sparse_mask(weight, threshold)
    conv = (x, crow, col, values, bias, [3, 3], s, p, d)
    with pytest.raises(RuntimeError, match=r"output of 7 x 9 is smaller than the pool window \[8, 2\]"):
        ops.dst_sparse_conv2d(*conv, False, [8, 2], [1, 1])
    with pytest.raises(RuntimeError, match="pool_kernel must be 2 positive sizes"):
        ops.dst_sparse_conv2d(*conv, False, [0, 2], [1, 1])
    with pytest.raises(RuntimeError, match="pool_stride must be 2 positive sizes"):
        ops.dst_sparse_conv2d(*conv, True, [2, 2], [2, -1])
    empty = ops.dst_sparse_conv2d(x[:0], crow, col, values, bias, [3, 3], s, p, d, True, [2, 2], [2, 2])
    assert empty.shape == (0, 5, 3, 4)


def test_opcheck_sparse_conv_ops():
    x, weight, threshold, bias, s, p, d = _case((2, 3, 7, 9, 5, 3, 2, 1, 1), 0.3)
    crow, col, values = ops.dst_sparse_mask(weight, threshold)
    torch.library.opcheck(ops.dst_sparse_conv2d.default, (x, crow, col, values, bias, [3, 3], s, p, d))
    torch.library.opcheck(ops.dst_sparse_conv2d.default, (x, crow, col, values, None, [3, 3], s, p, d))
    torch.library.opcheck(
        ops.dst_sparse_conv2d.default, (x, crow, col, values, bias, [3, 3], s, p, d, True, [2, 2], [2, 1])
    )
    gy = torch.randn(2, 5, 4, 5, dtype=torch.float64)
    for mode in ("always", "never"):
        with sparse_mode(mode):
            torch.library.opcheck(ops.dst_conv2d_grad_input.default, (gy, x, weight, threshold, s, p, d, 1))
            torch.library.opcheck(ops.dst_conv2d.default, (x, weight, threshold, bias, s, p, d, 1, None))


def test_conv_crossover():
    # The README's table: (batch, in, out, kh * kw, oh * ow) -> density.
    table = {
        (8, 512, 512, 9, 4): 0.0,
        (32, 512, 512, 9, 4): 0.05,
        (32, 512, 512, 9, 16): 0.1,
        (4, 20, 50, 25, 64): 0.2,
        (32, 128, 128, 9, 256): 0.15,
        (64, 20, 50, 25, 64): 0.25,
        (1, 3, 64, 9, 1024): 0.25,
    }
    for shape, density in table.items():
        assert dst.sparse.conv_crossover(*shape) == density, shape


def test_dst_conv2d_module_native_matches_reference():
    torch.manual_seed(0)
    layer = dst.DSTConv2d(5, 7, 3, padding=1, min_density=None).double()
    with torch.no_grad():
        layer.threshold.copy_(torch.quantile(layer.weight.abs().flatten(1), 0.95, dim=1))
    x = torch.randn(3, 5, 11, 11, dtype=torch.float64, requires_grad=True)
    outs = {}
    for backend in ("reference", "native"):
        layer.backend = backend
        with sparse_mode("always"):
            y = layer(x)
            outs[backend] = (y, *torch.autograd.grad(y.square().sum(), [x, *layer.parameters()]))
    for name, a, b in zip(["y", "dx", "dW", "db", "dt"], outs["native"], outs["reference"]):
        assert_close_rel(a, b, 1e-12 * (45 if name == "dt" else 1), name)


def test_dst_conv2d_compiles_on_sparse_path():
    torch.manual_seed(0)
    layer = dst.DSTConv2d(4, 6, 3, padding=1, min_density=None)
    with torch.no_grad():
        layer.threshold.copy_(torch.quantile(layer.weight.abs().flatten(1), 0.9, dim=1))
    compiled = torch.compile(layer, fullgraph=True)
    x = torch.randn(2, 4, 9, 9, requires_grad=True)
    with sparse_mode("always"):
        y_eager = layer(x)
        g_eager = torch.autograd.grad(y_eager.sum(), [x, *layer.parameters()])
        y = compiled(x)
        g = torch.autograd.grad(y.sum(), [x, *layer.parameters()])
    assert torch.equal(y, y_eager)
    for a, b in zip(g, g_eager):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------- inference export


def _sparse_model(name: str, density: float, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = dst.sparsify(build_model(name))
    with torch.no_grad():
        for m in model.modules():
            if dst.is_dst_layer(m):
                m.threshold.copy_(torch.quantile(m.weight.abs().flatten(1), 1.0 - density, dim=1))
            if isinstance(m, nn.BatchNorm2d):  # non-trivial running statistics for eval
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.mark.parametrize("name, shape", [("lenet5", (1, 28, 28)), ("vgg16", (3, 32, 32))])
@pytest.mark.parametrize("batch", [1, 5])
def test_to_sparse_conv_models_match_fold(name, shape, batch):
    model = _sparse_model(name, 0.05)
    sparse = dst.export.to_sparse(model)
    convs = [m for m in sparse.modules() if isinstance(m, SparseConv2d)]
    n_convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    assert len(convs) == n_convs and not any(dst.is_dst_layer(m) for m in sparse.modules())
    assert any(isinstance(m, SparseLinear) for m in sparse.modules())
    x = torch.randn(batch, *shape)
    with torch.no_grad():
        assert_close_rel(sparse(x), dst.export.fold(model)(x), tol_for(torch.float32), "logits")
        assert_close_rel(sparse(x), model(x), tol_for(torch.float32), "logits vs DST model")


def test_sparse_conv2d_module_options():
    """Stride, dilation, reflect padding, a dense fallback for another dtype, and a layer."""
    torch.manual_seed(0)
    for kwargs in (
        {"stride": 2, "padding": 1},
        {"dilation": 2, "padding": 2},
        {"padding": 1, "padding_mode": "reflect"},
    ):
        layer = dst.DSTConv2d(3, 5, 3, min_density=None, **kwargs).eval()
        with torch.no_grad():
            layer.threshold.copy_(torch.quantile(layer.weight.abs().flatten(1), 0.8, dim=1))
        sparse = dst.export.to_sparse(layer)
        assert isinstance(sparse, SparseConv2d)
        x = torch.randn(2, 3, 10, 9)
        with torch.no_grad():
            assert_close_rel(sparse(x), layer(x), tol_for(torch.float32), str(kwargs))
            assert_close_rel(sparse(x.double()), layer.double()(x.double()), 1e-6, "fallback")
        layer.float()
    grouped = dst.DSTConv2d(4, 4, 3, groups=2)
    with torch.no_grad():
        grouped.threshold.fill_(10.0)
    assert type(dst.export.to_sparse(grouped)) is nn.Conv2d  # grouped: folded dense
    with pytest.raises(ValueError, match="weight must be 4-D"):
        SparseConv2d.from_dense(torch.randn(3, 4))


def test_to_sparse_fuses_relu_and_max_pool_after_a_conv():
    model = _sparse_model("lenet5", 0.05)
    fused = dst.export.to_sparse(model)
    plain = dst.export.to_sparse(model, fuse_relu=False, fuse_pool=False)
    no_pool = dst.export.to_sparse(model, fuse_pool=False)
    assert [type(m) for m in fused] == [
        SparseConv2d,
        nn.Identity,
        nn.Identity,
        SparseConv2d,
        nn.Identity,
        nn.Identity,
        nn.Flatten,
        SparseLinear,
        nn.Identity,
        SparseLinear,
    ]
    for i in (0, 3):
        assert fused[i].relu and fused[i].pool_kernel_size == (2, 2) and fused[i].pool_stride == (2, 2)
        assert no_pool[i].relu and no_pool[i].pool_kernel_size is None
        assert type(no_pool[i + 2]) is nn.MaxPool2d
        assert not plain[i].relu and plain[i].pool_kernel_size is None
    assert "relu=True, pool_kernel_size=(2, 2), pool_stride=(2, 2)" in repr(fused[0])
    assert "pool" not in repr(plain[0])
    assert set(fused.state_dict()) == set(plain.state_dict())
    for batch in (1, 7, 32):
        x = torch.randn(batch, 1, 28, 28)
        with torch.no_grad():
            expected = plain(x)
            assert torch.equal(fused(x), expected)  # the same convolutions; the pool selects
            assert torch.equal(no_pool(x), expected)
            assert_close_rel(expected, dst.export.fold(model)(x), tol_for(torch.float32), "fold")
    # The dense fallback (another dtype than the stored values) pools too.
    x = torch.randn(3, 1, 28, 28, dtype=torch.float64)
    conv = fused[0]
    weight, bias = conv.dense_weight().double(), conv.bias.double()
    assert_close_rel(conv(x), F.max_pool2d(torch.relu(F.conv2d(x, weight, bias)), 2), 1e-12, "fallback")
    with pytest.raises(TypeError, match="fuse_pool must be a bool"):
        dst.export.to_sparse(model, fuse_pool=None)


def test_to_sparse_fuses_only_the_pools_it_computes():
    """A pool then a ReLU fuses (they commute); a padded, ceil-mode, index-returning or hooked
    pool, a pool after an unfused ReLU, and a layer used twice stay as they are."""
    torch.manual_seed(0)
    shared = nn.Conv2d(3, 3, 3, padding=1)
    hooked = nn.MaxPool2d(2)
    hooked.register_forward_hook(lambda m, i, o: None)
    seqs = {
        "pool-relu": (nn.Sequential(nn.Conv2d(3, 4, 3), nn.MaxPool2d(3, 2), nn.ReLU()), True),
        "padded": (nn.Sequential(nn.Conv2d(3, 4, 3), nn.MaxPool2d(3, 2, padding=1)), False),
        "ceil": (nn.Sequential(nn.Conv2d(3, 4, 3), nn.MaxPool2d(2, ceil_mode=True)), False),
        "dilated": (nn.Sequential(nn.Conv2d(3, 4, 3), nn.MaxPool2d(2, dilation=2)), False),
        "hooked": (nn.Sequential(nn.Conv2d(3, 4, 3), hooked), False),
        "avg": (nn.Sequential(nn.Conv2d(3, 4, 3), nn.AvgPool2d(2)), False),
        "shared": (nn.Sequential(shared, nn.MaxPool2d(2), shared), False),
    }

    def at_20_percent(seq):
        model = dst.sparsify(seq)
        with torch.no_grad():
            for m in model.modules():
                if dst.is_dst_layer(m):
                    m.threshold.copy_(torch.quantile(m.weight.abs().flatten(1), 0.8, dim=1))
        return model.eval()

    x = torch.randn(2, 3, 13, 11)
    for name, (seq, fuses) in seqs.items():
        model = at_20_percent(seq)
        sparse = dst.export.to_sparse(model)
        assert isinstance(sparse[0], SparseConv2d), name
        assert (sparse[0].pool_kernel_size is not None) == fuses, name
        assert isinstance(sparse[1], nn.Identity) == fuses, name
        with torch.no_grad():
            assert_close_rel(sparse(x), dst.export.fold(model)(x), tol_for(torch.float32), name)
    # no ReLU fused: the pool after it stays
    seq = at_20_percent(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.MaxPool2d(2)))
    sparse = dst.export.to_sparse(seq, fuse_relu=False)
    assert [type(m) for m in sparse] == [SparseConv2d, nn.ReLU, nn.MaxPool2d]


def test_sparse_conv2d_fused_arguments_and_old_pickles():
    torch.manual_seed(0)
    weight = torch.randn(5, 3, 3, 3)
    sparse = SparseConv2d.from_dense(weight * (weight.abs() > 1.2))
    crow, col, values = sparse.crow_indices, sparse.col_indices, sparse.values
    made = SparseConv2d(3, 5, 3, crow, col, values, relu=True, pool_kernel_size=3)
    assert made.pool_kernel_size == (3, 3) and made.pool_stride == (3, 3)
    with pytest.raises(TypeError, match="relu must be a bool"):
        SparseConv2d(3, 5, 3, crow, col, values, relu=1)
    with pytest.raises(ValueError, match="pool_stride needs pool_kernel_size"):
        SparseConv2d(3, 5, 3, crow, col, values, pool_stride=2)
    for bad in (0, (2, 0), (2,), 1.5, True):
        with pytest.raises(ValueError, match="pool_kernel_size must be a positive int"):
            SparseConv2d(3, 5, 3, crow, col, values, pool_kernel_size=bad)
    # A module pickled before the fused attributes existed runs unfused (the class defaults).
    for name in ("relu", "pool_kernel_size", "pool_stride"):
        del made.__dict__[name]
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(made(x), sparse(x))


def test_sparse_conv2d_state_dict_compile_and_files(tmp_path):
    model = _sparse_model("lenet5", 0.0164)
    sparse = dst.export.to_sparse(model)
    other = dst.export.to_sparse(_sparse_model("lenet5", 0.1, seed=1))
    other.load_state_dict(sparse.state_dict())
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(other(x), sparse(x))
        compiled = torch.compile(sparse, fullgraph=True)
        assert_close_rel(compiled(x), sparse(x), tol_for(torch.float32), "compiled")
    path = tmp_path / "lenet5.sparse.pt"
    dst.export.save_sparse(model, path)
    loaded = dst.export.load_sparse(path)
    with torch.no_grad():
        assert torch.equal(loaded(x), sparse(x))
    dense_path = tmp_path / "lenet5.dense.pt"
    torch.save(dst.export.fold(model).state_dict(), dense_path)
    assert path.stat().st_size < 0.2 * dense_path.stat().st_size
