"""Autotune configs of the GEMM kernels: pruned to what fits in shared memory, then capped by
``DST_KERNELS_TRITON_MAX_CONFIGS`` (so a capped run never keeps a config that cannot launch)."""

from __future__ import annotations

import importlib

import pytest
import torch

pytest.importorskip("triton", reason="the Triton backend needs triton")
gemm_mod = importlib.import_module("dst_kernels.triton._gemm")
H100_SMEM = 232448  # shared_memory_per_block_optin of an H100


@pytest.fixture
def compiled(monkeypatch):
    """Pretend the kernels are built for a GPU (the interpreter always keeps one config)."""
    monkeypatch.setattr(gemm_mod, "interpreting", lambda: False)
    return gemm_mod.configs()


def _args(dtype):
    t = torch.empty(1, dtype=dtype)
    return {"x_ptr": t, "w_ptr": t, "y_ptr": t, "M": 1}


def _blocks(cfg):
    return cfg.kwargs["BM"], cfg.kwargs["BN"], cfg.kwargs["BK"]


def test_all_fitting_configs_when_unset(monkeypatch, compiled):
    monkeypatch.delenv("DST_KERNELS_TRITON_MAX_CONFIGS", raising=False)
    monkeypatch.setattr(gemm_mod, "_shared_memory_limit", lambda: 1 << 30)
    assert len(compiled) == 7
    assert gemm_mod.prune(compiled, _args(torch.float32)) == compiled


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_the_cap_applies_after_the_fit(monkeypatch, compiled, dtype):
    monkeypatch.setattr(gemm_mod, "_shared_memory_limit", lambda: H100_SMEM)
    elem = torch.empty(0, dtype=dtype).element_size()
    fitting = [c for c in compiled if gemm_mod._footprint(c, elem) <= H100_SMEM]
    assert fitting, "some config fits every dtype on an H100"
    for n in (1, 2, 100):
        monkeypatch.setenv("DST_KERNELS_TRITON_MAX_CONFIGS", str(n))
        kept = gemm_mod.prune(compiled, _args(dtype))
        assert kept == fitting[:n]
        assert all(gemm_mod._footprint(c, elem) <= H100_SMEM for c in kept)
    if dtype == torch.float32:  # 128x128x64 in 3 stages needs 288 KiB of fp32 tiles
        assert _blocks(fitting[0]) != (128, 128, 64)


def test_nothing_fits_keeps_the_smallest(monkeypatch, compiled):
    monkeypatch.setattr(gemm_mod, "_shared_memory_limit", lambda: 1024)
    monkeypatch.delenv("DST_KERNELS_TRITON_MAX_CONFIGS", raising=False)
    (kept,) = gemm_mod.prune(compiled, _args(torch.float32))
    assert _blocks(kept) == (32, 32, 32)


@pytest.mark.parametrize("bad", ["0", "-1", "two"])
def test_bad_value_is_a_clear_error(monkeypatch, compiled, bad):
    monkeypatch.setenv("DST_KERNELS_TRITON_MAX_CONFIGS", bad)
    with pytest.raises(ValueError, match="DST_KERNELS_TRITON_MAX_CONFIGS must be a positive integer"):
        gemm_mod.prune(compiled, _args(torch.float32))
