"""Linear op family: DSTLinear against nn.Linear, the paper's algorithm and a parametrize peer."""

from benchmarks.common import run_case

OP = "linear"


def test_linear(benchmark, case, bench_records, bench_size):
    run_case(benchmark, case, bench_records, bench_size)
