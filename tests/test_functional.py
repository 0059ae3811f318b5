"""dst_kernels.functional: argument checks (docs/maths.md section 3) and backend dispatch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close_rel, make_case, rederive, row_length, spec_masked_weight, tol_for

import dst_kernels as dst
from dst_kernels import functional as DF
from dst_kernels import reference

# Every backend usable here ("auto" resolves to one of them; the linear test covers it too).
BACKENDS = dst.available_backends("cpu")


def _linear_args(dtype=torch.float32):
    return dict(
        x=torch.randn(3, 5, dtype=dtype),
        weight=torch.randn(4, 5, dtype=dtype),
        threshold=torch.zeros(4, dtype=dtype),
        bias=torch.randn(4, dtype=dtype),
    )


def _conv_args(dtype=torch.float32, groups=1):
    return dict(
        x=torch.randn(2, 4, 6, 6, dtype=dtype),
        weight=torch.randn(6, 4 // groups, 3, 3, dtype=dtype),
        threshold=torch.zeros(6, dtype=dtype),
        bias=torch.randn(6, dtype=dtype),
    )


def _linear(**overrides):
    args = _linear_args()
    backend = overrides.pop("backend", "auto")
    args.update(overrides)
    return DF.dst_linear(args["x"], args["weight"], args["threshold"], args["bias"], backend=backend)


def _conv(**overrides):
    args = _conv_args()
    backend = overrides.pop("backend", "auto")
    kw = {k: overrides.pop(k) for k in ("stride", "padding", "dilation", "groups") if k in overrides}
    args.update(overrides)
    return DF.dst_conv2d(args["x"], args["weight"], args["threshold"], args["bias"], **kw, backend=backend)


def _meta(shape, dtype=torch.float32):
    return torch.empty(shape, device="meta", dtype=dtype)


NAN = float("nan")
INF = float("inf")

# (id, call, exception, message regex). Each message must name the offending argument.
BAD_INPUTS = [
    # shapes
    ("linear-x-last-dim", lambda: _linear(x=torch.randn(3, 6)), ValueError, r"\bx\b.*in_features=5"),
    ("linear-weight-1d", lambda: _linear(weight=torch.randn(5)), ValueError, r"weight.*2 dimensions"),
    ("linear-weight-3d", lambda: _linear(weight=torch.randn(4, 5, 1)), ValueError, r"weight must be 2-D"),
    ("linear-threshold-short", lambda: _linear(threshold=torch.zeros(3)), ValueError, r"threshold.*\[4\]"),
    ("linear-threshold-long", lambda: _linear(threshold=torch.zeros(5)), ValueError, r"threshold.*\[4\]"),
    ("linear-threshold-2d", lambda: _linear(threshold=torch.zeros(4, 1)), ValueError, r"threshold.*\[4\]"),
    ("linear-threshold-0d", lambda: _linear(threshold=torch.tensor(0.0)), ValueError, r"threshold.*\[4\]"),
    ("linear-bias-shape", lambda: _linear(bias=torch.zeros(5)), ValueError, r"bias.*\[4\]"),
    ("conv-channels", lambda: _conv(x=torch.randn(2, 5, 6, 6)), ValueError, r"\bx\b has 5 channels"),
    ("conv-x-2d", lambda: _conv(x=torch.randn(4, 6)), ValueError, r"\bx\b must be 3-D .* or 4-D"),
    ("conv-weight-2d", lambda: _conv(weight=torch.randn(6, 4)), ValueError, r"weight must be 4-D"),
    ("conv-threshold-len", lambda: _conv(threshold=torch.zeros(4)), ValueError, r"threshold.*\[6\]"),
    ("conv-groups-indivisible-out", lambda: _conv(groups=4), ValueError, r"groups"),
    (
        "conv-groups-channels",
        lambda: _conv(groups=2, weight=torch.randn(6, 4, 3, 3)),
        ValueError,
        r"groups",
    ),
    ("conv-groups-zero", lambda: _conv(groups=0), ValueError, r"groups must be a positive int"),
    ("conv-stride-triple", lambda: _conv(stride=(1, 1, 1)), ValueError, r"stride"),
    ("conv-padding-str", lambda: _conv(padding="full"), ValueError, r"padding"),
    ("conv-dilation-float", lambda: _conv(dilation=1.5), ValueError, r"dilation"),
    # devices ('meta' stands in for a second device)
    ("device-threshold", lambda: _linear(threshold=_meta(4)), ValueError, r"threshold is on meta"),
    ("device-x", lambda: _linear(x=_meta((3, 5))), ValueError, r"\bx\b is on meta"),
    ("device-bias", lambda: _linear(bias=_meta(4)), ValueError, r"bias is on meta"),
    ("device-conv-x", lambda: _conv(x=_meta((2, 4, 6, 6))), ValueError, r"\bx\b is on meta"),
    # dtypes
    ("dtype-x", lambda: _linear(x=torch.randn(3, 5, dtype=torch.float64)), TypeError, r"\bx\b has dtype"),
    (
        "dtype-threshold",
        lambda: _linear(threshold=torch.zeros(4, dtype=torch.float64)),
        TypeError,
        r"threshold has dtype",
    ),
    ("dtype-bias", lambda: _linear(bias=torch.zeros(4, dtype=torch.float16)), TypeError, r"bias has dtype"),
    ("int-x", lambda: _linear(x=torch.ones(3, 5, dtype=torch.int64)), TypeError, r"\bx\b must be a floating"),
    (
        "int-weight",
        lambda: _linear(weight=torch.ones(4, 5, dtype=torch.int32)),
        TypeError,
        r"weight must be a floating",
    ),
    (
        "int-threshold",
        lambda: _linear(threshold=torch.zeros(4, dtype=torch.int64)),
        TypeError,
        r"threshold must be a floating",
    ),
    (
        "bool-bias",
        lambda: _linear(bias=torch.zeros(4, dtype=torch.bool)),
        TypeError,
        r"bias must be a floating",
    ),
    ("not-a-tensor", lambda: _linear(weight=[[1.0] * 5] * 4), TypeError, r"weight must be a torch.Tensor"),
    # layout
    (
        "noncontiguous-weight",
        lambda: _linear(weight=torch.randn(5, 4).t()),
        ValueError,
        r"weight must be contiguous.*contiguous\(\)",
    ),
    (
        "noncontiguous-conv-weight",
        lambda: _conv(weight=torch.randn(6, 4, 3, 6)[..., ::2]),
        ValueError,
        r"weight must be contiguous",
    ),
    (
        "noncontiguous-threshold",
        lambda: _linear(threshold=torch.zeros(8)[::2]),
        ValueError,
        r"threshold must be contiguous",
    ),
    # empty
    (
        "empty-weight",
        lambda: _linear(weight=torch.randn(0, 5), threshold=torch.zeros(0)),
        ValueError,
        r"weight",
    ),
    ("empty-x", lambda: _linear(x=torch.randn(0, 5)), ValueError, r"\bx\b must not be empty"),
    ("empty-conv-x", lambda: _conv(x=torch.randn(0, 4, 6, 6)), ValueError, r"\bx\b must not be empty"),
    # non-finite thresholds (policy: ValueError on CPU)
    (
        "nan-threshold",
        lambda: _linear(threshold=torch.tensor([0.0, NAN, 0.0, 0.0])),
        ValueError,
        r"threshold.*NaN",
    ),
    (
        "inf-threshold",
        lambda: _linear(threshold=torch.tensor([0.0, 0.0, INF, 0.0])),
        ValueError,
        r"threshold.*inf",
    ),
    (
        "neg-inf-threshold",
        lambda: _conv(threshold=torch.tensor([-INF, 0, 0, 0, 0, 0])),
        ValueError,
        r"threshold.*inf",
    ),
    # backends
    (
        "backend-foo",
        lambda: _linear(backend="foo"),
        ValueError,
        r"backend must be one of .*'reference'.*'foo'",
    ),
    ("backend-none", lambda: _linear(backend=None), ValueError, r"backend must be one of"),
    ("backend-conv-foo", lambda: _conv(backend="foo"), ValueError, r"backend must be one of"),
]


@pytest.mark.parametrize(
    ("call", "exc", "match"), [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS]
)
def test_bad_input_raises_clear_error(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: DF.masked_weight(torch.randn(4, 5), torch.zeros(3)), r"threshold.*\[4\]"),
        (lambda: DF.masked_weight(torch.randn(4, 5), torch.tensor([0.0, NAN, 0, 0])), r"threshold.*NaN"),
        (lambda: DF.masked_weight(torch.randn(5, 4).t(), torch.zeros(4)), r"weight must be contiguous"),
        (lambda: DF.masked_weight(torch.randn(4, 5), torch.zeros(4), backend="foo"), r"backend"),
        (lambda: DF.mask(torch.randn(4, 5), torch.zeros(4, dtype=torch.float64)), r"threshold has dtype"),
        (lambda: DF.density(torch.randn(4, 5), _meta(4)), r"threshold is on meta"),
        (lambda: DF.reset_thresholds_(torch.randn(4, 5), torch.zeros(5), 0.01), r"threshold.*\[4\]"),
    ],
)
def test_other_entry_points_check_arguments(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


# ----------------------------------------------------------------------------- backends


def test_available_backends():
    names = dst.available_backends()
    assert isinstance(names, list) and "reference" in names
    assert set(names) <= set(DF.BACKENDS)
    assert "reference" in dst.available_backends("cpu")
    assert "reference" in dst.available_backends(torch.device("meta"))


def test_native_backend_unavailable_says_how_to_build():
    if "native" in dst.available_backends("cpu"):
        # A build with the native ops: it must then compute the reference's function.
        args = _linear_args(torch.float64)
        out = DF.dst_linear(*args.values(), backend="native")
        assert_close_rel(out, DF.dst_linear(*args.values(), backend="reference"), 1e-12)
        return
    with pytest.raises(RuntimeError, match=r"'native' is not available.*pip install --no-build-isolation"):
        _linear(backend="native")


def test_native_backend_missing_extension_message(monkeypatch):
    """Whatever this build has: without the extension, 'native' fails saying how to build it."""
    from dst_kernels import _ops

    monkeypatch.setattr(_ops, "_loaded", False)
    monkeypatch.setattr(_ops, "LOAD_ERROR", "ImportError: simulated")
    monkeypatch.setattr(DF, "_USABLE", {})
    assert "native" not in dst.available_backends("cpu")
    with pytest.raises(RuntimeError, match=r"'native' is not available.*simulated.*pip install --no-build"):
        _linear(backend="native")
    # "auto" still works, on the reference backend.
    args = _linear_args(torch.float64)
    out = DF.dst_linear(*args.values())
    expected = F.linear(args["x"], reference.masked_weight(args["weight"], args["threshold"]), args["bias"])
    assert torch.equal(out, expected)


def test_triton_backend_unavailable_says_so():
    if "triton" in dst.available_backends("cpu"):
        args = _linear_args(torch.float32)
        out = DF.dst_linear(*args.values(), backend="triton")
        assert_close_rel(out, DF.dst_linear(*args.values(), backend="reference"), 1e-5)
        return
    with pytest.raises(RuntimeError, match=r"'triton' is not available"):
        _linear(backend="triton")
    with pytest.raises(RuntimeError, match=r"'triton' is not available"):
        _conv(backend="triton")


def test_resolve_backend_auto_picks_an_available_one():
    assert DF.resolve_backend("auto", torch.device("cpu")) in dst.available_backends("cpu")
    assert DF.resolve_backend("reference", torch.device("cpu")) == "reference"


def test_meta_tensors_propagate_shapes():
    y = DF.dst_linear(_meta((3, 5)), _meta((4, 5)), _meta(4), _meta(4))
    assert y.device.type == "meta" and y.shape == (3, 4)
    y = DF.dst_conv2d(_meta((2, 4, 6, 6)), _meta((6, 2, 3, 3)), _meta(6), None, 2, 1, 1, 2)
    assert y.shape == (2, 6, 3, 3)


# ----------------------------------------------------------------------------- values


@pytest.mark.parametrize("backend", ["auto", *BACKENDS])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("x_shape", [(13,), (3, 13), (2, 3, 13)], ids=["1d", "2d", "3d"])
def test_dst_linear_matches_spec(x_shape, dtype, backend):
    weight, threshold = make_case((7, 13), dtype)
    bias = torch.randn(7, dtype=dtype)
    x = torch.randn(x_shape, dtype=dtype)
    leaves = [v.clone().requires_grad_(True) for v in (x, weight, threshold, bias)]
    y = DF.dst_linear(*leaves, backend=backend)
    gy = torch.randn_like(y)
    y.backward(gy)

    x64, w64, t64, b64 = [v.detach().double().requires_grad_(True) for v in (x, weight, threshold, bias)]
    y_ref = F.linear(x64, spec_masked_weight(w64, t64), b64)
    y_ref.backward(gy.double())
    tol = tol_for(dtype)
    assert_close_rel(y, y_ref, tol, "y")
    for name, a, e in zip(("x", "weight", "bias"), (leaves[0], leaves[1], leaves[3]), (x64, w64, b64)):
        assert_close_rel(a.grad, e.grad, tol, f"d{name}")
    assert_close_rel(leaves[2].grad, t64.grad, tol * row_length(weight), "dthreshold")


def test_dst_linear_without_bias():
    weight, threshold = make_case((7, 13), torch.float64)
    x = torch.randn(4, 13, dtype=torch.float64)
    y = DF.dst_linear(x, weight, threshold)
    assert torch.equal(y, F.linear(x, reference.masked_weight(weight, threshold)))


CONV_CASES = [
    # (in, out, kernel, stride, padding, dilation, groups)
    (4, 6, 3, 1, 0, 1, 1),
    (4, 6, 3, 2, 1, 1, 2),
    (6, 6, 3, 1, 1, 1, 6),  # depthwise
    (6, 12, 3, 1, 1, 1, 6),  # depthwise, channel multiplier 2
    (3, 5, (3, 2), (2, 1), (1, 0), (2, 1), 1),
    (4, 4, 3, 1, "same", 2, 2),
    (4, 4, (2, 3), 1, "same", 1, 1),  # even kernel: asymmetric 'same' padding
    (4, 4, 3, 1, "valid", 1, 1),
    (2, 3, 1, 3, 0, 1, 1),
]


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "-".join(map(str, c)).replace(" ", ""))
def test_dst_conv2d_matches_f_conv2d_with_masked_weight(case, dtype, backend):
    cin, cout, k, stride, padding, dilation, groups = case
    kh, kw = (k, k) if isinstance(k, int) else k
    weight, threshold = make_case((cout, cin // groups, kh, kw), dtype)
    bias = torch.randn(cout, dtype=dtype)
    x = torch.randn(2, cin, 9, 8, dtype=dtype)
    leaves = [v.clone().requires_grad_(True) for v in (x, weight, threshold, bias)]
    y = DF.dst_conv2d(*leaves, stride, padding, dilation, groups, backend=backend)
    # Exactly what F.conv2d gives with the reference masked weight.
    expected = F.conv2d(
        x, reference.masked_weight(weight, threshold), bias, stride, padding, dilation, groups
    )
    assert y.shape == expected.shape
    assert_close_rel(y, expected, tol_for(dtype), "y vs F.conv2d")
    gy = torch.randn_like(y)
    y.backward(gy)

    x64, w64, t64, b64 = [v.detach().double().requires_grad_(True) for v in (x, weight, threshold, bias)]
    y_ref = F.conv2d(x64, spec_masked_weight(w64, t64), b64, stride, padding, dilation, groups)
    y_ref.backward(gy.double())
    tol = tol_for(dtype)
    assert_close_rel(y, y_ref, tol, "y")
    for name, a, e in zip(("x", "weight", "bias"), (leaves[0], leaves[1], leaves[3]), (x64, w64, b64)):
        assert_close_rel(a.grad, e.grad, tol, f"d{name}")
    assert_close_rel(leaves[2].grad, t64.grad, tol * row_length(weight), "dthreshold")


def test_dst_conv2d_unbatched_input():
    weight, threshold = make_case((6, 4, 3, 3), torch.float64)
    x = torch.randn(4, 7, 7, dtype=torch.float64)
    y = DF.dst_conv2d(x, weight, threshold, None, 1, 1)
    assert y.shape == (6, 7, 7)
    assert torch.equal(y, F.conv2d(x, reference.masked_weight(weight, threshold), None, 1, 1))


def test_channels_last_conv_weight_accepted():
    weight, threshold = make_case((6, 4, 3, 3), torch.float32)
    x = torch.randn(2, 4, 7, 7)
    w_cl = weight.to(memory_format=torch.channels_last)
    assert not w_cl.is_contiguous()
    w1 = weight.clone().requires_grad_(True)
    w2 = w_cl.clone().requires_grad_(True)
    t1 = threshold.clone().requires_grad_(True)
    t2 = threshold.clone().requires_grad_(True)
    y1 = DF.dst_conv2d(x, w1, t1, None, 1, 1)
    y2 = DF.dst_conv2d(x.to(memory_format=torch.channels_last), w2, t2, None, 1, 1)
    assert_close_rel(y2, y1, 1e-5)
    gy = torch.randn_like(y1)
    y1.backward(gy)
    y2.backward(gy)
    assert_close_rel(w2.grad, w1.grad, 1e-5)
    assert_close_rel(t2.grad, t1.grad, 1e-5 * row_length(weight))
    assert torch.equal(DF.mask(w_cl, threshold), DF.mask(weight, threshold))


def test_autocast_bf16_on_cpu_accepted():
    weight, threshold = make_case((7, 13), torch.float32)
    x = torch.randn(5, 13)
    w = weight.clone().requires_grad_(True)
    t = threshold.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = DF.dst_linear(x.bfloat16(), w, t)  # bf16 input, float32 weight: allowed under autocast
        y_f32_in = DF.dst_linear(x, w, t)
    assert y.dtype == torch.bfloat16 and y_f32_in.dtype == torch.bfloat16
    expected = F.linear(x.double(), reference.masked_weight(weight, threshold).double())
    assert_close_rel(y, expected, tol_for(torch.bfloat16))
    y.float().sum().backward()
    assert w.grad.dtype == torch.float32 and t.grad.dtype == torch.float32
    assert torch.isfinite(w.grad).all() and torch.isfinite(t.grad).all()
    _, gw_ref, gt_ref = rederive(weight, threshold, torch.ones(5, 7, dtype=torch.float64).t() @ x.double())
    assert_close_rel(w.grad, gw_ref, tol_for(torch.bfloat16))

    # Outside autocast the same mix is an error naming x.
    with pytest.raises(TypeError, match=r"\bx\b has dtype"):
        DF.dst_linear(x.bfloat16(), weight, threshold)


def test_autocast_bf16_conv_on_cpu_accepted():
    weight, threshold = make_case((6, 4, 3, 3), torch.float32)
    x = torch.randn(2, 4, 7, 7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = DF.dst_conv2d(x.bfloat16(), weight, threshold, None, 1, 1)
    assert y.dtype == torch.bfloat16
    expected = F.conv2d(x.double(), reference.masked_weight(weight, threshold).double(), None, 1, 1)
    assert_close_rel(y, expected, tol_for(torch.bfloat16))


@pytest.mark.parametrize("padding", ["same", "valid"])
def test_string_padding(padding):
    weight, threshold = make_case((5, 3, 3, 3), torch.float64)
    x = torch.randn(2, 3, 8, 7, dtype=torch.float64)
    y = DF.dst_conv2d(x, weight, threshold, None, 1, padding, 1)
    assert y.shape == ((2, 5, 8, 7) if padding == "same" else (2, 5, 6, 5))
    assert torch.equal(y, F.conv2d(x, reference.masked_weight(weight, threshold), None, 1, padding))


def test_masked_weight_mask_density():
    weight, threshold = make_case((7, 13), torch.float32)
    m = DF.mask(weight, threshold)
    assert m.dtype == torch.bool and torch.equal(m, reference.mask(weight, threshold))
    d = DF.density(weight, threshold)
    assert d.dim() == 0 and d.item() == pytest.approx(m.float().mean().item())
    p = DF.masked_weight(weight, threshold)
    assert torch.equal(p, weight * m)


def test_auto_and_native_backends_do_not_import_triton():
    """Resolving "auto" or "native" probes only those backends: the Triton backend (an import of
    triton and its kernels) is probed only when asked for, in a fresh process."""
    import subprocess
    import sys

    code = (
        "import sys, torch, dst_kernels as dst\n"
        "from dst_kernels import functional as DF\n"
        "assert DF.resolve_backend('auto', torch.device('cpu')) in ('native', 'reference')\n"
        "DF.resolve_backend('reference', torch.device('cpu'))\n"
        "layer = dst.DSTLinear(5, 3)\n"
        "layer(torch.randn(2, 5)).sum().backward()\n"
        "print(sorted(k for k in DF._USABLE), 'dst_kernels.triton' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("False"), out
    assert "triton" not in out.split("]")[0], out
