"""Count the Triton kernel specializations a test run asks for, without a GPU.

    TRITON_INTERPRET=1 python3 -m pytest tests -m cuda -p benchmarks.triton_compiles

A pytest plugin: under the Triton interpreter it records every kernel launch with the key a
GPU run would compile it under (the kernel, each tensor's dtype and 16-byte alignment, each
integer's ``== 1`` / ``% 16 == 0`` / int64 class, the constexpr values other than the
autotuned block sizes) and prints the number of distinct keys at the end. On a GPU each key is
compiled once per autotune config kept (``DST_KERNELS_TRITON_MAX_CONFIGS``); this is the
estimate written at the top of ``benchmarks/gpu_round.sh``.
"""

from __future__ import annotations

import collections

_TUNED = {"BM", "BN", "BK"}
_KEYS: set[tuple] = set()


def _arg_key(value):
    if hasattr(value, "data_ptr") and hasattr(value, "dtype"):
        return ("tensor", str(value.dtype), value.data_ptr() % 16 == 0)
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, int):
        return ("int", value == 1, value % 16 == 0, abs(value) >= 2**31)
    if isinstance(value, float):
        return ("float",)
    if value is None:
        return None
    return ("const", repr(value))


def _install() -> bool:
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:
        return False
    original = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        key = (
            self.fn.__name__,
            tuple(_arg_key(a) for a in args),
            tuple(sorted((k, _arg_key(v)) for k, v in kwargs.items() if k not in _TUNED)),
        )
        _KEYS.add(key)
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = run
    return True


def pytest_configure(config):
    config._triton_compiles = _install()


def pytest_terminal_summary(terminalreporter):
    if not getattr(terminalreporter.config, "_triton_compiles", False):
        terminalreporter.write_line("triton specializations: triton is not installed")
        return
    per_kernel = collections.Counter(key[0] for key in _KEYS)
    detail = ", ".join(f"{name} {n}" for name, n in sorted(per_kernel.items()))
    terminalreporter.write_line(f"triton specializations: {len(_KEYS)} ({detail})")
