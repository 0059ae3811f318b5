"""``dst-train`` under ``torchrun``: 2 CPU ranks (gloo) end to end, against one process with the
same global batch, under DDP and under ``--fsdp`` (FSDP2). Each rank trains on its share of every
global batch (the gradients are averaged, each rank's loss weighted by its share), evaluation sums
every rank's share, and rank 0 alone writes the outputs. A run stopped under torchrun resumes
bit-identically, whichever way the model is distributed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from test_train import write_mnist

import dst_kernels as dst
from dst_kernels.train.data import EpochBatchSampler
from dst_kernels.train.models import build_model

sys.path.insert(0, os.path.dirname(__file__))
import dist_workers as W  # noqa: E402

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo is not built"
)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 250 training images in batches of 64: the last global batch (58) splits 29 / 29. 1001 test
# images in evaluation batches of 1000: the last batch holds 1 image, and rank 1's share of it
# is empty (under FSDP2 it still runs that forward, in lock-step).
ARGS = ["--dataset", "mnist", "--model", "lenet300", "--epochs", "2", "--batch-size", "64", "--alpha", "5e-3"]


needs_fsdp = pytest.mark.skipif(not W.fsdp_available(), reason="this torch has no FSDP2 (fully_shard)")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_mnist(tmp_path_factory.mktemp("mnist"), n_train=250, n_test=1001)


def _dst_train(data, out, *extra, nproc: int | None = None, device: str = "cpu"):
    """``dst-train`` in a subprocess; under ``torchrun --standalone`` with ``nproc``."""
    launch = [sys.executable, "-m"]
    if nproc is not None:  # --standalone: a local rendezvous on a free port
        launch += ["torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), "-m"]
    cmd = [*launch, "dst_kernels.train", *ARGS, "--data-dir", str(data), "--out", str(out)]
    cmd += ["--device", device, "--no-progress", *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def one_process(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "run"
    proc = _dst_train(data, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _assert_same_run(run, one, rel: float = 1e-4) -> None:
    got, want = json.loads((run / "summary.json").read_text()), json.loads((one / "summary.json").read_text())
    for phase in ("dense", "dst"):
        assert got[phase]["accuracy"] == pytest.approx(want[phase]["accuracy"], abs=1.1e-3), phase  # 1 image
    assert got["dst"]["density"] == pytest.approx(want["dst"]["density"], abs=2e-3)
    metrics_got, metrics_want = _lines(run / "metrics.jsonl"), _lines(one / "metrics.jsonl")
    assert len(metrics_got) == len(metrics_want) == 4, "one line per epoch, written once"
    for a, b in zip(metrics_got, metrics_want):
        assert a["loss"] == pytest.approx(b["loss"], rel=rel)
        assert a["test_loss"] == pytest.approx(b["test_loss"], rel=rel)


@pytest.mark.parametrize(
    "mode, nproc, extra",
    [
        ("ddp", 2, []),
        pytest.param("fsdp", 2, ["--fsdp"], marks=needs_fsdp),
        pytest.param("fsdp-one-process", None, ["--fsdp"], marks=needs_fsdp),  # a world of one
    ],
)
def test_distributed_run_equals_one_process(data, one_process, tmp_path, mode, nproc, extra):
    proc = _dst_train(data, tmp_path / mode, *extra, nproc=nproc)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stderr.count("dst-train: lenet300 on mnist") == 1, "rank 0 alone prints the run"
    run, one = tmp_path / mode, one_process
    got, want = json.loads((run / "summary.json").read_text()), json.loads((one / "summary.json").read_text())
    assert got["world_size"] == (nproc or 1) and want["world_size"] == 1
    assert got["fsdp"] == (mode != "ddp") and want["fsdp"] is False
    _assert_same_run(run, one)
    assert sorted(p.name for p in run.iterdir() if p.suffix == ".tmp") == []

    # The checkpoints hold full plain tensors (under FSDP2 gathered on rank 0), as one process's.
    last = torch.load(run / "last.pt", weights_only=False)
    ref = torch.load(one / "last.pt", weights_only=False)
    for key in ("dense", "dst"):
        assert last[key].keys() == ref[key].keys()
        for name, value in last[key].items():
            assert type(value) is torch.Tensor and value.shape == ref[key][name].shape, (key, name)
            torch.testing.assert_close(value, ref[key][name], rtol=1e-3, atol=1e-4)
    best = torch.load(run / "best.pt", weights_only=False)
    model = build_model("lenet300", 10)
    dst.sparsify(model)
    model.load_state_dict(best["model"])  # the best DST model loads into one process's model
    assert dst.sparsity_report(model).density == pytest.approx(best["density"])


def _spawn_cli(out, argv, stop_at=None, world: int = 2) -> list[int]:
    import uuid

    import torch.multiprocessing as mp

    out.mkdir(parents=True, exist_ok=True)
    store = str(out.parent / f"store-{uuid.uuid4().hex}")  # a fresh file per process group
    mp.spawn(W.cli_worker, args=(world, store, argv, stop_at, str(out)), nprocs=world, join=True)
    return [int((out / f"rc{r}").read_text()) for r in range(world)]


def _without_times(records):
    return [{k: v for k, v in r.items() if k not in ("seconds", "step_time")} for r in records]


@pytest.fixture(scope="module")
def resume_runs(data, tmp_path_factory):
    """The uninterrupted 2-rank runs the resumed ones must equal, per mode."""
    runs = {}

    def get(mode: str):
        if mode not in runs:
            out = tmp_path_factory.mktemp(f"full-{mode}")
            assert _spawn_cli(out / "run", _resume_argv(data, out / "run", mode)) == [0, 0]
            runs[mode] = out / "run"
        return runs[mode]

    return get


def _resume_argv(data, out, mode: str) -> list[str]:
    argv = [*ARGS, "--epochs", "3", "--data-dir", str(data), "--out", str(out), "--device", "cpu"]
    argv += ["--no-progress", "--log-every", "2", "--limit-test", "101", "--target-density", "0.5"]
    return argv + (["--fsdp"] if mode == "fsdp" else [])


@pytest.mark.parametrize(
    "mode, stop_at",
    [
        # 4 steps per epoch: after the 1st epoch's last step, before its evaluation
        pytest.param("fsdp", ("dense", 4), marks=needs_fsdp),
        pytest.param("fsdp", ("dst", 5), marks=needs_fsdp),  # the ranks agree at step 6, mid-epoch
        ("ddp", ("dense", 5)),
    ],
)
def test_torchrun_run_resumes_bit_identically(data, tmp_path, resume_runs, mode, stop_at):
    """Rank 0 is asked to stop; the ranks agree at the next --log-every step, every rank
    takes part in gathering the checkpoint, and ``--resume`` (still 2 ranks) ends where the
    uninterrupted run ends, bit for bit."""
    full = resume_runs(mode)
    cut = tmp_path / "cut"
    assert _spawn_cli(cut, _resume_argv(data, cut, mode), stop_at=stop_at) == [128 + signal.SIGINT] * 2
    ckpt = torch.load(cut / "last.pt", weights_only=False)
    assert not ckpt["complete"] and ckpt["phase"] == stop_at[0]
    assert ckpt["trainer"]["global_step"] == stop_at[1] + stop_at[1] % 2, "stopped where the ranks agreed"
    assert ckpt["trainer"]["model"], "rank 0 wrote the gathered state"
    for rank in range(2):  # what each rank trained: sharded under --fsdp, whole under DDP
        seen = torch.load(cut / f"seen{rank}.pt", weights_only=False)[stop_at[0]]
        sharded = mode == "fsdp"
        assert ("FSDPModule" in seen["root"]) == sharded, seen
        assert seen["weight"] == ("DTensor" if sharded else "Parameter"), seen
        assert seen["local_rows"] == (seen["rows"] // 2 if sharded else seen["rows"]), seen

    resumed = ["--out", str(cut), "--resume", "--no-progress"]
    assert _spawn_cli(cut, resumed) == [0, 0]
    a, b = torch.load(full / "last.pt", weights_only=False), torch.load(cut / "last.pt", weights_only=False)
    for key in ("dense", "dst"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key} {name} differs after resume"
    assert a["trainer"]["alpha_fn"]["log_alpha"] == b["trainer"]["alpha_fn"]["log_alpha"]
    assert _without_times(_lines(full / "metrics.jsonl")) == _without_times(_lines(cut / "metrics.jsonl"))


def test_lockstep_sampler_gives_every_rank_every_batch():
    """Evaluation under FSDP2: every rank yields every batch; an empty share becomes a filler
    (the batch's first sample) that ``shares()`` marks as not counted."""
    n, bs, world = 11, 5, 2  # batches of 5, 5, 1: rank 1's share of the last one is empty
    for lockstep in (False, True):
        seen = []
        for rank in range(world):
            s = EpochBatchSampler(n, bs, shuffle=False, rank=rank, world=world, lockstep=lockstep)
            keys, shares = list(s), s.shares()
            assert len(keys) == len(s)
            assert shares == ([3, 3, 1] if rank == 0 else [2, 2, 0])
            if lockstep:
                assert len(keys) == 3
            else:
                assert len(keys) == sum(1 for k in shares if k)
            for key, count in zip(keys, shares if lockstep else [k for k in shares if k]):
                seen += key.indices[:count]
        assert sorted(seen) == list(range(n)), "every sample counted once"
    s = EpochBatchSampler(n, bs, shuffle=False, rank=1, world=world, lockstep=True)
    assert list(s)[-1].indices == [10], "the filler is the batch's first sample"
    s.set_epoch(1, start=2)
    assert s.shares() == [0] and len(s) == 1


def test_fsdp_without_fsdp2_is_a_one_line_error(tmp_path, capsys, monkeypatch, data):
    import types

    from test_train import run_cli

    monkeypatch.setitem(sys.modules, "torch.distributed.fsdp", types.ModuleType("torch.distributed.fsdp"))
    rc, err = run_cli(capsys, *ARGS, "--data-dir", data, "--out", tmp_path / "run", "--fsdp")
    assert rc == 2
    assert err.strip().count("\n") == 0 and "--fsdp needs FSDP2" in err, err


@needs_fsdp
def test_fsdp_checkpoint_before_the_first_step_leaves_the_optimizer_fresh():
    """A stop agreed before a phase's first step (say, during the dense run's last evaluation)
    checkpoints a fresh optimizer: DCP's get_state_dict would first step it with lr 0, which
    starts Adam's step count and changes the bias correction of every later step."""
    from dst_kernels.train import dist as DIST
    from dst_kernels.train.loop import RunConfig, Trainer

    def trainer():
        torch.manual_seed(0)
        model = build_model("lenet300", 10)
        dst.sparsify(model)
        cfg = RunConfig(epochs=1, lr=1e-3, optimizer="adam", fsdp=True)
        return Trainer(model, None, None, cfg, label="dst", ctx=DIST.Context())

    def check():
        first = trainer()
        state = first.state_dict()
        assert state["optimizer"] is None and not first.opt.state, "the optimizer was not stepped"
        assert type(state["model"]["1.threshold"]) is torch.Tensor
        second = trainer()
        second.load_state_dict(state)
        assert not second.opt.state
        x, y = torch.randn(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])
        for t in (first, second):
            torch.nn.functional.cross_entropy(t.model(x), y).backward()
            t.opt.step()
            t.global_step += 1
        a, b = first.state_dict(), second.state_dict()
        assert a["optimizer"]["state"]["1.weight"]["step"] == 1
        for name in a["model"]:
            assert torch.equal(a["model"][name], b["model"][name]), name

    DIST.setup("cpu", group=True)
    try:
        check()
    finally:
        DIST.teardown()
    assert not W.gloo_threads(), "the group was freed: its gloo threads are joined"


@needs_fsdp
def test_fsdp_error_before_training_leaves_no_process_group(tmp_path, capsys):
    from test_train import run_cli

    rc, err = run_cli(capsys, *ARGS, "--data-dir", tmp_path / "absent", "--out", tmp_path / "run", "--fsdp")
    assert rc == 2 and "dst-train: error:" in err
    assert not dist.is_initialized(), "the world-of-one group was destroyed"


on_cuda = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    needs_fsdp,
]


@pytest.fixture(scope="module")
def cuda_one_process(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("one-cuda") / "run"
    proc = _dst_train(data, out, device="cuda")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.parametrize(
    "how, nproc, device",
    [
        pytest.param("world-of-one", None, "cuda", marks=on_cuda),  # NCCL through an in-memory store
        pytest.param("torchrun-1", 1, "cuda", marks=on_cuda),  # NCCL through torchrun's rendezvous
        pytest.param("cpu-on-a-gpu-machine", 2, "cpu", marks=on_cuda),  # the mesh follows --device
    ],
)
def test_fsdp_on_a_cuda_machine(data, tmp_path, request, how, nproc, device):
    """--fsdp where CUDA exists: NCCL groups of one, and a --device cpu run whose mesh must not
    move the model to the GPU (FSDP2's default mesh is the accelerator)."""
    proc = _dst_train(data, tmp_path / how, "--fsdp", nproc=nproc, device=device)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ref = request.getfixturevalue("cuda_one_process" if device == "cuda" else "one_process")
    _assert_same_run(tmp_path / how, ref, rel=1e-3 if device == "cuda" else 1e-4)
    summary = json.loads((tmp_path / how / "summary.json").read_text())
    assert summary["fsdp"] is True and summary["device"].startswith(device)


def test_world_of_one_on_cuda_names_its_device(monkeypatch):
    """``--fsdp --device cuda`` without torchrun: NCCL needs the current device set, and
    ``torch.cuda.set_device`` refuses a device without an index."""
    from dst_kernels.train import dist as DIST

    calls = []
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", d)))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: calls.append(("init", backend)))
    ctx, device = DIST.setup("cuda", group=True)
    assert device == "cuda:3" and not ctx.distributed
    assert calls == [("set_device", torch.device("cuda:3")), ("init", "nccl")]
    calls.clear()
    assert DIST.setup("cuda:1", group=True)[1] == "cuda:1"
    assert calls == [("set_device", torch.device("cuda:1")), ("init", "nccl")]
