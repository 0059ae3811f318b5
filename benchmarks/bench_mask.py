"""Mask op family: P = W * (|W| > t) (and its count), fused against plain PyTorch."""

from benchmarks.common import run_case

OP = "mask"


def test_mask(benchmark, case, bench_records, bench_size):
    run_case(benchmark, case, bench_records, bench_size)
