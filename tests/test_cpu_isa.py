"""DST_KERNELS_CPU_ISA: every variant of the CPU row kernels computes the same function.

The row kernels (mask, weight gradient, CSR compression and product) are compiled for
AVX-512, AVX2 and the baseline x86-64 instruction set; the environment variable picks
one at the first call (csrc/include/dst/cpu_isa.h). Each variant runs in its own process
here and is compared with the float64 re-derivation: masks exactly, values within the
tolerances of docs/maths.md section 4. ``.ci/run`` runs the whole suite a second time with ``portable``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import assert_close_rel, rederive, row_length, tol_for

from dst_kernels import _ops

pytestmark = pytest.mark.skipif(not _ops.has_op("cpu_isa"), reason="the native extension is not built")

# Odd shapes: one row, primes, rows shorter and longer than a vector, a partial last chunk of 16.
SHAPES = [(1, 1), (3, 7), (17, 31), (64, 33), (5, 257)]

_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    import dst_kernels  # noqa: F401
    from dst_kernels import _ops
    ops = torch.ops.dst_kernels
    out = {"isa": _ops.cpu_isa(), "cases": []}
    for rows, cols in SHAPES:
        for dtype in (torch.float32, torch.float64):
            g = torch.Generator().manual_seed(rows * 1000 + cols)
            w = torch.randn(rows, cols, generator=g, dtype=dtype)
            t = (torch.rand(rows, generator=g, dtype=dtype) * 1.5).to(dtype)
            w[0, 0] = t[0]  # a tie: masked out
            grad = torch.randn(rows, cols, generator=g, dtype=dtype)
            p, _ = ops.dst_mask(w, t, None)
            dw, dt = ops.dst_weight_grad(grad, w, t)
            crow, col, val = ops.dst_sparse_mask(w, t)
            x = torch.randn(9, cols, generator=g, dtype=dtype)
            y = ops.dst_sparse_mm(x, crow, col, val, None)
            y1 = ops.dst_sparse_mm(x[:1].contiguous(), crow, col, val, None)
            # 67 rows: whole 16-token blocks of the tile's transposed store and a tail.
            x67 = torch.randn(67, cols, generator=g, dtype=dtype)
            b = torch.randn(rows, generator=g, dtype=dtype)
            y67 = ops.dst_sparse_mm(x67, crow, col, val, b, True)
            case = dict(w=w, t=t, grad=grad, p=p, dw=dw, dt=dt, x=x, y=y, y1=y1, nnz=val.numel(),
                        x67=x67, b=b, y67=y67)
            out["cases"].append(case)
    # The sparse convolution's fused ReLU and 2 x 2 max pool (a NaN included; odd output
    # sizes: the pool drops the last row and column), beside the same convolution unfused.
    g = torch.Generator().manual_seed(7)
    w = torch.randn(5, 4, 3, 3, generator=g)
    crow, col, val = ops.dst_sparse_mask(w, torch.full((5,), 0.8))
    xc = torch.randn(3, 4, 13, 26, generator=g)
    xc[1, 2, 5, 7] = float("nan")
    b = torch.randn(5, generator=g)
    conv = (xc, crow, col, val, b, [3, 3], [1, 1], [0, 0], [1, 1])
    out["pool"] = (ops.dst_sparse_conv2d(*conv, True, [2, 2], [2, 2]),
                   torch.nn.functional.max_pool2d(torch.relu(ops.dst_sparse_conv2d(*conv)), 2))
    torch.save(out, sys.argv[1])
    """
)


def _run(isa: str, tmp_path) -> dict:
    path = tmp_path / f"{isa}.pt"
    env = dict(os.environ, DST_KERNELS_CPU_ISA=isa, DST_KERNELS_QUIET="1")
    proc = subprocess.run(
        [sys.executable, "-c", f"SHAPES = {SHAPES!r}\n{_SCRIPT}", str(path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return torch.load(path)


@pytest.mark.parametrize("isa", ["portable", "avx2", "avx512"])
def test_every_variant_matches_the_reference(isa, tmp_path):
    out = _run(isa, tmp_path)
    # The variant asked for, or the best this CPU has below it.
    order = ["portable", "avx2", "avx512"]
    assert order.index(out["isa"]) <= order.index(isa)
    if isa == "portable":
        assert out["isa"] == "portable"
    for case in out["cases"]:
        w, t, grad = case["w"], case["t"], case["grad"]
        dtype = w.dtype
        mask = w.abs() > t[:, None]
        assert torch.equal(case["p"] != 0, mask & (w != 0))
        assert torch.equal(case["p"], w * mask)
        assert case["nnz"] == int(mask.sum())
        p, gw, gt = rederive(w, t, grad)
        tol = tol_for(dtype)
        assert_close_rel(case["dw"], gw.to(dtype), tol, "dW")
        assert_close_rel(case["dt"], gt.to(dtype), tol * row_length(w), "dt")
        y = case["x"].double() @ p.T
        assert_close_rel(case["y"], y.to(dtype), tol, "sparse_mm")
        assert_close_rel(case["y1"], y[:1].to(dtype), tol, "sparse_mm, one row")
        y67 = torch.relu(case["x67"].double() @ p.T + case["b"].double())
        assert_close_rel(case["y67"], y67.to(dtype), tol, "sparse_mm, 67 rows, bias and ReLU")
    fused, unfused = out["pool"]
    assert fused.isnan().any()
    torch.testing.assert_close(fused, unfused, rtol=0, atol=0, equal_nan=True)


def test_variants_agree_with_each_other(tmp_path):
    """The mask pass and the CSR are bit-identical across variants (a compare and a copy);
    sums may differ in their last bits (the vector width sets the reduction order). The
    product of several rows sums every token lane in one order in each variant, so it is
    bit-identical (the AVX-512 variant's transposed store included)."""
    runs = [_run(isa, tmp_path) for isa in ("portable", "avx2", "avx512")]
    for a, b, c in zip(*(r["cases"] for r in runs)):
        assert torch.equal(a["p"], c["p"]) and a["nnz"] == c["nnz"]
        assert_close_rel(a["dw"], c["dw"], tol_for(a["w"].dtype), "dW")
        for key in ("y", "y67"):
            assert torch.equal(a[key], b[key]) and torch.equal(a[key], c[key]), key


def test_an_unknown_value_is_refused_at_import():
    env = dict(os.environ, DST_KERNELS_CPU_ISA="sse9")
    proc = subprocess.run(
        [sys.executable, "-c", "import dst_kernels"], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode != 0
    assert "DST_KERNELS_CPU_ISA must be one of auto, avx512, avx2, portable; got 'sse9'" in proc.stderr


def test_this_process_reports_its_variant():
    isa = _ops.cpu_isa()
    assert isa in ("portable", "avx2", "avx512")
    if os.environ.get("DST_KERNELS_CPU_ISA") == "portable":
        assert isa == "portable"
    assert torch.ops.dst_kernels.cpu_isa() == isa
