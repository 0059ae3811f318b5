"""The sparse op family: compressed P (``dst_sparse_mask``), the product with it
(``dst_sparse_mm``), ``dst_linear``'s sparse path in training, and the inference export
(``to_sparse`` / ``save_sparse`` / ``load_sparse``)."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import DEVICES, assert_close_rel, make_case, rederive, row_length, tol_for
from torch import nn

import dst_kernels as dst
from dst_kernels import functional as DF
from dst_kernels.sparse import SparseLinear, sparse_mode
from dst_kernels.train.models import lenet_300_100

pytestmark = pytest.mark.skipif(
    os.environ.get("DST_KERNELS_NO_EXTENSION") == "1", reason="pure-Python install requested"
)

ops = torch.ops.dst_kernels

# (tokens, in, out): 1, primes, a token count over one tile of 64 with a tail, and an input
# width over 2048 (tiles of 32 tokens).
SHAPES = [(1, 1, 1), (1, 13, 7), (5, 13, 7), (3, 37, 11), (67, 131, 29), (2, 2053, 5), (64, 784, 300)]
DENSITIES = [0.0, 0.03, 0.5, 1.0]


def at_density(shape, density: float, dtype=torch.float64, seed: int = 0):
    """A weight and per-row thresholds keeping about ``density`` of every row."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    rows = weight.reshape(shape[0], -1).abs().to(torch.float64)
    if density <= 0.0:
        threshold = rows.amax(1) + 1.0
    elif density >= 1.0:
        threshold = torch.full((shape[0],), -1.0, dtype=torch.float64)
    else:
        threshold = torch.quantile(rows, 1.0 - density, dim=1)
    return weight, threshold.to(dtype)


def dense_of(crow, col, values, shape):
    rows = torch.repeat_interleave(torch.arange(shape[0]), (crow[1:] - crow[:-1]).long())
    out = torch.zeros(shape, dtype=values.dtype)
    out[rows, col.long()] = values
    return out


# ----------------------------------------------------------------------------- dst_sparse_mask


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (29, 131), (5, 2053)])
def test_sparse_mask_is_masked_weight(shape, density, dtype, transpose):
    weight, threshold = at_density(shape, density, dtype)
    crow, col, values = ops.dst_sparse_mask(weight, threshold, transpose)
    p = weight * (weight.abs() > threshold[:, None])
    expected = p.t() if transpose else p
    assert crow.dtype == col.dtype == torch.int32 and values.dtype == dtype
    assert col.numel() == int((weight.abs() > threshold[:, None]).sum())
    assert torch.equal(dense_of(crow, col, values, expected.shape), expected)
    # Column indices ascend within every row (the kernels' summation order).
    for r in range(expected.shape[0]):
        seg = col[crow[r] : crow[r + 1]]
        assert bool((seg[1:] > seg[:-1]).all())


def test_sparse_mask_ties_negative_thresholds_and_zeros():
    weight, threshold = make_case((9, 17), torch.float64)  # ties masked out, t < 0 keeps zeros
    crow, col, values = ops.dst_sparse_mask(weight, threshold)
    kept = weight.abs() > threshold[:, None]
    assert col.numel() == int(kept.sum())
    assert torch.equal(dense_of(crow, col, values, weight.shape), weight * kept)


def test_sparse_mask_conv_weight_rows():
    weight, threshold = at_density((6, 3, 3, 3), 0.3)
    crow, col, values = ops.dst_sparse_mask(weight, threshold)
    p = (weight * (weight.abs() > threshold.view(-1, 1, 1, 1))).reshape(6, -1)
    assert torch.equal(dense_of(crow, col, values, p.shape), p)


# ----------------------------------------------------------------------------- dst_sparse_mm


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("n, k, m", SHAPES)
def test_sparse_mm_matches_linear(n, k, m, density, dtype, with_bias):
    weight, threshold = at_density((m, k), density)
    x = torch.randn(n, k, dtype=torch.float64)
    bias = torch.randn(m, dtype=torch.float64) if with_bias else None
    p = weight * (weight.abs() > threshold[:, None])
    expected = torch.nn.functional.linear(x, p, bias)
    crow, col, values = ops.dst_sparse_mask(weight.to(dtype), threshold.to(dtype))
    y = ops.dst_sparse_mm(x.to(dtype), crow, col, values, None if bias is None else bias.to(dtype))
    assert y.dtype == dtype
    assert_close_rel(y, expected, tol_for(dtype), "y")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sparse_mm_low_precision(dtype):
    weight, threshold = at_density((29, 131), 0.1)
    x = torch.randn(67, 131, dtype=torch.float64)
    crow, col, values = ops.dst_sparse_mask(weight.to(dtype), threshold.to(dtype))
    y = ops.dst_sparse_mm(x.to(dtype), crow, col, values)
    p = weight.to(dtype).double() * (weight.to(dtype).abs() > threshold.to(dtype)[:, None]).double()
    assert_close_rel(y, x.to(dtype).double() @ p.t(), tol_for(dtype), "y")


@pytest.mark.parametrize("x_shape", [(13,), (2, 3, 13), (0, 13)])
def test_sparse_mm_input_shapes(x_shape):
    weight, threshold = at_density((7, 13), 0.5)
    x = torch.randn(x_shape, dtype=torch.float64)
    crow, col, values = ops.dst_sparse_mask(weight, threshold)
    y = ops.dst_sparse_mm(x, crow, col, values)
    expected = torch.nn.functional.linear(x, weight * (weight.abs() > threshold[:, None]))
    assert y.shape == expected.shape
    if x.numel():
        assert_close_rel(y, expected, 1e-12, "y")


def test_sparse_mm_non_contiguous_input():
    weight, threshold = at_density((7, 13), 0.5)
    x = torch.randn(13, 9, dtype=torch.float64).t()
    crow, col, values = ops.dst_sparse_mask(weight, threshold)
    p = weight * (weight.abs() > threshold[:, None])
    assert_close_rel(ops.dst_sparse_mm(x, crow, col, values), x @ p.t(), 1e-12, "y")


def test_sparse_mm_bad_input():
    weight, threshold = at_density((7, 13), 0.5)
    crow, col, values = ops.dst_sparse_mask(weight, threshold)
    x = torch.randn(3, 13, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="int32"):
        ops.dst_sparse_mm(x, crow.long(), col, values)
    with pytest.raises(RuntimeError, match=r"col_indices must lie in \[0, 12\)"):
        ops.dst_sparse_mm(torch.randn(3, 12, dtype=torch.float64), crow, col, values)
    with pytest.raises(RuntimeError, match="values have dtype"):
        ops.dst_sparse_mm(x.float(), crow, col, values)
    with pytest.raises(RuntimeError, match="bias must have shape"):
        ops.dst_sparse_mm(x, crow, col, values, torch.zeros(3, dtype=torch.float64))
    bad = crow.clone()
    bad[-1] += 1
    with pytest.raises(RuntimeError, match="end at nnz"):
        ops.dst_sparse_mm(x, bad, col, values)
    with pytest.raises(RuntimeError, match="same length"):
        ops.dst_sparse_mm(x, crow, col, values[:-1])


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n, k, m", SHAPES)
def test_sparse_mm_relu_epilogue_is_relu_of_the_product(n, k, m, dtype, with_bias):
    # The same kernel on both sides: the fused ReLU equals torch.relu of the plain product
    # bit for bit, NaN and -0.0 included.
    weight, threshold = at_density((m, k), 0.5)
    crow, col, values = ops.dst_sparse_mask(weight.to(dtype), threshold.to(dtype))
    x = torch.randn(n, k, dtype=torch.float64).to(dtype)
    x[0, 0] = float("nan")
    bias = torch.randn(m, dtype=torch.float64).to(dtype) if with_bias else None
    plain = ops.dst_sparse_mm(x, crow, col, values, bias)
    fused = ops.dst_sparse_mm(x, crow, col, values, bias, True)
    assert bool((plain < 0).any()) or m * n < 4
    assert torch.equal(fused.isnan(), plain.isnan())
    assert torch.equal(fused.nan_to_num(), torch.relu(plain).nan_to_num())


def test_sparse_mask_bad_input():
    weight, threshold = at_density((7, 13), 0.5)
    with pytest.raises(RuntimeError, match="threshold must have shape"):
        ops.dst_sparse_mask(weight, threshold[:-1])
    with pytest.raises(ValueError, match="finite"):
        ops.dst_sparse_mask(weight, torch.full_like(threshold, float("nan")))
    with pytest.raises(RuntimeError, match="floating-point"):
        ops.dst_sparse_mask(weight.long(), threshold.long())


# ----------------------------------------------------------------------------- training path


def _step(x, weight, threshold, bias, grad_y, min_density=None):
    leaves = [t.clone().requires_grad_(True) for t in (x, weight, threshold)]
    b = bias.clone().requires_grad_(True) if bias is not None else None
    y, masked, t_eff = ops.dst_linear(*leaves, b, min_density)
    grads = torch.autograd.grad(y, leaves + ([b] if b is not None else []), grad_y)
    return y, masked, t_eff, grads


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["always", "never", "auto"])
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("n, k, m", SHAPES)
def test_dst_linear_sparse_path_matches_spec(n, k, m, density, mode, device):
    weight, threshold = at_density((m, k), density)
    x = torch.randn(n, k, dtype=torch.float64)
    bias = torch.randn(m, dtype=torch.float64)
    grad_y = torch.randn(n, m, dtype=torch.float64)
    with sparse_mode(mode):
        y, masked, t_eff, grads = _step(*(t.to(device) for t in (x, weight, threshold, bias, grad_y)))
    p, gw_ref, gt_ref = rederive(weight, threshold, grad_y.t() @ x)
    assert torch.equal(masked.cpu(), p) and torch.equal(t_eff.cpu(), threshold)
    assert_close_rel(y, torch.nn.functional.linear(x, p, bias), 1e-12, "y")
    assert_close_rel(grads[0], grad_y @ p, 1e-12, "dx")
    assert_close_rel(grads[1], gw_ref, 1e-12, "dW")
    assert_close_rel(grads[2], gt_ref, 1e-12 * row_length(weight), "dt")
    assert_close_rel(grads[3], grad_y.sum(0), 1e-12, "db")


@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("n, k, m", [(5, 13, 7), (67, 131, 29), (64, 784, 300)])
def test_dst_linear_sparse_path_float32(n, k, m, density):
    weight, threshold = at_density((m, k), density)
    x = torch.randn(2, n, k, dtype=torch.float64)  # 3-D input
    grad_y = torch.randn(2, n, m, dtype=torch.float64)
    with sparse_mode("always"):
        y, _, _, grads = _step(x.float(), weight.float(), threshold.float(), None, grad_y.float())
    w32, t32 = weight.float().double(), threshold.float().double()
    p, gw_ref, gt_ref = rederive(w32, t32, grad_y.reshape(-1, m).t() @ x.float().double().reshape(-1, k))
    tol = tol_for(torch.float32)
    assert_close_rel(y, x.float().double() @ p.t(), tol, "y")
    assert_close_rel(grads[0], grad_y @ p, tol, "dx")
    assert_close_rel(grads[1], gw_ref, tol, "dW")
    assert_close_rel(grads[2], gt_ref, tol * row_length(weight), "dt")


def test_dst_linear_sparse_path_reset_rule():
    weight, threshold = at_density((9, 11), 0.0)  # nothing kept: the reset rule fires
    x = torch.randn(4, 11, dtype=torch.float64)
    grad_y = torch.randn(4, 9, dtype=torch.float64)
    with sparse_mode("always"):
        y, masked, t_eff, grads = _step(x, weight, threshold, None, grad_y, 0.01)
    assert torch.equal(t_eff, torch.zeros(9, dtype=torch.float64)) and torch.equal(masked, weight)
    assert_close_rel(y, x @ weight.t(), 1e-12, "y")
    assert_close_rel(grads[0], grad_y @ weight, 1e-12, "dx")


@pytest.mark.parametrize("tokens", [1, 33, 67])
def test_dst_linear_sparse_path_deterministic_and_thread_independent(tokens):
    """33 tokens tile as one 64-wide tile on one thread and as 32 + 1 on two: the one-row
    tail must sum in the same order as the wide tile."""
    weight, threshold = at_density((300, 784), 0.03, torch.float32)
    x = torch.randn(tokens, 784)
    grad_y = torch.randn(tokens, 300)
    threads = torch.get_num_threads()
    try:
        with sparse_mode("always"):
            torch.set_num_threads(2)
            first = _step(x, weight, threshold, None, grad_y)
            again = _step(x, weight, threshold, None, grad_y)
            torch.set_num_threads(1)
            single = _step(x, weight, threshold, None, grad_y)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip([first[0], *first[3]], [again[0], *again[3]]):
        assert torch.equal(a, b)
    # y and dX come from the sparse kernel: bitwise the same on one thread.
    assert torch.equal(first[0], single[0]) and torch.equal(first[3][0], single[3][0])


@pytest.mark.parametrize("mode", ["always", "never"])
def test_dst_linear_module_native_matches_reference(mode):
    torch.manual_seed(0)
    layer = dst.DSTLinear(131, 29, min_density=None).double()
    with torch.no_grad():
        layer.threshold.copy_(torch.quantile(layer.weight.abs(), 0.97, dim=1))
    x = torch.randn(67, 131, dtype=torch.float64, requires_grad=True)
    outs = {}
    for backend in ("reference", "native"):
        layer.backend = backend
        with sparse_mode(mode):
            y = layer(x)
            outs[backend] = (y, *torch.autograd.grad(y.square().sum(), [x, *layer.parameters()]))
    for name, a, b in zip(["y", "dx", "dW", "db", "dt"], outs["native"], outs["reference"]):
        assert_close_rel(a, b, 1e-12 * (131 if name == "dt" else 1), name)


def test_dst_linear_grad_input_matches_dense():
    weight, threshold = make_case((29, 131), torch.float64)
    grad_y = torch.randn(2, 67, 29, dtype=torch.float64)
    p = weight * (weight.abs() > threshold[:, None])
    for mode in ("always", "never", "auto"):
        with sparse_mode(mode):
            assert_close_rel(ops.dst_linear_grad_input(grad_y, weight, threshold), grad_y @ p, 1e-12)
    # an expanded (stride-0) gradient, as the backward of y.sum() gives
    g = torch.ones(1, 1, dtype=torch.float64).expand(67, 29)
    with sparse_mode("always"):
        assert_close_rel(ops.dst_linear_grad_input(g, weight, threshold), g @ p, 1e-12)
    with pytest.raises(RuntimeError, match="grad_y must have 29 features"):
        ops.dst_linear_grad_input(torch.randn(3, 28, dtype=torch.float64), weight, threshold)


@pytest.mark.parametrize("density", [0.0, 0.03, 0.5, 1.0])
@pytest.mark.parametrize("shape", [(1, 1), (29, 131), (7, 64), (5, 600)])  # 600: 3 column blocks
def test_dst_linear_grad_input_from_the_forwards_p(shape, density):
    """Given the forward's P (as the CPU backward passes it), dX is dY P: the same as from (W, t),
    on every path. A NaN weight (NaN * 0 = NaN in P) is left out of the sparse path's CSR, as the
    CSR from (W, t) leaves it out: the nonzero count and the CSR agree (no overrun)."""
    weight, threshold = at_density(shape, density)
    weight.view(-1)[:: max(1, weight.numel() // 3)] = 0.0  # exact zeros: kept or not, P is 0 there
    grad_y = torch.randn(33, shape[0], dtype=torch.float64)
    masked = ops.dst_mask(weight, threshold, None)[0]
    for mode in ("always", "never", "auto"):
        with sparse_mode(mode):
            a = ops.dst_linear_grad_input(grad_y, weight, threshold, masked)
            b = ops.dst_linear_grad_input(grad_y, weight, threshold)
            assert_close_rel(a, grad_y @ masked, 1e-12)
            assert_close_rel(a, b, 1e-12)
    w = weight.clone()
    w.view(-1)[0] = float("nan")
    p = ops.dst_mask(w, threshold, None)[0]
    with sparse_mode("always"):
        got = ops.dst_linear_grad_input(grad_y, w, threshold, p)
    want = grad_y @ torch.nan_to_num(p, nan=0.0)
    assert_close_rel(got, want, 1e-12)


def test_dst_linear_grad_input_refuses_a_wrong_masked():
    weight, threshold = at_density((7, 13), 0.4)
    grad_y = torch.randn(5, 7, dtype=torch.float64)
    wrong_shape = torch.zeros(7, 12, dtype=torch.float64)
    strided = torch.zeros(13, 7, dtype=torch.float64).t()
    for bad in (wrong_shape, torch.zeros(7, 13), strided):
        with pytest.raises(RuntimeError, match="masked must be"):
            ops.dst_linear_grad_input(grad_y, weight, threshold, bad)


def test_sparse_mode_and_crossover():
    assert sparse_mode() == "auto"
    with sparse_mode("never"):
        assert sparse_mode() == "never"
        with sparse_mode("always"):
            assert sparse_mode() == "always"
        assert sparse_mode() == "never"
    assert sparse_mode() == "auto"
    with pytest.raises(ValueError, match="mode must be one of"):
        sparse_mode("sometimes")
    for shape in [(64, 784, 300), (256, 1024, 1024), (1024, 4096, 1024), (1, 7, 5)]:
        assert 0.0 <= dst.sparse.crossover(*shape) <= 1.0


# ----------------------------------------------------------------------------- opcheck


def test_opcheck_sparse_ops():
    weight, threshold = at_density((7, 13), 0.4)
    crow, col, values = ops.dst_sparse_mask(weight, threshold)
    x = torch.randn(5, 13, dtype=torch.float64)
    bias = torch.randn(7, dtype=torch.float64)
    torch.library.opcheck(ops.dst_sparse_mm.default, (x, crow, col, values, bias))
    torch.library.opcheck(ops.dst_sparse_mm.default, (x, crow, col, values, None))
    torch.library.opcheck(ops.dst_sparse_mm.default, (x, crow, col, values, bias, True))
    torch.library.opcheck(
        ops.dst_linear_grad_input.default, (torch.randn(5, 7, dtype=torch.float64), weight, threshold)
    )
    masked = ops.dst_mask(weight, threshold, None)[0]
    torch.library.opcheck(
        ops.dst_linear_grad_input.default,
        (torch.randn(5, 7, dtype=torch.float64), weight, threshold, masked),
    )
    # A data-dependent output size (nnz): the fake kernel returns an unbacked size.
    torch.library.opcheck(
        ops.dst_sparse_mask.default,
        (weight, threshold, False),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )
    torch.library.opcheck(
        ops.dst_sparse_mask.default,
        (weight, threshold, True),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )


@pytest.mark.parametrize("mode", ["always", "never"])
def test_opcheck_dst_linear_both_paths(mode):
    weight, threshold = at_density((7, 13), 0.3)
    x = torch.randn(5, 13, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(7, dtype=torch.float64, requires_grad=True)
    weight.requires_grad_(True)
    threshold.requires_grad_(True)
    with sparse_mode(mode):
        torch.library.opcheck(ops.dst_linear.default, (x, weight, threshold, bias, None))


def test_dst_linear_compiles_on_sparse_path():
    torch.manual_seed(0)
    layer = dst.DSTLinear(131, 29, min_density=None)
    with torch.no_grad():
        layer.threshold.copy_(torch.quantile(layer.weight.abs(), 0.97, dim=1))
    x = torch.randn(67, 131, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    with sparse_mode("always"):
        y_eager = layer(x)
        g_eager = torch.autograd.grad(y_eager.sum(), [x, *layer.parameters()])
        y = compiled(x)
        g = torch.autograd.grad(y.sum(), [x, *layer.parameters()])
    assert torch.equal(y, y_eager)
    for a, b in zip(g, g_eager):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------- inference export


def _lenet(density: float, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = dst.sparsify(lenet_300_100())
    with torch.no_grad():
        for m in model.modules():
            if dst.is_dst_layer(m):
                m.threshold.copy_(torch.quantile(m.weight.abs(), 1.0 - density, dim=1))
    return model.eval()


@pytest.mark.parametrize("batch", [1, 64, 67])
def test_to_sparse_matches_fold(batch):
    model = _lenet(0.03)
    sparse = dst.export.to_sparse(model)
    kinds = [type(m) for m in sparse.modules()]
    assert kinds.count(SparseLinear) == 3 and not any(dst.is_dst_layer(m) for m in sparse.modules())
    x = torch.randn(batch, 1, 28, 28)
    with torch.no_grad():
        assert_close_rel(sparse(x), dst.export.fold(model)(x), tol_for(torch.float32), "logits")
        assert_close_rel(sparse(x), model(x), tol_for(torch.float32), "logits vs DST model")


def test_to_sparse_fuses_the_relus_of_a_sequential():
    model = _lenet(0.03)
    fused = dst.export.to_sparse(model)
    plain = dst.export.to_sparse(model, fuse_relu=False)
    assert [type(m) for m in fused] == [
        nn.Flatten,
        SparseLinear,
        nn.Identity,
        SparseLinear,
        nn.Identity,
        SparseLinear,
    ]
    assert [fused[i].relu for i in (1, 3, 5)] == [True, True, False]
    assert [type(m) for m in plain][2] is nn.ReLU and not any(plain[i].relu for i in (1, 3, 5))
    assert "relu=True" in repr(fused[1]) and "relu" not in repr(plain[1])
    assert set(fused.state_dict()) == set(plain.state_dict())
    for batch in (1, 64, 67):
        x = torch.randn(batch, 1, 28, 28)
        with torch.no_grad():
            assert torch.equal(fused(x), plain(x))  # the same products, the ReLU as they store
    # The dense fallback (another dtype than the stored values) applies the ReLU too.
    x = torch.randn(4, 784, dtype=torch.float64)
    expected = torch.relu(x @ fused[1].dense_weight().double().t() + fused[1].bias.double())
    assert_close_rel(fused[1](x), expected, 1e-12, "fallback")
    with pytest.raises(TypeError, match="fuse_relu must be a bool"):
        dst.export.to_sparse(model, fuse_relu=1)
    with pytest.raises(TypeError, match="relu must be a bool"):
        SparseLinear(3, 2, torch.zeros(3, dtype=torch.int32), torch.zeros(0), torch.zeros(0), relu=1)


def test_to_sparse_leaves_shared_hooked_and_functional_relus():
    torch.manual_seed(0)
    shared = nn.Linear(11, 11)
    hooked = nn.ReLU()
    seen = []
    hooked.register_forward_hook(lambda m, i, o: seen.append(o.shape))

    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(11, 5)

        def forward(self, x):
            return torch.relu(self.fc(x))

    model = nn.Sequential(shared, nn.ReLU(), shared, nn.Linear(11, 11), hooked, Functional())
    model = dst.sparsify(model)
    with torch.no_grad():
        for m in model.modules():
            if dst.is_dst_layer(m):
                m.threshold.copy_(torch.quantile(m.weight.abs(), 0.7, dim=1))
    model.eval()
    sparse = dst.export.to_sparse(model, max_density=0.5)
    assert sparse[0] is sparse[2] and not sparse[0].relu and type(sparse[1]) is nn.ReLU
    assert type(sparse[3]) is SparseLinear and not sparse[3].relu and type(sparse[4]) is nn.ReLU
    assert not sparse[5].fc.relu
    x = torch.randn(6, 11)
    with torch.no_grad():
        assert_close_rel(sparse(x), model(x), tol_for(torch.float32), "out")
    assert len(seen) == 2  # the hook ran for the DST model and for the sparse copy


def test_sparse_linear_pickled_without_relu_runs_plain():
    layer = dst.export.to_sparse(_lenet(0.03))[1]
    del layer.__dict__["relu"]  # as a module pickled before the attribute existed
    x = torch.randn(3, 784)
    with torch.no_grad():
        assert bool((layer(x) < 0).any())


def test_to_sparse_keeps_dense_layers_dense():
    model = _lenet(0.03)
    with torch.no_grad():
        model[5].threshold.fill_(-1.0)  # the classifier keeps everything
    sparse = dst.export.to_sparse(model, max_density=0.5)
    assert type(sparse[5]) is nn.Linear and type(sparse[1]) is SparseLinear
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert_close_rel(sparse(x), model(x), tol_for(torch.float32), "logits")
    layer = dst.DSTLinear(13, 7)
    with torch.no_grad():
        layer.threshold.fill_(10.0)
    single = dst.export.to_sparse(layer)
    assert isinstance(single, SparseLinear) and single.nnz == 0
    assert torch.equal(single(torch.randn(2, 13)), layer.bias.detach().expand(2, 7))


def test_sparse_linear_state_dict_round_trip():
    sparse = dst.export.to_sparse(_lenet(0.03))
    other = dst.export.to_sparse(_lenet(0.1, seed=1))  # different nnz per layer
    assert other[1].nnz != sparse[1].nnz
    other.load_state_dict(sparse.state_dict())
    x = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(other(x), sparse(x))
    assert set(sparse.state_dict()) == {
        f"{i}.{b}" for i in (1, 3, 5) for b in ("crow_indices", "col_indices", "values", "bias")
    }


def test_sparse_linear_compiles():
    sparse = dst.export.to_sparse(_lenet(0.03))
    compiled = torch.compile(sparse, fullgraph=True)
    for batch in (64, 1):
        x = torch.randn(batch, 1, 28, 28)
        with torch.no_grad():
            assert_close_rel(compiled(x), sparse(x), tol_for(torch.float32), "compiled")


def test_sparse_linear_dense_fallback_and_bad_input():
    layer = dst.export.to_sparse(_lenet(0.1), fuse_relu=False)[1]
    x = torch.randn(4, 784, dtype=torch.float64)
    # another dtype than the stored values: the dense fallback
    expected = x @ layer.dense_weight().double().t() + layer.bias.double()
    assert_close_rel(layer(x), expected, 1e-12, "fallback")
    with pytest.raises(ValueError, match="crow_indices must have shape"):
        SparseLinear(3, 2, torch.zeros(2, dtype=torch.int32), torch.zeros(0), torch.zeros(0))


def test_save_and_load_sparse(tmp_path):
    model = _lenet(0.03)
    path = tmp_path / "lenet.sparse.pt"
    dst.export.save_sparse(model, path)
    loaded = dst.export.load_sparse(path)
    x = torch.randn(8, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(loaded(x), dst.export.to_sparse(model)(x))
    dense_path = tmp_path / "lenet.dense.pt"
    torch.save(dst.export.fold(model).state_dict(), dense_path)
    assert path.stat().st_size < 0.2 * dense_path.stat().st_size
    torch.save({"something": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a file written by"):
        dst.export.load_sparse(tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError):
        dst.export.load_sparse(tmp_path / "missing.pt")


def test_functional_dst_linear_native_uses_it():
    weight, threshold = at_density((29, 131), 0.03, torch.float32)
    x = torch.randn(67, 131)
    with sparse_mode("always"):
        y = DF.dst_linear(x, weight, threshold, backend="native")
    p = weight * (weight.abs() > threshold[:, None])
    assert_close_rel(y, x @ p.t(), tol_for(torch.float32), "y")


def test_eager_entry_is_the_op_through_the_dispatcher():
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode

    eager = dst._ops.eager_entry("sparse_mm")
    assert eager is not None
    weight, threshold = at_density((29, 131), 0.1, torch.float32)
    crow, col, values = ops.dst_sparse_mask(weight, threshold)
    bias = torch.randn(29)
    for n in (1, 5, 67):
        x = torch.randn(n, 131)
        for relu in (False, True):
            assert torch.equal(
                eager(x, crow, col, values, bias, relu), ops.dst_sparse_mm(x, crow, col, values, bias, relu)
            )
    assert torch.equal(eager(x, crow, col, values, None, False), ops.dst_sparse_mm(x, crow, col, values))

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func)
            return func(*args, **(kwargs or {}))

    with Seen() as seen:
        eager(x, crow, col, values, bias, True)
    assert ops.dst_sparse_mm.default in seen.ops
    with FakeTensorMode() as mode:
        fake = mode.from_tensor
        y = eager(fake(x), fake(crow), fake(col), fake(values), fake(bias), False)
    assert y.shape == (67, 29)
    with pytest.raises(TypeError, match="col_indices must be a Tensor"):
        eager(x, crow, col.tolist(), values, None, False)
    with pytest.raises(TypeError, match="bias must be a Tensor or None"):
        eager(x, crow, col, values, 1.0, False)
    with pytest.raises(TypeError, match="relu must be a bool"):
        eager(x, crow, col, values, None, 1)
    with pytest.raises(TypeError, match="takes 6 arguments"):
        eager(x, crow, col, values)
    with pytest.raises(RuntimeError, match=r"col_indices must lie in \[0, 130\)"):
        eager(x[:, :130], crow, col, values, None, False)
