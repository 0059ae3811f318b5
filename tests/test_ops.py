"""The compiled extension dst_kernels._C (torch.ops.dst_kernels).

These tests FAIL when the extension is missing or broken: a build that silently fell back to
pure Python must not look green. Set DST_KERNELS_NO_EXTENSION=1 (the pure-Python install of
setup.py) to skip them on purpose.
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import make_generator, spec_estimator, tol_for

from dst_kernels import _ops, reference

if os.environ.get("DST_KERNELS_NO_EXTENSION") == "1":
    pytest.skip("DST_KERNELS_NO_EXTENSION=1: pure-Python install, no compiled ops", allow_module_level=True)


def _estimator_op():
    """The compiled op; a failed assertion (not a skip) when the extension is missing."""
    assert _ops.loaded(), (
        f"dst_kernels._C is not loaded ({_ops.LOAD_ERROR}); {_ops.BUILD_HINT}. "
        f"Set DST_KERNELS_NO_EXTENSION=1 to test a pure-Python install."
    )
    assert _ops.has_op("estimator"), "dst_kernels._C does not register torch.ops.dst_kernels.estimator"
    return torch.ops.dst_kernels.estimator


def _release(version: str) -> str:
    return version.split("+")[0]


def test_extension_loaded():
    assert _ops.loaded(), f"dst_kernels._C is not loaded: {_ops.LOAD_ERROR}"
    assert _ops.LOAD_ERROR is None
    assert _ops.has_op("estimator") and _ops.has_op("build_info")
    assert not _ops.has_op("no_such_op")


def test_build_info_matches_installed_torch():
    info = _ops.build_info()
    assert isinstance(info, dict), (
        f"build_info() returned {info!r}: is the extension loaded? {_ops.LOAD_ERROR}"
    )
    assert {"torch", "cuda", "archs", "with_cuda"} <= info.keys()
    assert _release(info["torch"]) == _release(torch.__version__), (
        f"built for torch {info['torch']}, running torch {torch.__version__}"
    )
    assert info["with_cuda"] in ("0", "1")
    if info["with_cuda"] == "1":
        assert info["cuda"], "a CUDA build must record its CUDA version"
    raw = torch.ops.dst_kernels.build_info()
    assert isinstance(raw, str) and raw.startswith("torch=")


def test_build_mismatch_check(monkeypatch):
    estimator_op = _estimator_op()
    assert estimator_op is not None
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _ops._check_build_matches()  # this build matches: silent
    real = _ops.build_info()
    monkeypatch.setattr(_ops, "build_info", lambda: dict(real, torch="1.0.0+cpu"))
    with pytest.warns(RuntimeWarning, match=r"built for torch 1\.0\.0.*rebuild"):
        _ops._check_build_matches()


def _estimator_inputs(dtype: torch.dtype) -> torch.Tensor:
    g = make_generator()
    special = [-2.0, -1.0, -0.7, -0.4, -0.1, -0.0, 0.0, 0.1, 0.4, 0.5, 1.0, 2.0, 1e-30, -1e30]
    x = torch.cat(
        [
            torch.tensor(special, dtype=torch.float64),
            torch.linspace(-1.5, 1.5, 30001, dtype=torch.float64),
            torch.randn(40000, generator=g, dtype=torch.float64),  # > one parallel_for grain
        ]
    ).to(dtype)
    # The neighbours of the breakpoints in this dtype.
    bps = torch.tensor([-1.0, -0.4, 0.4, 1.0], dtype=dtype)
    near = torch.cat([torch.nextafter(bps, bps * 2), torch.nextafter(bps, bps * 0), bps])
    return torch.cat([x, near])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_estimator_matches_reference_exactly(dtype):
    estimator_op = _estimator_op()
    x = _estimator_inputs(dtype)
    out = estimator_op(x)
    assert out.dtype == dtype and out.shape == x.shape
    assert torch.equal(out, reference.estimator(x))
    assert torch.equal(
        estimator_op(torch.tensor([-2, -0.7, -0.1, 0, 0.5, 1], dtype=dtype)),
        torch.tensor([0, 0.4, 1.6, 2, 0.4, 0.4], dtype=dtype),
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_estimator_low_precision_within_tolerance(dtype):
    estimator_op = _estimator_op()
    x = _estimator_inputs(dtype)
    out = estimator_op(x)
    assert out.dtype == dtype and out.shape == x.shape
    assert not torch.isnan(out).any()
    expected = spec_estimator(x)  # float64 H of the dtype's values
    err = (out.double() - expected).norm() / expected.norm()
    assert err < tol_for(dtype), f"relative error {err:.3e}"
    # Element-wise too: no single value may be far off (the breakpoints included).
    assert (out.double() - expected).abs().max() <= torch.finfo(dtype).eps  # one rounding of a value <= 2
    assert (out.double() - reference.estimator(x).double()).norm() / expected.norm() < tol_for(dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_estimator_nan_and_inf_give_zero(dtype):
    estimator_op = _estimator_op()
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0], dtype=dtype)
    assert torch.equal(estimator_op(x), torch.tensor([0.0, 0.0, 0.0, 2.0], dtype=dtype))


def test_estimator_non_contiguous_and_shapes():
    estimator_op = _estimator_op()
    x = torch.randn(7, 13, 5, dtype=torch.float64)
    for view in (x.transpose(0, 2), x[:, ::3], x[0, 0, 0], x.reshape(-1)[:1], torch.empty(0, 3)):
        out = estimator_op(view)
        assert out.shape == view.shape
        assert torch.equal(out, reference.estimator(view))
    cl = torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last)
    assert torch.equal(estimator_op(cl), reference.estimator(cl))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_estimator_integer_input_raises(dtype):
    estimator_op = _estimator_op()
    with pytest.raises(RuntimeError, match=r"x must be a floating-point"):
        estimator_op(torch.ones(4, dtype=dtype))


def test_estimator_fake_kernel():
    estimator_op = _estimator_op()
    out = estimator_op(torch.empty(3, 5, device="meta", dtype=torch.float16))
    assert out.device.type == "meta" and out.shape == (3, 5) and out.dtype == torch.float16
    with pytest.raises(RuntimeError, match=r"floating-point"):
        estimator_op(torch.empty(3, device="meta", dtype=torch.int64))


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.randn(7, 13),
        lambda: torch.randn(5, dtype=torch.float64),
        lambda: torch.randn(6, 4, dtype=torch.bfloat16).t(),
        lambda: torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last),
        lambda: torch.randn(3, 4, dtype=torch.float16),
    ],
    ids=["f32", "f64-1d", "bf16-transposed", "channels_last", "f16"],
)
def test_estimator_opcheck(make):
    estimator_op = _estimator_op()
    torch.library.opcheck(estimator_op, (make(),))


def test_estimator_compiles():
    estimator_op = _estimator_op()
    torch._dynamo.reset()
    fn = torch.compile(lambda x: estimator_op(x) * 2, fullgraph=True, backend="aot_eager")
    x = torch.linspace(-2, 2, 101)
    assert torch.equal(fn(x), reference.estimator(x) * 2)


def test_package_works_without_the_extension():
    """With ``_C`` unloadable the package warns once and runs on the reference backend."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(
        """
        import sys, warnings
        sys.modules["dst_kernels._C"] = None  # makes `from dst_kernels import _C` fail
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import dst_kernels as dst
        msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        assert any("could not be loaded" in m and "pip install --no-build-isolation" in m for m in msgs), msgs
        import torch
        assert "native" not in dst.available_backends() and "reference" in dst.available_backends()
        layer = dst.DSTLinear(5, 3)
        layer(torch.randn(2, 5)).sum().backward()
        assert layer.threshold.grad is not None
        try:
            dst.DSTLinear(5, 3, backend="native")(torch.randn(2, 5))
        except RuntimeError as exc:
            assert "not loaded" in str(exc) and "--no-build-isolation" in str(exc), exc
        else:
            raise AssertionError("native without _C must raise")
        print("ok")
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stdout + proc.stderr
