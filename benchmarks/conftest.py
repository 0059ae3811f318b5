"""pytest-benchmark configuration: machine size, and the report written at the end.

    pytest benchmarks [--bench-size smoke|cpu|cpu-full|gpu-quick|gpu] [--bench-out bench-results]

Each benchmark test measures every implementation of one case, interleaved (see
harness.py), and also hands the fastest of ours to pytest-benchmark's own timer.
At the end of the session the interleaved records are written as
``results.json``, ``report.md`` and ``ratios.png`` in ``--bench-out``.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.cases import SIZES, cases_for, device_for
from benchmarks.run import write_results

_RECORDS: list[dict] = []


def pytest_addoption(parser):
    group = parser.getgroup("dst_kernels benchmarks")
    group.addoption("--bench-size", choices=SIZES, default=None)
    group.addoption("--bench-out", default="bench-results")
    group.addoption("--bench-threads", type=int, default=2)


def _size(config) -> str:
    return config.getoption("--bench-size") or ("gpu" if torch.cuda.is_available() else "cpu")


def pytest_configure(config):
    torch.set_num_threads(config.getoption("--bench-threads"))


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        op = metafunc.module.OP
        size = _size(metafunc.config)
        cases = cases_for(size, device_for(size), [op])
        ids = [f"{c.mode}-{c.dtype_name}-{'x'.join(map(str, c.shape))}" for c in cases]
        metafunc.parametrize("case", cases, ids=ids)


@pytest.fixture
def bench_size(request) -> str:
    return _size(request.config)


@pytest.fixture
def bench_records() -> list[dict]:
    return _RECORDS


def pytest_sessionfinish(session, exitstatus):
    if _RECORDS:
        size = _size(session.config)
        write_results(_RECORDS, session.config.getoption("--bench-out"), device_for(size))
