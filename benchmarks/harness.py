"""Interleaved timing of several implementations of one benchmark case.

Every implementation of a case runs in the same process, round after round, in a
rotating order, so machine drift lands on all of them alike; the figures kept are
medians (and inter-quartile ranges) of per-iteration times. CUDA is timed with
events after warm-up; peak memory is ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

import dst_kernels as dst
from benchmarks.baselines import PaperConv2d, PaperLinear, fake_sparsity

# Implementations, in report order; "dense" is the denominator of every ratio.
IMPLS = ("dense", "paper", "paper-sync", "ao-fakesparsity", "reference", "native", "triton")
OURS = ("native", "triton")


@dataclass
class Case:
    op: str  # linear | conv2d | lstm | mask | weight_grad
    shape: tuple  # linear: (tokens, in, out); conv2d: (N, C, H, W, out, k)
    dtype: torch.dtype
    mode: str  # forward | backward | step
    device: str

    @property
    def dtype_name(self) -> str:
        return dtype_name(self.dtype)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def available_impls(case: Case) -> list[str]:
    names = ["dense", "paper", "ao-fakesparsity", "reference"]
    if case.device == "cuda":
        names.insert(2, "paper-sync")
    backends = dst.available_backends(case.device)
    names += [b for b in OURS if b in backends]
    return names


def _init_thresholds(layer: nn.Module) -> None:
    """Thresholds that keep about 10 % of the weights (a typical mid-training state)."""
    with torch.no_grad():
        w = layer.weight.reshape(layer.weight.shape[0], -1).abs().float()
        layer.threshold.copy_(torch.quantile(w, 0.9, dim=1).to(layer.threshold.dtype))


def build_layer(impl: str, case: Case) -> nn.Module:
    kw = dict(device=case.device, dtype=torch.float32 if case.dtype != torch.float64 else case.dtype)
    if case.op == "linear":
        _, k, n = case.shape
        make = {
            "dense": lambda: nn.Linear(k, n, **kw),
            "paper": lambda: PaperLinear(k, n, sync=False, **kw),
            "paper-sync": lambda: PaperLinear(k, n, sync=True, **kw),
            "ao-fakesparsity": lambda: fake_sparsity(nn.Linear(k, n, **kw)),
        }
        dst_cls = lambda backend: dst.DSTLinear(k, n, backend=backend, **kw)  # noqa: E731
    elif case.op == "conv2d":
        _, c, _, _, n, ks = case.shape
        make = {
            "dense": lambda: nn.Conv2d(c, n, ks, padding=ks // 2, **kw),
            "paper": lambda: PaperConv2d(c, n, ks, padding=ks // 2, sync=False, **kw),
            "paper-sync": lambda: PaperConv2d(c, n, ks, padding=ks // 2, sync=True, **kw),
            "ao-fakesparsity": lambda: fake_sparsity(nn.Conv2d(c, n, ks, padding=ks // 2, **kw)),
        }
        dst_cls = lambda backend: dst.DSTConv2d(c, n, ks, padding=ks // 2, backend=backend, **kw)  # noqa: E731
    else:
        raise ValueError(f"unknown op {case.op!r}")
    torch.manual_seed(0)
    layer = make[impl]() if impl in make else dst_cls(impl)
    if hasattr(layer, "threshold"):
        _init_thresholds(layer)
    if case.dtype in (torch.float16, torch.bfloat16) and case.device == "cpu":
        layer.to(case.dtype)  # CPU low precision: the whole layer in that dtype
    if case.op == "conv2d" and case.device == "cuda":
        layer.to(memory_format=torch.channels_last)
    return layer.train()


def make_input(case: Case) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(1)
    if case.op == "linear":
        shape = (case.shape[0], case.shape[1])
    else:
        shape = case.shape[:4]
    x = torch.randn(shape, generator=g).to(case.device)
    if case.device == "cpu" or case.dtype == torch.float64:
        x = x.to(case.dtype)
    if case.op == "conv2d" and case.device == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def make_step(layer: nn.Module, x: torch.Tensor, case: Case) -> Callable[[], None]:
    """One call of the timed work for ``case.mode``."""
    autocast = case.device == "cuda" and case.dtype in (torch.float16, torch.bfloat16)
    params = [p for p in layer.parameters() if p.requires_grad]

    def forward():
        with torch.autocast(case.device, dtype=case.dtype, enabled=autocast):
            return layer(x)

    if case.mode == "forward":

        def run():
            with torch.no_grad():
                forward()

        return run
    out = forward()
    grad = torch.randn_like(out)
    if case.mode == "backward":

        def run():  # the backward of one forward, kept alive across calls
            torch.autograd.grad(out, params, grad, retain_graph=True)

        return run

    def run():
        torch.autograd.grad(forward(), params, grad)

    return run


def _timer(device: str):
    if device == "cuda":

        def timed(fn, inner):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / inner

        return timed

    def timed(fn, inner):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        return (time.perf_counter() - t0) * 1e3 / inner

    return timed


def default_inner(case: Case) -> int:
    """Calls per timed sample: enough to sit well above the timer's resolution."""
    if case.device == "cuda":
        return 20
    work = 1
    for s in case.shape:
        work *= s
    return max(1, min(20, int(2e8 // max(work, 1))))


def measure(
    case: Case, impls: list[str], rounds: int = 7, inner: int | None = None, warmup: int = 3
) -> list[dict]:
    """Interleaved medians for every implementation of ``case``: a record per implementation."""
    inner = inner or default_inner(case)
    x = make_input(case)
    steps, peaks = {}, {}
    for impl in impls:
        layer = build_layer(impl, case)
        if case.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        step = make_step(layer, x, case)
        for _ in range(warmup):
            step()
        if case.device == "cuda":
            torch.cuda.synchronize()
            peaks[impl] = torch.cuda.max_memory_allocated()
        steps[impl] = step
    timed = _timer(case.device)
    samples: dict[str, list[float]] = {impl: [] for impl in impls}
    for r in range(rounds):
        order = impls[r % len(impls) :] + impls[: r % len(impls)]
        for impl in order:
            samples[impl].append(timed(steps[impl], inner))
    records = []
    for impl in impls:
        s = sorted(samples[impl])
        q = statistics.quantiles(s, n=4) if len(s) >= 2 else [s[0], s[0], s[0]]
        records.append(
            {
                "op": case.op,
                "impl": impl,
                "shape": list(case.shape),
                "dtype": dtype_name(case.dtype),
                "mode": case.mode,
                "median_ms": statistics.median(s),
                "iqr_ms": q[2] - q[0],
                "peak_mem_bytes": peaks.get(impl),
            }
        )
    return records
