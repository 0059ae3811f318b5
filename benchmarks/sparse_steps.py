"""The sparse family's implementations: a DST training step held on each path, the inference
models (LeNet-300-100, LeNet-5, VGG-16), and the peer SparseProp where it is installed
(``bench_sparse.py`` runs them; the harness builds them)."""

from __future__ import annotations

import functools
import warnings

import torch
from torch import nn

import dst_kernels as dst
from dst_kernels.sparse import sparse_mode

__all__ = ["build_sparse_step", "sparse_impls", "sparseprop_missing", "is_conv", "is_lstm", "CONV_MODELS"]

# The peer's registry release; it compiles with -march=native on install.
SPARSEPROP = "sparseprop==0.1.14"
# Conv inference cases: (batch, channels, height, width) picks the model.
CONV_MODELS = {(1, 28, 28): "lenet5", (3, 32, 32): "vgg16"}


@functools.cache
def sparseprop_missing() -> str | None:
    """None where SparseProp imports, else why not (the peer's columns are then left out)."""
    try:
        import sparseprop.modules  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any failure to build or import means no peer
        reason = f"SparseProp is not importable ({type(e).__name__}: {e}); install it with " + (
            f"pip install --no-build-isolation {SPARSEPROP} (needs scipy)"
        )
        warnings.warn(reason + ": its peer columns are left out", stacklevel=2)
        return reason
    return None


def is_conv(case) -> bool:
    """A conv case: a training step of one conv layer (N, C, H, W, out, k), or conv-model inference."""
    return len(case.shape) == 6 or (case.mode == "forward" and tuple(case.shape[1:]) in CONV_MODELS)


def is_lstm(case) -> bool:
    """An LSTM case: a training step of a DSTLSTM (batch, steps, input, hidden, layers)."""
    return len(case.shape) == 5


def sparse_impls(case) -> list[str]:
    native = "native" in dst.available_backends(case.device)
    if is_lstm(case):
        if case.mode == "forward":
            return ["dense"] + (["native"] if native else [])
        # native-dense: the layer held on PyTorch's fused LSTM (the path before the kernel).
        return ["dense"] + (["native-dense", "native"] if native else [])
    # The peer stores a static mask: it is measured at the sparse densities only.
    peers = [] if sparseprop_missing() or case.density >= 0.5 else ["sparseprop"]
    if case.mode == "forward":
        if is_conv(case):
            # dense-cl: the folded model and its input in channels_last (ATen's faster pooling);
            # native-unfused: to_sparse without the fused ReLU and max pool.
            return ["dense", "dense-cl"] + (["native-unfused", "native"] if native else [])
        return ["dense", "torch-sparse"] + (["native"] if native else []) + peers
    if is_conv(case) and peers:
        peers = ["sparseprop", "sparseprop-on"]
    return ["dense"] + peers + (["native-dense", "native"] if native else [])


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


def _conv_layers(impl: str, case):
    n, c, h, w, oc, k = case.shape
    pad, bias = (0, True) if k == 5 else (k // 2, False)  # LeNet-5's 5x5 convs have biases
    torch.manual_seed(0)
    if impl == "dense":
        layer = nn.Conv2d(c, oc, k, padding=pad, bias=bias, dtype=case.dtype)
    else:
        layer = dst.DSTConv2d(c, oc, k, padding=pad, bias=bias, min_density=None, backend="native")
        layer = layer.to(case.dtype)
        with torch.no_grad():
            layer.threshold.copy_(_thresholds_for(layer.weight.flatten(1), case.density))
        if impl.startswith("sparseprop"):
            from sparseprop.modules import SparseConv2d

            layer = SparseConv2d.from_dense(
                dst.export.fold(layer), vectorizing_over_on=impl == "sparseprop-on"
            )
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, c, h, w, generator=g).to(case.dtype).requires_grad_(True)
    out = (h + 2 * pad - k + 1, w + 2 * pad - k + 1)
    grad = torch.randn(n, oc, *out, generator=g).to(case.dtype)
    return layer.train(), x, grad


def _lstm_inference(impl: str, case):
    batch, steps, n_in, hidden, layers = case.shape
    torch.manual_seed(0)
    layer = dst.DSTLSTM(n_in, hidden, layers, batch_first=True, min_density=None, backend="native")
    with torch.no_grad():
        for w, t in layer._dst_pairs:
            getattr(layer, t).copy_(_thresholds_for(layer._parameters[w], case.density))
    layer = layer.to(case.dtype).eval()
    net = dst.export.to_sparse(layer, max_density=1.0) if impl == "native" else dst.export.fold(layer)
    x = torch.randn(batch, steps, n_in, generator=torch.Generator().manual_seed(1)).to(case.dtype)

    def step():
        with torch.no_grad():
            net(x)

    return step


def _lstm_step(impl: str, case):
    batch, steps, n_in, hidden, layers = case.shape
    torch.manual_seed(0)
    if impl == "dense":
        layer = nn.LSTM(n_in, hidden, layers, batch_first=True, dtype=case.dtype)
    else:
        layer = dst.DSTLSTM(n_in, hidden, layers, batch_first=True, min_density=None, backend="native")
        layer = layer.to(case.dtype)
        with torch.no_grad():
            for w, t in layer._dst_pairs:
                getattr(layer, t).copy_(_thresholds_for(layer._parameters[w], case.density))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, steps, n_in, generator=g).to(case.dtype)
    grad = torch.randn(batch, steps, hidden, generator=g).to(case.dtype)
    wrt = list(layer.parameters())
    layer.train()

    def step():
        torch.autograd.grad(layer(x)[0], wrt, grad)

    return held("never", step) if impl == "native-dense" else step


def training_step(impl: str, case):
    if is_lstm(case):
        return _lstm_step(impl, case)
    if len(case.shape) == 6:
        layer, x, grad = _conv_layers(impl, case)
        wrt = [*layer.parameters(), x]

        def conv_step():
            torch.autograd.grad(layer(x), wrt, grad)

        return held("never", conv_step) if impl == "native-dense" else conv_step
    tokens, k, n = case.shape
    if impl == "dense":
        torch.manual_seed(0)
        layer = nn.Linear(k, n, dtype=case.dtype)
    else:
        layer = _dst_linear(k, n, case.density, case.dtype)
        if impl == "sparseprop":
            from sparseprop.modules import SparseLinear as PeerLinear

            folded = dst.export.fold(layer)
            layer = PeerLinear(folded.weight.detach(), nn.Parameter(folded.bias.detach().clone()))
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


def _model(name: str, density: float) -> nn.Module:
    from dst_kernels.train.models import build_model

    torch.manual_seed(0)
    model = dst.sparsify(build_model(name), backend="native")
    with torch.no_grad():
        for m in model.modules():
            if dst.is_dst_layer(m):
                m.threshold.copy_(_thresholds_for(m.weight.flatten(1), density))
    return model.eval()


def _inference_step(impl: str, case):
    batch = case.shape[0]
    name = CONV_MODELS.get(tuple(case.shape[1:]), "lenet300")
    model = _model(name, case.density)
    if impl in ("native", "native-unfused"):
        fuse = impl == "native"
        net = dst.export.to_sparse(model, max_density=1.0, fuse_relu=fuse, fuse_pool=fuse)
    else:
        net = dst.export.fold(model)
        if impl in ("torch-sparse", "sparseprop"):
            for i, m in enumerate(net):
                if type(m) is not nn.Linear:
                    continue
                if impl == "torch-sparse":
                    net[i] = _TorchSparseLinear(m)
                else:
                    from sparseprop.modules import SparseLinear as PeerLinear

                    net[i] = PeerLinear(m.weight.detach(), nn.Parameter(m.bias.detach().clone()))
    shape = case.shape[1:] if name != "lenet300" else (1, 28, 28)
    x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(1)).to(case.dtype)
    if impl == "dense-cl":
        net = net.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)

    def step():
        with torch.no_grad():
            net(x)

    return step


def build_sparse_step(impl: str, case):
    """The timed callable of ``impl`` for a case of the sparse family."""
    if case.mode == "forward":
        return _lstm_inference(impl, case) if is_lstm(case) else _inference_step(impl, case)
    return training_step(impl, case)


# ----------------------------------------------------------------------------- crossover sweep
