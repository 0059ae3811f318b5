"""The ``native`` backend end to end: layers and functional ops against the reference backend."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import DEVICES, assert_close_rel, make_case, row_length, tol_for

import dst_kernels as dst
from dst_kernels import functional as DF

pytestmark = pytest.mark.skipif(
    os.environ.get("DST_KERNELS_NO_EXTENSION") == "1", reason="pure-Python install requested"
)


def _grads(fn, inputs):
    inputs = [i.detach().clone().requires_grad_(True) for i in inputs]
    out = fn(*inputs)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    out.backward(g.to(out.dtype).to(out.device))
    return out.detach(), [i.grad for i in inputs]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("batch, k, n", [(1, 1, 1), (3, 13, 7), (17, 31, 5), (64, 784, 300)])
def test_linear_native_matches_reference(batch, k, n, dtype, device):
    weight, threshold = make_case((n, k), dtype)
    x = torch.randn(batch, k, dtype=torch.float64).to(dtype)
    bias = torch.randn(n, dtype=torch.float64).to(dtype)
    inputs = [t.to(device) for t in (x, weight, threshold, bias)]
    outs = {}
    for backend in ("reference", "native"):
        outs[backend] = _grads(
            lambda x_, w_, t_, b_, be=backend: DF.dst_linear(x_, w_, t_, b_, backend=be), inputs
        )
    (yr, gr), (yn, gn) = outs["reference"], outs["native"]
    tol = tol_for(dtype)
    assert_close_rel(yn, yr, tol, "y")
    for name, a, b in zip(("dx", "dW", "dt", "db"), gn, gr):
        scale = row_length(weight) ** 0.5 if name == "dt" else 1.0
        assert_close_rel(a, b, tol * max(1.0, scale), name)


@pytest.mark.parametrize(
    "cfg",
    [
        dict(c_in=3, c_out=5, k=3, stride=1, padding=1, dilation=1, groups=1),
        dict(c_in=4, c_out=6, k=3, stride=2, padding=0, dilation=2, groups=2),
        dict(c_in=5, c_out=5, k=3, stride=1, padding="same", dilation=1, groups=5),  # depthwise
        dict(c_in=2, c_out=7, k=1, stride=1, padding=0, dilation=1, groups=1),
    ],
)
@pytest.mark.parametrize("channels_last", [False, True])
def test_conv2d_native_matches_reference(cfg, channels_last):
    dtype = torch.float64
    weight, threshold = make_case((cfg["c_out"], cfg["c_in"] // cfg["groups"], cfg["k"], cfg["k"]), dtype)
    x = torch.randn(2, cfg["c_in"], 9, 11, dtype=dtype)
    bias = torch.randn(cfg["c_out"], dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
        weight = weight.to(memory_format=torch.channels_last)
    args = (cfg["stride"], cfg["padding"], cfg["dilation"], cfg["groups"])
    res = {}
    for backend in ("reference", "native"):
        res[backend] = _grads(
            lambda x_, w_, t_, b_, be=backend: DF.dst_conv2d(x_, w_, t_, b_, *args, backend=be),
            [x, weight, threshold, bias],
        )
    (yr, gr), (yn, gn) = res["reference"], res["native"]
    assert_close_rel(yn, yr, 1e-12, "y")
    for name, a, b in zip(("dx", "dW", "dt", "db"), gn, gr):
        assert_close_rel(a, b, 1e-12, name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("groups", [1, 3])
def test_conv2d_native_low_precision_matches_reference(groups, channels_last, dtype, device):
    """Whole layers in fp32 / bf16 / fp16 (no autocast): same mask, values within the tolerances
    of docs/maths.md section 4."""
    weight, threshold = make_case((6, 9 // groups, 3, 3), dtype)
    x = torch.randn(2, 9, 7, 5, dtype=torch.float64).to(dtype)
    bias = torch.randn(6, dtype=torch.float64).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
        weight = weight.to(memory_format=torch.channels_last)
    inputs = [t.to(device) for t in (x, weight, threshold, bias)]
    res = {}
    for backend in ("reference", "native"):
        res[backend] = _grads(
            lambda x_, w_, t_, b_, be=backend: DF.dst_conv2d(x_, w_, t_, b_, 2, 1, 1, groups, backend=be),
            inputs,
        )
    (yr, gr), (yn, gn) = res["reference"], res["native"]
    assert yn.dtype == dtype and gn[1].dtype == dtype
    tol = tol_for(dtype)
    assert_close_rel(yn, yr, tol, "y")
    for name, a, b in zip(("dx", "dW", "dt", "db"), gn, gr):
        scale = row_length(weight) ** 0.5 if name == "dt" else 1.0
        assert_close_rel(a, b, tol * scale, name)
    masked = torch.ops.dst_kernels.dst_mask(inputs[1], inputs[2], None)[0]
    assert torch.equal(masked, inputs[1] * dst.functional.mask(inputs[1], inputs[2]))


def test_gradcheck_native_input_path():
    weight, threshold = make_case((5, 7), torch.float64)
    x = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x_, b_: DF.dst_linear(x_, weight, threshold, b_, backend="native"), (x, bias)
    )
    cw, ct = make_case((4, 2, 3, 3), torch.float64)
    xc = torch.randn(1, 4, 6, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x_: DF.dst_conv2d(x_, cw, ct, None, 1, 1, 1, 2, backend="native"), (xc,)
    )


def _model(backend):
    torch.manual_seed(0)
    return torch.nn.Sequential(
        dst.DSTConv2d(3, 8, 3, padding=1, backend=backend),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        dst.DSTLinear(8 * 6 * 6, 10, backend=backend),
    )


def test_layers_native_training_step_matches_reference():
    ref_model, nat_model = _model("reference"), _model("native")
    nat_model.load_state_dict(ref_model.state_dict())
    with torch.no_grad():  # push layer 0 under 1 % so the reset rule fires in both
        for m in (ref_model, nat_model):
            m[0].threshold.fill_(10.0)
            m[3].threshold.copy_(torch.linspace(0.0, 0.05, 10))
    x = torch.randn(4, 3, 6, 6)
    for m in (ref_model, nat_model):
        out = m(x)
        (out.square().mean() + 1e-3 * dst.sparsity_loss(m)).backward()
    assert torch.equal(nat_model[0].threshold, torch.zeros(8)), "reset happened in place"
    for (name, a), (_, b) in zip(nat_model.named_parameters(), ref_model.named_parameters()):
        assert torch.equal(a.detach(), b.detach()), name
        tol = 1e-5 * (row_length(a) ** 0.5 if name.endswith("threshold") else 1)
        assert_close_rel(a.grad, b.grad, tol, f"{name}.grad")


def test_eval_mode_never_mutates_thresholds_native():
    model = _model("native").eval()
    with torch.no_grad():
        model[0].threshold.fill_(10.0)
    model(torch.randn(2, 3, 6, 6))
    assert torch.equal(model[0].threshold.detach(), torch.full((8,), 10.0))


def test_native_under_autocast_bf16():
    layer = dst.DSTLinear(31, 17, backend="native")
    ref_layer = dst.DSTLinear(31, 17, backend="reference")
    ref_layer.load_state_dict(layer.state_dict())
    x = torch.randn(5, 31)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, yr = layer(x), ref_layer(x)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, yr)
    y.float().sum().backward()
    yr.float().sum().backward()
    assert layer.weight.grad.dtype == torch.float32
    assert_close_rel(layer.weight.grad, ref_layer.weight.grad, 1e-5, "dW")


def test_compile_fullgraph_native():
    eager, compiled_model = _model("native"), _model("native")
    compiled_model.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_model, fullgraph=True, backend="aot_eager")
    x = torch.randn(4, 3, 6, 6)
    for m in (eager, compiled):
        out = m(x)
        (out.sum() + 1e-3 * dst.sparsity_loss(compiled_model if m is compiled else m)).backward()
    assert_close_rel(compiled(x).detach(), eager(x).detach(), 1e-5, "y")
    for (name, a), (_, b) in zip(compiled_model.named_parameters(), eager.named_parameters()):
        assert_close_rel(a.grad, b.grad, 1e-5 * (30 if name.endswith("threshold") else 1), name)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_compiled_autograd_matches_eager():
    """The backward graph of DST layers traced by compiled autograd (C++ autograd Functions)."""
    eager, compiled_model = _model("native"), _model("native")
    with torch.no_grad():
        for m in (eager, compiled_model):
            for layer in (m[0], m[3]):
                torch.manual_seed(1)
                layer.threshold.uniform_(0.0, 0.1)
    x = torch.randn(4, 3, 6, 6)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    eager(x1).square().sum().backward()
    torch._dynamo.reset()
    with torch._dynamo.compiled_autograd._enable(torch.compile(backend="aot_eager")):
        compiled_model(x2).square().sum().backward()
    torch._dynamo.reset()
    assert_close_rel(x2.grad, x1.grad, 1e-6, "dx")
    for (name, a), (_, b) in zip(compiled_model.named_parameters(), eager.named_parameters()):
        assert_close_rel(a.grad, b.grad, 1e-6 * (72 if name.endswith("threshold") else 1), name)


def _second_order(kind, backend):
    weight, threshold = make_case((4, 6), torch.float64)
    if kind == "conv2d":
        weight, threshold = make_case((4, 2, 3, 3), torch.float64)
        x = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    else:
        x = torch.randn(3, 6, dtype=torch.float64)
    leaves = [t.requires_grad_(True) for t in (x, weight, threshold)]
    if kind == "linear":
        out = DF.dst_linear(*leaves, backend=backend)
    elif kind == "conv2d":
        out = DF.dst_conv2d(*leaves, padding=1, backend=backend)
    else:
        out = DF.masked_weight(weight, threshold, backend=backend) * x.sum()
    grads = torch.autograd.grad(out.pow(3).sum(), leaves, create_graph=True)
    return torch.autograd.grad(sum(g.square().sum() for g in grads), leaves, allow_unused=True)


@pytest.mark.parametrize("backend", [b for b in dst.available_backends("cpu") if b != "reference"])
@pytest.mark.parametrize("kind", ["linear", "conv2d", "masked_weight"])
def test_double_backward_is_refused_not_wrong(kind, backend):
    """Second-order gradients would need the estimator's own derivative and P's dependence on
    the thresholds: the fused backends refuse them; the reference backend computes them."""
    with pytest.raises(NotImplementedError, match=r"double backward .* backend=\"reference\""):
        _second_order(kind, backend)
    assert any(g is not None for g in _second_order(kind, "reference"))
