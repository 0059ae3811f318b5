"""dst-train's models (parameter counts, structure) and one short end-to-end run per model,
on data the tests write; the ImageNet path (torchvision) on an ImageFolder of JPEGs."""

from __future__ import annotations

import importlib
import json
import os
import signal
import sys

import numpy as np
import pytest
import torch
from test_train import run_cli, write_cifar, write_mnist

import dst_kernels as dst
from dst_kernels.train import cli, data, datasets
from dst_kernels.train.models import MODELS, VGG16_CFG, build_model, count_parameters


def _torchvision():
    """torchvision, or None where it does not import (the CPU-torch venv: not installed, or a
    wheel built for another torch)."""
    try:
        return importlib.import_module("torchvision")
    except Exception:
        return None


TV = _torchvision()
needs_torchvision = pytest.mark.skipif(
    TV is None, reason="torchvision does not import here (optional extra dst_kernels[imagenet])"
)


# ----------------------------------------------------------------------------- parameter counts


def _vgg16_count(classes: int = 10) -> int:
    """The official CIFAR VGG-16: conv 3x3 without bias + BatchNorm (2 per channel) for each
    of the 13 widths, then Linear(512, 512) + BatchNorm1d(512) + Linear(512, classes)."""
    total, cin = 0, 3
    for v in VGG16_CFG:
        if v != "M":
            total += cin * v * 9 + 2 * v
            cin = v
    return total + (512 * 512 + 512) + 2 * 512 + (512 * classes + classes)


def _wrn_count(depth: int, k: int, classes: int = 10) -> int:
    """WideResNet-depth-k of the official code: conv 3->16, three groups of n = (depth-4)/6
    pre-activation blocks (BN, conv 3x3, BN, conv 3x3; the first block of a group has a 1x1
    shortcut conv when the width changes), final BN and Linear(64k, classes); no conv biases."""
    n = (depth - 4) // 6
    widths = [16, 16 * k, 32 * k, 64 * k]
    total = 3 * 16 * 9
    for g in range(3):
        for j in range(n):
            cin, cout = (widths[g] if j == 0 else widths[g + 1]), widths[g + 1]
            total += 2 * cin + cin * cout * 9 + 2 * cout + cout * cout * 9
            total += cin * cout if cin != cout else 0
    return total + 2 * widths[3] + widths[3] * classes + classes


def _lstm_count(hidden: int, rows: int = 28, classes: int = 10) -> int:
    """Two nn.LSTM layers (4 gates: W_ih, W_hh and two biases each) and Linear(hidden, classes)."""
    layer = lambda n_in: 4 * hidden * (n_in + hidden) + 2 * 4 * hidden  # noqa: E731
    return layer(rows) + layer(hidden) + hidden * classes + classes


@pytest.mark.parametrize(
    "name, classes, expected",
    [
        ("lenet300", 10, 266_610),  # 784*300+300 + 300*100+100 + 100*10+10
        ("lenet5", 10, 431_080),  # 1*20*25+20 + 20*50*25+50 + 800*500+500 + 500*10+10
        ("lstm_a", 10, 214_282),  # _lstm_count(128): two layers, as the official code
        ("lstm_b", 10, 821_770),  # _lstm_count(256)
        ("vgg16", 10, 14_987_722),  # _vgg16_count
        ("wrn16_8", 10, 10_961_370),  # _wrn_count(16, 8)
        ("wrn28_10", 10, 36_479_194),  # _wrn_count(28, 10)
        ("resnet50", 1000, 25_557_032),  # torchvision.models.resnet50()
    ],
)
def test_parameter_counts(name, classes, expected):
    model = build_model(name, classes)
    assert count_parameters(model) == expected
    if name == "vgg16":
        assert _vgg16_count() == expected
    if name.startswith("lstm"):
        assert _lstm_count(128 if name == "lstm_a" else 256) == expected
    if name.startswith("wrn"):
        assert _wrn_count(*map(int, name[3:].split("_"))) == expected
    # Thresholds are not counted, and every conv and linear layer is masked.
    dst.sparsify(model, exclude=MODELS[name].exclude)
    assert count_parameters(model) == expected
    plain = [m for m in model.modules() if type(m) in (torch.nn.Conv2d, torch.nn.Linear, torch.nn.LSTM)]
    if name.startswith("lstm"):  # the classifier stays dense
        assert plain == [model.fc]
    else:
        assert plain == []
    assert sum(dst.is_dst_layer(m) for m in model.modules()) > 0


def test_lstm_classifier_stays_dense():
    model = build_model("lstm_a")
    dst.sparsify(model, exclude=MODELS["lstm_a"].exclude)
    assert dst.is_dst_layer(model.lstm) and not dst.is_dst_layer(model.fc)


@needs_torchvision
def test_resnet50_matches_torchvision():
    ours = build_model("resnet50", 1000).state_dict()
    theirs = TV.models.resnet50().state_dict()
    assert list(ours) == list(theirs)
    assert all(ours[k].shape == theirs[k].shape for k in ours)


# ----------------------------------------------------------------------------- one run per model


def _run_model(tmp_path, capsys, model, dataset, data_dir, *extra):
    out = tmp_path / f"run-{model}"
    argv = ["--dataset", dataset, "--data-dir", data_dir, "--model", model, "--epochs", "1"]
    argv += ["--limit-batches", "2", "--no-progress", "--out", out, *extra]
    rc, err = run_cli(capsys, *argv)
    assert rc == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"] == model and summary["dst_train"]["steps"] == 2
    assert 0 < summary["dst"]["density"] <= 1 and np.isfinite(summary["dst"]["accuracy"])
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss"]) for r in lines)
    return summary, lines


@pytest.mark.parametrize("model", ["lenet300", "lenet5", "lstm_a", "lstm_b"])
def test_mnist_models_run(tmp_path, capsys, model):
    folder = write_mnist(tmp_path / "data", n_train=64, n_test=20)
    summary, lines = _run_model(tmp_path, capsys, model, "mnist", folder, "--batch-size", "16")
    assert [r["run"] for r in lines] == ["dense", "dst"]
    assert summary["parameters"] == count_parameters(build_model(model))


@pytest.mark.parametrize(
    "model, extra",
    [
        ("vgg16", ["--batch-size", "4"]),
        ("wrn16_8", ["--batch-size", "2"]),
        ("wrn28_10", ["--batch-size", "2"]),
        # ResNet-50 takes any size >= 32: on CIFAR here; at 224 on an ImageFolder below.
        ("resnet50", ["--batch-size", "2"]),
    ],
)
def test_cifar_models_run(tmp_path, capsys, model, extra):
    folder = write_cifar(tmp_path / "data", per_batch=4, n_test=2)
    # The DST run only: on 2 CPU cores a WRN-28-10 step takes seconds.
    summary, lines = _run_model(tmp_path, capsys, model, "cifar10", folder, "--no-dense-baseline", *extra)
    assert [r["run"] for r in lines] == ["dst"] and summary["dense"] is None
    names = [layer["name"] for layer in lines[-1]["layers"]]
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in build_model(model).modules())
    assert len(names) == convs + sum(isinstance(m, torch.nn.Linear) for m in build_model(model).modules())


@pytest.mark.parametrize(
    "extra",
    [
        ["--amp", "bf16"],
        ["--amp", "fp16"],
        ["--channels-last"],
        ["--compile", "aot_eager", "--backend", "native"],
        ["--workers", "2"],
    ],
    ids=["bf16", "fp16", "channels-last", "compile-native", "workers"],
)
def test_speed_options_run(tmp_path, capsys, extra):
    if "native" in extra and "native" not in dst.available_backends("cpu"):
        extra = [e if e != "native" else "auto" for e in extra]  # an environment without _C
    folder = write_mnist(tmp_path / "data", n_train=64, n_test=20)
    summary, _ = _run_model(
        tmp_path, capsys, "lenet5", "mnist", folder, "--batch-size", "16", "--no-dense-baseline", *extra
    )
    if "--amp" in extra:
        assert summary["amp"] == extra[1]
    if "--compile" in extra:
        assert summary["compile"] == "aot_eager"


# ----------------------------------------------------------------------------- ImageNet


def write_image_folder(root, classes=("ant", "bee", "cat"), per_class=(4, 2)) -> None:
    """train/<class>/*.JPEG and val/<class>/*.JPEG written with Pillow (sizes vary, one is
    grey-scale, as in ImageNet)."""
    from PIL import Image

    rng = np.random.RandomState(0)
    for split, n in zip(("train", "val"), per_class):
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                h, w = 40 + 7 * i, 56 - 5 * i
                pixels = rng.randint(0, 256, (h, w, 3)).astype(np.uint8)
                pixels[..., c] = 255
                image = Image.fromarray(pixels)
                if i == 1:
                    image = image.convert("L")
                image.save(folder / f"n{c:08d}_{i}.JPEG", quality=90)


def test_imagenet_without_torchvision_names_the_extra(tmp_path, capsys, monkeypatch):
    pytest.importorskip("PIL", reason="Pillow writes the test images")
    write_image_folder(tmp_path / "data")
    monkeypatch.setitem(sys.modules, "torchvision", None)  # as where it is not installed
    rc, err = run_cli(
        capsys, "--dataset", "imagenet", "--data-dir", tmp_path / "data", "--out", tmp_path / "r"
    )
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "needs torchvision" in err and "pip install 'dst_kernels[imagenet]'" in err


def test_imagenet_folder_layout_errors(tmp_path, capsys):
    (tmp_path / "data" / "train").mkdir(parents=True)
    rc, err = run_cli(
        capsys, "--dataset", "imagenet", "--data-dir", tmp_path / "data", "--out", tmp_path / "r"
    )
    assert rc == 2 and "looked for the folders train/ and val/" in err and "missing: val/" in err


@needs_torchvision
def test_image_folder_pipeline(tmp_path):
    pytest.importorskip("PIL", reason="Pillow writes the test images")
    write_image_folder(tmp_path)
    source = datasets.load_dataset("imagenet", cli.parser().parse_args(["--data-dir", str(tmp_path)]))
    assert source.num_classes == 3 and len(source.train) == 12 and len(source.test) == 6
    key = data.BatchKey(7, [0, 5, 11])
    x, y = source.train.__getitems__(key)
    assert x.shape == (3, 3, 224, 224) and y.tolist() == [0, 1, 2]
    x2, _ = source.train.__getitems__(key)
    assert torch.equal(x, x2)  # the crops are a function of the batch's seed
    v, _ = source.test.__getitems__(data.BatchKey(0, [0, 1]))
    assert v.shape == (2, 3, 224, 224)


@needs_torchvision
def test_resnet50_on_image_folder(tmp_path, capsys):
    pytest.importorskip("PIL", reason="Pillow writes the test images")
    write_image_folder(tmp_path / "data")
    summary, lines = _run_model(
        tmp_path,
        capsys,
        "resnet50",
        "imagenet",
        tmp_path / "data",
        "--batch-size",
        "2",
        "--no-dense-baseline",
    )
    assert "top5" in lines[-1] and "top5" in summary["dst"]
    assert summary["versions"].get("torchvision") == TV.__version__


@needs_torchvision
def test_corrupt_jpeg_is_named(tmp_path, capsys):
    pytest.importorskip("PIL", reason="Pillow writes the test images")
    write_image_folder(tmp_path / "data")
    bad = tmp_path / "data" / "val" / "bee" / "n00000001_0.JPEG"
    bad.write_bytes(b"not a jpeg")
    argv = ["--dataset", "imagenet", "--data-dir", tmp_path / "data", "--model", "resnet50"]
    argv += ["--epochs", "1", "--limit-batches", "1", "--batch-size", "2", "--limit-test", "6"]
    rc, err = run_cli(capsys, *argv, "--no-dense-baseline", "--no-progress", "--out", tmp_path / "r")
    assert rc == 2 and str(bad) in err and "cannot be decoded" in err
    assert err.strip().splitlines()[-1].startswith("dst-train: error:")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_run_with_amp_and_resume(tmp_path, capsys):
    folder = write_cifar(tmp_path / "data", per_batch=16, n_test=16)
    out = tmp_path / "run"
    argv = ["--dataset", "cifar10", "--data-dir", folder, "--epochs", "2", "--limit-batches", "2"]
    argv += ["--batch-size", "8", "--device", "cuda", "--amp", "bf16", "--channels-last", "--workers", "2"]
    argv += ["--no-progress", "--out", out]
    stop = {"label": "dst", "n": 2}

    def hook(trainer):
        if trainer.label == stop["label"] and trainer.global_step == stop["n"]:
            os.kill(os.getpid(), signal.SIGINT)

    rc, err = run_cli(capsys, *argv, on_step=hook)
    assert rc == 130, err
    rc, err = run_cli(capsys, "--out", out, "--resume")
    assert rc == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["device"].startswith("cuda") and summary["peak_memory"]["kind"].startswith("cuda")
    assert summary["dst_train"]["steps"] == 4 and "gpu" in summary["versions"]
