"""Size limits of the Triton kernels: every index that can pass 2**31 is int64, every launch grid
fits CUDA's limits (x < 2**31, y and z <= 65535), and what cannot fit raises a clear error."""

from __future__ import annotations

import importlib
import inspect
import re

import pytest
import torch
from conftest import TRITON_DEVICE, assert_close_rel, make_case, tol_for, triton_test

from dst_kernels import functional as DF

pytest.importorskip("triton", reason="the Triton backend needs triton")
mask_mod = importlib.import_module("dst_kernels.triton.mask")
linear_mod = importlib.import_module("dst_kernels.triton.linear")
conv_mod = importlib.import_module("dst_kernels.triton.conv2d")
runtime_mod = importlib.import_module("dst_kernels.triton._runtime")
gemm_mod = importlib.import_module("dst_kernels.triton._gemm")

TRITON = triton_test


@pytest.mark.parametrize("rows, cols", [(1, 5_000_000), (300_000, 300), (7, 13)])
def test_elementwise_grid_is_one_dimensional_and_fits(rows, cols):
    # A 1 x 5M weight needed 78125 column blocks on grid y (limit 65535) before.
    grid = runtime_mod.grid(rows, cols)
    assert len(grid) == 1 and 1 <= grid[0] <= 2**31 - 1
    row_blocks, col_blocks = runtime_mod.blocks(rows, cols)
    assert grid[0] == row_blocks * col_blocks


def test_elementwise_grid_too_large_is_a_clear_error():
    with pytest.raises(ValueError, match=r"weight of shape \[1048576, 4194304\].*backend='native'"):
        runtime_mod.grid(2**20, 2**22)


@pytest.mark.parametrize("m, n, k", [(2**31, 5, 5), (5, 2**31, 5), (5, 5, 2**31)])
def test_gemm_sizes_past_int32_are_a_clear_error(m, n, k):
    with pytest.raises(ValueError, match=r"supports .* < 2\*\*31 - 256.*backend='native'"):
        gemm_mod.check_gemm_sizes(m, n, k)
    gemm_mod.check_gemm_sizes(2**31 - 257, 5, 5)  # just inside: no error


@pytest.mark.parametrize("module", [linear_mod, conv_mod])
def test_every_stride_product_is_int64(module):
    """``index * stride`` in int32 wraps once a tensor (or a transposed view of one) passes
    2**31 elements; every such product in the GEMM kernels casts the index first."""
    source = inspect.getsource(module)
    products = re.findall(r"([\w\[\]:, ().]+?)\s*\*\s*(s(?:x|w|y|d)[a-z]{1,2})\b", source)
    assert products, "no stride products found: the pattern is stale"
    bad = [
        f"{lhs.strip()} * {stride}" for lhs, stride in products if not lhs.rstrip().endswith(".to(tl.int64)")
    ]
    assert not bad, f"int32 index * stride products: {bad}"


@TRITON
def test_kept_count_is_int64():
    weight, threshold = make_case((7, 13), torch.float32)
    count = mask_mod._count(weight.to(TRITON_DEVICE), threshold.to(TRITON_DEVICE), None)
    assert count.dtype == torch.int64
    assert int(count.item()) == int((weight.abs() > threshold[:, None]).sum())


@TRITON
def test_linear_with_a_transposed_input():
    """A transposed view of x (stride along K != 1) reaches the kernels as it is."""
    weight, threshold = make_case((11, 37), torch.float32)
    x = torch.randn(37, 23).t()  # [23, 37] with strides (1, 23)
    assert not x.is_contiguous()
    weight, threshold = weight.to(TRITON_DEVICE), threshold.to(TRITON_DEVICE)
    xd = x.to(TRITON_DEVICE).requires_grad_(True)
    y = DF.dst_linear(xd, weight, threshold, backend="triton")
    (gx,) = torch.autograd.grad(y, (xd,), torch.ones_like(y))
    p = weight.double().cpu() * (weight.abs() > threshold[:, None]).cpu()
    assert_close_rel(y, x.double() @ p.t(), tol_for(torch.float32), "y")
    assert_close_rel(gx, torch.ones(23, 11, dtype=torch.float64) @ p, tol_for(torch.float32), "dx")


def test_gemm_grid_past_cuda_limit_is_a_clear_error():
    assert gemm_mod.programs(3, 5) == 15
    with pytest.raises(ValueError, match=r"needs 4294967296 Triton programs \(65536 x 65536 blocks\)"):
        gemm_mod.programs(65536, 65536)
