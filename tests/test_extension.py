"""The compiled extension dst_kernels._C (torch.ops.dst_kernels): it loads, says what it was
built against, and the package works without it.

These tests FAIL when the extension is missing or broken: a build that silently fell back to
pure Python must not look green. Set DST_KERNELS_NO_EXTENSION=1 (the pure-Python install of
setup.py) to skip them on purpose.
"""

from __future__ import annotations

import os

import pytest
import torch

from dst_kernels import _ops

if os.environ.get("DST_KERNELS_NO_EXTENSION") == "1":
    pytest.skip("DST_KERNELS_NO_EXTENSION=1: pure-Python install, no compiled ops", allow_module_level=True)


def _release(version: str) -> str:
    return version.split("+")[0]


def test_extension_loaded():
    assert _ops.loaded(), f"dst_kernels._C is not loaded: {_ops.LOAD_ERROR}"
    assert _ops.LOAD_ERROR is None
    assert _ops.has_op("dst_mask") and _ops.has_op("build_info")
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
    assert _ops.loaded(), f"dst_kernels._C is not loaded ({_ops.LOAD_ERROR}); {_ops.BUILD_HINT}"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _ops._check_build_matches()  # this build matches: silent
    real = _ops.build_info()
    monkeypatch.setattr(_ops, "build_info", lambda: dict(real, torch="1.0.0+cpu"))
    with pytest.warns(RuntimeWarning, match=r"built for torch 1\.0\.0.*rebuild"):
        _ops._check_build_matches()


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
