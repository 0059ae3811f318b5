"""LSTM op family: DSTLSTM against nn.LSTM (cuDNN on GPU) and the reference backend."""

from benchmarks.common import run_case

OP = "lstm"


def test_lstm(benchmark, case, bench_records, bench_size):
    run_case(benchmark, case, bench_records, bench_size)
