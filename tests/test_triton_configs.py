"""``DST_KERNELS_TRITON_MAX_CONFIGS``: how many autotune configs the GEMM kernels keep."""

from __future__ import annotations

import importlib

import pytest

pytest.importorskip("triton", reason="the Triton backend needs triton")
linear_mod = importlib.import_module("dst_kernels.triton.linear")


@pytest.fixture
def compiled(monkeypatch):
    """Pretend the kernels are built for a GPU (the interpreter always keeps one config)."""
    monkeypatch.setattr(linear_mod, "interpreting", lambda: False)


def test_all_configs_when_unset(monkeypatch, compiled):
    monkeypatch.delenv("DST_KERNELS_TRITON_MAX_CONFIGS", raising=False)
    configs = linear_mod._configs()
    assert len(configs) == 6
    assert {c.kwargs["BK"] for c in configs} == {64, 128}


@pytest.mark.parametrize("n", [1, 2, 6, 100])
def test_first_n_configs(monkeypatch, compiled, n):
    monkeypatch.setenv("DST_KERNELS_TRITON_MAX_CONFIGS", str(n))
    assert len(linear_mod._configs()) == min(n, 6)
    first = linear_mod._configs()[0].kwargs
    assert (first["BM"], first["BN"], first["BK"]) == (128, 128, 64)


@pytest.mark.parametrize("bad", ["0", "-1", "two"])
def test_bad_value_is_a_clear_error(monkeypatch, compiled, bad):
    monkeypatch.setenv("DST_KERNELS_TRITON_MAX_CONFIGS", bad)
    with pytest.raises(ValueError, match="DST_KERNELS_TRITON_MAX_CONFIGS must be a positive integer"):
        linear_mod._configs()
