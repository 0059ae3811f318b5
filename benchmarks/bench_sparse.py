"""Sparse family: execution on the kept weights only.

Cases have a ``density`` (thresholds set per row to keep that fraction; reset rule off):

* mode ``step``, shape ``(tokens, in, out)``: one training step of a ``DSTLinear`` layer
  inside a network (gradients of x, W, t and b): ``dense`` (``nn.Linear``), ``native``
  (the native backend, which takes the sparse kernels below the density crossover) and
  ``native-dense`` (the native backend held on its dense GEMMs, as before the sparse
  kernels);
* mode ``step``, shape ``(N, C, H, W, out, k)``: one training step of a ``DSTConv2d`` layer
  (gradients of x, W, t and b): ``dense`` (``nn.Conv2d``), ``native``, ``native-dense``, and
  the peer SparseProp's ``SparseConv2d`` (static mask, dW at the kept weights only) with its
  kernels vectorised over the batch (``sparseprop``) and over the output width
  (``sparseprop-on``);
* mode ``step``, shape ``(batch, steps, input, hidden, layers)``: one training step of a
  ``DSTLSTM`` (gradients of W, t and b; batch-first input): ``dense`` (``nn.LSTM``),
  ``native`` (the sparse recurrent kernel below the crossover) and ``native-dense`` (the layer
  held on PyTorch's fused LSTM on the masked weights, the path before the kernel);
* mode ``forward``, shape ``(batch, 784, 300, 100)``: LeNet-300-100 inference, eval mode,
  no grad: ``dense`` (``export.fold``), ``torch-sparse`` (the folded weights as
  ``torch.sparse_csr`` tensors), ``native`` (``export.to_sparse``) and ``sparseprop`` (its
  ``SparseLinear``); shape ``(batch, C, H, W)``: LeNet-5 (1x28x28) and VGG-16 (3x32x32)
  inference: ``dense``, ``dense-cl`` (the folded model and its input in channels_last),
  ``native`` and ``native-unfused`` (``to_sparse`` without its fused ReLU and max pool).

SparseProp (``pip install --no-build-isolation sparseprop==0.1.14``) joins where it imports;
elsewhere a warning says why its columns are missing. Its step on a Linear also uses its
``SparseLinear``.

``python -m benchmarks.bench_sparse`` sweeps densities and prints where the sparse path of
the training step overtakes the dense one, per shape (the crossover tables of
``csrc/cpu/sparse.cpp`` come from it; ``--shapes`` takes conv shapes too).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.common import run_case
from benchmarks.sparse_steps import held, training_step

OP = "sparse"


def test_sparse(benchmark, case, bench_records, bench_size):
    run_case(benchmark, case, bench_records, bench_size)


def _median_times(steps: dict, rounds: int, inner: int) -> dict:
    samples = {k: [] for k in steps}
    names = list(steps)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t0 = time.perf_counter()
            for _ in range(inner):
                steps[name]()
            samples[name].append((time.perf_counter() - t0) * 1e3 / inner)
    return {k: statistics.median(v) for k, v in samples.items()}


def sweep(shape, densities, rounds: int) -> list[tuple[float, float, float]]:
    """(density, sparse-path step / dense-path step, dense-path step / dense-layer step) per
    density, for a DSTLinear (tokens, in, out) or a DSTConv2d (N, C, H, W, out, k) step."""
    from benchmarks.harness import Case

    rows = []
    for density in densities:
        case = Case(OP, shape, torch.float32, "step", "cpu", density)
        layer_step = training_step("native", case)
        steps = {
            "sparse": held("always", layer_step),
            "dense-path": held("never", layer_step),
            "linear": training_step("dense", case),
        }
        for fn in steps.values():
            fn()
        work = shape[0] * shape[1] * shape[2] * (shape[4] * shape[5] ** 2 if len(shape) == 6 else 1)
        found = _median_times(steps, rounds, max(1, min(20, int(2e8 // work))))
        rows.append((density, found["sparse"] / found["dense-path"], found["dense-path"] / found["linear"]))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_sparse",
        description="Density sweep of the DSTLinear / DSTConv2d training step: sparse path against "
        "dense path.",
    )
    p.add_argument(
        "--shapes",
        default="1x784x300,64x784x300,64x300x100,256x1024x1024,1024x4096x1024",
        help="tokens x in x out (DSTLinear) or N x C x H x W x out x k (DSTConv2d), comma-separated",
    )
    p.add_argument("--densities", default="0.02,0.05,0.1,0.2,0.3,0.5")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    densities = [float(d) for d in args.densities.split(",")]
    for text in args.shapes.split(","):
        shape = tuple(int(s) for s in text.split("x"))
        rows = sweep(shape, densities, args.rounds)
        cells = "  ".join(f"{d:.2f}:{r:.2f}" for d, r, _ in rows)
        below = [d for d, r, _ in rows if r < 1.0]
        print(f"{text}: sparse/dense-path {cells}  (sparse wins up to {max(below) if below else 'none'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
