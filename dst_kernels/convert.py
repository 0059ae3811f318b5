"""``sparsify``, ``register_layer``, ``plan_sparsify``: DST layers in someone else's model.

``sparsify`` makes the layers of a model DST layers and changes nothing else.

Conversion is in place and keeps each module's identity: the module object stays
where it is (so a module used in two places stays shared), with its own Parameter
objects (ties, ``requires_grad``, optimiser references and parameter names stay),
hooks, train/eval mode, device and dtype. Two mechanisms, one mask:

* a module whose type is exactly ``nn.Linear``, ``nn.Conv2d``, ``nn.LSTM`` or
  ``nn.GRU`` changes class to ``DSTLinear`` / ``DSTConv2d`` / ``DSTLSTM`` /
  ``DSTGRU`` (the fused native forward) and gains its thresholds;
* any other registered type (a subclass with its own forward, ``nn.Conv1d`` /
  ``nn.Conv3d``, ``nn.MultiheadAttention``'s packed ``in_proj_weight``, a type
  added with :func:`register_layer`) changes class to a generated subclass of its
  own type in which each masked weight is a computed attribute ``W * M`` (the
  fused mask op with the estimator backward) over the module's own Parameter, as
  ``torch.nn.utils.parametrize`` does, but with the parameter names unchanged. The
  module's own ``forward`` runs, and so does any code that reads ``module.weight``
  (``nn.MultiheadAttention`` reading ``out_proj.weight``).

Who reads a masked weight gets ``W * M``. A masked-attribute module's weight always reads
as ``W * M`` (its Parameter is ``dense_weight(name)``). A fused layer's own forward reads
its Parameters directly; any other forward that reads its weight (a parent passing
``self.qkv.weight`` to a function, as torchvision's Swin attention does) gets ``W * M``
with the estimator's gradient: ``sparsify`` hooks every module above a fused layer
(``dst_kernels.nn.watch_outside_reads``), and while one of their forwards runs,
``layer.weight`` is the masked weight. Outside a forward ``layer.weight`` is the
Parameter itself, for what users do with it (initialisation, ``.data``, ``.grad``,
optimisers, state dicts). Code that reads a weight outside any forward of the model
(a function called on ``model.qkv.weight`` directly) gets the Parameter: use
``layer.masks()`` or ``dst.export.fold`` there.

Layers it cannot mask exactly are left dense and named in the summary with the
reason (:func:`plan_sparsify` gives it as data; ``sparsify`` logs it once).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
from collections.abc import Callable, Mapping

import torch
from torch import nn
from torch.nn.parameter import is_lazy
from torch.nn.utils import parametrize

from dst_kernels import functional as DF
from dst_kernels.nn.base import DSTLayer, is_dst_layer, watch_outside_reads
from dst_kernels.nn.conv import DSTConv2d
from dst_kernels.nn.linear import DSTLinear
from dst_kernels.nn.rnn import DSTGRU, DSTLSTM

__all__ = [
    "SparsifyEntry",
    "SparsifySummary",
    "plan_sparsify",
    "register_layer",
    "sparsify",
]

logger = logging.getLogger("dst_kernels.sparsify")

DEFAULT_INCLUDE = (nn.Linear, nn.Conv2d, nn.LSTM)

# Exact types with a fused DST class: the module's class becomes it.
_FUSED: dict[type, type] = {nn.Linear: DSTLinear, nn.Conv2d: DSTConv2d, nn.LSTM: DSTLSTM, nn.GRU: DSTGRU}

# Parents that read these children's weights themselves (nn.TransformerEncoderLayer's fast
# path passes linear1.weight / linear2.weight to one fused op): the children get the
# masked attribute even when their type has a fused class.
_WEIGHT_READERS: dict[type, tuple[str, ...]] = {nn.TransformerEncoderLayer: ("linear1", "linear2")}

WeightsSpec = Mapping[str, int] | Callable[[nn.Module], Mapping[str, int]]
_RULES: dict[type, WeightsSpec] = {}


def _rnn_weights(module: nn.Module) -> dict[str, int]:
    return {n: 0 for n in module._flat_weights_names if n.startswith("weight_")}


def _mha_weights(module: nn.Module) -> dict[str, int]:
    names = (
        ("in_proj_weight",)
        if module._qkv_same_embed_dim
        else ("q_proj_weight", "k_proj_weight", "v_proj_weight")
    )
    return {n: 0 for n in names}


def register_layer(layer_type: type, weights: WeightsSpec) -> None:
    """Teach ``sparsify`` a layer type: which of its Parameters to mask, along which axis.

    ``weights`` maps a parameter name to its **output axis** (one threshold per index
    of that axis), or is a function of the module returning such a mapping. For
    HuggingFace's GPT-2 ``Conv1D`` (weight ``[in, out]``)::

        from transformers.pytorch_utils import Conv1D
        dst.register_layer(Conv1D, {"weight": 1})
        dst.sparsify(model, include=(nn.Linear, Conv1D))

    Subclasses of a registered type use its rule (unless registered themselves).
    The module's forward must read the weight as an attribute (``self.weight``).
    """
    if not (isinstance(layer_type, type) and issubclass(layer_type, nn.Module)):
        raise TypeError(f"layer_type must be an nn.Module subclass, got {layer_type!r}")
    if issubclass(layer_type, nn.RNNBase):
        raise ValueError(
            f"layer_type {layer_type.__name__} is an nn.RNNBase: its forward reads _flat_weights, "
            f"not attributes; only exact nn.LSTM / nn.GRU are masked (DSTLSTM / DSTGRU)"
        )
    if not callable(weights):
        if not isinstance(weights, Mapping) or not weights:
            raise TypeError(f"weights must map parameter names to output axes, got {weights!r}")
        for name, axis in weights.items():
            if not isinstance(name, str) or isinstance(axis, bool) or not isinstance(axis, int):
                raise TypeError(
                    f"weights must map parameter names (str) to output axes (int), got {weights!r}"
                )
    _RULES[layer_type] = weights


for _t in (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d):
    _RULES[_t] = {"weight": 0}
_RULES[nn.LSTM] = _rnn_weights
_RULES[nn.GRU] = _rnn_weights
_RULES[nn.MultiheadAttention] = _mha_weights


def _rule_for(module: nn.Module) -> dict[str, int] | None:
    cls = type(module)
    if isinstance(module, nn.RNNBase):  # their forward reads _flat_weights: exact types only
        return _rnn_weights(module) if cls in (nn.LSTM, nn.GRU) else None
    for base in cls.__mro__:
        spec = _RULES.get(base)
        if spec is not None:
            return dict(spec(module) if callable(spec) else spec)
    return None


def _threshold_name(weight_name: str) -> str:
    return (
        weight_name.replace("weight", "threshold", 1)
        if "weight" in weight_name
        else weight_name + "_threshold"
    )


# ----------------------------------------------------------------------------- masked-attribute classes


class DSTMaskedModule(DSTLayer):
    """Mixin of the generated classes: each masked weight is a computed attribute ``W * M``
    over the module's own Parameter (still ``_parameters[name]``, so names and state dicts
    are unchanged). ``dense_weight(name)`` is the Parameter itself."""

    _dst_spec: tuple[tuple[str, str, int], ...] = ()

    def __reduce_ex__(self, protocol):
        # The generated class is not importable: rebuild it from the base class and the spec.
        return (_new_masked_module, (self._dst_base, self._dst_spec), self.__getstate__())

    def extra_repr(self) -> str:
        names = ", ".join(w for w, _, _ in self._dst_spec)
        return f"{super().extra_repr()}, masked=({names})"


def _masked_attribute(w_name: str) -> property:
    def fget(self):
        return None if self._parameters[w_name] is None else self._masked_read(w_name)

    return property(fget, doc=f"{w_name} * mask (computed; the Parameter is dense_weight({w_name!r}))")


_CLASSES: dict[tuple[type, tuple], type] = {}


def _masked_class(base: type, spec: tuple[tuple[str, str, int], ...]) -> type:
    key = (base, spec)
    cls = _CLASSES.get(key)
    if cls is None:
        ns = {w: _masked_attribute(w) for w, _, _ in spec}
        ns.update(
            _dst_base=base,
            _dst_spec=spec,
            _dst_pairs=tuple((w, t) for w, t, _ in spec),
            _dst_axes={w: axis for w, _, axis in spec if axis},
            __module__=__name__,
        )
        cls = _CLASSES[key] = type(f"DSTMasked{base.__name__}", (DSTMaskedModule, base), ns)
    return cls


def _new_masked_module(base: type, spec):
    cls = _masked_class(base, tuple(tuple(s) for s in spec))
    return cls.__new__(cls)


# ----------------------------------------------------------------------------- plan


@dataclasses.dataclass(frozen=True)
class SparsifyEntry:
    """One weight-bearing module: ``how`` it was converted, or ``reason`` it was left dense."""

    name: str
    type: str
    weights: tuple[str, ...]
    how: str = ""
    reason: str = ""


@dataclasses.dataclass(frozen=True)
class SparsifySummary:
    """What ``sparsify`` converts and which weight-bearing modules it leaves dense, and why."""

    converted: tuple[SparsifyEntry, ...]
    dense: tuple[SparsifyEntry, ...]

    def rows(self) -> list[dict]:
        return [dataclasses.asdict(e) for e in (*self.converted, *self.dense)]

    def warnings(self) -> list[SparsifyEntry]:
        """Entries left dense for a reason the caller did not choose (not include/exclude/frozen)."""
        chosen = ("excluded", "type not in include", "frozen", "embedding table")
        return [e for e in self.dense if not e.reason.startswith(chosen)]

    def __str__(self) -> str:
        lines = [
            f"sparsify: {len(self.converted)} module(s) masked, {len(self.dense)} weight-bearing left dense"
        ]
        for e in self.converted:
            lines.append(f"  masked  {e.name or '<model>'} ({e.type}: {', '.join(e.weights)}) {e.how}")
        for e in self.dense:
            lines.append(f"  dense   {e.name or '<model>'} ({e.type}: {', '.join(e.weights)}): {e.reason}")
        return "\n".join(lines)


@dataclasses.dataclass
class _Item:
    name: str
    module: nn.Module
    weights: dict[str, int]
    fused: bool = False


def _check_args(include, exclude, min_density, backend):
    DF.check_min_density(min_density)
    DF.check_backend_name(backend)
    include = tuple(include) if isinstance(include, (tuple, list)) else (include,)
    exclude = tuple(exclude) if isinstance(exclude, (tuple, list)) else (exclude,)
    for item in include:
        ok = isinstance(item, type) and issubclass(item, nn.Module)
        if ok and issubclass(item, nn.RNNBase):
            ok = item in (nn.LSTM, nn.GRU, nn.RNNBase)
        elif ok:
            ok = any(issubclass(item, base) or issubclass(base, item) for base in _RULES)
        if not ok:
            raise TypeError(
                f"include must hold layer types sparsify knows (nn.Linear, nn.Conv1d/2d/3d, nn.LSTM, "
                f"nn.GRU, nn.MultiheadAttention, or a type added with dst.register_layer), got {item!r}"
            )
    for item in exclude:
        if not isinstance(item, (str, type)):
            raise TypeError(f"exclude must hold layer types or name patterns, got {item!r}")
    return include, exclude


def _excluded(name: str, module: nn.Module, exclude) -> bool:
    for item in exclude:
        if isinstance(item, str):
            if fnmatch.fnmatchcase(name, item):
                return True
        elif isinstance(item, type) and isinstance(module, item):
            return True
    return False


def _weight_bearing(module: nn.Module) -> list[str]:
    """Names of the module's own matrix-or-larger Parameters (what a mask could apply to)."""
    return [n for n, p in module._parameters.items() if p is not None and (is_lazy(p) or p.dim() >= 2)]


def _any_nonzero(p: torch.Tensor) -> torch.Tensor:
    if p.is_meta:  # not materialised yet (weights loaded later): nothing to check
        return torch.ones((), dtype=torch.bool)
    return p.ne(0).any().cpu()


def _plan(model, include, exclude, min_density, backend, include_frozen):
    include, exclude = _check_args(include, exclude, min_density, backend)
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        for p_name, p in module._parameters.items():
            if p is not None:
                owners.setdefault(id(p), []).append(f"{name}.{p_name}" if name else p_name)
    read_by_parent = {
        id(getattr(m, child))
        for m in model.modules()
        for reader, children in _WEIGHT_READERS.items()
        if isinstance(m, reader)
        for child in children
    }
    todo: list[_Item] = []
    converted: list[SparsifyEntry] = []
    dense: list[SparsifyEntry] = []
    for name, module in model.named_modules():
        type_name = type(module).__name__
        if is_dst_layer(module):
            weights = tuple(w for w, _ in module._dst_pairs)
            if _excluded(name, module, exclude):
                converted.append(SparsifyEntry(name, type_name, weights, how="(already DST, excluded here)"))
                continue
            if (module.min_density, module.backend) != (min_density, backend):
                raise ValueError(
                    f"sparsify: {name or 'the model'} is already a DST layer with "
                    f"min_density={module.min_density}, backend={module.backend!r}, but this call asks "
                    f"for min_density={min_density}, backend={backend!r}. Call sparsify with the same "
                    f"options, set the layer's own (layer.min_density = ..., layer.backend = ...), or "
                    f"leave it out of this call (exclude=({name or '<name>'!r},))."
                )
            converted.append(SparsifyEntry(name, type_name, weights, how="(already DST)"))
            continue
        if isinstance(module, parametrize.ParametrizationList):
            continue  # the parametrized module itself is reported
        rule = _rule_for(module)
        candidates = list(rule) if rule is not None else _weight_bearing(module)
        if not candidates:
            continue

        def leave(reason, name=name, type_name=type_name, weights=tuple(candidates)):
            dense.append(SparsifyEntry(name, type_name, weights, reason=reason))

        if rule is None:
            if isinstance(module, nn.RNNBase):
                leave("an RNN other than exact nn.LSTM / nn.GRU (an RNN reads _flat_weights, not attributes)")
            elif isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
                leave("embedding table: DST masks layer weights (Linear, Conv, RNN), not embeddings")
            else:
                leave("no masking rule for this type (add one with dst.register_layer)")
            continue
        if _excluded(name, module, exclude):
            leave("excluded")
            continue
        if not isinstance(module, include):
            leave("type not in include")
            continue
        not_params = [w for w in candidates if w not in module._parameters]
        if not_params:
            leave(
                f"{', '.join(not_params)} is not a Parameter of the module (parametrized, e.g. "
                f"weight_norm / spectral_norm, or computed by a hook): mask the layer before "
                f"parametrizing it, or remove the parametrization"
            )
            continue
        present = {w: a for w, a in rule.items() if module._parameters[w] is not None}
        if not present:
            continue
        if any(is_lazy(module._parameters[w]) for w in present):
            leave("uninitialized (lazy) parameter: run one forward to materialise it, then sparsify")
            continue
        bad_axis = [
            w
            for w, a in present.items()
            if not -module._parameters[w].dim() <= a < module._parameters[w].dim()
        ]
        if bad_axis:
            leave(f"output axis out of range for {', '.join(bad_axis)} (see dst.register_layer)")
            continue
        clash = [_threshold_name(w) for w in present if hasattr(module, _threshold_name(w))]
        if clash:
            leave(f"the module already has an attribute named {', '.join(clash)}")
            continue
        tied = []
        for w in present:
            own = f"{name}.{w}" if name else w
            others = [o for o in owners[id(module._parameters[w])] if o != own]
            if others:
                tied.append(f"{own} is also {', '.join(others)}")
        if tied:
            leave(f"weight tied to another module ({'; '.join(tied)}); a mask would untie it")
            continue
        frozen = [w for w in present if not module._parameters[w].requires_grad]
        if frozen and not include_frozen:
            leave("frozen (requires_grad=False; pass include_frozen=True to mask it)")
            continue
        fused = type(module) in _FUSED and id(module) not in read_by_parent
        axes = {w: a % module._parameters[w].dim() for w, a in present.items()}
        todo.append(_Item(name, module, axes, fused))
    # All-zero weights: |0| > 0 is false and their estimator gradient is 0, so they never train.
    if todo:
        with torch.no_grad():
            params = [[it.module._parameters[w] for w in it.weights] for it in todo]
            nonzero = [torch.stack([_any_nonzero(p) for p in ps]).all() for ps in params]
            flags = torch.stack([f.cpu() for f in nonzero]).tolist()
        kept = []
        for it, nonzero in zip(todo, flags):
            if nonzero:
                kept.append(it)
            else:
                dense.append(
                    SparsifyEntry(
                        it.name,
                        type(it.module).__name__,
                        tuple(it.weights),
                        reason="all-zero weight: |0| > 0 is false and its gradient through the mask is 0, "
                        "so a masked copy would never train (initialise it, then sparsify)",
                    )
                )
        todo = kept
    for it in todo:
        how = "(fused layer)" if it.fused else "(masked attribute, own forward)"
        converted.append(SparsifyEntry(it.name, type(it.module).__name__, tuple(it.weights), how=how))
    return todo, SparsifySummary(tuple(converted), tuple(dense))


def plan_sparsify(
    model: nn.Module,
    *,
    include=DEFAULT_INCLUDE,
    exclude=(),
    min_density: float | None = 0.01,
    backend: str = "auto",
    include_frozen: bool = False,
) -> SparsifySummary:
    """What :func:`sparsify` with these arguments would convert and leave dense (and why),
    without changing the model."""
    return _plan(model, include, exclude, min_density, backend, include_frozen)[1]


# ----------------------------------------------------------------------------- convert


def _convert(item: _Item, min_density, backend) -> None:
    module = item.module
    if item.fused:
        module.__class__ = _FUSED[type(module)]
        module._init_dst(min_density, backend)
        if isinstance(module, DSTLSTM | DSTGRU):
            module._init_rnn_thresholds()
        else:
            module.register_parameter("threshold", module._new_threshold(module._parameters["weight"]))
    else:
        spec = tuple((w, _threshold_name(w), axis) for w, axis in item.weights.items())
        raw = {w: module._parameters[w] for w in item.weights}
        module.__class__ = _masked_class(type(module), spec)
        module._init_dst(min_density, backend)
        for w, t, axis in spec:
            module.register_parameter(t, module._new_threshold(raw[w], axis))


# Containers whose own forward reads no weight (ModuleList / ModuleDict have none).
_NO_READS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _watch_ancestors(model: nn.Module) -> None:
    """Hook every module that holds a fused DST layer below it, so that what its forward reads
    of that layer's weight (``F.linear(x, self.qkv.weight)``, torchvision's Swin attention) is
    ``W * M``: see ``dst_kernels.nn.watch_outside_reads``."""
    fused = [
        name
        for name, m in model.named_modules(remove_duplicate=False)
        if is_dst_layer(m) and not isinstance(m, DSTMaskedModule)
    ]
    ancestors = {".".join(name.split(".")[:i]) for name in fused if name for i in range(name.count(".") + 1)}
    for name in sorted(ancestors):
        module = model.get_submodule(name)
        if type(module) not in _NO_READS:
            watch_outside_reads(module)


def sparsify(
    model: nn.Module,
    *,
    include=DEFAULT_INCLUDE,
    exclude=(),
    min_density: float | None = 0.01,
    backend: str = "auto",
    include_frozen: bool = False,
) -> nn.Module:
    """Make the layers of ``model`` DST layers, in place, changing nothing else.

    ``include`` lists the layer types to mask (default: the paper's ``nn.Linear``,
    ``nn.Conv2d``, ``nn.LSTM``; also ``nn.Conv1d``, ``nn.Conv3d``, ``nn.GRU``,
    ``nn.MultiheadAttention`` (its packed ``in_proj_weight``, per output row) and any
    type added with :func:`register_layer`); subclasses of an included type are
    included. ``exclude`` holds layer types or qualified-name patterns (``fnmatch``,
    e.g. ``"classifier.*"``) to leave dense. Frozen weights are left dense unless
    ``include_frozen``; tied weights, all-zero weights and parametrized weights are
    left dense (see the module docstring). Thresholds start at 0. A summary is
    logged once (logger ``dst_kernels.sparsify``); :func:`plan_sparsify` returns it.

    Returns ``model`` (the same object, also when ``model`` itself is converted).
    An optimiser built before keeps updating the weights (the same Parameters);
    add the new thresholds with ``dst.threshold_parameters(model)``.
    """
    todo, summary = _plan(model, include, exclude, min_density, backend, include_frozen)
    for item in todo:
        _convert(item, min_density, backend)
    _watch_ancestors(model)
    logger.info("%s", summary)
    odd = summary.warnings()
    if not summary.converted:
        logger.warning("sparsify: nothing in %s was masked\n%s", type(model).__name__, summary)
    elif odd:
        logger.warning(
            "sparsify: %d weight-bearing module(s) left dense: %s",
            len(odd),
            "; ".join(f"{e.name or '<model>'} ({e.type}): {e.reason}" for e in odd),
        )
    return model
