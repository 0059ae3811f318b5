"""The training command: outputs of a short run, and the on-disk data formats it reads."""

from __future__ import annotations

import gzip
import json
import pickle
import struct
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dst_kernels.train import cli, data


def _run(tmp_path, *extra):
    out = tmp_path / "run"
    args = ["--epochs", "3", "--limit-train", "640", "--limit-test", "200", "--no-progress"]
    args += ["--out", str(out)]
    assert cli.main(args + list(extra)) == 0
    return out


def test_short_run_writes_every_output(tmp_path):
    out = _run(tmp_path)
    summary = json.loads((out / "summary.json").read_text())
    assert {"model", "dataset", "epochs", "alpha", "parameters", "dense", "dst"} <= set(summary)
    assert summary["model"] == "lenet300" and summary["dataset"] == "mnist5k" and summary["epochs"] == 3
    assert summary["parameters"] == 784 * 300 + 300 + 300 * 100 + 100 + 100 * 10 + 10
    assert 0.0 <= summary["dense"]["accuracy"] <= 1.0
    dst_part = summary["dst"]
    assert 0.0 <= dst_part["accuracy"] <= 1.0 and 0.0 < dst_part["density"] <= 1.0
    assert [layer["name"] for layer in dst_part["layers"]] == ["1.weight", "3.weight", "5.weight"]
    # Three epochs on 640 digits learn far more than chance (10 %).
    assert summary["dense"]["accuracy"] > 0.5 and dst_part["accuracy"] > 0.5

    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["run"], r["epoch"]) for r in lines] == [
        (run, e) for run in ("dense", "dst") for e in (1, 2, 3)
    ]
    for r in lines:
        assert {"loss", "accuracy", "density", "layers"} <= set(r)
        assert np.isfinite(r["loss"])
    assert len(lines[-1]["layers"]) == 3
    assert lines[-1]["density"] == pytest.approx(dst_part["density"])

    png = (out / "density.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    assert {"dense", "dst", "args", "summary"} <= set(ckpt)
    assert "1.threshold" in ckpt["dst"] and "1.threshold" not in ckpt["dense"]


def test_no_dense_baseline(tmp_path):
    out = _run(tmp_path, "--no-dense-baseline", "--alpha", "1e-2", "--backend", "reference")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dense"] is None and summary["alpha"] == 1e-2
    runs = {json.loads(line)["run"] for line in (out / "metrics.jsonl").read_text().splitlines()}
    assert runs == {"dst"}


def test_lstm_model_trains_with_dst_lstm(tmp_path):
    out = _run(tmp_path, "--model", "lstm_a", "--no-dense-baseline", "--lr", "3e-3")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"] == "lstm_a"
    assert torch.load(out / "checkpoint.pt", weights_only=False)["args"]["optimizer"] == "adam"
    names = [layer["name"] for layer in summary["dst"]["layers"]]
    assert names == ["lstm.weight_ih_l0", "lstm.weight_hh_l0", "fc.weight"]
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    assert ckpt["dst"]["lstm.threshold_ih_l0"].shape == (4 * 128,)
    # Three epochs on 640 digits read row by row learn far more than chance (10 %).
    assert summary["dst"]["accuracy"] > 0.3


def test_module_entry_point_help():
    proc = subprocess.run(
        [sys.executable, "-m", "dst_kernels.train", "--help"], capture_output=True, text=True
    )
    assert proc.returncode == 0 and "--no-dense-baseline" in proc.stdout and "--data-dir" in proc.stdout


def test_mnist5k_split_is_stratified_and_fixed():
    a, b = data.load_mnist5k(seed=0), data.load_mnist5k(seed=0)
    assert a.x_train.shape == (4000, 1, 28, 28) and a.x_test.shape == (1000, 1, 28, 28)
    assert torch.equal(a.y_train, b.y_train) and torch.equal(a.x_test, b.x_test)
    assert torch.bincount(a.y_train).tolist() == [400] * 10
    assert torch.bincount(a.y_test).tolist() == [100] * 10
    # Prefixes (what --limit-train / --limit-test keep) hold every class.
    assert (torch.bincount(a.y_train[:200], minlength=10) >= 8).all()
    assert (torch.bincount(a.y_test[:200], minlength=10) >= 8).all()


def _write_idx(path, array: np.ndarray, gz: bool) -> None:
    codes = {np.dtype(np.uint8): 0x08}
    header = bytes([0, 0, codes[array.dtype], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.tobytes()
    (gzip.open if gz else open)(path, "wb").write(payload)


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx_from_torchvision_layout(tmp_path, gz):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.RandomState(0)
    sfx = ".gz" if gz else ""
    _write_idx(raw / f"train-images-idx3-ubyte{sfx}", rng.randint(0, 256, (6, 28, 28)).astype(np.uint8), gz)
    _write_idx(raw / f"train-labels-idx1-ubyte{sfx}", np.arange(6, dtype=np.uint8), gz)
    _write_idx(raw / f"t10k-images-idx3-ubyte{sfx}", rng.randint(0, 256, (3, 28, 28)).astype(np.uint8), gz)
    _write_idx(raw / f"t10k-labels-idx1-ubyte{sfx}", np.array([7, 8, 9], dtype=np.uint8), gz)
    ds = data.load_mnist(str(tmp_path))
    assert ds.x_train.shape == (6, 1, 28, 28) and ds.y_train.tolist() == list(range(6))
    assert ds.y_test.tolist() == [7, 8, 9]
    raw_img = data.read_idx(str(raw / f"train-images-idx3-ubyte{sfx}"))
    expected = (torch.from_numpy(raw_img[0].astype(np.float32) / 255.0) - data.MNIST_MEAN) / data.MNIST_STD
    assert torch.allclose(ds.x_train[0, 0], expected)


def test_missing_data_names_the_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        data.load_mnist(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="data_batch_1"):
        data.load_cifar10(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="--data-dir"):
        data.load_dataset("cifar10", SimpleNamespace(data_dir=None, seed=0))


def test_cifar10_batches(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.RandomState(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.randint(0, 256, (4, 3072)).astype(np.uint8), b"labels": [1, 2, 3, 4]}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    ds = data.load_cifar10(str(tmp_path))
    assert ds.x_train.shape == (20, 3, 32, 32) and ds.x_test.shape == (4, 3, 32, 32)
    assert ds.y_test.tolist() == [1, 2, 3, 4] and ds.augment
    loader = data.TensorLoader(ds.x_train, ds.y_train, 8, shuffle=True, augment=True, seed=0)
    batches = list(loader)
    assert [len(b[1]) for b in batches] == [8, 8, 4]
    assert batches[0][0].shape == (8, 3, 32, 32)


def test_crop_flip_keeps_content():
    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.float32).reshape(2, 1, 6, 6)
    out = data._crop_flip(x, torch.Generator().manual_seed(0), pad=0)
    for i in range(2):  # with no padding, a crop is the image itself, possibly mirrored
        assert torch.equal(out[i], x[i]) or torch.equal(out[i], x[i].flip(2))
