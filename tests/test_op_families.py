"""One name per op family: every family of ``csrc/ops.cpp`` has its kernel file, its test file
and its benchmark under that name (docs/architecture.md, "Adding an op family")."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Ops that are not kernels, with the reason.
EXEMPT = {
    "build_info": "build metadata (what _C was built against), no kernel",
    "cpu_isa": "the instruction set the CPU kernels run with, no kernel",
    "cpu_recycled_bytes": "the idle bytes of the CPU buffer pool, no kernel",
    "cpu_recycled_release": "frees the CPU buffer pool's idle buffers, no kernel",
}
# Ops named after their family with a suffix: the family is the op name up to it.
FAMILY_OF = {
    "dst_weight_grad_": "weight_grad",
    "dst_linear_grad_input": "linear",
    "dst_linear_weight_grad": "linear",
    "dst_conv2d_grad_input": "conv2d",
    "dst_sparse_conv2d": "sparse",
    "sparse_conv_crossover": "sparse",
    "dst_sparse_mask": "sparse",
    "dst_sparse_mm": "sparse",
    "dst_sparse_rnn": "sparse",
    "dst_sparse_rnn_train": "sparse",
    "dst_sparse_rnn_backward": "sparse",
    "sparse_mode": "sparse",
    "sparse_crossover": "sparse",
}


def _schemas() -> list[str]:
    source = (ROOT / "csrc" / "ops.cpp").read_text()
    return re.findall(r'm\.def\(\s*"(\w+)\(', source)


def _family(op: str) -> str:
    return FAMILY_OF.get(op, op.removeprefix("dst_"))


FAMILIES = sorted({_family(op) for op in _schemas() if op not in EXEMPT})


def test_the_schemas_are_read():
    ops = _schemas()
    assert {"dst_mask", "dst_linear", "dst_conv2d", "dst_weight_grad", "build_info"} <= set(ops)
    assert FAMILIES == ["conv2d", "linear", "mask", "sparse", "weight_grad"]


def test_every_op_but_the_metadata_ones_is_dst_prefixed_or_named_for_its_family():
    for op in _schemas():
        if op in EXEMPT:
            continue
        assert op.startswith("dst_") or op.startswith(_family(op)), op


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_has_its_kernel_test_and_benchmark(family):
    kernels = [
        ROOT / "csrc" / f"{family}.cpp",  # device-independent (composite + autograd)
        ROOT / "csrc" / "cpu" / f"{family}.cpp",
        ROOT / "csrc" / "cuda" / f"{family}.cu",
    ]
    assert any(p.exists() for p in kernels), f"no kernel file for {family}: {[str(p) for p in kernels]}"
    assert (ROOT / "tests" / f"test_{family}.py").exists(), f"tests/test_{family}.py"
    assert (ROOT / "benchmarks" / f"bench_{family}.py").exists(), f"benchmarks/bench_{family}.py"


def test_every_kernel_file_belongs_to_a_family():
    files = [
        *sorted((ROOT / "csrc" / "cpu").glob("*.cpp")),
        *sorted((ROOT / "csrc" / "cuda").glob("*.cu")),
        *sorted(p for p in (ROOT / "dst_kernels" / "triton").glob("*.py") if not p.name.startswith("_")),
    ]
    tools = {"compile_check.py"}  # lowers every Triton kernel to cubin: a build check, not a family
    stray = [str(p.relative_to(ROOT)) for p in files if p.stem not in FAMILIES and p.name not in tools]
    assert not stray, f"kernel files named after no op family of csrc/ops.cpp: {stray}"
