"""Conv2d op family: DSTConv2d against nn.Conv2d, the paper's algorithm and a parametrize peer."""

from benchmarks.common import run_case

OP = "conv2d"


def test_conv2d(benchmark, case, bench_records, bench_size):
    run_case(benchmark, case, bench_records, bench_size)
