"""Autotuning must not change results: every config the autotuner benchmarks runs into the
same output buffers, so a kernel that does not overwrite its whole output would leave an
earlier config's values behind on the first call of every new shape.

Under the interpreter the kernels have one config and nothing is benchmarked. These tests give
a kernel two configs and a stub timer that makes the second (larger block) config the winner,
which is what a GPU sees when the larger config is faster, and check the first call's results.
"""

from __future__ import annotations

import contextlib
import importlib
import os

import pytest
import torch
from conftest import assert_close_rel, make_case, rederive, row_length, tol_for

import dst_kernels as dst
from dst_kernels import functional as DF

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" or "triton" not in dst.available_backends("cpu"),
    reason="the stub timer replaces GPU benchmarking; it needs the Triton interpreter",
)


class _StubTimer:
    """A ``do_bench`` that runs each config once and reports later configs as faster."""

    def __init__(self):
        self.calls = 0

    def __call__(self, kernel_call, quantiles=None):
        kernel_call()
        self.calls += 1
        t = 10.0 / self.calls
        return [t, t, t] if quantiles else t


@pytest.fixture(autouse=True)
def _every_config(monkeypatch):
    """The test suite caps autotuning at one config; these tests need both of theirs."""
    monkeypatch.delenv("DST_KERNELS_TRITON_MAX_CONFIGS", raising=False)


@contextlib.contextmanager
def _two_configs(kernel, configs):
    """Give an autotuned kernel ``configs`` and the stub timer, restoring it afterwards."""
    saved = kernel.configs, dict(kernel.cache), kernel.__dict__.get("do_bench")
    timer = _StubTimer()
    kernel.configs = configs
    kernel.cache.clear()
    kernel.__dict__["do_bench"] = timer
    try:
        yield timer
    finally:
        kernel.configs = saved[0]
        kernel.cache.clear()
        kernel.cache.update(saved[1])
        if saved[2] is None:
            kernel.__dict__.pop("do_bench", None)
        else:
            kernel.__dict__["do_bench"] = saved[2]


def _config(bm, bn, bk):
    import triton

    return triton.Config({"BM": bm, "BN": bn, "BK": bk}, num_warps=4)


@pytest.mark.parametrize("k", [17, 50, 97])
def test_linear_weight_grad_first_call_with_autotuning(k):
    """dW and dt of the fused linear on the first call, when the larger-BK config wins."""
    tl_linear = importlib.import_module("dst_kernels.triton.linear")

    m, n = 9, 11
    weight, threshold = make_case((n, k), torch.float32)
    x = torch.randn(m, k)
    grad_y = torch.randn(m, n)
    leaves = [t.clone().requires_grad_(True) for t in (x, weight, threshold)]
    with _two_configs(tl_linear._dw_kernel, [_config(16, 16, 16), _config(16, 16, 32)]) as timer:
        y = DF.dst_linear(*leaves, backend="triton")
        grads = torch.autograd.grad(y, leaves, grad_y)
        assert timer.calls == 2, "both configs were benchmarked"
        best = tl_linear._dw_kernel.best_config
        assert best.kwargs["BK"] == 32, f"the stub timer should make BK=32 win, got {best}"
    _, gw_ref, gt_ref = rederive(weight, threshold, grad_y.double().t() @ x.double())
    tol = tol_for(torch.float32)
    p = weight.double() * (weight.abs() > threshold[:, None])
    assert_close_rel(grads[0], grad_y.double() @ p, tol, "dx")
    assert_close_rel(grads[1], gw_ref, tol, "dW")
    assert_close_rel(grads[2], gt_ref, tol * max(1.0, row_length(weight) ** 0.5), "dt")


def test_linear_forward_and_dx_first_call_with_autotuning():
    """The forward and dX kernels under two configs: outputs fully overwritten by the winner."""
    tl_linear = importlib.import_module("dst_kernels.triton.linear")

    m, n, k = 37, 19, 45
    weight, threshold = make_case((n, k), torch.float32)
    x = torch.randn(m, k)
    grad_y = torch.randn(m, n)
    xr = x.clone().requires_grad_(True)
    configs = [_config(16, 16, 16), _config(32, 32, 32)]
    with _two_configs(tl_linear._fwd_kernel, configs), _two_configs(tl_linear._dx_kernel, configs):
        y = DF.dst_linear(xr, weight, threshold, backend="triton")
        (gx,) = torch.autograd.grad(y, (xr,), grad_y)
    p = weight.double() * (weight.abs() > threshold[:, None])
    tol = tol_for(torch.float32)
    assert_close_rel(y, x.double() @ p.t(), tol, "y")
    assert_close_rel(gx, grad_y.double() @ p, tol, "dx")
