"""End-to-end training speed: ``dst-train`` runs repeated, each run's DST phase against the
dense phase of the same command (steps per second from ``summary.json``), with the machine.

    python -m benchmarks.e2e_runs --runs 3 --out docs/sparse-e2e
    python -m benchmarks.e2e_runs --select lenet5,vgg16 --runs 3 --out docs/sparse-conv

Each command starts the DST run at the paper's density (``--init-density``) with a learning
rate small enough that the thresholds stay there while the steps are timed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

# name -> dst-train arguments (the paper's densities: LeNet-300-100 2.48 %, LSTM-b 0.98 %). The
# learning rates keep the thresholds where --init-density put them: SGD's steps scale with the
# gradient, Adam's are about lr each whatever it is (1e-5 over 200 steps would move an LSTM-b
# threshold by some 2e-3, past the 0.06 % band of |W| that holds the top 1 % of its weights).
COMMANDS = {
    "lenet300": ["--model", "lenet300", "--dataset", "mnist", "--epochs", "1", "--init-density", "0.0248",
                 "--lr", "1e-5"],
    "lstm_b": [
        "--model", "lstm_b", "--dataset", "mnist", "--epochs", "1", "--limit-batches", "200",
        "--init-density", "0.0098", "--lr", "1e-9",
    ],
    # The convolutional rows (issue 24's commands): LeNet-5 at 1.64 %, VGG-16 at 3.76 % on
    # generated CIFAR-10 batches (random pixels: the timing does not depend on them).
    "lenet5": ["--model", "lenet5", "--dataset", "mnist", "--epochs", "1", "--limit-batches", "300",
               "--init-density", "0.0164", "--lr", "1e-5"],
    "vgg16": ["--model", "vgg16", "--dataset", "cifar10", "--epochs", "1", "--limit-batches", "20",
              "--init-density", "0.0376", "--lr", "1e-5", "--data-dir", "{cifar}"],
}  # fmt: skip


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write_cifar(folder: Path, per_batch: int = 300, n_test: int = 200) -> Path:
    """CIFAR-10 python batches of random pixels (the layout ``--dataset cifar10`` reads)."""
    import pickle

    import numpy as np

    from dst_kernels.train.data import CIFAR_FILES

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(0)
    for name in CIFAR_FILES:
        n = n_test if name == "test_batch" else per_batch
        batch = {
            b"batch_label": name.encode(),
            b"data": rng.randint(0, 256, (n, 3072)).astype(np.uint8),
            b"labels": [int(v) for v in rng.randint(0, 10, n)],
        }
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    return folder


def run_once(name: str, extra: list[str], threads: int, folder: Path, cifar: Path | None = None) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    command = [a.format(cifar=cifar) for a in COMMANDS[name]]
    argv = [sys.executable, "-m", "dst_kernels.train", *command, *extra]
    argv += ["--device", "cpu", "--out", str(folder), "--overwrite"]
    subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL)
    summary = json.loads((folder / "summary.json").read_text())
    dense, dst = summary["dense_train"]["steps_per_second"], summary["dst_train"]["steps_per_second"]
    return {
        "command": ["dst-train", *COMMANDS[name], *extra],  # {cifar}: the generated batches
        "dense_steps_per_second": dense,
        "dst_steps_per_second": dst,
        "dst/dense": dst / dense,
        "density": summary["dst"]["density"],
        "steps": summary["dst_train"]["steps"],
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--select", default="lenet300,lstm_b", help=f"comma-separated, of {sorted(COMMANDS)}")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--extra", default="", help="more dst-train arguments, space-separated")
    p.add_argument("--out", default=None, help="folder for results.json")
    args = p.parse_args(argv)
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        cifar = write_cifar(Path(tmp) / "cifar") if "vgg16" in args.select.split(",") else None
        for run in range(args.runs):
            for name in args.select.split(","):
                rec = {"name": name, "run": run}
                folder = Path(tmp) / f"{name}-{run}"
                rec.update(run_once(name, args.extra.split(), args.threads, folder, cifar))
                records.append(rec)
                print(json.dumps(rec), flush=True)
    for name in args.select.split(","):
        ratios = [r["dst/dense"] for r in records if r["name"] == name]
        print(f"{name}: DST / dense steps per second {statistics.median(ratios):.2f} "
              f"({min(ratios):.2f}-{max(ratios):.2f}) over {len(ratios)} runs")  # fmt: skip
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        machine = {"cpu": _cpu(), "cores": os.cpu_count(), "threads": args.threads}
        with open(Path(args.out) / "results.json", "w") as f:
            json.dump({"machine": machine, "records": records}, f, indent=1)


if __name__ == "__main__":
    main()
