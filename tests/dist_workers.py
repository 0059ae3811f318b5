"""Worker processes of tests/test_distributed.py (a module of its own so spawned processes can
import it). Every worker trains a small float64 DST model on its rank's share of a global batch
and saves what the parent compares with one process training on the whole batch."""

from __future__ import annotations

import contextlib
import faulthandler
import functools
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import dst_kernels as dst
from dst_kernels.train import dist as DIST

faulthandler.enable(all_threads=True)  # a worker that aborts prints where (pytest only covers itself)

ALPHA = 1e-2
STEPS = 4
LR = 0.05


class ConvLSTMNet(nn.Module):
    """A DSTConv2d feeding a DSTLSTM (rows of the feature map as time steps), then a DSTLinear."""

    def __init__(self, backend: str):
        super().__init__()
        self.conv = dst.DSTConv2d(2, 3, 3, padding=1, backend=backend)
        self.lstm = dst.DSTLSTM(3 * 6, 5, batch_first=True, backend=backend)
        self.head = dst.DSTLinear(5, 4, backend=backend)

    def forward(self, x):
        f = torch.relu(self.conv(x))  # [B, 3, 6, 6]
        seq = f.permute(0, 2, 1, 3).reshape(x.shape[0], 6, 18)
        out, _ = self.lstm(seq)
        return self.head(out[:, -1])


class WithUnused(nn.Module):
    """An MLP with a layer the forward never uses (DDP needs find_unused_parameters or a static
    graph). With ``reg_in_forward`` the forward also returns the regulariser, so every threshold
    DDP sees used is used inside the forward."""

    def __init__(self, backend: str, reg_in_forward: bool = False):
        super().__init__()
        self.a = dst.DSTLinear(7, 13, backend=backend)
        self.b = dst.DSTLinear(13, 4, backend=backend)
        self.unused = dst.DSTLinear(13, 4, backend=backend)
        self.reg_in_forward = reg_in_forward

    def forward(self, x):
        y = self.b(torch.relu(self.a(x)))
        return (y, ALPHA * dst.sparsity_loss(self)) if self.reg_in_forward else y


def build_model(kind: str, backend: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "conv_lstm":
        model = ConvLSTMNet(backend)
    elif kind in ("unused", "unused_reg_in_forward"):
        model = WithUnused(backend, reg_in_forward=kind == "unused_reg_in_forward")
    elif kind == "narrow_head":  # 2 output rows: with 3 ranks one of them holds none
        model = nn.Sequential(
            dst.DSTLinear(7, 13, backend=backend), nn.ReLU(), dst.DSTLinear(13, 2, backend=backend)
        )
    else:
        model = nn.Sequential(
            dst.DSTLinear(7, 13, backend=backend), nn.ReLU(), dst.DSTLinear(13, 4, backend=backend)
        )
    model = model.double()
    with torch.no_grad():
        first = next(m for m in model.modules() if dst.is_dst_layer(m))
        first.threshold.fill_(10.0)  # keeps nothing: the reset rule fires in the first forward
        for m in model.modules():
            if isinstance(m, dst.DSTLinear) and m is not first:
                m.threshold.copy_(torch.linspace(0.0, 0.2, m.threshold.numel(), dtype=torch.float64))
    return model


def _outputs(kind: str) -> int:
    return 2 if kind == "narrow_head" else 4


def global_batches(kind: str, world: int, micro: int = 1, per_rank: int = 3):
    """``[step][micro][rank] -> (x, y)``, the same on every process."""
    g = torch.Generator().manual_seed(1)
    shape = (2, 6, 6) if kind == "conv_lstm" else (7,)
    return [
        [
            [
                (
                    torch.randn(per_rank, *shape, generator=g, dtype=torch.float64),
                    torch.randn(per_rank, _outputs(kind), generator=g, dtype=torch.float64),
                )
                for _ in range(world)
            ]
            for _ in range(micro)
        ]
        for _ in range(STEPS)
    ]


def loss_fn(model_out, y, model):
    if isinstance(model_out, tuple):  # the model computed its regulariser in its forward
        return F.mse_loss(model_out[0], y) + model_out[1]
    return F.mse_loss(model_out, y) + ALPHA * dst.sparsity_loss(model)


def train_single(kind: str, backend: str, world: int, micro: int = 1) -> dict:
    """One process, the concatenated batch of every rank (per micro-batch)."""
    model = build_model(kind, backend).train()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    for step in global_batches(kind, world, micro):
        for parts in step:
            x = torch.cat([p[0] for p in parts])
            y = torch.cat([p[1] for p in parts])
            loss_fn(model(x), y, model).backward()
        opt.step()
        opt.zero_grad()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def fsdp_available() -> bool:
    """Whether this torch has FSDP2 (``torch.distributed.fsdp.fully_shard``)."""
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return False
    return True


def _init(rank: int, world: int, store: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)


def gloo_threads() -> list[str]:
    """The names of this process's gloo threads (Linux: /proc; elsewhere none are seen)."""
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return []
    names = []
    for tid in tasks:
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                names.append(f.read().strip())
        except OSError:  # the thread ended meanwhile
            pass
    return [n for n in names if "gloo" in n]


def in_group(body):
    """A spawned worker ``body(rank, world, *args)`` inside a gloo group joined through the file
    ``store``. Once ``body`` has returned (its models and meshes gone), the group is left and
    freed, and no gloo thread may be left: one alive while the interpreter finalises can abort
    the worker ("terminate called without an active exception")."""

    @functools.wraps(body)
    def worker(rank: int, world: int, store: str, *args) -> None:
        _init(rank, world, store)
        body(rank, world, *args)
        DIST.teardown()
        left = gloo_threads()
        assert not left, f"gloo threads still running after the group was freed: {left}"

    return worker


def _ddp_run(rank, world, kind, backend, micro=1, find_unused=False, perturb=False, static=False):
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = build_model(kind, backend).train()
    ddp = DDP(model, find_unused_parameters=find_unused, static_graph=static)
    opt = torch.optim.SGD(ddp.parameters(), lr=LR, momentum=0.9)
    thresholds = []
    for step in global_batches(kind, world, micro):
        for k, parts in enumerate(step):
            x, y = parts[rank]
            if perturb and rank == 1:
                x = x * 7.0 + 1.0  # another local batch: the gradients still agree after the all-reduce
            ctx = ddp.no_sync() if k < micro - 1 else contextlib.nullcontext()
            with ctx:
                loss_fn(ddp(x), y, model).backward()
        opt.step()
        opt.zero_grad()
        thresholds.append(
            torch.cat([t.detach().clone() for n, t in model.named_parameters() if "threshold" in n])
        )
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, thresholds


@in_group
def ddp_worker(rank: int, world: int, out: str, backend: str) -> None:
    """Every DDP scenario for one backend, in one process group."""
    results = {}
    for name, kwargs in [
        ("mlp", dict(kind="mlp")),
        ("mlp_find_unused", dict(kind="mlp", find_unused=True)),
        ("unused_static_graph", dict(kind="unused", static=True)),
        ("unused_find_unused", dict(kind="unused_reg_in_forward", find_unused=True)),
        ("accumulate", dict(kind="mlp", micro=2)),
        ("conv_lstm", dict(kind="conv_lstm")),
        ("perturbed", dict(kind="mlp", perturb=True)),
    ]:
        results[name] = _ddp_run(rank, world, backend=backend, **kwargs)
    torch.save(results, os.path.join(out, f"ddp-{backend}-rank{rank}.pt"))


def _fit_local(model, kind: str, world: int, rank: int, dtype=None) -> list[torch.Tensor]:
    """SGD steps of ``model`` on this rank's share of every global batch; the losses."""
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    losses = []
    for step in global_batches(kind, world):
        x, y = step[0][rank]
        if dtype is not None:
            x, y = x.to(dtype), y.to(dtype)
        loss = loss_fn(model(x), y, model)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach())
    return losses


@in_group
def fsdp_worker(rank: int, world: int, out: str, backend: str) -> None:
    """FSDP2 over DST layers against the single-process step; then the report, a full state
    dict (gathered, saved, loaded into a fresh sharded model), mixed precision, and the error
    for sharded thresholds without the reset hook."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        set_model_state_dict,
    )
    from torch.distributed.fsdp import MixedPrecisionPolicy
    from torch.distributed.fsdp import fully_shard as torch_fully_shard

    from dst_kernels.distributed import fully_shard

    full_sd = StateDictOptions(full_state_dict=True, cpu_offload=True)
    results = {}
    model = fully_shard(build_model("mlp", backend).train())
    _fit_local(model, "mlp", world, rank)
    results["state"] = {
        k: v.detach().clone() for k, v in get_model_state_dict(model, options=full_sd).items()
    }
    results["report"] = dst.sparsity_report(model).rows()
    results["density"] = [m.density() for m in model if dst.is_dst_layer(m)]
    results["threshold_is_dtensor"] = type(model[0].threshold).__name__
    try:  # a new Parameter for a sharded masked weight is still refused
        model[0].weight = nn.Parameter(torch.randn(13, 7, dtype=torch.float64))
        results["guard_error"] = None
    except RuntimeError as e:
        results["guard_error"] = str(e)

    # A DSTConv2d + DSTLSTM model: FSDP2 swaps the LSTM's sharded and unsharded weights in and
    # out through the module's setattr (nn.LSTM keeps its own list of weights).
    conv_lstm = fully_shard(build_model("conv_lstm", backend).train())
    _fit_local(conv_lstm, "conv_lstm", world, rank)
    results["conv_lstm"] = {
        k: v.detach().clone() for k, v in get_model_state_dict(conv_lstm, options=full_sd).items()
    }

    # A DensityController's penalty on sharded thresholds: each rank's shards, summed over ranks.
    controlled = fully_shard(build_model("mlp", backend).train())
    penalty = dst.DensityController(controlled, 0.5, alpha=ALPHA).penalty()
    results["penalty_type"] = type(penalty).__name__
    penalty = penalty.detach().clone()
    dist.all_reduce(penalty)
    results["penalty"] = penalty

    # Checkpoint: the gathered full state dict loads into a fresh sharded model.
    fresh = fully_shard(build_model("mlp", backend).train())
    # cpu_offload gathers the full state on rank 0 only; broadcast it from there.
    load = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(fresh, {k: v.clone() for k, v in results["state"].items()}, options=load)
    results["reloaded"] = {
        k: v.detach().clone() for k, v in get_model_state_dict(fresh, options=full_sd).items()
    }

    # Mixed precision: bf16 parameters in the forward, fp32 gradient reduction.
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    mp_model = fully_shard(build_model("mlp", backend).float().train(), mp_policy=policy)
    results["mp_losses"] = torch.stack(_fit_local(mp_model, "mlp", world, rank, dtype=torch.float32))
    results["mp_state"] = {
        k: v.detach().clone() for k, v in get_model_state_dict(mp_model, options=full_sd).items()
    }

    # torch's own fully_shard without the reset hooks: the regulariser refuses to go on.
    plain = build_model("mlp", backend).train()
    for m in plain:
        if dst.is_dst_layer(m):
            torch_fully_shard(m)
    torch_fully_shard(plain)
    x, y = global_batches("mlp", world)[0][0][rank]
    try:
        loss_fn(plain(x), y, plain)
        results["unhooked_error"] = None
    except RuntimeError as e:
        results["unhooked_error"] = str(e)
    torch.save(results, os.path.join(out, f"fsdp-{backend}-rank{rank}.pt"))


@in_group
def fsdp_uneven_worker(rank: int, world: int, out: str, backend: str) -> None:
    """FSDP2 where a rank holds no rows of the head (2 rows over 3 ranks)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from dst_kernels.distributed import fully_shard

    model = fully_shard(build_model("narrow_head", backend).train())
    with torch.no_grad():  # the head keeps nothing: its reset fires with an empty shard on rank 2
        model[2].threshold.to_local().fill_(10.0)
    _fit_local(model, "narrow_head", world, rank)
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    torch.save(
        {k: v.detach().clone() for k, v in state.items()},
        os.path.join(out, f"uneven-{backend}-rank{rank}.pt"),
    )


@in_group
def cli_worker(rank: int, world: int, argv: list[str], stop_at, out: str) -> None:
    """One rank of ``dst-train`` as torchrun starts it (its environment variables), in this
    process so that a test can ask rank 0 to stop (SIGINT) after global step ``stop_at =
    (label, n)``; writes the exit status to ``out/rc<rank>``. The process group is joined
    through a file store (``dst-train`` uses a group it finds), so no port can collide."""
    import signal

    from dst_kernels.train import cli

    env = {"RANK": rank, "WORLD_SIZE": world, "LOCAL_RANK": rank, "LOCAL_WORLD_SIZE": world}
    os.environ.update({name: str(value) for name, value in env.items()})
    torch.set_num_threads(1)

    def hook(trainer):
        if trainer.global_step == 1:  # what this rank trains: its module types and shard sizes
            weight = next(m for m in trainer.model.modules() if isinstance(m, nn.Linear)).weight
            local = weight.to_local() if hasattr(weight, "to_local") else weight
            seen[trainer.label] = {
                "root": [c.__name__ for c in type(trainer.model).__mro__],
                "weight": type(weight).__name__,
                "local_rows": local.shape[0],
                "rows": weight.shape[0],
            }
        if stop_at is not None and rank == 0 and (trainer.label, trainer.global_step) == tuple(stop_at):
            os.kill(os.getpid(), signal.SIGINT)  # the run's own handler: stop, agree, save

    seen: dict = {}

    rc = cli.main(list(argv), on_step=hook)
    with open(os.path.join(out, f"rc{rank}"), "w") as f:
        f.write(str(rc))
    torch.save(seen, os.path.join(out, f"seen{rank}.pt"))
