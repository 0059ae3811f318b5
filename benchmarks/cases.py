"""Benchmark cases per machine size.

Sizes: ``smoke`` (tiny, for the test suite), ``cpu`` (the default on a CPU: a few
minutes on 2 cores), ``cpu-full`` (the whole CPU table: the batch-128 conv layers),
``gpu-quick`` (the GPU round: bf16 and fp32, the targets' shapes, about 3 minutes on an
H100), ``gpu`` (the default on a GPU: every shape and dtype).
"""

from __future__ import annotations

import torch

from benchmarks.harness import Case

# (tokens, in_features, out_features)
LINEAR = {
    "smoke": [(3, 7, 5)],
    "cpu": [(64, 784, 300), (64, 300, 100), (256, 1024, 1024)],
    "cpu-full": [(64, 784, 300), (64, 300, 100), (256, 1024, 1024), (1024, 4096, 1024)],
    "gpu-quick": [(4096, 4096, 4096), (8192, 4096, 4096)],
    "gpu": [
        (64, 784, 300),
        (4096, 4096, 4096),
        (8192, 4096, 4096),
        (4096, 4096, 11008),
        (16, 4096, 4096),
        (64, 4096, 4096),
        (256, 4096, 4096),
        (256, 4096, 11008),
    ],
}
# (N, C, H, W, out_channels, kernel): LeNet-5, then the batch-128 3x3 layers of
# VGG-16 CIFAR (64@32 .. 512@4), WRN-16-8 CIFAR (128@32, 256@16) and ResNet-50 (64@56 .. 512@7)
_CONV_3X3 = [
    (128, 64, 32, 32, 64, 3),
    (128, 128, 16, 16, 128, 3),
    (128, 256, 8, 8, 256, 3),
    (128, 512, 4, 4, 512, 3),
    (128, 128, 32, 32, 128, 3),
    (128, 256, 16, 16, 256, 3),
    (128, 64, 56, 56, 64, 3),
    (128, 128, 28, 28, 128, 3),
    (128, 256, 14, 14, 256, 3),
    (128, 512, 7, 7, 512, 3),
]
CONV2D = {
    "smoke": [(2, 3, 5, 5, 4, 3)],
    # LeNet-5's second conv, and VGG-16's 128@16x16 layer at batch 32
    "cpu": [(64, 20, 12, 12, 50, 5), (32, 128, 16, 16, 128, 3)],
    "cpu-full": [(64, 20, 12, 12, 50, 5), *_CONV_3X3],
    # VGG-16 64@32, ResNet-50 64@56 and 256@14
    "gpu-quick": [(128, 64, 32, 32, 64, 3), (128, 64, 56, 56, 64, 3), (128, 256, 14, 14, 256, 3)],
    "gpu": _CONV_3X3,
}
# (batch, steps, input, hidden): the hidden sizes of the paper's MNIST LSTM-a / LSTM-b, 2 layers
LSTM = {
    "smoke": [(2, 3, 4, 5)],
    "cpu": [(100, 28, 28, 128)],
    "cpu-full": [(100, 28, 28, 128), (100, 28, 28, 256)],
    "gpu-quick": [(100, 28, 28, 256)],
    "gpu": [(100, 28, 28, 128), (100, 28, 28, 256), (128, 64, 1024, 1024)],
}
# (rows, cols) of a weight: the op families on their own
OP_SHAPES = {
    "smoke": [(7, 13)],
    "cpu": [(300, 784), (1024, 4096)],
    "cpu-full": [(300, 784), (1024, 4096)],
    "gpu-quick": [(4096, 4096)],
    "gpu": [(300, 784), (4096, 4096), (11008, 4096)],
}
# The sparse family (bench_sparse.py): DSTLinear training steps (tokens, in, out) and
# LeNet-300-100 inference (batch, 784, 300, 100), each at the densities listed.
SPARSE_STEP = {
    "smoke": [(3, 7, 5)],
    "cpu": [(64, 784, 300), (256, 1024, 1024), (1024, 4096, 1024)],
    "cpu-full": [(64, 784, 300), (256, 1024, 1024), (1024, 4096, 1024)],
    "gpu-quick": [],
    "gpu": [],
}
SPARSE_INFERENCE = {
    "smoke": [(2, 784, 300, 100)],
    "cpu": [(64, 784, 300, 100), (1, 784, 300, 100)],
    "cpu-full": [(64, 784, 300, 100), (1, 784, 300, 100)],
    "gpu-quick": [],
    "gpu": [],
}
# The sparse family's conv cases: one DSTConv2d training step (N, C, H, W, out, k) at the
# densities listed with it (the paper's 3x3 layers of VGG-16, WRN-16-8 and ResNet-50 at batch
# 32, LeNet-5's second 5x5 conv at batch 64), and conv-model inference (batch, C, H, W):
# LeNet-5 at 1.64 % and VGG-16 at 3.76 % (the paper's densities).
SPARSE_CONV_STEP = {
    "smoke": [((2, 3, 6, 6, 4, 3), [0.05])],
    "cpu": [
        ((64, 20, 12, 12, 50, 5), [0.02, 1.0]),
        ((32, 128, 16, 16, 128, 3), [0.05, 1.0]),
        ((32, 256, 8, 8, 256, 3), [0.05, 1.0]),
        ((32, 128, 32, 32, 128, 3), [0.05, 1.0]),
        ((32, 64, 56, 56, 64, 3), [0.05, 1.0]),
    ],
    "gpu-quick": [],
    "gpu": [],
}
SPARSE_CONV_STEP["cpu-full"] = SPARSE_CONV_STEP["cpu"]
SPARSE_CONV_INFERENCE = {
    "smoke": [((2, 1, 28, 28), 0.0164)],
    "cpu": [
        ((1, 1, 28, 28), 0.0164),
        ((32, 1, 28, 28), 0.0164),
        ((1, 3, 32, 32), 0.0376),
        ((32, 3, 32, 32), 0.0376),
    ],
    "gpu-quick": [],
    "gpu": [],
}
SPARSE_CONV_INFERENCE["cpu-full"] = SPARSE_CONV_INFERENCE["cpu"]
# The sparse family's LSTM cases: one DSTLSTM training step (batch, steps, input, hidden, layers)
# at the densities listed with it: the paper's MNIST LSTM-a (hidden 128) at 2 % and LSTM-b
# (hidden 256) at 1 %, rows of 28 pixels as the 28 steps, batch 100.
SPARSE_LSTM_STEP = {
    "smoke": [((2, 3, 4, 5, 2), [0.3])],
    "cpu": [
        ((100, 28, 28, 128, 2), [0.02, 1.0]),
        ((100, 28, 28, 256, 2), [0.01, 1.0]),
    ],
    "gpu-quick": [],
    "gpu": [],
}
SPARSE_LSTM_STEP["cpu-full"] = SPARSE_LSTM_STEP["cpu"]
# LSTM-b inference (eval, no grad) at 1 %, batch 1 and 100: the folded nn.LSTM against to_sparse.
SPARSE_LSTM_INFERENCE = {
    "smoke": [((2, 3, 4, 5, 2), 0.3)],
    "cpu": [((1, 28, 28, 256, 2), 0.01), ((100, 28, 28, 256, 2), 0.01)],
    "gpu-quick": [],
    "gpu": [],
}
SPARSE_LSTM_INFERENCE["cpu-full"] = SPARSE_LSTM_INFERENCE["cpu"]
SPARSE_DENSITIES = {
    "smoke": [0.03],
    "cpu": [0.03, 1.0],
    "cpu-full": [0.03, 0.1, 1.0],
    "gpu-quick": [],
    "gpu": [],
}
DTYPES = {
    "smoke": [torch.float32],
    "cpu": [torch.float32],
    "cpu-full": [torch.float32],
    "gpu-quick": [torch.bfloat16, torch.float32],
    "gpu": [torch.bfloat16, torch.float16, torch.float32],
}
MODES = {
    "smoke": ["forward", "backward", "step"],
    "cpu": ["step", "forward"],
    "cpu-full": ["step", "forward"],
    "gpu-quick": ["step"],
    "gpu": ["step", "forward"],
}
SIZES = tuple(MODES)


def device_for(size: str) -> str:
    return "cuda" if size.startswith("gpu") else "cpu"


# The op families have one natural mode each.
OP_MODE = {"mask": "forward", "weight_grad": "backward"}


def cases_for(size: str, device: str, ops=None) -> list[Case]:
    table = {
        "linear": LINEAR,
        "conv2d": CONV2D,
        "lstm": LSTM,
        "mask": OP_SHAPES,
        "weight_grad": OP_SHAPES,
        "sparse": SPARSE_STEP,
    }
    unknown = set(ops or ()) - set(table)
    if unknown:
        raise SystemExit(f"unknown op families {sorted(unknown)}; choose from {sorted(table)}")
    out = []
    for op, shapes in table.items():
        if ops and op not in ops:
            continue
        if op == "sparse":
            out += _sparse_cases(size, device)
            continue
        for mode in [OP_MODE[op]] if op in OP_MODE else MODES[size]:
            for dtype in DTYPES[size]:
                for shape in shapes[size]:
                    if (
                        op not in OP_MODE
                        and mode == "forward"
                        and size != "smoke"
                        and shape != shapes[size][0]
                    ):
                        continue  # forward-only on the first shape of each family
                    out.append(Case(op, shape, dtype, mode, device))
    return out


def _sparse_cases(size: str, device: str) -> list[Case]:
    if device != "cpu":
        return []  # the sparse kernels are CPU kernels; GPU: see the README's design note
    out = []
    for density in SPARSE_DENSITIES[size]:
        out += [Case("sparse", s, torch.float32, "step", device, density) for s in SPARSE_STEP[size]]
    for density in SPARSE_DENSITIES[size][:1]:
        out += [Case("sparse", s, torch.float32, "forward", device, density) for s in SPARSE_INFERENCE[size]]
    for shape, densities in SPARSE_CONV_STEP[size]:
        out += [Case("sparse", shape, torch.float32, "step", device, d) for d in densities]
    out += [Case("sparse", s, torch.float32, "forward", device, d) for s, d in SPARSE_CONV_INFERENCE[size]]
    for shape, densities in SPARSE_LSTM_STEP[size]:
        out += [Case("sparse", shape, torch.float32, "step", device, d) for d in densities]
    out += [Case("sparse", s, torch.float32, "forward", device, d) for s, d in SPARSE_LSTM_INFERENCE[size]]
    return out
