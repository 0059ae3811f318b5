"""The body shared by every benchmark test: interleaved records plus pytest-benchmark timing."""

from __future__ import annotations

from benchmarks.harness import OURS, available_impls, build_step, measure


def run_case(benchmark, case, records: list[dict], size: str) -> None:
    impls = available_impls(case)
    rounds = 3 if size == "smoke" else 9
    inner = 1 if size == "smoke" else None
    found = measure(case, impls, rounds=rounds, inner=inner)
    records.extend(found)
    by_impl = {r["impl"]: r for r in found}
    ours = next((i for i in OURS if i in impls), "reference")
    step = build_step(ours, case)
    benchmark.extra_info.update(impl=ours, **{f"{i}_median_ms": r["median_ms"] for i, r in by_impl.items()})
    if "dense" in by_impl:
        benchmark.extra_info[f"{ours}/dense"] = by_impl[ours]["median_ms"] / by_impl["dense"]["median_ms"]
    # pytest-benchmark's own timing of ours: a few rounds (the interleaved records are the figures).
    benchmark.pedantic(step, rounds=3, iterations=1, warmup_rounds=1)
