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
from benchmarks.baselines import IGemmConv2d, PaperConv2d, PaperLinear, fake_sparsity

# Implementations, in report order; "dense" is the denominator of every ratio.
IMPLS = (
    "dense",
    "dense-cl",
    "paper",
    "paper-sync",
    "ao-fakesparsity",
    "reference",
    "torch-sparse",
    "sparseprop",
    "sparseprop-on",
    "native-dense",
    "native-unfused",
    "native",
    "triton",
    "triton-igemm",
)
OURS = ("native", "triton", "triton-igemm")


@dataclass
class Case:
    op: str  # linear | conv2d | lstm | mask | weight_grad
    # linear: (tokens, in, out); conv2d: (N, C, H, W, out, k); lstm: (batch, steps, in, hidden);
    # mask, weight_grad: (rows, cols); sparse: a linear or conv2d step shape, or an inference
    # model's input (benchmarks/sparse_steps.py)
    shape: tuple
    dtype: torch.dtype
    mode: str  # forward | backward | step
    device: str
    density: float | None = None  # sparse family: the kept fraction the thresholds are set for

    @property
    def dtype_name(self) -> str:
        return dtype_name(self.dtype)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


LAYER_OPS = ("linear", "conv2d", "lstm")


def available_impls(case: Case) -> list[str]:
    if case.op == "sparse":
        from benchmarks.sparse_steps import sparse_impls

        return sparse_impls(case)
    if case.op == "lstm":
        names = ["dense", "reference"]
    elif case.op in ("mask", "weight_grad"):
        names = ["paper", "reference"]
    else:
        names = ["dense", "paper", "ao-fakesparsity", "reference"]
        if case.device == "cuda":
            names.insert(2, "paper-sync")
    backends = dst.available_backends(case.device)
    names += [b for b in OURS if b in backends]
    if case.op == "conv2d" and "triton" in backends:
        names.append("triton-igemm")
    return names


def _keep_tenth(weight: torch.Tensor) -> torch.Tensor:
    """Per-row thresholds that keep about 10 % of ``weight`` (a typical mid-training state)."""
    w = weight.detach().reshape(weight.shape[0], -1).abs().float()
    return torch.quantile(w, 0.9, dim=1).to(weight.dtype)


def _init_thresholds(layer: nn.Module) -> None:
    with torch.no_grad():
        for name, param in layer.named_parameters():
            if name.startswith("threshold"):
                param.copy_(_keep_tenth(getattr(layer, name.replace("threshold", "weight", 1))))


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
            "triton-igemm": lambda: IGemmConv2d(c, n, ks, padding=ks // 2, backend="triton", **kw),
        }
        dst_cls = lambda backend: dst.DSTConv2d(c, n, ks, padding=ks // 2, backend=backend, **kw)  # noqa: E731
    elif case.op == "lstm":
        _, _, n_in, hidden = case.shape
        make = {"dense": lambda: nn.LSTM(n_in, hidden, 2, batch_first=True, **kw)}
        dst_cls = lambda backend: dst.DSTLSTM(n_in, hidden, 2, batch_first=True, backend=backend, **kw)  # noqa: E731
    else:
        raise ValueError(f"unknown op {case.op!r}")
    torch.manual_seed(0)
    layer = make[impl]() if impl in make else dst_cls(impl)
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
    elif case.op == "lstm":
        shape = case.shape[:3]
    else:
        shape = case.shape[:4]
    x = torch.randn(shape, generator=g).to(case.device)
    if case.device == "cpu" or case.dtype == torch.float64:
        x = x.to(case.dtype)
    if case.op == "conv2d" and case.device == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def make_step(layer: nn.Module, x: torch.Tensor, case: Case) -> Callable[[], None]:
    """One call of the timed work for ``case.mode``.

    Backward and step time a layer inside a network: the gradients of all parameters and of
    the input ``x``.
    """
    autocast = case.device == "cuda" and case.dtype in (torch.float16, torch.bfloat16)
    wrt = [p for p in layer.parameters() if p.requires_grad]
    if case.mode != "forward":
        x = x.detach().requires_grad_(True)
        wrt.append(x)

    def forward():
        with torch.autocast(case.device, dtype=case.dtype, enabled=autocast):
            y = layer(x)
        return y[0] if isinstance(y, tuple) else y  # LSTM: (output, (h, c))

    if case.mode == "forward":

        def run():
            with torch.no_grad():
                forward()

        return run
    out = forward()
    grad = torch.randn_like(out)
    if case.mode == "backward":

        def run():  # the backward of one forward, kept alive across calls
            torch.autograd.grad(out, wrt, grad, retain_graph=True)

        return run

    def run():
        torch.autograd.grad(forward(), wrt, grad)

    return run


def _paper_mask(weight: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """The official code's forward: P = W * (|W| - t > 0), as separate elementwise ops."""
    return weight * ((weight.abs() - threshold.view(-1, 1)) > 0).to(weight.dtype)


def _paper_weight_grad(grad: torch.Tensor, weight: torch.Tensor, threshold: torch.Tensor):
    """The official code's backward of P = W * step(|W| - t) through its autograd function."""
    from benchmarks.baselines import _BinaryStep

    w = weight.detach().requires_grad_(True)
    t = threshold.detach().requires_grad_(True)
    p = w * _BinaryStep.apply(w.abs() - t.view(-1, 1))
    return torch.autograd.grad(p, (w, t), grad)


def op_target(impl: str, op: str) -> Callable:
    """The function that ``impl`` runs for the ``mask`` / ``weight_grad`` op family."""
    if impl == "paper":
        return _paper_mask if op == "mask" else _paper_weight_grad
    if impl == "reference":
        return dst.reference.masked_weight if op == "mask" else dst.reference.weight_grad
    if op == "mask":  # the backend's own implementation, below the dispatcher's checks
        from dst_kernels import functional as DF

        return DF._backend_impl(impl).masked_weight
    if impl == "native":
        return torch.ops.dst_kernels.dst_weight_grad
    if impl == "triton":
        import dst_kernels.triton  # noqa: F401  (registers the Triton ops)

        return torch.ops.dst_kernels.triton_weight_grad
    raise ValueError(f"no {op} implementation named {impl!r}")


def impl_target(impl: str, case: Case):
    """What ``impl`` resolves to for ``case``: the op function, or the layer's type and backend."""
    if case.op in ("mask", "weight_grad"):
        return op_target(impl, case.op)
    if case.op == "sparse":  # sparse_steps builds a distinct model or mode per name
        return ("sparse", case.mode, impl)
    layer = build_layer(impl, _tiny(case))
    return type(layer), getattr(layer, "backend", None), getattr(layer, "sync", None)


def _tiny(case: Case) -> Case:
    """``case`` with tiny shapes (for resolving what an implementation runs, not for timing)."""
    tiny = {"linear": (2, 3, 4), "conv2d": (1, 2, 5, 5, 3, 3), "lstm": (1, 2, 3, 4)}[case.op]
    return Case(case.op, tiny, case.dtype, case.mode, case.device)


def check_distinct(case: Case, impls: list[str]) -> None:
    """Every record must time the implementation it names: two names, one callable, is an error."""
    seen: dict = {}
    for impl in impls:
        target = impl_target(impl, case)
        if target in seen:
            raise RuntimeError(
                f"benchmark {case.op}: implementations {seen[target]!r} and {impl!r} both run {target}"
            )
        seen[target] = impl


def _op_step(impl: str, case: Case) -> Callable[[], None]:
    """The mask (forward) and weight_grad (backward) op families, outside any layer."""
    rows, cols = case.shape
    g = torch.Generator().manual_seed(0)
    weight = (torch.randn(rows, cols, generator=g) * 0.05).to(case.device, case.dtype)
    threshold = _keep_tenth(weight)
    grad = torch.randn(rows, cols, generator=g).to(case.device, case.dtype)
    fn = op_target(impl, case.op)
    if case.op == "mask":
        if impl in ("paper", "reference"):
            return lambda: fn(weight, threshold)
        return lambda: fn(weight, threshold, None)  # a backend's masked_weight: reset rule off
    return lambda: fn(grad, weight, threshold)  # dW and dt given dL/dP


def build_step(impl: str, case: Case) -> Callable[[], None]:
    """The timed callable of ``impl`` for ``case``."""
    if case.op in LAYER_OPS:
        return make_step(build_layer(impl, case), make_input(case), case)
    if case.op in ("mask", "weight_grad"):
        return _op_step(impl, case)
    if case.op == "sparse":
        from benchmarks.sparse_steps import build_sparse_step

        return build_sparse_step(impl, case)
    raise ValueError(f"unknown op {case.op!r}")


def count_host_syncs(step: Callable[[], None], device: str) -> int | None:
    """Host synchronisations in one call of ``step`` (CUDA only; None elsewhere)."""
    if device != "cuda":
        return None
    import warnings

    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


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


# CPU: calls per sample so that a sample lasts about this long (at most 20 calls).
CPU_SAMPLE_MS = 20.0


def _calibrated_inner(step: Callable[[], None], device: str) -> int:
    """Calls per timed sample for one implementation, from one timed call after warm-up."""
    if device == "cuda":
        return 20
    t0 = time.perf_counter()
    step()
    ms = (time.perf_counter() - t0) * 1e3
    return max(1, min(20, int(CPU_SAMPLE_MS / max(ms, 1e-3))))


def measure(
    case: Case, impls: list[str], rounds: int = 7, inner: int | None = None, warmup: int = 3
) -> list[dict]:
    """Interleaved medians for every implementation of ``case``: a record per implementation."""
    check_distinct(case, impls)
    steps, peaks, syncs, inners = {}, {}, {}, {}
    for impl in impls:
        if case.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        step = build_step(impl, case)
        for _ in range(warmup):
            step()
        if case.device == "cuda":
            torch.cuda.synchronize()
            peaks[impl] = torch.cuda.max_memory_allocated()
        syncs[impl] = count_host_syncs(step, case.device)
        steps[impl] = step
        inners[impl] = inner or _calibrated_inner(step, case.device)
    timed = _timer(case.device)
    samples: dict[str, list[float]] = {impl: [] for impl in impls}
    for r in range(rounds):
        order = impls[r % len(impls) :] + impls[: r % len(impls)]
        for impl in order:
            samples[impl].append(timed(steps[impl], inners[impl]))
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
                "density": case.density,
                "median_ms": statistics.median(s),
                "iqr_ms": q[2] - q[0],
                "peak_mem_bytes": peaks.get(impl),
                "host_syncs": syncs.get(impl),
            }
        )
    return records
