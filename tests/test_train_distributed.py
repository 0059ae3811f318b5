"""``dst-train`` under ``torchrun``: 2 CPU ranks (gloo) end to end, against one process with the
same global batch. Each rank trains on its share of every global batch (DDP all-reduces the
gradients, each rank's loss weighted by its share), evaluation sums every rank's share, and rank
0 alone writes the outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch.distributed as dist
from test_train import run_cli, write_mnist

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo is not built"
)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 250 training images in batches of 64: the last global batch (58) splits 29 / 29; 100 test
# images in batches that leave rank 1 a short last share.
ARGS = ["--dataset", "mnist", "--model", "lenet300", "--epochs", "2", "--batch-size", "64", "--alpha", "5e-3"]


def _torchrun(tmp_path, data, out, nproc: int):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # a local rendezvous on a free port
        "--nproc_per_node",
        str(nproc),
        "-m",
        "dst_kernels.train",
        *ARGS,
        "--data-dir",
        str(data),
        "--out",
        str(out),
        "--device",
        "cpu",
        "--no-progress",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_torchrun_two_ranks_equal_one_process(tmp_path, capsys):
    data = write_mnist(tmp_path / "data", n_train=250, n_test=100)
    proc = _torchrun(tmp_path, tmp_path / "data", tmp_path / "two", 2)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stderr.count("dst-train: lenet300 on mnist") == 1, "rank 0 alone prints the run"
    rc, _ = run_cli(capsys, *ARGS, "--data-dir", data, "--out", tmp_path / "one", "--no-progress")
    assert rc == 0
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    one = json.loads((tmp_path / "one" / "summary.json").read_text())
    assert two["world_size"] == 2 and one["world_size"] == 1
    for run in ("dense", "dst"):
        assert two[run]["accuracy"] == pytest.approx(one[run]["accuracy"], abs=0.011), run  # 1 image in 100
    assert two["dst"]["density"] == pytest.approx(one["dst"]["density"], abs=2e-3)
    metrics_two = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    metrics_one = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics_two) == len(metrics_one) == 4, "one line per epoch, written once"
    for a, b in zip(metrics_two, metrics_one):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
        assert a["test_loss"] == pytest.approx(b["test_loss"], rel=1e-4)
    assert sorted(p.name for p in (tmp_path / "two").iterdir() if p.suffix == ".tmp") == []
