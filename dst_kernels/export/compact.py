"""``compact``: a folded model with its dead neurons and filters removed.

A unit (an output row of a Linear, a filter of a Conv2d) can go when nothing downstream
depends on it through anything but a constant:

* its outgoing weights are all pruned (the next layer's columns for it are all zero): its
  value does not matter; or
* its own weights are all pruned: it outputs its bias (a constant, a constant image for a
  conv), which flows through the element-wise and per-channel modules up to the next layer
  and is added to that layer's bias instead.

The next layer loses the matching inputs; BatchNorm between the two loses the channel. The
pass repeats until nothing changes (a removal can empty other rows or columns).

It works on chains whose order of execution is known: ``nn.Sequential`` (nested ones
too) and models that state their chain with ``compact_chain()`` (``dst-train``'s ``vgg16``;
its ``lenet300`` and ``lenet5`` are ``nn.Sequential``).
Between two layers it accepts element-wise activations, dropout, BatchNorm1d/2d (running
statistics), max / average / adaptive pooling and ``nn.Flatten``; anything else there, a
non-chain model (residual blocks, RNNs), grouped convolutions, or a Linear feeding a conv
raise ``ValueError`` / ``TypeError`` naming what it cannot prove safe.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from dst_kernels.export.fold import fold

__all__ = ["compact"]

_POINTWISE = (
    nn.Identity,
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardtanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Softplus,
    nn.Softsign,
    nn.Tanhshrink,
)
# Identity in eval mode, which is where compact's result computes the same function.
_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout, nn.FeatureAlphaDropout)
_SPATIAL_CONSTANT = (nn.MaxPool2d, nn.AdaptiveMaxPool2d, nn.AdaptiveAvgPool2d)
_LAYERS = (nn.Linear, nn.Conv2d)


@dataclass
class _Link:
    """Two consecutive layers and what runs between them."""

    producer: nn.Module
    between: list[nn.Module]
    consumer: nn.Module
    where: str  # for messages


def _name(module: nn.Module) -> str:
    return type(module).__name__


def _leaves(module: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    if isinstance(module, nn.Sequential):
        out = []
        for name, child in module.named_children():
            out += _leaves(child, f"{prefix}.{name}" if prefix else name)
        return out
    return [(prefix, module)]


def _chain(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's modules in the order its forward runs them, or TypeError.

    An ``nn.Sequential`` is its own chain. Any other model can state its chain with a method
    ``compact_chain()`` returning ``(name, module)`` pairs in the order of its forward (nested
    ``nn.Sequential`` entries are flattened; what the forward computes between its modules is
    given as an equivalent module, e.g. ``("forward: flatten(1)", nn.Flatten())``), as
    ``dst-train``'s VGG-16 does."""
    if isinstance(model, nn.Sequential):
        return _leaves(model)
    chain = getattr(model, "compact_chain", None)
    if callable(chain):
        out = []
        for name, module in chain():
            out += _leaves(module, name)
        return out
    raise TypeError(
        f"compact supports nn.Sequential chains and models with a compact_chain() method (as "
        f"dst-train's lenet300, lenet5 and vgg16); it cannot follow the forward of "
        f"{type(model).__name__} (residual connections, RNNs and custom forwards are not "
        f"analysed). Use dst.export.fold(model) for those."
    )


def _links(chain: list[tuple[str, nn.Module]]) -> list[_Link]:
    layers = [i for i, (_, m) in enumerate(chain) if isinstance(m, _LAYERS)]
    links = []
    for a, b in zip(layers, layers[1:]):
        (pname, producer), (cname, consumer) = chain[a], chain[b]
        where = f"between {pname!r} and {cname!r}"
        between = [m for _, m in chain[a + 1 : b]]
        for layer in (producer, consumer):
            if isinstance(layer, nn.Conv2d) and layer.groups != 1:
                raise ValueError(
                    f"compact: grouped convolution {where} (groups={layer.groups}) is not supported"
                )
        for name, m in chain[a + 1 : b]:
            if not _known_between(m):
                raise ValueError(
                    f"compact: cannot prove that {_name(m)} ({name!r}, {where}) keeps units independent; "
                    f"supported between layers: element-wise activations, dropout, BatchNorm1d/2d with "
                    f"running statistics, pooling, nn.Flatten"
                )
        if isinstance(producer, nn.Linear) and isinstance(consumer, nn.Conv2d):
            raise ValueError(f"compact: a Linear feeding a Conv2d ({where}) is not supported")
        links.append(_Link(producer, between, consumer, where))
    return links


def _known_between(m: nn.Module) -> bool:
    if isinstance(m, _POINTWISE + _DROPOUT + _SPATIAL_CONSTANT):
        return True
    if isinstance(m, nn.AvgPool2d):
        return True
    if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
        return m.track_running_stats and m.running_mean is not None
    if isinstance(m, nn.Flatten):
        return m.start_dim == 1 and m.end_dim == -1
    return False


def _units(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def _propagate(value: torch.Tensor, between: list[nn.Module]) -> torch.Tensor:
    """Per-unit constant after the modules between two layers (NaN: not a constant)."""
    for m in between:
        if isinstance(m, _POINTWISE):
            value = m.eval()(value.unsqueeze(0)).squeeze(0)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            scale = torch.rsqrt(m.running_var + m.eps)
            value = (value - m.running_mean) * scale
            if m.affine:
                value = value * m.weight + m.bias
        elif isinstance(m, nn.AvgPool2d):
            padded = any(p != 0 for p in ((m.padding,) if isinstance(m.padding, int) else m.padding))
            if padded or m.ceil_mode or m.divisor_override is not None:
                # windows at the border average in padding: only 0 stays a constant
                value = torch.where(value == 0, value, torch.full_like(value, math.nan))
        # dropout (eval), max / adaptive pooling and Flatten keep a constant image constant
    return value


def _columns(link: _Link) -> tuple[torch.Tensor, int]:
    """The consumer's weight viewed as [out, units, per-unit span] and that span."""
    units = _units(link.producer)
    w = link.consumer.weight
    if isinstance(link.consumer, nn.Conv2d):
        if w.shape[1] != units:
            raise ValueError(f"compact: {link.where}: {units} channels feed a conv expecting {w.shape[1]}")
        return w.reshape(w.shape[0], units, -1), 1
    if w.shape[1] % units:
        raise ValueError(
            f"compact: {link.where}: {units} units feed a Linear of {w.shape[1]} inputs (not a multiple)"
        )
    span = w.shape[1] // units
    if span > 1 and not any(isinstance(m, nn.Flatten) for m in link.between):
        raise ValueError(
            f"compact: {link.where}: a Linear reads {span} values per unit without an nn.Flatten"
        )
    return w.reshape(w.shape[0], units, span), span


def _absorbs_constants(consumer: nn.Module) -> bool:
    """A constant input channel adds a constant to every output (no zero-padded border)."""
    if isinstance(consumer, nn.Linear):
        return True
    padding = consumer.padding
    zero_pad = consumer.padding_mode == "zeros" and (
        padding == "same" or (padding != "valid" and any(p != 0 for p in padding))
    )
    return not zero_pad


@torch.no_grad()
def _compact_link(link: _Link) -> bool:
    producer, consumer = link.producer, link.consumer
    units = _units(producer)
    rows = producer.weight.reshape(units, -1)
    row_dead = (rows == 0).all(dim=1)
    cols, span = _columns(link)
    col_dead = (cols == 0).all(dim=2).all(dim=0)
    bias = (
        producer.bias
        if producer.bias is not None
        else torch.zeros(units, dtype=rows.dtype, device=rows.device)
    )
    const = _propagate(bias.detach().clone(), link.between)
    foldable = row_dead & ~torch.isnan(const)
    if not _absorbs_constants(consumer):
        foldable &= const == 0
    remove = col_dead | foldable
    if bool(remove.all()):
        remove[0] = False  # keep one unit: layers of width 0 are not what anyone wants
    if not bool(remove.any()):
        return False
    add = (remove & ~col_dead & (const != 0)).nonzero().flatten()
    if len(add):
        contribution = (cols[:, add, :].sum(dim=2) * const[add]).sum(dim=1)
        if consumer.bias is None:
            consumer.bias = nn.Parameter(torch.zeros_like(contribution))
        consumer.bias.add_(contribution.to(consumer.bias.dtype))
    keep = (~remove).nonzero().flatten()
    _keep_outputs(producer, keep)
    for m in link.between:
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            _keep_bn(m, keep)
    _keep_inputs(consumer, keep, units, span)
    return True


def _param(t: torch.Tensor, like: nn.Parameter) -> nn.Parameter:
    return nn.Parameter(t.contiguous(), requires_grad=like.requires_grad)


def _keep_outputs(layer: nn.Module, keep: torch.Tensor) -> None:
    layer.weight = _param(layer.weight[keep], layer.weight)
    if layer.bias is not None:
        layer.bias = _param(layer.bias[keep], layer.bias)
    if isinstance(layer, nn.Linear):
        layer.out_features = len(keep)
    else:
        layer.out_channels = len(keep)


def _keep_inputs(layer: nn.Module, keep: torch.Tensor, units: int, span: int) -> None:
    w = layer.weight
    if isinstance(layer, nn.Conv2d):
        layer.weight = _param(w[:, keep], w)
        layer.in_channels = len(keep)
        return
    cols = (keep.unsqueeze(1) * span + torch.arange(span, device=keep.device)).flatten()
    layer.weight = _param(w[:, cols], w)
    layer.in_features = len(cols)


def _keep_bn(bn: nn.Module, keep: torch.Tensor) -> None:
    if bn.affine:
        bn.weight = _param(bn.weight[keep], bn.weight)
        bn.bias = _param(bn.bias[keep], bn.bias)
    bn.running_mean = bn.running_mean[keep].clone()
    bn.running_var = bn.running_var[keep].clone()
    bn.num_features = len(keep)


def compact(model: nn.Module) -> nn.Module:
    """A folded copy of ``model`` (in eval mode) without its dead neurons and filters.

    DST layers are folded first (:func:`dst_kernels.export.fold`), then every output unit of a
    Linear / Conv2d whose outgoing weights are all zero, or whose own weights are all zero
    (its constant output goes into the next layer's bias), is removed together with the next
    layer's matching inputs and the BatchNorm channels between them. The first layer's inputs
    and the last layer's outputs stay. In eval mode the result computes the same function as
    ``model`` (up to float rounding of the folded constants) with fewer parameters.

    Raises ``TypeError`` for a model whose forward it cannot follow and ``ValueError`` for a
    module between two layers that it cannot prove keeps units independent; see the module
    documentation for what is supported. ``model`` itself is left unchanged.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    out = fold(model).eval()
    links = _links(_chain(out))
    changed = True
    while changed:
        changed = False
        for link in links:
            changed |= _compact_link(link)
    return out
