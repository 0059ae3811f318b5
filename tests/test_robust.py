"""Never NaN: each way a DST run could reach a non-finite loss, provoked, with the loss staying finite.

The causes users of the official code met (NaN losses on VGG-16, a WRN run stuck at 15 %), and
what this implementation does about each:

* ``exp(-t)`` overflow: a bad step (large lr or alpha, badly scaled inputs) sends a threshold far
  below 0; ``exp(-t)`` is inf below t = -88.7 in float32, then the threshold's gradient is -inf
  and the run turns to NaN. The regulariser is linear below t = -10 (``threshold_penalty``).
* half-precision thresholds: ``sum exp(-t)`` leaves float16's range (65504) with a few thousand
  thresholds slightly below 0. The regulariser sums in float32.
* the estimator in float16 / bfloat16: computed in float32 and rounded once (no intermediate
  overflow); only a gradient that itself exceeds the dtype's range is inf, as in a dense layer.
* an all-pruned layer (reset rule off, or between resets): outputs the bias, finite gradients.
* weight decay on thresholds: pulls them towards 0, stable for ``lr * wd < 2``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close_rel, rederive, tol_for
from torch import nn

import dst_kernels as dst
from dst_kernels.regulariser import EXP_LINEAR_BELOW, threshold_penalty

BACKENDS = ["reference"] + (["native"] if "native" in dst.available_backends("cpu") else [])


def _data(scale=1.0):
    # Drawn in float64: float32 normal draws take a vectorised path on some CPUs only.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 32, generator=g, dtype=torch.float64) * scale
    y = (x[:, :8] @ torch.randn(8, 4, generator=g, dtype=torch.float64)).argmax(1)
    return x.float(), y


def _net(backend="auto", min_density=0.01, dtype=None):
    torch.manual_seed(0)
    return nn.Sequential(
        dst.DSTLinear(32, 64, backend=backend, min_density=min_density, dtype=dtype),
        nn.ReLU(),
        dst.DSTLinear(64, 4, backend=backend, min_density=min_density, dtype=dtype),
    )


def _thresholds(model):
    return [t for m in model.modules() if dst.is_dst_layer(m) for t in m.thresholds()]


def _unprotected_penalty(model) -> torch.Tensor:
    """The regulariser as the official code computes it: plain exp(-t), summed in t's dtype."""
    return sum(torch.exp(-t.detach()).sum() for t in _thresholds(model))


def _overflow_thresholds(model) -> None:
    """Thresholds where plain exp(-t) is inf in float32 (t < -88.7): -100 and -1e4 on some rows
    of the first layer, -1e30 on one row of the last; the other rows stay at 0."""
    with torch.no_grad():
        t0, t1 = model[0].threshold, model[2].threshold
        t0[:16] = -100.0
        t0[16:24] = -1e4
        t1[0] = -1e30


def _train_checked(model, steps, alpha, opt, x, y) -> None:
    """Train, asserting at every step that the loss, every gradient and every parameter are finite."""
    for s in range(steps):
        i = (s * 64) % len(x)
        loss = F.cross_entropy(model(x[i : i + 64]), y[i : i + 64]) + alpha * dst.sparsity_loss(model)
        assert torch.isfinite(loss), f"step {s}: loss {loss.item()}"
        opt.zero_grad()
        loss.backward()
        for name, p in model.named_parameters():
            assert torch.isfinite(p.grad).all(), f"step {s}: gradient of {name} is not finite"
        opt.step()
        for name, p in model.named_parameters():
            assert torch.isfinite(p).all(), f"step {s}: {name} is not finite"


# ----------------------------------------------------------------------------- the regulariser


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_penalty_is_unchanged_for_healthy_thresholds(dtype):
    """Above t = -10 value and gradient are bit-identical to exp(-t).sum()."""
    g = torch.Generator().manual_seed(0)
    for _ in range(10):
        t = (torch.randn(777, generator=g, dtype=dtype) * 4).clamp(min=-EXP_LINEAR_BELOW)
        t[:3] = torch.tensor([-EXP_LINEAR_BELOW, 0.0, 50.0], dtype=dtype)
        a, b = t.clone().requires_grad_(), t.clone().requires_grad_()
        ours, plain = threshold_penalty(a), torch.exp(-b).sum()
        assert ours.dtype == dtype and torch.equal(ours, plain)
        (3e-4 * ours).backward()
        (3e-4 * plain).backward()
        assert torch.equal(a.grad, b.grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_healthy_training_is_bit_identical_to_plain_exp(backend):
    """20 SGD steps with sparsity_loss give exactly the weights plain exp(-t).sum() gives."""
    x, y = _data()
    runs = []
    for plain in (False, True):
        model = _net(backend)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        for s in range(20):
            i = (s * 64) % len(x)
            reg = _unprotected_penalty_with_grad(model) if plain else dst.sparsity_loss(model)
            loss = F.cross_entropy(model(x[i : i + 64]), y[i : i + 64]) + 1e-2 * reg
            opt.zero_grad()
            loss.backward()
            opt.step()
        runs.append(model)
    for (name, p), q in zip(runs[0].named_parameters(), runs[1].parameters()):
        assert torch.equal(p, q), name


def _unprotected_penalty_with_grad(model) -> torch.Tensor:
    terms = [torch.exp(-t).sum() for t in _thresholds(model)]
    return sum(terms[1:], terms[0])


def test_penalty_tail_is_linear_and_finite():
    c = EXP_LINEAR_BELOW
    t = torch.tensor([-1e30, -1e4, -100.0, -c - 1.0, -c], requires_grad=True)
    value = threshold_penalty(t)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(t.grad).all()
    assert torch.equal(t.grad[:4], torch.full((4,), -math.exp(c), dtype=torch.float32))  # slope -e^c
    tail = threshold_penalty(torch.tensor([-c - 1.0])).item()
    assert tail == pytest.approx(math.exp(c) * 2.0, rel=1e-6)  # e^c * (1 + (-c - t))
    assert not torch.isfinite(torch.exp(-t.detach()[:3])).all()  # what it replaces


@pytest.mark.parametrize("backend", BACKENDS)
def test_regulariser_before_the_forward_survives_the_reset_rule(backend):
    """The reset rule writes the thresholds in place during a training forward: a regulariser
    computed before it must not have saved them for backward (exp(-t) does not; neither may we)."""
    model = _net(backend)
    with torch.no_grad():
        model[0].threshold.fill_(10.0)  # the reset fires in the forward below
    reg = 1e-3 * dst.sparsity_loss(model)
    loss = reg + model(torch.randn(8, 32)).square().mean()
    loss.backward()
    assert torch.equal(model[0].threshold.detach(), torch.zeros(64))
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_thresholds_are_summed_in_float32(dtype):
    layer = dst.DSTLinear(4, 8192, dtype=dtype)
    with torch.no_grad():
        layer.threshold.fill_(-3.0)
    loss = dst.sparsity_loss(layer)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert loss.item() == pytest.approx(8192 * math.exp(3.0), rel=tol_for(dtype))
    if dtype == torch.float16:
        assert not torch.isfinite(torch.exp(-layer.threshold.detach()).sum())  # the cause, provoked


# ----------------------------------------------------------------------------- training


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("alpha", "lr"), [(1e-3, 5.0), (1.0, 1.0)], ids=["large-lr", "large-alpha"])
def test_threshold_blow_up_keeps_the_loss_finite(backend, alpha, lr):
    """Thresholds far below 0 (put there: where plain exp(-t) overflows whatever the machine),
    then training at a large lr / alpha: every loss, gradient and parameter stays finite."""
    x, y = _data()
    model = _net(backend)
    _overflow_thresholds(model)
    # What it replaces: the official regulariser is inf there, and its threshold gradient -inf.
    plain = [t.detach().clone().requires_grad_() for t in _thresholds(model)]
    plain_value = sum(torch.exp(-t).sum() for t in plain)
    (alpha * plain_value).backward()
    assert not torch.isfinite(plain_value)
    assert not all(torch.isfinite(t.grad).all() for t in plain)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    _train_checked(model, 120, alpha, opt, x, y)


def test_badly_scaled_inputs_keep_the_loss_finite():
    """Inputs x100 at lr 0.05, starting with thresholds where plain exp(-t) overflows."""
    x, y = _data(scale=100.0)
    model = _net()
    _overflow_thresholds(model)
    assert not torch.isfinite(_unprotected_penalty(model))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    _train_checked(model, 60, 1e-3, opt, x, y)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_pruned_layer_gives_finite_loss_and_gradients(backend):
    """Reset rule off: a layer with every weight pruned outputs its bias; nothing is NaN."""
    x, y = _data()
    model = _net(backend, min_density=None)
    with torch.no_grad():
        model[0].threshold.fill_(1e3)
    assert model[0].density().item() == 0.0
    loss = F.cross_entropy(model(x[:64]), y[:64]) + 1e-3 * dst.sparsity_loss(model)
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert torch.isfinite(p.grad).all(), name
    assert torch.count_nonzero(model[0].weight.grad) == 0  # |Q| > 1: no estimator gradient
    controller = dst.DensityController(model, 0.1, every=1)
    controller.step()
    assert math.isfinite(controller.alpha.item())
    assert controller.measure()[0].item() == 0.0


def test_all_pruned_conv_before_batchnorm_is_finite():
    """A pruned conv feeds BatchNorm a constant: its variance is 0, eps keeps it finite."""
    conv = dst.DSTConv2d(3, 4, 3, bias=False, min_density=None)
    model = nn.Sequential(conv, nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    with torch.no_grad():
        conv.threshold.fill_(5.0)
    out = model(torch.randn(8, 3, 8, 8))
    out.sum().backward()
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("backend", BACKENDS)
def test_reset_rule_revives_an_all_pruned_layer(backend):
    model = _net(backend)
    with torch.no_grad():
        model[0].threshold.fill_(1e3)
    model(torch.randn(2, 32))
    assert torch.equal(model[0].threshold.detach(), torch.zeros(64))


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.5),
        lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=0.5),
        lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.5),
    ],
    ids=["sgd", "adam", "adamw"],
)
def test_weight_decay_on_thresholds_is_stable(make_opt):
    """Decay (here 5000x the paper's) pulls thresholds towards 0; nothing diverges.

    First a training run (every step finite, wherever it goes); then the decay itself, on
    thresholds put at +-3 with no task loss, so the only forces on them are the regulariser
    and the decay (elementwise: the same on every machine): every threshold moves towards 0."""
    x, y = _data()
    model = _net()
    opt = make_opt(model.parameters())  # thresholds included, as in the paper's CIFAR recipe
    _train_checked(model, 60, 1e-2, opt, x, y)
    model = _net(min_density=None)
    with torch.no_grad():
        for i, t in enumerate(_thresholds(model)):
            t.copy_(torch.where(torch.arange(t.numel()) % 2 == i % 2, 3.0, -3.0))
    thresholds = _thresholds(model)
    opt = make_opt(thresholds)
    for _ in range(60):
        opt.zero_grad()
        (1e-2 * dst.sparsity_loss(model)).backward()
        opt.step()
    for t in thresholds:
        assert torch.isfinite(t).all() and (t.detach().abs() < 2.9).all(), t


# ----------------------------------------------------------------------------- half precision


@pytest.mark.parametrize("backend", BACKENDS)
def test_estimator_in_float16_has_no_intermediate_overflow(backend):
    """G * W = 90000 > 65504 inside the estimator, results in range: computed in float32."""
    weight = torch.tensor([[300.0, -300.0], [0.25, 0.5]], dtype=torch.float16)
    threshold = torch.tensor([299.5, 0.1], dtype=torch.float16)  # row 0: Q = 0.5, H = 0.4
    grad = torch.tensor([[300.0, 300.0], [1.0, -1.0]], dtype=torch.float16)
    w = weight.clone().requires_grad_()
    t = threshold.clone().requires_grad_()
    p = dst.functional.masked_weight(w, t, backend=backend)
    p.backward(grad)
    _, gw, gt = rederive(weight, threshold, grad)
    assert torch.isfinite(w.grad).all() and torch.isfinite(t.grad).all()
    assert_close_rel(w.grad, gw, tol_for(torch.float16), "dW")
    assert_close_rel(t.grad, gt, tol_for(torch.float16) * 2, "dt")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_training_stays_finite(backend, dtype):
    x, y = _data()
    model = _net(backend, dtype=dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for s in range(20):
        i = (s * 64) % len(x)
        out = model(x[i : i + 64].to(dtype))
        loss = F.cross_entropy(out.float(), y[i : i + 64]) + 1e-3 * dst.sparsity_loss(model)
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_non_finite_threshold_is_an_error_not_a_silent_mask():
    layer = dst.DSTLinear(4, 3)
    with torch.no_grad():
        layer.threshold[1] = float("nan")
    with pytest.raises(ValueError, match="threshold"):
        layer(torch.randn(2, 4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_fused_penalty_is_bit_identical_to_the_per_tensor_one(dtype):
    """sparsity_loss's one autograd node over every threshold tensor gives threshold_penalty's
    values and gradients bit for bit, on the tail, at the joint and above it."""
    from dst_kernels.regulariser import _float_or_same, _Penalties

    g = torch.Generator().manual_seed(0)
    sizes = (300, 100, 10, 1)
    base = [torch.randn(n, generator=g, dtype=torch.float64) * 6 for n in sizes]
    base[0][:5] = torch.tensor([-11.0, -EXP_LINEAR_BELOW, -1e4, 50.0, 0.0], dtype=torch.float64)
    a = [t.to(dtype).requires_grad_(True) for t in base]
    b = [t.to(dtype).requires_grad_(True) for t in base]
    per_tensor = [threshold_penalty(t) for t in a]
    fused = _Penalties.apply(*[_float_or_same(t) for t in b])
    weights = [1.5, 2.5, 3.5, 4.5]  # distinct upstream gradients per output
    ga = torch.autograd.grad(sum(w * v for w, v in zip(weights, per_tensor)), a)
    gb = torch.autograd.grad(sum(w * v for w, v in zip(weights, fused)), b)
    for u, v in zip(per_tensor, fused):
        assert u.dtype == v.dtype and torch.equal(u, v)
    for u, v in zip(ga, gb):
        assert u.dtype == dtype and torch.equal(u, v)
