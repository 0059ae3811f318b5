"""The Triton kernels compile for sm_80 and sm_90 (to cubin), without a GPU."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton", reason="triton is not installed")


def test_triton_kernels_compile_for_sm80_and_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "dst_kernels.triton.compile_check", "--arch", "80", "90"],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "compile_check: 0 failure(s)" in out
    # 4 GEMM kernels (3 linear, the implicit-GEMM conv) + 2 elementwise kernels per dtype (3)
    # and arch (2), plus the reset kernel.
    assert out.count("\nok    ") + out.startswith("ok    ") == 2 * (3 * 6 + 1)
