"""The whole DST training step under ``torch.compile(fullgraph=True)``.

Forward (with the reset rule), the loss with the sparse regulariser (through the
DensityController's penalty), backward and the optimiser update trace into one graph and give
the weights eager mode gives. Two things torch needs for that: ``trace_autograd_ops`` (dynamo
traces ``loss.backward()`` / ``torch.autograd.grad`` only with it), and the functional
optimisers (``torch.optim.sgd.sgd``, ``torch.optim.adam.adam``): ``Optimizer.step`` breaks the
graph on purpose (``torch.optim.optimizer._use_grad``).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import CUDA_PARAM, assert_close_rel
from torch import nn
from torch.optim.adam import adam
from torch.optim.sgd import sgd

import dst_kernels as dst

BACKENDS = ["reference"] + (["native"] if "native" in dst.available_backends("cpu") else [])


class _Net(nn.Module):
    def __init__(self, backend, device):
        super().__init__()
        self.conv = dst.DSTConv2d(3, 6, 3, backend=backend, device=device)
        self.fc1 = dst.DSTLinear(6 * 6 * 6, 32, backend=backend, device=device)
        self.fc2 = dst.DSTLinear(32, 4, backend=backend, device=device)

    def forward(self, x):
        x = F.max_pool2d(torch.relu(self.conv(x)), 2)
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def _model(backend, device="cpu"):
    torch.manual_seed(0)
    model = _Net(backend, device)
    with torch.no_grad():
        model.conv.threshold.fill_(10.0)  # the reset rule fires in the first step
        model.fc1.threshold.uniform_(0.0, 0.05)
    return model


def _sgd(params, grads, momentum_buffers):
    """``torch.optim.SGD(lr=0.05, momentum=0.9, weight_decay=1e-4).step()`` as a function."""
    sgd(
        params,
        grads,
        momentum_buffers,
        lr=0.05,
        momentum=0.9,
        weight_decay=1e-4,
        dampening=0.0,
        nesterov=False,
        maximize=False,
        foreach=False,
    )


def _make_step(model, controller, optimizer: str):
    """One training step on tensors the caller owns: params, optimiser state, controller."""
    params = list(model.parameters())
    state = [torch.zeros_like(p) for p in params]
    state2 = [torch.zeros_like(p) for p in params]
    steps = [torch.zeros((), device=p.device) for p in params]

    def step(x, y):
        loss = F.cross_entropy(model(x), y) + controller.penalty()
        grads = list(torch.autograd.grad(loss, params))
        with torch.no_grad():
            if optimizer == "sgd":
                _sgd(params, grads, state)
            else:
                adam(
                    params,
                    grads,
                    state,
                    state2,
                    [],
                    steps,
                    amsgrad=False,
                    beta1=0.9,
                    beta2=0.999,
                    lr=1e-2,
                    weight_decay=0.0,
                    eps=1e-8,
                    maximize=False,
                    foreach=False,
                    capturable=params[0].is_cuda,  # CUDA graphs need the step count on the GPU
                )
        return loss.detach()

    return step


def _run(backend, optimizer, compiler, n_steps=6, device="cpu", mode=None):
    model = _model(backend, device)
    controller = dst.DensityController(model, 0.3, alpha=1e-2, every=2)
    step = _make_step(model, controller, optimizer)
    if compiler is not None:
        step = torch.compile(step, fullgraph=True, backend=compiler, mode=mode)  # raises on a graph break
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(n_steps):
        x = torch.randn(16, 3, 14, 14, generator=g).to(device)
        y = torch.randint(0, 4, (16,), generator=g).to(device)
        losses.append(step(x, y).clone())  # a CUDA graph's outputs are overwritten by its next replay
        controller.step()  # host-side counter; the update itself runs on the device
    return model, controller, torch.stack(losses)


def _compare(eager, compiled):
    (m_e, c_e, l_e), (m_c, c_c, l_c) = eager, compiled
    assert_close_rel(l_c, l_e, 1e-5, "loss")
    assert_close_rel(c_c.alpha, c_e.alpha, 1e-5, "alpha")
    for (name, p), q in zip(m_e.named_parameters(), m_c.parameters()):
        assert_close_rel(q.detach(), p.detach(), 1e-5, name)
    # Inductor's fused kernels round differently from eager's (their own vector widths and
    # reduction splits): the weights agree to ~1e-7, so a mask may differ only where |W| is
    # that close to its threshold.
    for name, layer in (("conv", m_e.conv), ("fc1", m_e.fc1), ("fc2", m_e.fc2)):
        w, t = layer.dense_weight().detach(), layer.threshold.detach()
        q = w.abs().flatten(1) - t[:, None]
        tie = (q.abs() <= 1e-5 * w.abs().max()).reshape(w.shape)
        differ = getattr(m_c, name).mask() != layer.mask()
        assert not (differ & ~tie).any(), f"{name} mask differs away from a tie"
        assert tie.sum() <= max(2, w.numel() // 1000), f"{name}: too many near-ties to compare"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_whole_step_compiles_fullgraph_and_matches_eager(backend, optimizer):
    """Inductor for the backend "auto" picks; aot_eager (same capture, no codegen) otherwise."""
    auto = dst.functional.resolve_backend("auto", torch.device("cpu"))
    compiler = "inductor" if backend == auto and optimizer == "sgd" else "aot_eager"
    torch._dynamo.reset()
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        eager = _run(backend, optimizer, None)
        compiled = _run(backend, optimizer, compiler)
    _compare(eager, compiled)
    # The reset rule ran inside the graph: the conv's thresholds came back from 10.
    assert compiled[0].conv.threshold.abs().max().item() < 1.0


def test_sgd_functional_step_is_torch_optim_sgd():
    """The functional update used above is what ``torch.optim.SGD`` does."""
    model_a, model_b = _model("reference"), _model("reference")
    params_b = list(model_b.parameters())
    opt = torch.optim.SGD(model_a.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    bufs = [torch.zeros_like(p) for p in params_b]
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randn(16, 3, 14, 14, generator=g)
        y = torch.randint(0, 4, (16,), generator=g)
        loss_a = F.cross_entropy(model_a(x), y) + 1e-2 * dst.sparsity_loss(model_a)
        opt.zero_grad()
        loss_a.backward()
        opt.step()
        loss_b = F.cross_entropy(model_b(x), y) + 1e-2 * dst.sparsity_loss(model_b)
        grads = list(torch.autograd.grad(loss_b, params_b))
        with torch.no_grad():
            _sgd(params_b, grads, bufs)
    for p, q in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(p, q)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("device", [CUDA_PARAM])
def test_whole_step_captures_in_a_cuda_graph(device):
    """mode="reduce-overhead": the compiled step replays as one CUDA graph (no host sync in it)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        eager = _run("auto", "adam", None, n_steps=8, device=device)
        compiled = _run("auto", "adam", "inductor", n_steps=8, device=device, mode="reduce-overhead")
    _compare(eager, compiled)
    assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])
