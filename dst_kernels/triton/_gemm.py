"""What the Triton GEMM kernels share (linear and conv2d): autotune configs pruned by shared
memory, grid limits, accumulator type and fp32 input precision."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from dst_kernels.triton._runtime import interpreting

__all__ = ["acc_type", "check_gemm_sizes", "configs", "precision", "programs", "prune"]


def _shared_memory_limit() -> int:
    if not torch.cuda.is_available():
        return 1 << 30
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return int(getattr(props, "shared_memory_per_block_optin", 0) or 99 * 1024)


def _footprint(cfg, elem: int) -> int:
    """Shared memory of a config's pipelined operand tiles (bytes), for whichever of the three
    GEMM kernels streams the largest pair."""
    m, n, k = cfg.kwargs["BM"], cfg.kwargs["BN"], cfg.kwargs["BK"]
    return max(m * k + n * k, m * n + n * k, m * n + m * k) * elem * max(cfg.num_stages, 1)


def prune(configs, named_args, **kwargs):
    """The configs whose tiles fit in shared memory (else the smallest one), then the first
    ``DST_KERNELS_TRITON_MAX_CONFIGS`` of them: capping after the fit keeps a capped run from
    picking a config that cannot launch."""
    elem = max(
        named_args[name].element_size()
        for name in named_args
        if name.endswith("_ptr") and hasattr(named_args[name], "element_size")
    )
    limit = _shared_memory_limit()
    kept = [cfg for cfg in configs if _footprint(cfg, elem) <= limit]
    if not kept:
        kept = [min(configs, key=lambda cfg: _footprint(cfg, elem))]
    return kept[: _max_configs()]


def _max_configs() -> int:
    """``DST_KERNELS_TRITON_MAX_CONFIGS=N`` autotunes over the first N configs that fit (the tests
    use 1: on a GPU every config is compiled for every specialization); unset: all of them."""
    value = os.environ.get("DST_KERNELS_TRITON_MAX_CONFIGS", "")
    if not value:
        return 1 << 30
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"DST_KERNELS_TRITON_MAX_CONFIGS must be a positive integer, got {value!r}")
    return int(value)


def configs():
    if interpreting():  # the interpreter cannot benchmark: one config
        return [triton.Config({"BM": 16, "BN": 16, "BK": 16}, num_warps=4)]
    # Largest tiles first: the order in which DST_KERNELS_TRITON_MAX_CONFIGS keeps them. The
    # last one fits float64 tiles (8-byte elements) in an H100's 227 KiB.
    return [
        triton.Config({"BM": bm, "BN": bn, "BK": bk}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in [
            (128, 128, 64, 8, 3),
            (128, 64, 64, 4, 4),
            (64, 128, 64, 4, 4),
            (64, 64, 64, 4, 4),
            (32, 64, 64, 4, 4),
            (16, 64, 128, 4, 4),
            (32, 32, 32, 4, 2),
        ]
    ]


def check_gemm_sizes(m: int, n: int, k: int) -> None:
    """The kernels index rows and columns with int32 program offsets (element offsets are int64)."""
    for name, v in (("rows of x (batch)", m), ("out_features", n), ("in_features", k)):
        if v >= 2**31 - 256:
            raise ValueError(
                f"the triton linear supports {name} < 2**31 - 256, got {v}; use backend='native'"
            )


def programs(*blocks: int) -> int:
    """Programs of a 1-D grid over all block combinations; CUDA's grid x stops at 2**31 - 1."""
    total = 1
    for b in blocks:
        total *= b
    if total > 2**31 - 1:
        raise ValueError(
            f"this GEMM needs {total} Triton programs ({' x '.join(map(str, blocks))} blocks), more "
            f"than a CUDA grid holds; use backend='native'"
        )
    return total


def acc_type(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def precision(dtype: torch.dtype, conv: bool = False) -> str:
    """``tl.dot``'s input precision: TF32 for float32 exactly where PyTorch's own kernel would use
    it (cuBLAS: ``torch.backends.cuda.matmul.allow_tf32``, i.e. ``set_float32_matmul_precision``;
    cuDNN convolutions: ``torch.backends.cudnn.allow_tf32``), so every backend follows the same
    switches. The interpreter computes in full precision."""
    if dtype != torch.float32 or interpreting():
        return "ieee"
    allowed = torch.backends.cudnn.allow_tf32 if conv else torch.backends.cuda.matmul.allow_tf32
    return "tf32" if allowed else "ieee"
