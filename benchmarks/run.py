"""Run the benchmark cases and write ``results.json``, ``report.md`` and a chart.

    python -m benchmarks.run --size cpu [--ops linear] [--out bench-results]
    python -m benchmarks.run --compare OLD.json [--out bench-results]

``--size`` picks the case list: ``smoke`` (tiny, for the test suite), ``cpu`` (a
subset that finishes in minutes on 2 cores), ``gpu`` (the full set). With
``--compare``, every ours/dense ratio that got more than 10 % worse than in
OLD.json is listed and the exit status is 1.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch

from benchmarks.cases import cases_for
from benchmarks.harness import available_impls, measure
from benchmarks.report import compare, write_chart, write_report


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def _device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=["smoke", "cpu", "gpu"], default=None)
    p.add_argument("--ops", default=None, help="comma-separated op families (default: all)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--out", default="bench-results")
    p.add_argument("--compare", default=None, metavar="OLD.json")
    args = p.parse_args(argv)
    if args.compare and args.size is None and os.path.exists(os.path.join(args.out, "results.json")):
        with open(os.path.join(args.out, "results.json")) as f:
            new = json.load(f)
        return _report_compare(args.compare, new)
    size = args.size or ("gpu" if torch.cuda.is_available() else "cpu")
    device = "cuda" if size == "gpu" else "cpu"
    torch.set_num_threads(args.threads)
    ops = args.ops.split(",") if args.ops else None
    rounds = args.rounds or (3 if size == "smoke" else 9)
    inner = 1 if size == "smoke" else None
    records = []
    for case in cases_for(size, device, ops):
        impls = available_impls(case)
        print(
            f"bench: {case.op} {case.mode} {tuple(case.shape)} {case.dtype} on {device}: {impls}", flush=True
        )
        records += measure(case, impls, rounds=rounds, inner=inner or case_inner(case))
    results = {
        "device": _device_name(device),
        "torch": torch.__version__,
        "commit": _commit(),
        "records": records,
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    write_report(results, os.path.join(args.out, "report.md"))
    write_chart(results, os.path.join(args.out, "ratios.png"))
    print(open(os.path.join(args.out, "report.md")).read())
    if args.compare:
        return _report_compare(args.compare, results)
    return 0


def case_inner(case) -> int:
    """Iterations per timed sample: enough to get well above timer resolution."""
    if case.device == "cuda":
        return 20
    work = 1
    for s in case.shape:
        work *= s
    return max(1, min(20, int(2e8 // max(work, 1))))


def _report_compare(old_path: str, new: dict) -> int:
    with open(old_path) as f:
        old = json.load(f)
    worse = compare(old, new)
    for line in worse:
        print("worse:", line)
    if not worse:
        print("compare: no ratio got more than 10 % worse")
    return 1 if worse else 0


if __name__ == "__main__":
    sys.exit(main())
