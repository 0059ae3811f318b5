"""Compile every Triton kernel of the backend for NVIDIA GPUs, without a GPU.

    python -m dst_kernels.triton.compile_check [--arch 80 90] [--all-configs]

Lowers each kernel through Triton's full pipeline (TTIR, TTGIR, LLVM IR, PTX,
cubin via ptxas) for the given compute capabilities, in float32, float16 and
bfloat16, for the largest autotune config (or all of them), and reports the
shared memory each needs. Exits 1 if any fails. Run it without
``TRITON_INTERPRET`` (the interpreter replaces the kernels).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys


def _kernels(all_configs: bool):
    import triton.language as tl

    gemm = importlib.import_module("dst_kernels.triton._gemm")
    runtime = importlib.import_module("dst_kernels.triton._runtime")
    linear = importlib.import_module("dst_kernels.triton.linear")
    mask = importlib.import_module("dst_kernels.triton.mask")
    weight_grad = importlib.import_module("dst_kernels.triton.weight_grad")
    conv = importlib.import_module("dst_kernels.triton.conv2d")
    configs = gemm.configs() if all_configs else gemm.configs()[:1]
    for dtype in ("fp32", "fp16", "bf16"):
        precision = "tf32" if dtype == "fp32" else "ieee"
        for cfg in configs:
            for kernel in (linear._fwd_kernel, linear._dx_kernel, linear._dw_kernel, conv._igemm_fwd_kernel):
                constexprs = dict(cfg.kwargs, PRECISION=precision, ACC=tl.float32)
                if "HAS_BIAS" in kernel.fn.arg_names:
                    constexprs["HAS_BIAS"] = True
                yield kernel.fn, dtype, constexprs
        blocks = dict(BR=runtime.BLOCK_R, BC=runtime.BLOCK_C)
        yield mask._mask_kernel, dtype, dict(WRITE=True, **blocks)
        yield weight_grad._weight_grad_kernel, dtype, dict(ACC=tl.float32, **blocks)
    yield mask._reset_kernel, "fp32", dict(BLOCK=1024)


def _signature(fn, dtype: str, constexprs: dict) -> dict:
    special = {"count_ptr": "*i32", "part_ptr": "*fp32"}
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = special.get(name, "*" + dtype)
        else:
            sig[name] = "i32"
    return sig


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m dst_kernels.triton.compile_check", description=__doc__.splitlines()[0]
    )
    p.add_argument(
        "--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities (80 = A100, 90 = H100)"
    )
    p.add_argument("--all-configs", action="store_true", help="every autotune config, not only the largest")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("compile_check: unset TRITON_INTERPRET (the interpreter replaces the kernels)", file=sys.stderr)
        return 2
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    failures = 0
    for arch in args.arch:
        for fn, dtype, constexprs in _kernels(args.all_configs):
            label = f"sm_{arch} {fn.__name__} {dtype} {constexprs}"
            try:
                src = ASTSource(fn=fn, signature=_signature(fn, dtype, constexprs), constexprs=constexprs)
                compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32))
                assert compiled.asm.get("cubin"), "no cubin produced"
                print(f"ok    {label}: {compiled.metadata.shared} B shared memory")
            except Exception as exc:  # report every failure, then fail
                failures += 1
                print(f"FAIL  {label}: {type(exc).__name__}: {exc}")
    print(f"compile_check: {failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
