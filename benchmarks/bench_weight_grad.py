"""Weight-gradient op family: dW and dt from dL/dP, fused against plain PyTorch."""

from benchmarks.common import run_case

OP = "weight_grad"


def test_weight_grad(benchmark, case, bench_records, bench_size):
    run_case(benchmark, case, bench_records, bench_size)
