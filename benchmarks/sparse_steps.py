"""The sparse family's implementations: a DST training step held on each path, and the
LeNet-300-100 inference models (``bench_sparse.py`` runs them; the harness builds them)."""

from __future__ import annotations

import torch
from torch import nn

import dst_kernels as dst
from dst_kernels.sparse import sparse_mode

__all__ = ["build_sparse_step", "sparse_impls"]


def sparse_impls(case) -> list[str]:
    native = "native" in dst.available_backends(case.device)
    if case.mode == "forward":
        return ["dense", "torch-sparse"] + (["native"] if native else [])
    return ["dense"] + (["native-dense", "native"] if native else [])


def _thresholds_for(weight: torch.Tensor, density: float) -> torch.Tensor:
    w = weight.detach().abs().float()
    if density >= 1.0:
        return torch.full((weight.shape[0],), -1.0, dtype=weight.dtype, device=weight.device)
    return torch.quantile(w, 1.0 - density, dim=1).to(weight.dtype)


def _dst_linear(k: int, n: int, density: float, dtype) -> dst.DSTLinear:
    torch.manual_seed(0)
    layer = dst.DSTLinear(k, n, min_density=None, backend="native", dtype=dtype)
    with torch.no_grad():
        layer.threshold.copy_(_thresholds_for(layer.weight, density))
    return layer.train()


def held(mode: str, fn):
    def run():
        with sparse_mode(mode):
            fn()

    return run


def training_step(impl: str, case):
    tokens, k, n = case.shape
    if impl == "dense":
        torch.manual_seed(0)
        layer = nn.Linear(k, n, dtype=case.dtype)
    else:
        layer = _dst_linear(k, n, case.density, case.dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(tokens, k, generator=g).to(case.dtype).requires_grad_(True)
    grad = torch.randn(tokens, n, generator=g).to(case.dtype)
    wrt = [*layer.parameters(), x]

    def step():
        torch.autograd.grad(layer(x), wrt, grad)

    return held("never", step) if impl == "native-dense" else step


class _TorchSparseLinear(nn.Module):
    """A folded Linear whose weight is a ``torch.sparse_csr`` tensor (the plain-PyTorch peer)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight = linear.weight.detach().to_sparse_csr()
        self.bias = linear.bias.detach()

    def forward(self, x):
        return torch.addmm(self.bias[:, None], self.weight, x.t()).t()


def _lenet(density: float) -> nn.Module:
    from dst_kernels.train.models import lenet_300_100

    torch.manual_seed(0)
    model = dst.sparsify(lenet_300_100(), backend="native")
    with torch.no_grad():
        for m in model.modules():
            if dst.is_dst_layer(m):
                m.threshold.copy_(_thresholds_for(m.weight, density))
    return model.eval()


def _inference_step(impl: str, case):
    batch = case.shape[0]
    model = _lenet(case.density)
    if impl == "native":
        net = dst.export.to_sparse(model, max_density=1.0)
    else:
        net = dst.export.fold(model)
        if impl == "torch-sparse":
            for i, m in enumerate(net):
                if type(m) is nn.Linear:
                    net[i] = _TorchSparseLinear(m)
    x = torch.randn(batch, 1, 28, 28, generator=torch.Generator().manual_seed(1)).to(case.dtype)

    def step():
        with torch.no_grad():
            net(x)

    return step


def build_sparse_step(impl: str, case):
    """The timed callable of ``impl`` for a case of the sparse family."""
    if case.mode == "forward":
        return _inference_step(impl, case)
    return training_step(impl, case)


# ----------------------------------------------------------------------------- crossover sweep
