"""Repeated runs of some of the sparse family's cases: each case's implementations interleaved
(rotating order), medians per run, the whole list measured ``--runs`` times. It builds the same
callables as ``bench_sparse.py`` (``benchmarks.sparse_steps``).

    python -m benchmarks.sparse_runs --select lstm --runs 3 --out results.json
    python -m benchmarks.sparse_runs --select linear --runs 3
    python -m benchmarks.sparse_runs --select lenet300 --runs 3 --inner suite

A sample is one call by default (each call follows another implementation's); ``--inner
suite`` times samples of consecutive calls calibrated as the suite's harness does.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from benchmarks.cases import cases_for
from benchmarks.harness import _calibrated_inner
from benchmarks.sparse_steps import build_sparse_step, is_conv, is_lstm, sparse_impls

SELECT = {
    "lstm": lambda c: is_lstm(c),
    "lenet300": lambda c: c.mode == "forward" and tuple(c.shape[1:]) == (784, 300, 100),
    "linear": lambda c: c.mode != "forward" and len(c.shape) == 3,  # DSTLinear steps
    "conv": lambda c: c.mode != "forward" and is_conv(c),  # DSTConv2d steps
    "conv-inference": lambda c: c.mode == "forward" and is_conv(c),  # LeNet-5, VGG-16
}


def measure(case, rounds: int, inner: int | None = 1) -> dict[str, float]:
    """Interleaved medians (ms per call) of the case's implementations. A sample is ``inner``
    consecutive calls of one implementation; None calibrates it per implementation as the
    suite's harness does (``make bench``: about 20 ms per sample, at most 20 calls). With one
    call per sample every call follows another implementation's."""
    impls = sparse_impls(case)
    steps = {i: build_sparse_step(i, case) for i in impls}
    for step in steps.values():
        for _ in range(3):
            step()
    inners = {i: inner or _calibrated_inner(steps[i], "cpu") for i in impls}
    samples: dict[str, list[float]] = {i: [] for i in impls}
    for r in range(rounds):
        for i in impls[r % len(impls) :] + impls[: r % len(impls)]:
            t0 = time.perf_counter()
            for _ in range(inners[i]):
                steps[i]()
            samples[i].append((time.perf_counter() - t0) * 1e3 / inners[i])
    return {i: statistics.median(v) for i, v in samples.items()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--select", default="lstm,lenet300", help=f"comma-separated, of {sorted(SELECT)}")
    p.add_argument("--size", default="cpu")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--rounds", type=int, default=11)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--inner",
        default="1",
        help="calls per sample: a number, or 'suite' for the harness's calibration (make bench)",
    )
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.inner != "suite" and not (args.inner.isdigit() and int(args.inner) > 0):
        p.error(f"--inner must be a positive number or 'suite', got {args.inner!r}")
    inner = None if args.inner == "suite" else int(args.inner)
    torch.set_num_threads(args.threads)
    chosen = [SELECT[s] for s in args.select.split(",")]
    cases = [c for c in cases_for(args.size, "cpu", ["sparse"]) if any(f(c) for f in chosen)]
    records = []
    for run in range(args.runs):
        for case in cases:
            ms = measure(case, args.rounds, inner)
            rec = {
                "run": run,
                "shape": list(case.shape),
                "mode": case.mode,
                "density": case.density,
                "ms": ms,
            }
            rec["native/dense"] = ms["native"] / ms["dense"]
            if "sparseprop" in ms:
                rec["native/sparseprop"] = ms["native"] / ms["sparseprop"]
            for base in ("native-dense", "dense-cl", "native-unfused"):
                if base in ms:
                    rec[f"native/{base}"] = ms["native"] / ms[base]
            records.append(rec)
            print(json.dumps(rec), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"threads": args.threads, "inner": args.inner, "records": records}, f, indent=1)


if __name__ == "__main__":
    main()
