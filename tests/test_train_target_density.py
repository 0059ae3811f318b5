"""``dst-train --target-density``: the DensityController in the training command."""

from __future__ import annotations

import json

import pytest
import torch
from test_train import _interrupt_at, mnist5k_or_skip, run_cli, write_mnist


@pytest.fixture
def mnist_dir(tmp_path):
    write_mnist(tmp_path / "data", n_train=512)
    return tmp_path / "data"


def _records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_target_density_adapts_alpha_and_is_saved(tmp_path, mnist_dir, capsys):
    out = tmp_path / "run"
    rc, err = run_cli(
        capsys,
        "--dataset", "mnist", "--data-dir", mnist_dir, "--epochs", "6", "--no-dense-baseline",
        "--target-density", "0.3", "--alpha", "1e-3", "--no-progress", "--out", out,
    )  # fmt: skip
    assert rc == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["target_density"] == 0.3
    alphas = [r["alpha"] for r in _records(out) if r["run"] == "dst"]
    assert len(alphas) == 6 and len(set(alphas)) > 1  # alpha moved
    ckpt = torch.load(out / "last.pt", weights_only=False)
    state = ckpt["trainer"]["alpha_fn"]
    assert state["steps"] == 6 * 8 and state["updates"] == 6 * 8 // 20
    assert float(torch.as_tensor(state["log_alpha"]).exp()) == pytest.approx(alphas[-1], rel=1e-5)


def test_target_density_resume_is_bit_identical(tmp_path, mnist_dir, capsys):
    common = ["--dataset", "mnist", "--data-dir", mnist_dir, "--epochs", "4", "--no-dense-baseline"]
    common += ["--target-density", "0.3", "--no-progress"]
    whole, part = tmp_path / "whole", tmp_path / "part"
    rc, err = run_cli(capsys, *common, "--out", whole)
    assert rc == 0, err
    # Stop mid-epoch between two controller updates (every 20 steps; 8 steps an epoch).
    rc, err = run_cli(capsys, *common, "--out", part, on_step=_interrupt_at(("dst", 13)))
    assert rc == 130, err
    rc, err = run_cli(capsys, "--resume", "--out", part, "--no-progress")
    assert rc == 0, err
    a = torch.load(whole / "last.pt", weights_only=False)["trainer"]
    b = torch.load(part / "last.pt", weights_only=False)["trainer"]
    assert torch.equal(a["alpha_fn"]["log_alpha"], b["alpha_fn"]["log_alpha"])
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key


@pytest.mark.parametrize("value", ["0", "1", "1.5", "-0.1"])
def test_target_density_out_of_range_is_a_usage_error(tmp_path, mnist_dir, capsys, value):
    rc, err = run_cli(
        capsys,
        "--dataset",
        "mnist",
        "--data-dir",
        mnist_dir,
        "--target-density",
        value,
        "--out",
        tmp_path / "r",
    )
    assert rc == 2 and "--target-density" in err


def test_mnist5k_target_density_smoke(tmp_path, capsys):
    mnist5k_or_skip()
    out = tmp_path / "run"
    rc, err = run_cli(
        capsys, "--epochs", "1", "--limit-batches", "25", "--limit-test", "200", "--no-dense-baseline",
        "--target-density", "0.05", "--out", out,
    )  # fmt: skip
    assert rc == 0, err
    assert json.loads((out / "summary.json").read_text())["target_density"] == 0.05
