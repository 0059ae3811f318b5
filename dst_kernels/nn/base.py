"""What every DST layer shares: thresholds, the reset rule, masks, dense conversion, and the
rule that whoever reads a masked weight during a forward gets ``W * M``.

The layers themselves are in ``linear.py``, ``conv.py`` and ``rnn.py``; ``dst_kernels.nn``
re-exports them. Nothing here imports a model-level tool (``convert``, ``export``, ...).
"""

from __future__ import annotations

import copy
import warnings
import weakref
from collections import OrderedDict

import torch
from torch import nn

from dst_kernels import functional as DF
from dst_kernels._dtensor import full, is_dtensor
from dst_kernels.regulariser import layer_penalties, layer_penalty

__all__ = [
    "DSTLayer",
    "DSTStateDictWarning",
    "is_dst_layer",
    "layer_penalty",
    "masked_along",
    "sparsity_loss",
    "threshold_parameters",
    "unwatch_outside_reads",
    "watch_outside_reads",
]


class DSTLayer:
    """What every DST layer has: thresholds, the reset rule, mask/density, dense conversion.

    A subclass lists its ``(weight_name, threshold_name)`` pairs in ``_dst_pairs``;
    ``_dst_base`` is the plain PyTorch class it computes like (what ``fold`` turns it
    back into). Masks are per output row: along axis 0 of each weight unless
    ``_dst_axes`` names another axis for it (e.g. 1 for a ``[in, out]`` weight).
    """

    _dst_pairs: tuple[tuple[str, str], ...] = (("weight", "threshold"),)
    _dst_axes: dict[str, int] = {}
    _dst_base: type = nn.Module
    # Set on a layer by dst_kernels.distributed once FSDP2's reset hooks run the rule.
    _dst_fsdp_ready: bool = False

    def _init_dst(self, min_density, backend):
        self.min_density = DF.check_min_density(min_density)
        self.backend = DF.check_backend_name(backend)

    def _new_threshold(self, weight: torch.Tensor, axis: int = 0) -> nn.Parameter:
        return nn.Parameter(torch.zeros(weight.shape[axis], device=weight.device, dtype=weight.dtype))

    def thresholds(self) -> list[nn.Parameter]:
        return [getattr(self, t) for _, t in self._dst_pairs]

    def dense_weight(self, name: str = "weight") -> nn.Parameter:
        """The Parameter ``W`` behind a masked weight (unmasked; what the optimiser updates)."""
        return self._parameters[name]

    def _masked_read(self, name: str) -> torch.Tensor:
        """``W * M`` for the masked weight ``name`` (fused mask op, estimator backward)."""
        t_name = dict(self._dst_pairs)[name]
        return masked_along(
            self._parameters[name],
            self._parameters[t_name],
            self._dst_axes.get(name, 0),
            self.backend,
            self._reset_bound(),
        )

    def _reset_bound(self) -> float | None:
        """``min_density`` in training mode (the reset rule applies), else None. Under FSDP2 with
        the reset hooks (``dst_kernels.distributed``) the rule already ran on the sharded
        parameters before this forward: None."""
        if not self.training or self._dst_fsdp_ready:
            return None
        return self.min_density

    @torch.no_grad()
    def masks(self) -> dict[str, torch.Tensor]:
        """Boolean mask per masked weight, keyed by the weight's name (no host sync)."""
        return {
            w: _mask_along(self._parameters[w], getattr(self, t), self._dst_axes.get(w, 0))
            for w, t in self._dst_pairs
        }

    def mask(self) -> torch.Tensor:
        """Boolean mask shaped like the masked weight (no host sync); ``masks()`` when there are several."""
        if len(self._dst_pairs) != 1:
            names = ", ".join(w for w, _ in self._dst_pairs)
            raise ValueError(f"{type(self).__name__} masks several weights ({names}): use masks()")
        return self.masks()[self._dst_pairs[0][0]]

    @torch.no_grad()
    def kept(self) -> torch.Tensor:
        """Number of kept weights, as a 0-dim int64 tensor (no host sync; for FSDP2-sharded
        weights one all-reduce, so call it on every rank)."""
        return full(sum(m.sum() for m in self.masks().values()))

    def total(self) -> int:
        return sum(self._parameters[w].numel() for w, _ in self._dst_pairs)

    @torch.no_grad()
    def density(self) -> torch.Tensor:
        """Kept fraction over all masked weights, a 0-dim float32 tensor (no host sync)."""
        return self.kept().float() / self.total()

    def register_parameter(self, name: str, param) -> None:
        # A new Parameter assigned to a masked weight would be re-masked by the old
        # thresholds (torch.nn.utils.fuse_conv_bn_eval does that: it rescales the weights).
        params = self.__dict__.get("_parameters")
        if (
            params is not None
            and params.get(name) is not None
            and param is not params[name]
            and any(w == name for w, _ in self._dst_pairs)
            and not self.__dict__.get("_dst_assigning", False)
            and not self._fsdp_swap(param, params[name])
        ):
            raise RuntimeError(
                f"cannot assign a new Parameter to {name!r} of the DST layer {type(self).__name__}: "
                f"its thresholds would mask the new values (this is what "
                f"torch.nn.utils.fuse_conv_bn_eval does to a DST conv). Fold the model first "
                f"(dst.export.fold(model)) and work on the plain layers, or change the values in "
                f"place (with torch.no_grad(): layer.dense_weight({name!r}).copy_(new))."
            )
        super().register_parameter(name, param)

    def _fsdp_swap(self, new, old) -> bool:
        """Whether this assignment may be FSDP2 swapping a sharded weight for its unsharded copy
        (or back). FSDP2 writes ``_parameters`` directly unless the class overrides
        ``__setattr__`` (``nn.LSTM`` does, to keep its weight list), so only such classes can
        see the swap here; every other DST layer keeps refusing new Parameters when sharded."""
        return type(self).__setattr__ is not nn.Module.__setattr__ and (is_dtensor(new) or is_dtensor(old))

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        metadata = getattr(destination, "_metadata", None)
        if metadata is not None:
            key = prefix[:-1]
            weights = [w for w, _ in self._dst_pairs]
            metadata[key] = _DSTStateMetadata(metadata.get(key, {}), prefix, weights, metadata)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, *args):
        # A dense layer's state dict has no thresholds: load it with thresholds at 0.
        for _, t in self._dst_pairs:
            key = prefix + t
            if key not in state_dict:
                state_dict[key] = torch.zeros_like(getattr(self, t))
        local_metadata = dict(local_metadata)  # a plain dict: a DST layer loading DST state is fine
        self.__dict__["_dst_assigning"] = bool(local_metadata.get("assign_to_params_buffers", False))
        try:
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, *args)
        finally:
            self.__dict__.pop("_dst_assigning", None)

    def __prepare_scriptable__(self):
        raise RuntimeError(
            f"torch.jit.script cannot compile the DST layer {type(self).__name__} (its forward "
            f"calls dst_kernels' Python dispatch and custom autograd). Use torch.compile or "
            f"torch.export instead, or script the folded plain model: "
            f"torch.jit.script(dst.export.fold(model).eval())."
        )

    @torch.no_grad()
    def _dst_unmask_(self) -> nn.Module:
        """In place: weights become ``W * M``, thresholds and DST state go, the class becomes
        ``_dst_base`` again (hooks, Parameter objects and sharing stay). Used by ``fold`` on a copy."""
        masks = self.masks()
        pairs = self._dst_pairs
        for w, t in pairs:
            self._parameters[w].mul_(masks[w])
            del self._parameters[t]
        for attr in ("min_density", "backend", "_dst_pairs"):
            self.__dict__.pop(attr, None)
        self.__class__ = self._dst_base
        return self

    def to_dense(self) -> nn.Module:
        """A plain copy (``nn.Linear``, ``nn.Conv2d``, ``nn.LSTM``, ... : ``_dst_base``) with ``W * M``."""
        return copy.deepcopy(self)._dst_unmask_()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, min_density={self.min_density}, backend={self.backend!r}"


class DSTStateDictWarning(UserWarning):
    """A DST layer's state (dense ``W``, thresholds) is being loaded into a plain module."""


class _DSTStateMetadata(dict):
    """State-dict metadata of a DST layer. A plain module that loads these entries reads
    ``assign_to_params_buffers`` from it (a DST layer reads a plain copy): then warn, once
    for the whole state dict, that it gets ``W``, not ``W * M``. Pickles as an OrderedDict."""

    def __init__(self, data, prefix: str, weights: list[str], parent=None):
        super().__init__(data)
        self._dst_names = [prefix + w for w in weights]
        self._dst_parent = weakref.ref(parent) if parent is not None else None
        self._dst_warned = False

    def get(self, key, default=None):
        if key == "assign_to_params_buffers" and not self._dst_warned:
            parent = self._dst_parent() if self._dst_parent is not None else None
            group = [v for v in parent.values() if isinstance(v, _DSTStateMetadata)] if parent else [self]
            names = [n for v in group for n in v._dst_names]
            for v in group:
                v._dst_warned = True
            shown = ", ".join(map(repr, names[:4])) + (
                f" and {len(names) - 4} more" if len(names) > 4 else ""
            )
            warnings.warn(
                f"load_state_dict: {shown} come from DST layers: they hold the dense weights W, not "
                f"the masked W * M the layers compute with, and their thresholds are not loaded. "
                f"To load the trained function into a plain model use "
                f"dst.export.dense_state_dict(model) (or dst.export.fold(model).state_dict()).",
                DSTStateDictWarning,
                stacklevel=4,
            )
        return super().get(key, default)

    def __reduce_ex__(self, protocol):
        # As an OrderedDict (what weights_only loading allows), without the subclass.
        return (OrderedDict, (), None, None, iter(self.items()))

    def __deepcopy__(self, memo):
        out = _DSTStateMetadata(copy.deepcopy(dict(self), memo), "", [])
        out._dst_names = list(self._dst_names)
        return out


def _as_rows(weight: torch.Tensor, axis: int) -> torch.Tensor:
    """``weight`` with its output axis first, in a layout the DST ops take."""
    if axis:
        weight = weight.movedim(axis, 0)
    if weight.is_contiguous() or (
        weight.dim() == 4 and weight.is_contiguous(memory_format=torch.channels_last)
    ):
        return weight
    return weight.contiguous()


def _mask_along(weight: torch.Tensor, threshold: torch.Tensor, axis: int) -> torch.Tensor:
    m = DF.mask(_as_rows(weight, axis), threshold)
    return m.movedim(0, axis) if axis else m


# ----------------------------------------------------------------------------- reads from outside


class _OutsideReads:
    """How many forwards are running in modules that may read a fused DST layer's weight from
    outside that layer's own forward (a parent passing ``self.qkv.weight`` to a function, as
    torchvision's Swin attention does). ``sparsify`` hooks every such module (the ancestors of
    the layers it fuses); while one of them runs, a fused layer's masked weights read as
    attributes are ``W * M``. The fused forwards read ``_parameters`` directly."""

    def __init__(self) -> None:
        self.depth = 0


_OUTSIDE_READS = _OutsideReads()


def _enter_outside_reads(module, args) -> None:
    _OUTSIDE_READS.depth += 1


def _leave_outside_reads(module, args, output) -> None:
    _OUTSIDE_READS.depth -= 1


def _watches_outside_reads(module: nn.Module) -> bool:
    return any(h is _enter_outside_reads for h in module._forward_pre_hooks.values())


def watch_outside_reads(module: nn.Module) -> None:
    """While ``module``'s forward runs, every fused DST layer's masked weight read as an
    attribute (``layer.weight``) is ``W * M`` with the estimator's gradient. ``sparsify``
    calls it on the ancestors of the layers it fuses; call it on a module of your own that
    reads the weight of a DST layer it holds (idempotent)."""
    if not _watches_outside_reads(module):
        module.register_forward_pre_hook(_enter_outside_reads)
        module.register_forward_hook(_leave_outside_reads, always_call=True)


def unwatch_outside_reads(module: nn.Module) -> None:
    """Remove the hooks of :func:`watch_outside_reads` (``fold`` does, on its copy)."""
    for hooks in (module._forward_pre_hooks, module._forward_hooks):
        for key in [k for k, h in hooks.items() if h is _enter_outside_reads or h is _leave_outside_reads]:
            del hooks[key]
            module._forward_hooks_always_called.pop(key, None)


def _outside_read_attribute(name: str) -> property:
    """A fused layer's masked weight as an attribute: the Parameter itself (initialisation,
    optimisers, ``.data``, ``.grad``), but ``W * M`` while a watched forward runs."""

    def fget(self):
        try:
            param = self._parameters[name]
        except KeyError:  # before nn.Module.__init__ registered it: not an attribute yet
            raise AttributeError(name) from None
        if _OUTSIDE_READS.depth and param is not None:
            return self._masked_read(name)
        return param

    return property(
        fget,
        doc=f"The Parameter {name!r}; inside a forward that sparsify watches, W * M "
        f"(see dst_kernels.nn.watch_outside_reads).",
    )


def masked_along(weight, threshold, axis: int, backend: str, min_density) -> torch.Tensor:
    """``W * M`` with one threshold per index of ``axis`` (the output axis), through the fused op."""
    p = DF.masked_weight(_as_rows(weight, axis), threshold, backend=backend, min_density=min_density)
    return p.movedim(0, axis) if axis else p


def is_dst_layer(module: nn.Module) -> bool:
    return isinstance(module, DSTLayer)


def threshold_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every DST threshold of ``model`` (each once): add them to an optimiser built before
    ``sparsify``, e.g. ``opt.add_param_group({"params": threshold_parameters(model)})``."""
    seen: dict[int, nn.Parameter] = {}
    for m in model.modules():
        if is_dst_layer(m):
            for t in m.thresholds():
                seen.setdefault(id(t), t)
    return list(seen.values())


def sparsity_loss(model: nn.Module) -> torch.Tensor:
    """``sum over DST layers of sum_i exp(-t_i)``; multiply by alpha and add to the loss."""
    layers = [m for m in model.modules() if is_dst_layer(m)]
    if not layers:
        raise ValueError("sparsity_loss: the model has no DST layers (use dst_kernels.sparsify)")
    terms = layer_penalties(layers)
    return sum(terms[1:], terms[0])
