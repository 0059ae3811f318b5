"""DST layers, sparsify, sparsity_loss, sparsity_report and export.fold (docs/maths.md section 3)."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close_rel, rederive, row_length, tol_for
from torch import nn

import dst_kernels as dst
from dst_kernels import reference
from dst_kernels.export import fold

VERY_NEGATIVE = -1e30  # every |W| is above it: the layer is dense
# Layer tests that depend on the backend run on every backend usable on the CPU.
BACKENDS = dst.available_backends("cpu")


def _set_random_thresholds(layer, low=-0.05, high=0.25):
    """Thresholds that mask out a good share of a default-initialised layer's weights."""
    with torch.no_grad():
        for t in layer.thresholds():
            t.uniform_(low, high)


def _grads(module):
    return {name: p.grad for name, p in module.named_parameters()}


# ----------------------------------------------------------------------------- DSTLinear


def test_linear_is_a_linear_with_zero_thresholds():
    layer = dst.DSTLinear(13, 7)
    assert isinstance(layer, nn.Linear) and dst.is_dst_layer(layer)
    assert isinstance(layer.threshold, nn.Parameter) and layer.threshold.requires_grad
    assert layer.threshold.shape == (7,) and layer.threshold.dtype == layer.weight.dtype
    assert torch.equal(layer.threshold.detach(), torch.zeros(7))
    assert any(p is layer.threshold for p in layer.parameters())  # optimisers see it
    assert dict(layer.named_parameters()).keys() == {"weight", "bias", "threshold"}
    assert layer.min_density == 0.01
    layer64 = dst.DSTLinear(3, 2, bias=False, dtype=torch.float64)
    assert layer64.bias is None and layer64.threshold.dtype == torch.float64


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_dense_when_thresholds_very_negative(bias, dtype, backend):
    layer = dst.DSTLinear(13, 7, bias=bias, dtype=dtype, backend=backend)
    with torch.no_grad():
        layer.threshold.fill_(VERY_NEGATIVE)
    dense = nn.Linear(13, 7, bias=bias, dtype=dtype)
    dense.load_state_dict({k: v for k, v in layer.state_dict().items() if k != "threshold"})
    x = torch.randn(5, 13, dtype=dtype)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y, y_dense = layer(x1), dense(x2)
    gy = torch.randn_like(y)
    y.backward(gy)
    y_dense.backward(gy)
    pairs = [("y", y, y_dense), ("dx", x1.grad, x2.grad), ("dW", layer.weight.grad, dense.weight.grad)]
    if bias:
        pairs.append(("db", layer.bias.grad, dense.bias.grad))
    for name, ours, theirs in pairs:
        if backend == "triton":  # its own GEMMs: another summation order than ATen's
            assert_close_rel(ours, theirs, tol_for(dtype), name)
        else:  # the same ATen GEMM on both sides: bit-identical
            assert torch.equal(ours, theirs), name
    assert torch.equal(layer.threshold.grad, torch.zeros(7, dtype=dtype))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_linear_matches_masked_f_linear(dtype, backend):
    layer = dst.DSTLinear(31, 17, dtype=dtype, backend=backend)
    _set_random_thresholds(layer)
    w, t = layer.weight.detach().clone(), layer.threshold.detach().clone()
    m = reference.mask(w, t)
    assert 0 < int(m.sum()) < m.numel()
    x = torch.randn(2, 3, 31, dtype=dtype, requires_grad=True)
    y = layer(x)
    dense_w = (w * m).requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    bias_ref = layer.bias.detach().clone().requires_grad_(True)
    y_ref = F.linear(x_ref, dense_w, bias_ref)
    if backend == "triton":  # its own GEMM: a different summation order than ATen's
        assert_close_rel(y, y_ref, tol_for(dtype), "y")
    else:
        assert torch.equal(y, y_ref)
    gy = torch.randn_like(y)
    y.backward(gy)
    y_ref.backward(gy)
    tol = tol_for(dtype)
    assert_close_rel(x.grad, x_ref.grad, tol, "dx")
    assert_close_rel(layer.bias.grad, bias_ref.grad, tol, "dbias")
    gw, gt = reference.weight_grad(dense_w.grad, w, t)
    assert_close_rel(layer.weight.grad, gw, tol, "dW")
    assert_close_rel(layer.threshold.grad, gt, tol * row_length(w), "dt")
    _, gw64, gt64 = rederive(w, t, dense_w.grad)
    assert_close_rel(layer.weight.grad, gw64, tol, "dW vs float64 re-derivation")
    assert_close_rel(layer.threshold.grad, gt64, tol * row_length(w), "dt vs float64 re-derivation")


def test_linear_mask_and_density():
    layer = dst.DSTLinear(31, 17)
    _set_random_thresholds(layer)
    m = layer.mask()
    d = layer.density()
    assert m.dtype == torch.bool and m.shape == layer.weight.shape
    assert torch.equal(m, reference.mask(layer.weight.detach(), layer.threshold.detach()))
    assert isinstance(d, torch.Tensor) and d.dim() == 0
    assert d.item() == pytest.approx(m.float().mean().item(), abs=0, rel=1e-7)
    assert 0.0 < d.item() < 1.0


# ----------------------------------------------------------------------------- DSTConv2d

CONV_CONFIGS = [
    dict(in_channels=4, out_channels=6, kernel_size=3),
    dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=1, bias=False),
    dict(
        in_channels=4,
        out_channels=6,
        kernel_size=(3, 2),
        stride=(2, 1),
        padding=(1, 2),
        dilation=(2, 1),
        groups=2,
        padding_mode="reflect",
    ),
    dict(in_channels=6, out_channels=6, kernel_size=3, padding=1, groups=6, padding_mode="replicate"),
    dict(in_channels=4, out_channels=8, kernel_size=3, padding=2, dilation=2, padding_mode="circular"),
    dict(in_channels=4, out_channels=4, kernel_size=3, padding="same", dilation=2),
    dict(in_channels=4, out_channels=4, kernel_size=3, padding="same", padding_mode="reflect"),
    dict(in_channels=4, out_channels=6, kernel_size=3, padding="valid", groups=2),
    dict(in_channels=3, out_channels=5, kernel_size=1, stride=3, bias=False, padding_mode="circular"),
]


def _conv_id(cfg):
    return "-".join(f"{k[:3]}{v}" for k, v in cfg.items()).replace(" ", "")


def _conv_pair(cfg, dtype, backend="auto"):
    layer = dst.DSTConv2d(**cfg, dtype=dtype, backend=backend)
    dense = nn.Conv2d(**cfg, dtype=dtype)
    return layer, dense


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("cfg", CONV_CONFIGS, ids=_conv_id)
def test_conv_dense_when_thresholds_very_negative(cfg, dtype):
    layer, dense = _conv_pair(cfg, dtype)
    assert isinstance(layer, nn.Conv2d)
    assert torch.equal(layer.threshold.detach(), torch.zeros(cfg["out_channels"], dtype=dtype))
    with torch.no_grad():
        layer.threshold.fill_(VERY_NEGATIVE)
    dense.load_state_dict({k: v for k, v in layer.state_dict().items() if k != "threshold"})
    x = torch.randn(2, cfg["in_channels"], 9, 8, dtype=dtype)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y, y_dense = layer(x1), dense(x2)
    assert torch.equal(y, y_dense)
    gy = torch.randn_like(y)
    y.backward(gy)
    y_dense.backward(gy)
    assert torch.equal(x1.grad, x2.grad)
    assert torch.equal(layer.weight.grad, dense.weight.grad)
    if layer.bias is not None:
        assert torch.equal(layer.bias.grad, dense.bias.grad)
    assert torch.equal(layer.threshold.grad, torch.zeros_like(layer.threshold))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("cfg", CONV_CONFIGS, ids=_conv_id)
def test_conv_matches_nn_conv2d_with_masked_weight(cfg, dtype, backend):
    layer, dense = _conv_pair(cfg, dtype, backend)
    _set_random_thresholds(layer, -0.05, 0.15)
    w, t = layer.weight.detach().clone(), layer.threshold.detach().clone()
    m = reference.mask(w, t)
    with torch.no_grad():
        dense.weight.copy_(w * m)
        if dense.bias is not None:
            dense.bias.copy_(layer.bias)
    x = torch.randn(2, cfg["in_channels"], 9, 8, dtype=dtype)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y, y_dense = layer(x1), dense(x2)
    tol = tol_for(dtype)
    assert_close_rel(y, y_dense, tol, "y")
    gy = torch.randn_like(y)
    y.backward(gy)
    y_dense.backward(gy)
    assert_close_rel(x1.grad, x2.grad, tol, "dx")
    if layer.bias is not None:
        assert_close_rel(layer.bias.grad, dense.bias.grad, tol, "dbias")
    gw, gt = reference.weight_grad(dense.weight.grad, w, t)
    assert_close_rel(layer.weight.grad, gw, tol, "dW")
    assert_close_rel(layer.threshold.grad, gt, tol * row_length(w), "dt")
    _, gw64, gt64 = rederive(w, t, dense.weight.grad)
    assert_close_rel(layer.weight.grad, gw64, tol, "dW vs float64 re-derivation")
    assert_close_rel(layer.threshold.grad, gt64, tol * row_length(w), "dt vs float64 re-derivation")
    md = layer.mask()
    assert md.dtype == torch.bool and torch.equal(md, m)
    assert layer.density().dim() == 0 and layer.density().item() == pytest.approx(m.float().mean().item())


def test_conv_channels_last_module():
    layer = dst.DSTConv2d(4, 6, 3, padding=1)
    _set_random_thresholds(layer)
    ref = copy.deepcopy(layer)
    layer = layer.to(memory_format=torch.channels_last)
    assert layer.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, 4, 7, 7)
    assert_close_rel(layer(x.to(memory_format=torch.channels_last)), ref(x), 1e-5)


# ----------------------------------------------------------------------------- reset rule


def _thresholds_keeping(weight: torch.Tensor, kept: int) -> torch.Tensor:
    """Thresholds that keep exactly the ``kept`` largest-magnitude weights of row 0 and nothing else."""
    rows = weight.detach().reshape(weight.shape[0], -1).abs()
    t = rows.max(dim=1).values + 1.0  # everything masked out
    if kept:
        t[0] = rows[0].sort(descending=True).values[kept]
    return t


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_reset_rule_in_training_forward(kind, backend):
    if kind == "linear":
        layer = dst.DSTLinear(20, 10, backend=backend)  # 200 weights: 2 kept -> density 0.01
        x = torch.randn(4, 20)
    else:
        layer = dst.DSTConv2d(5, 10, (2, 2), backend=backend)  # 200 weights
        x = torch.randn(2, 5, 6, 6)
    assert layer.weight.numel() == 200
    with torch.no_grad():
        layer.threshold.copy_(_thresholds_keeping(layer.weight, 2))
    assert int(layer.mask().sum()) == 2 and layer.density().item() <= 0.01
    layer.train()
    y = layer(x)
    # The WHOLE vector is 0, including row 0 whose threshold kept something.
    assert torch.equal(layer.threshold.detach(), torch.zeros(10))
    # ... and the mask was recomputed in that same forward: thresholds 0 keep all nonzero weights.
    fresh = copy.deepcopy(layer).eval()
    assert torch.equal(y, fresh(x))
    y.sum().backward()  # the in-place reset does not break autograd
    assert layer.threshold.grad is not None and torch.isfinite(layer.threshold.grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_reset_rule_not_triggered_above_min_density(backend):
    layer = dst.DSTLinear(20, 10, backend=backend)
    with torch.no_grad():
        layer.threshold.copy_(_thresholds_keeping(layer.weight, 3))  # density 0.015 > 0.01
    before = layer.threshold.detach().clone()
    y = layer.train()(torch.randn(4, 20))
    assert torch.equal(layer.threshold.detach(), before)
    assert int(layer.mask().sum()) == 3
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_reset_rule_custom_min_density(backend):
    layer = dst.DSTLinear(20, 10, min_density=0.1, backend=backend)
    with torch.no_grad():
        layer.threshold.copy_(_thresholds_keeping(layer.weight, 15))  # density 0.075 <= 0.1
    layer.train()(torch.randn(4, 20))
    assert torch.equal(layer.threshold.detach(), torch.zeros(10))


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_reset_in_eval_mode(backend):
    layer = dst.DSTLinear(20, 10, backend=backend)
    with torch.no_grad():
        layer.threshold.fill_(10.0)  # everything masked out
    before = layer.threshold.detach().clone()
    layer.eval()
    x = torch.randn(4, 20)
    y = layer(x)
    assert torch.equal(layer.threshold.detach(), before)
    assert torch.equal(y, layer.bias.detach().expand(4, 10))  # masked weight is all zero


@pytest.mark.parametrize("backend", BACKENDS)
def test_min_density_none_disables_reset(backend):
    layer = dst.DSTLinear(20, 10, min_density=None, backend=backend)
    assert layer.min_density is None
    with torch.no_grad():
        layer.threshold.fill_(10.0)
    y = layer.train()(torch.randn(4, 20))
    assert torch.equal(layer.threshold.detach(), torch.full((10,), 10.0))
    assert torch.equal(y, layer.bias.detach().expand(4, 10))


@pytest.mark.parametrize("backend", BACKENDS)
def test_lstm_reset_rule_per_matrix(backend):
    lstm = dst.DSTLSTM(5, 4, backend=backend)
    with torch.no_grad():
        lstm.threshold_ih_l0.fill_(10.0)  # weight_ih_l0 fully masked
        lstm.threshold_hh_l0.fill_(0.05)
    hh_before = lstm.threshold_hh_l0.detach().clone()
    lstm.eval()(torch.randn(3, 2, 5))
    assert torch.equal(lstm.threshold_ih_l0.detach(), torch.full((16,), 10.0))  # eval: untouched
    lstm.train()(torch.randn(3, 2, 5))
    assert torch.equal(lstm.threshold_ih_l0.detach(), torch.zeros(16))
    assert torch.equal(lstm.threshold_hh_l0.detach(), hh_before)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["reuse", "two-forwards"])
def test_layer_called_twice_before_backward(kind, backend):
    """A layer applied twice in one training step (weight sharing, or two forwards, one backward)."""
    layer = dst.DSTLinear(6, 6, backend=backend)
    _set_random_thresholds(layer, 0.0, 0.1)
    x = torch.randn(3, 6)
    loss = layer(layer(x)).sum() if kind == "reuse" else layer(x).sum() + layer(2 * x).sum()
    loss.backward()
    # Expected: the same gradients as two separate layers sharing the parameters.
    w, t = layer.weight.detach(), layer.threshold.detach()
    w_ = w.clone().requires_grad_(True)
    t_ = t.clone().requires_grad_(True)
    if kind == "reuse":
        y = reference.linear(reference.linear(x, w_, t_, layer.bias), w_, t_, layer.bias)
    else:
        y = reference.linear(x, w_, t_, layer.bias) + reference.linear(2 * x, w_, t_, layer.bias)
    y.sum().backward()
    assert_close_rel(layer.weight.grad, w_.grad, 1e-5)
    assert_close_rel(layer.threshold.grad, t_.grad, 1e-5 * 6)


@pytest.mark.parametrize(
    ("factory", "x"),
    [
        (lambda: dst.DSTLinear(5, 4, device="meta"), lambda: torch.empty(3, 5, device="meta")),
        (lambda: dst.DSTConv2d(3, 4, 3, device="meta"), lambda: torch.empty(2, 3, 6, 6, device="meta")),
        (lambda: dst.DSTLSTM(5, 4, 2, device="meta"), lambda: torch.empty(6, 3, 5, device="meta")),
    ],
    ids=["linear", "conv", "lstm"],
)
def test_training_step_without_host_sync_on_meta(factory, x):
    """The reset rule, forward, backward, mask() and density() never read a value on the host:
    on the meta device any such read raises."""
    layer = factory().train()
    y = layer(x())
    y = y[0] if isinstance(y, tuple) else y
    (y.sum() + dst.sparsity_loss(layer)).backward()
    assert all(p.grad is not None and p.grad.device.type == "meta" for p in layer.parameters())
    assert layer.density().shape == () and layer.density().device.type == "meta"
    assert all(m.dtype == torch.bool for m in layer.masks().values())


# ----------------------------------------------------------------------------- constructor checks


@pytest.mark.parametrize(
    ("factory", "exc", "match"),
    [
        (lambda: dst.DSTLinear(3, 2, min_density=-1), ValueError, "min_density"),
        (lambda: dst.DSTLinear(3, 2, min_density=1.5), ValueError, "min_density"),
        (lambda: dst.DSTLinear(3, 2, min_density="0.1"), TypeError, "min_density"),
        (lambda: dst.DSTLinear(3, 2, backend="foo"), ValueError, "backend"),
        (lambda: dst.DSTConv2d(3, 2, 3, min_density=-1), ValueError, "min_density"),
        (lambda: dst.DSTConv2d(3, 2, 3, min_density=1.5), ValueError, "min_density"),
        (lambda: dst.DSTConv2d(3, 2, 3, backend="foo"), ValueError, "backend"),
        (lambda: dst.DSTLSTM(3, 2, min_density=-1), ValueError, "min_density"),
        (lambda: dst.DSTLSTM(3, 2, min_density=1.5), ValueError, "min_density"),
        (lambda: dst.DSTLSTM(3, 2, backend="foo"), ValueError, "backend"),
        (lambda: dst.sparsify(nn.Linear(3, 2), min_density=1.5), ValueError, "min_density"),
        (lambda: dst.sparsify(nn.Linear(3, 2), backend="foo"), ValueError, "backend"),
        (lambda: dst.sparsify(nn.Linear(3, 2), include=(nn.ReLU,)), TypeError, "include"),
        (lambda: dst.sparsify(nn.Linear(3, 2), exclude=(3,)), TypeError, "exclude"),
    ],
)
def test_bad_constructor_args(factory, exc, match):
    with pytest.raises(exc, match=match):
        factory()


def test_layer_forward_checks_input():
    with pytest.raises(ValueError, match=r"\bx\b must have in_features=3"):
        dst.DSTLinear(3, 2)(torch.randn(4, 5))
    with pytest.raises(TypeError, match=r"\bx\b has dtype"):
        dst.DSTLinear(3, 2)(torch.randn(4, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"\bx\b has 5 channels"):
        dst.DSTConv2d(4, 2, 3)(torch.randn(1, 5, 6, 6))


# ----------------------------------------------------------------------------- DSTLSTM


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch_first", [False, True])
def test_lstm_matches_nn_lstm_with_masked_weights(batch_first, backend):
    dtype = torch.float64
    num_layers, input_size, hidden, seq, batch = 2, 5, 4, 6, 3
    lstm = dst.DSTLSTM(input_size, hidden, num_layers, batch_first=batch_first, dtype=dtype, backend=backend)
    assert isinstance(lstm, nn.LSTM)
    for k in range(num_layers):
        for kind in ("ih", "hh"):
            t = getattr(lstm, f"threshold_{kind}_l{k}")
            assert isinstance(t, nn.Parameter) and t.shape == (4 * hidden,)
            assert torch.equal(t.detach(), torch.zeros(4 * hidden, dtype=dtype))
    _set_random_thresholds(lstm, -0.05, 0.3)

    ref = nn.LSTM(input_size, hidden, num_layers, batch_first=batch_first, dtype=dtype)
    masks = {}
    with torch.no_grad():
        for name, p in ref.named_parameters():
            src = getattr(lstm, name)
            if name.startswith("weight"):
                t = getattr(lstm, name.replace("weight", "threshold"))
                masks[name] = reference.mask(src, t)
                assert 0 < int(masks[name].sum()) < masks[name].numel()
                p.copy_(src * masks[name])
            else:
                p.copy_(src)

    shape = (batch, seq, input_size) if batch_first else (seq, batch, input_size)
    x = torch.randn(shape, dtype=dtype)
    h0 = torch.randn(num_layers, batch, hidden, dtype=dtype)
    c0 = torch.randn(num_layers, batch, hidden, dtype=dtype)
    ins = [v.clone().requires_grad_(True) for v in (x, h0, c0)]
    ins_ref = [v.clone().requires_grad_(True) for v in (x, h0, c0)]
    out, (hn, cn) = lstm(ins[0], (ins[1], ins[2]))
    out_ref, (hn_ref, cn_ref) = ref(ins_ref[0], (ins_ref[1], ins_ref[2]))
    tol = 1e-12
    for name, a, e in (("out", out, out_ref), ("h_n", hn, hn_ref), ("c_n", cn, cn_ref)):
        assert_close_rel(a, e, tol, name)

    cot = [torch.randn_like(v) for v in (out, hn, cn)]
    sum((a * g).sum() for a, g in zip((out, hn, cn), cot)).backward()
    sum((a * g).sum() for a, g in zip((out_ref, hn_ref, cn_ref), cot)).backward()
    for name, a, e in zip(("x", "h0", "c0"), ins, ins_ref):
        assert_close_rel(a.grad, e.grad, tol, f"d{name}")
    for name, p in ref.named_parameters():
        if name.startswith("bias"):
            assert_close_rel(getattr(lstm, name).grad, p.grad, tol, f"d{name}")
            continue
        w = getattr(lstm, name)
        t = getattr(lstm, name.replace("weight", "threshold"))
        gw, gt = reference.weight_grad(p.grad, w.detach(), t.detach())
        assert_close_rel(w.grad, gw, tol, f"d{name}")
        assert_close_rel(t.grad, gt, tol * row_length(w), f"dthreshold of {name}")
        _, gw64, gt64 = rederive(w, t, p.grad)
        assert_close_rel(w.grad, gw64, tol, f"d{name} vs re-derivation")
        assert_close_rel(t.grad, gt64, tol * row_length(w), f"dthreshold of {name} vs re-derivation")

    d = lstm.density()
    assert d.dim() == 0
    kept = sum(int(m.sum()) for m in masks.values())
    assert d.item() == pytest.approx(kept / sum(m.numel() for m in masks.values()))
    # The LSTM's own weights were not replaced by the masked copies.
    assert all(isinstance(getattr(lstm, n), nn.Parameter) for n in masks)
    assert not torch.equal(lstm.weight_ih_l0.detach(), ref.weight_ih_l0.detach())


def test_lstm_without_initial_state_and_eval():
    lstm = dst.DSTLSTM(5, 4, num_layers=2)
    _set_random_thresholds(lstm)
    ref = lstm.to_dense()
    assert type(ref) is nn.LSTM
    x = torch.randn(6, 3, 5)
    lstm.eval()
    ref.eval()
    out, (hn, cn) = lstm(x)
    out_ref, (hn_ref, cn_ref) = ref(x)
    assert_close_rel(out, out_ref, 1e-6)
    assert_close_rel(cn, cn_ref, 1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bidirectional, proj_size", [(True, 0), (False, 3), (True, 2)])
def test_lstm_bidirectional_and_projections_match_nn_lstm(bidirectional, proj_size, backend):
    dtype = torch.float64
    lstm = dst.DSTLSTM(5, 4, 2, True, True, 0.0, bidirectional, proj_size, dtype=dtype, backend=backend)
    ref = nn.LSTM(5, 4, 2, batch_first=True, bidirectional=bidirectional, proj_size=proj_size, dtype=dtype)
    weights = [n for n, _ in ref.named_parameters() if n.startswith("weight")]
    thresholds = sorted(n for n, _ in lstm.named_parameters() if n.startswith("threshold"))
    assert thresholds == sorted(n.replace("weight", "threshold") for n in weights)
    if proj_size:
        assert lstm.threshold_hr_l1.shape == (proj_size,)
    _set_random_thresholds(lstm, -0.05, 0.3)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            src = getattr(lstm, name)
            t = getattr(lstm, name.replace("weight", "threshold"), None)
            p.copy_(src * reference.mask(src, t) if name in weights else src)
    x = torch.randn(3, 6, 5, dtype=dtype)
    out, (hn, cn) = lstm(x)
    out_ref, (hn_ref, cn_ref) = ref(x)
    for name, a, e in (("out", out, out_ref), ("h_n", hn, hn_ref), ("c_n", cn, cn_ref)):
        assert_close_rel(a, e, 1e-12, name)
    (out.square().sum() + hn.sum()).backward()
    (out_ref.square().sum() + hn_ref.sum()).backward()
    for name, p in ref.named_parameters():
        if name in weights:
            w, t = getattr(lstm, name), getattr(lstm, name.replace("weight", "threshold"))
            gw, gt = reference.weight_grad(p.grad, w.detach(), t.detach())
            assert_close_rel(w.grad, gw, 1e-12, f"d{name}")
            assert_close_rel(t.grad, gt, 1e-12 * row_length(w), f"dthreshold of {name}")
        else:
            assert_close_rel(getattr(lstm, name).grad, p.grad, 1e-12, f"d{name}")
    # sparsify converts such LSTMs, and fold gives them back as plain ones.
    model = dst.sparsify(nn.Sequential(copy.deepcopy(ref)))
    assert isinstance(model[0], dst.DSTLSTM) and model[0].bidirectional == bidirectional
    assert model[0].proj_size == proj_size
    plain = lstm.to_dense()
    assert type(plain) is nn.LSTM and plain.bidirectional == bidirectional and plain.proj_size == proj_size
    assert_close_rel(plain(x)[0], lstm(x)[0], 1e-12, "to_dense")


@pytest.mark.parametrize("backend", BACKENDS)
def test_lstm_dropout_between_layers_matches_nn_lstm(backend):
    lstm = dst.DSTLSTM(5, 4, num_layers=3, dropout=0.4, dtype=torch.float64, backend=backend)
    _set_random_thresholds(lstm)
    ref = lstm.to_dense()
    assert ref.dropout == 0.4 and ref.training
    x = torch.randn(7, 2, 5, dtype=torch.float64)
    outs = []
    for m in (lstm, ref):
        torch.manual_seed(3)  # the same dropout draws: computing the masks consumes no random numbers
        out, _ = m(x)
        out.square().sum().backward()
        outs.append(out)
    assert_close_rel(outs[0], outs[1], 1e-12, "out")
    torch.manual_seed(4)
    assert not torch.equal(lstm(x)[0], outs[0]), "dropout is active in training"
    for name, p in ref.named_parameters():
        if name.startswith("weight"):
            w, t = getattr(lstm, name), getattr(lstm, name.replace("weight", "threshold"))
            gw, _ = reference.weight_grad(p.grad, w.detach(), t.detach())
            assert_close_rel(w.grad, gw, 1e-12, f"d{name}")
        else:
            assert_close_rel(getattr(lstm, name).grad, p.grad, 1e-12, f"d{name}")


# ----------------------------------------------------------------------------- sparsify & co.


class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1, groups=2, bias=False),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d((2, 3)),
        )
        self.lstm = nn.LSTM(8, 6, num_layers=2, batch_first=True)
        self.head = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 3))

    def forward(self, x):
        f = self.features(x).flatten(2).transpose(1, 2)  # [N, 6, 8]: a 6-step sequence
        out, _ = self.lstm(f)
        return self.head(out[:, -1])


DENSE_NAMES = {
    "features.0": nn.Conv2d,
    "features.3": nn.Conv2d,
    "lstm": nn.LSTM,
    "head.0": nn.Linear,
    "head.2": nn.Linear,
}
DST_TYPES = {nn.Conv2d: dst.DSTConv2d, nn.LSTM: dst.DSTLSTM, nn.Linear: dst.DSTLinear}


def _small_net():
    net = SmallNet()
    net.features[1].running_mean.uniform_(-0.1, 0.1)
    net.features[1].running_var.uniform_(0.5, 1.5)
    return net


def _thresholds(model):
    """Every DST threshold parameter, found by name (independently of the library's helpers)."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, (dst.DSTLinear, dst.DSTConv2d)):
            out[f"{name}.threshold"] = m.threshold
        elif isinstance(m, dst.DSTLSTM):
            for k in range(m.num_layers):
                for kind in ("ih", "hh"):
                    out[f"{name}.threshold_{kind}_l{k}"] = getattr(m, f"threshold_{kind}_l{k}")
    return out


def test_sparsify_swaps_in_place_and_keeps_weights():
    net = _small_net()
    dense_state = {k: v.clone() for k, v in net.state_dict().items()}
    bn = net.features[1]
    x = torch.randn(2, 3, 6, 6)
    y_before = net.eval()(x)

    out = dst.sparsify(net)
    assert out is net
    modules = dict(net.named_modules())
    for name, dense_type in DENSE_NAMES.items():
        assert type(modules[name]) is DST_TYPES[dense_type], name
    assert net.features[1] is bn and type(bn) is nn.BatchNorm2d
    for key, value in dense_state.items():
        assert torch.equal(net.state_dict()[key], value), key  # bit-identical
    thresholds = _thresholds(net)
    assert len(thresholds) == 2 + 4 + 2
    for name, t in thresholds.items():
        assert torch.equal(t.detach(), torch.zeros_like(t)), name
    # Thresholds 0 keep every nonzero weight: the function is unchanged.
    assert torch.equal(net.eval()(x), y_before)
    y_train = net.train()(x)
    assert torch.isfinite(y_train).all()
    assert dst.sparsify(net) is net  # idempotent: DST layers are left alone
    assert all(torch.equal(t.detach(), torch.zeros_like(t)) for t in _thresholds(net).values())


def test_sparsify_root_layer():
    lin = nn.Linear(4, 3)
    out = dst.sparsify(lin, min_density=None, backend="reference")
    assert type(out) is dst.DSTLinear and out.min_density is None and out.backend == "reference"
    assert torch.equal(out.weight.detach(), lin.weight.detach())


@pytest.mark.parametrize(
    ("kwargs", "dense_left"),
    [
        (dict(exclude=(nn.Conv2d,)), {"features.0", "features.3"}),
        (dict(exclude=nn.LSTM), {"lstm"}),
        (dict(exclude=("head.*",)), {"head.0", "head.2"}),
        (dict(exclude=("head.2", "features.0")), {"head.2", "features.0"}),
        (dict(exclude=("*.0",)), {"features.0", "head.0"}),
        (dict(include=(nn.Linear,)), {"features.0", "features.3", "lstm"}),
        (dict(include=nn.Conv2d, exclude=("features.3",)), {"features.3", "lstm", "head.0", "head.2"}),
    ],
)
def test_sparsify_include_exclude(kwargs, dense_left):
    net = dst.sparsify(_small_net(), **kwargs)
    modules = dict(net.named_modules())
    for name, dense_type in DENSE_NAMES.items():
        expected = dense_type if name in dense_left else DST_TYPES[dense_type]
        assert type(modules[name]) is expected, name


def test_sparsify_passes_options():
    net = dst.sparsify(_small_net(), min_density=0.2, backend="reference")
    for m in net.modules():
        if dst.is_dst_layer(m):
            assert m.min_density == 0.2 and m.backend == "reference"


def test_sparsity_loss():
    net = dst.sparsify(_small_net())
    thresholds = _thresholds(net)
    with torch.no_grad():
        for t in thresholds.values():
            t.uniform_(-1.0, 1.0)
    loss = dst.sparsity_loss(net)
    assert loss.dim() == 0
    expected = sum(torch.exp(-t.detach().double()).sum() for t in thresholds.values())
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    for name, t in thresholds.items():
        assert_close_rel(t.grad, -torch.exp(-t.detach()), 1e-6, name)
    # Dense parameters get no gradient from the regulariser.
    assert net.head[0].weight.grad is None
    with pytest.raises(ValueError, match="no DST layers"):
        dst.sparsity_loss(_small_net())


def test_sparsity_report():
    net = dst.sparsify(_small_net())
    with torch.no_grad():
        for t in _thresholds(net).values():
            t.uniform_(0.0, 0.3)
    report = dst.sparsity_report(net)
    expected_names = [
        "features.0.weight",
        "features.3.weight",
        "lstm.weight_ih_l0",
        "lstm.weight_hh_l0",
        "lstm.weight_ih_l1",
        "lstm.weight_hh_l1",
        "head.0.weight",
        "head.2.weight",
    ]
    assert [r.name for r in report] == expected_names
    params = dict(net.named_parameters())
    kept_all = total_all = 0
    for row in report:
        w = params[row.name]
        t = params[row.name.replace("weight", "threshold")]
        m = reference.mask(w.detach(), t.detach())
        assert row.shape == tuple(w.shape)
        assert row.total == w.numel()
        assert row.kept == int(m.sum())
        assert 0 < row.kept < row.total
        assert row.density == pytest.approx(row.kept / row.total)
        assert isinstance(row.kept, int) and isinstance(row.density, float)
        kept_all += row.kept
        total_all += row.total
    assert report.kept == kept_all and report.total == total_all
    assert report.density == pytest.approx(kept_all / total_all)
    rows = report.rows()
    assert rows[0]["name"] == "features.0.weight" and rows[0]["shape"] == [8, 3, 3, 3]
    text = str(report)
    lines = text.splitlines()
    assert lines[0].split() == ["layer", "shape", "kept", "total", "density"]
    for row in report:
        line = next(ln for ln in lines if ln.split()[0] == row.name)
        assert line.split() == [
            row.name,
            "x".join(map(str, row.shape)),
            str(row.kept),
            str(row.total),
            f"{100 * row.density:.2f}%",
        ]
    assert lines[-1].split()[:3] == ["total", str(kept_all), str(total_all)]


# ----------------------------------------------------------------------------- export.fold


def test_fold_gives_plain_layers_with_the_same_eval_output():
    net = dst.sparsify(_small_net())
    with torch.no_grad():
        for t in _thresholds(net).values():
            t.uniform_(0.0, 0.2)
    net.train()
    state_before = {k: v.clone() for k, v in net.state_dict().items()}
    folded = fold(net)
    assert folded is not net
    assert not any(dst.is_dst_layer(m) for m in folded.modules())
    modules = dict(folded.named_modules())
    for name, dense_type in DENSE_NAMES.items():
        assert type(modules[name]) is dense_type, name
    assert not any("threshold" in k for k in folded.state_dict())
    # The original model is unchanged.
    assert all(dst.is_dst_layer(dict(net.named_modules())[n]) for n in DENSE_NAMES)
    for key, value in net.state_dict().items():
        assert torch.equal(value, state_before[key]), key
    # Folded weights are W * M.
    for name in DENSE_NAMES:
        layer = dict(net.named_modules())[name]
        for w_name, m in layer.masks().items():
            assert torch.equal(getattr(modules[name], w_name).detach(), getattr(layer, w_name).detach() * m)
    x = torch.randn(2, 3, 6, 6)
    net.eval()
    folded.eval()
    assert_close_rel(folded(x), net(x), 1e-6)


def test_fold_single_layers_and_state_dict_into_plain_layers():
    lin = dst.DSTLinear(7, 5)
    _set_random_thresholds(lin)
    t_before = lin.threshold.detach().clone()
    plain = fold(lin)
    assert type(plain) is nn.Linear
    target = nn.Linear(7, 5)
    target.load_state_dict(plain.state_dict(), strict=True)
    x = torch.randn(3, 7)
    assert torch.equal(target(x), lin.eval()(x))
    assert torch.equal(lin.threshold.detach(), t_before)  # untouched

    conv = dst.DSTConv2d(4, 6, 3, padding=1, groups=2, padding_mode="reflect")
    _set_random_thresholds(conv)
    plain_conv = fold(conv)
    assert type(plain_conv) is nn.Conv2d and plain_conv.padding_mode == "reflect" and plain_conv.groups == 2
    target = nn.Conv2d(4, 6, 3, padding=1, groups=2, padding_mode="reflect")
    target.load_state_dict(plain_conv.state_dict(), strict=True)
    x = torch.randn(2, 4, 5, 5)
    assert torch.equal(target(x), conv.eval()(x))

    lstm = dst.DSTLSTM(5, 4, num_layers=2, batch_first=True)
    _set_random_thresholds(lstm)
    plain_lstm = fold(lstm)
    assert type(plain_lstm) is nn.LSTM and plain_lstm.batch_first and plain_lstm.num_layers == 2
    target = nn.LSTM(5, 4, num_layers=2, batch_first=True)
    target.load_state_dict(plain_lstm.state_dict(), strict=True)
    x = torch.randn(2, 6, 5)
    assert_close_rel(target(x)[0], lstm.eval()(x)[0], 1e-6)


# ----------------------------------------------------------------------------- state dicts


def test_state_dict_round_trip():
    a = dst.DSTLinear(7, 5)
    _set_random_thresholds(a)
    b = dst.DSTLinear(7, 5)
    b.load_state_dict(a.state_dict(), strict=True)
    for key, value in a.state_dict().items():
        assert torch.equal(b.state_dict()[key], value), key
    assert "threshold" in a.state_dict()
    x = torch.randn(3, 7)
    assert torch.equal(a.eval()(x), b.eval()(x))

    la = dst.DSTLSTM(5, 4, num_layers=2)
    _set_random_thresholds(la)
    lb = dst.DSTLSTM(5, 4, num_layers=2)
    lb.load_state_dict(la.state_dict(), strict=True)
    assert torch.equal(lb.threshold_hh_l1.detach(), la.threshold_hh_l1.detach())


@pytest.mark.parametrize(
    ("dense", "make_dst"),
    [
        (lambda: nn.Linear(7, 5), lambda: dst.DSTLinear(7, 5)),
        (lambda: nn.Linear(7, 5, bias=False), lambda: dst.DSTLinear(7, 5, bias=False)),
        (lambda: nn.Conv2d(4, 6, 3, groups=2), lambda: dst.DSTConv2d(4, 6, 3, groups=2)),
        (lambda: nn.LSTM(5, 4, 2), lambda: dst.DSTLSTM(5, 4, 2)),
    ],
    ids=["linear", "linear-nobias", "conv", "lstm"],
)
def test_load_dense_state_dict_strict(dense, make_dst):
    src = dense()
    layer = make_dst()
    _set_random_thresholds(layer)
    result = layer.load_state_dict(src.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for key, value in src.state_dict().items():
        assert torch.equal(layer.state_dict()[key], value), key
    for t in layer.thresholds():
        assert torch.equal(t.detach(), torch.zeros_like(t))


# ----------------------------------------------------------------------------- torch.compile


class _CompileNet(nn.Module):
    def __init__(self, backend):
        super().__init__()
        self.conv = dst.DSTConv2d(3, 4, 3, padding=1, backend=backend)
        self.fc = dst.DSTLinear(4 * 5 * 5, 3, backend=backend)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


# torch.compile traces into Triton kernels, which needs a GPU: the interpreter runs eagerly only.
COMPILE_BACKENDS = [
    pytest.param(
        b,
        marks=pytest.mark.skipif(
            b == "triton" and os.environ.get("TRITON_INTERPRET") == "1",
            reason="compiling Triton kernels needs a GPU (the Triton interpreter is eager-only)",
        ),
    )
    for b in BACKENDS
]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("backend", COMPILE_BACKENDS)
def test_torch_compile_fullgraph_train_matches_eager(backend):
    """Inductor for the backend "auto" picks here; aot_eager (same tracing, no codegen) for the
    others, to keep the suite fast."""
    auto = dst.functional.resolve_backend("auto", torch.device("cpu"))
    compiler = "inductor" if backend == auto else "aot_eager"
    torch._dynamo.reset()
    eager = _CompileNet(backend)
    with torch.no_grad():
        eager.conv.threshold.fill_(10.0)  # triggers the reset rule inside the compiled graph
        eager.fc.threshold.uniform_(0.0, 0.05)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True, backend=compiler)  # raises on graph breaks
    x = torch.randn(2, 3, 5, 5)
    eager.train()
    compiled_model.train()
    y_eager = eager(x)
    y_compiled = compiled(x)
    assert_close_rel(y_compiled, y_eager, 1e-5, "y")
    y_eager.square().sum().backward()
    y_compiled.square().sum().backward()
    row_len = {"conv.threshold": 27, "fc.threshold": 100}
    for name, p in eager.named_parameters():
        q = dict(compiled_model.named_parameters())[name]
        assert_close_rel(q.detach(), p.detach(), 0.0, name)  # incl. the reset thresholds
        tol = 1e-5 * row_len.get(name, 1)
        assert_close_rel(q.grad, p.grad, tol, f"d{name}")
    assert torch.equal(compiled_model.conv.threshold.detach(), torch.zeros(4))


class _CompileLSTMNet(nn.Module):
    def __init__(self, backend):
        super().__init__()
        self.lstm = dst.DSTLSTM(5, 6, num_layers=2, batch_first=True, backend=backend)
        self.head = dst.DSTLinear(6, 3, backend=backend)

    def forward(self, x):
        return self.head(self.lstm(x)[0][:, -1])


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("backend", COMPILE_BACKENDS)
def test_torch_compile_lstm_train_matches_eager(backend):
    """Training through torch.compile with default settings. Dynamo does not trace ``nn.LSTM``'s
    fused kernel unless ``allow_rnn`` is set, and a training graph of ``nn.LSTM`` itself fails in
    AOTAutograd then, so the model compiles into graphs around the LSTM call: the masks (with the
    reset rule) in one, the head in another. On the CPU with the native backend the layers run
    on the sparse recurrent kernel, whose calls (made from the untraced RNN module) compile into
    a graph each."""
    torch._dynamo.reset()
    eager = _CompileLSTMNet(backend)
    with torch.no_grad():
        for t in [*eager.lstm.thresholds(), *eager.head.thresholds()]:
            t.uniform_(0.0, 0.2)
        eager.lstm.threshold_hh_l1.fill_(10.0)  # triggers the reset rule inside the compiled graph
    compiled_model = copy.deepcopy(eager)
    explained = torch._dynamo.explain(copy.deepcopy(eager))(torch.randn(2, 4, 5))
    kernel_graphs = sum(
        any("dst_sparse_rnn_train" in str(n.target) for n in g.graph.nodes) for g in explained.graphs
    )
    on_kernel = backend == "native"
    assert explained.graph_count >= 2
    assert explained.graph_break_count <= 2 + (2 * kernel_graphs if on_kernel else 0)
    assert kernel_graphs == (2 if on_kernel else 0)  # one per layer
    torch._dynamo.reset()
    compiled = torch.compile(compiled_model, backend="inductor")
    x = torch.randn(3, 4, 5)
    y_eager, y_compiled = eager(x), compiled(x)
    assert_close_rel(y_compiled, y_eager, 1e-5, "y")
    y_eager.square().sum().backward()
    y_compiled.square().sum().backward()
    named = dict(compiled_model.named_parameters())
    for name, p in eager.named_parameters():
        assert_close_rel(named[name].detach(), p.detach(), 0.0, name)  # incl. the reset thresholds
        assert_close_rel(named[name].grad, p.grad, 1e-5 * (6 if "threshold" in name else 1), f"d{name}")
    assert torch.equal(compiled_model.lstm.threshold_hh_l1.detach(), torch.zeros(24))


@pytest.mark.parametrize("backend", COMPILE_BACKENDS)
def test_torch_compile_lstm_inference_fullgraph(backend):
    """With ``allow_rnn`` dynamo traces the fused LSTM too: inference compiles into one graph."""
    torch._dynamo.reset()
    model = _CompileLSTMNet(backend).eval()
    _set_random_thresholds(model.lstm)
    _set_random_thresholds(model.head)
    x = torch.randn(3, 4, 5)
    # Inductor's C++ code for the kernel path's layout copies uses at::vec without including it
    # when ATen runs without vector code (ATEN_CPU_CAPABILITY=default, torch 2.13): there the
    # graph is checked with aot_eager (same tracing, no code generation).
    plain = torch.backends.cpu.get_cpu_capability() == "DEFAULT"
    compiler = "aot_eager" if plain and backend == "native" else "inductor"
    with torch._dynamo.config.patch(allow_rnn=True), torch.no_grad():
        compiled = torch.compile(model, fullgraph=True, backend=compiler)  # raises on graph breaks
        assert_close_rel(compiled(x), model(x), 1e-5, "y")
