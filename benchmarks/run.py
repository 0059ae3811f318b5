"""Run the benchmark cases and write ``results.json``, ``report.md`` and a chart.

    python -m benchmarks.run --size cpu [--ops linear] [--runs 3] [--out bench-results]
    python -m benchmarks.run --compare OLD.json [--out bench-results]

``--size`` picks the case list (``benchmarks/cases.py``): ``smoke``, ``cpu``,
``cpu-full``, ``gpu-quick`` or ``gpu``. ``--runs N`` measures the whole list N times, one
run after the other; the report gives each ratio's median over the runs and its min-max
(a figure holds "on every run" when its worst run meets it). ``results.json`` records the
machine: CPU model and ISA flags, threads, the load average before and after each run,
and the instruction set of the project's CPU kernels. With ``--compare``, every ours/dense
ratio that got more than 10 % worse than in OLD.json is listed and the exit status is 1.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch

from benchmarks.cases import SIZES, cases_for, device_for
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


# The CPU flags that decide which kernels run (ATen's, oneDNN's and the project's).
_ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")


def machine() -> dict:
    """CPU model, its ISA flags, core and thread counts, and the kernels' instruction sets."""
    import platform

    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    from dst_kernels import _ops

    return {
        "cpu": model,
        "isa_flags": [f for f in _ISA_FLAGS if f in flags],
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "dst_cpu_isa": _ops.cpu_isa(),
        "load_average_1min": round(os.getloadavg()[0], 2),
    }


def write_results(records: list[dict], out: str, device: str, runs: list[dict] | None = None) -> dict:
    """``results.json`` (the suite's schema), ``report.md`` and ``ratios.png`` in ``out``."""
    results = {
        "device": _device_name(device),
        "torch": torch.__version__,
        "commit": _commit(),
        "machine": machine(),
        "runs": runs or [],
        "records": records,
    }
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    write_report(results, os.path.join(out, "report.md"))
    write_chart(results, os.path.join(out, "ratios.png"))
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=SIZES, default=None)
    p.add_argument("--ops", default=None, help="comma-separated op families (default: all)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--runs", type=int, default=1, help="measure the whole case list this many times")
    p.add_argument("--out", default="bench-results")
    p.add_argument("--compare", default=None, metavar="OLD.json", help="flag ratios >10%% worse than OLD")
    p.add_argument(
        "--no-run", action="store_true", help="with --compare: compare OUT/results.json, run nothing"
    )
    p.add_argument("--list", action="store_true", help="print the cases and implementations, run nothing")
    args = p.parse_args(argv)
    if args.list:
        size = args.size or ("gpu" if torch.cuda.is_available() else "cpu")
        ops = args.ops.split(",") if args.ops else None
        cases = cases_for(size, device_for(size), ops)
        for case in cases:
            density = f" density {case.density:g}" if case.density is not None else ""
            print(f"{case.op} {case.mode} {'x'.join(map(str, case.shape))} {case.dtype_name}{density}")
        print(f"{len(cases)} cases at size {size!r}")
        return 0
    if args.no_run:
        if not args.compare:
            p.error("--no-run needs --compare")
        with open(os.path.join(args.out, "results.json")) as f:
            return _report_compare(args.compare, json.load(f))
    size = args.size or ("gpu" if torch.cuda.is_available() else "cpu")
    device = device_for(size)
    torch.set_num_threads(args.threads)
    ops = args.ops.split(",") if args.ops else None
    rounds = args.rounds or (3 if size == "smoke" else 9)
    if args.runs < 1:
        p.error("--runs must be >= 1")
    records, runs = [], []
    for run in range(args.runs):
        load_before = round(os.getloadavg()[0], 2)
        for case in cases_for(size, device, ops):
            impls = available_impls(case)
            print(
                f"bench: run {run + 1}/{args.runs}: {case.op} {case.mode} {tuple(case.shape)} "
                f"{case.dtype_name} on {device}: {impls}",
                flush=True,
            )
            for r in measure(case, impls, rounds=rounds, inner=1 if size == "smoke" else None):
                records.append({**r, "run": run})
        runs.append({"run": run, "load_before": load_before, "load_after": round(os.getloadavg()[0], 2)})
    results = write_results(records, args.out, device, runs)
    print(open(os.path.join(args.out, "report.md")).read())
    if args.compare:
        return _report_compare(args.compare, results)
    return 0


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
