"""Sparse inference: the kept weights in compressed form.

``to_sparse(model)`` gives inference modules that hold only the kept weights of each
``DSTLinear`` in CSR form (int32 indices) and run the sparse kernel of
``dst_kernels._C`` (``dst_sparse_mm``); ``save_sparse`` / ``load_sparse`` store that
form. (``dst_kernels.sparse`` re-exports these names: a ``SparseLinear`` pickled under
that path loads.)
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from dst_kernels import _ops
from dst_kernels.export.fold import fold
from dst_kernels.nn.base import is_dst_layer

__all__ = ["SparseLinear", "to_sparse", "save_sparse", "load_sparse", "SPARSE_FORMAT", "DEFAULT_MAX_DENSITY"]

SPARSE_FORMAT = "dst_kernels.sparse"
_FORMAT_VERSION = 1
# Layers kept dense by to_sparse above this density: the inference product wins below it.
DEFAULT_MAX_DENSITY = 0.3


def _native() -> bool:
    return _SPARSE_MM is not None


# The product op, looked up once (SparseLinear.forward is on the per-call path).
_SPARSE_MM = torch.ops.dst_kernels.dst_sparse_mm.default if _ops.has_op("dst_sparse_mm") else None


def require_native(what: str) -> None:
    """Raise a clear RuntimeError when the compiled sparse ops are missing."""
    if not _native():
        reason = _ops.LOAD_ERROR or "this build of dst_kernels._C lacks the sparse ops"
        raise RuntimeError(f"{what} needs the compiled sparse ops ({reason}); {_ops.BUILD_HINT}")


class SparseLinear(nn.Module):
    """Inference ``Linear`` on the kept weights only: ``y = x P^T + b`` with ``P`` in CSR.

    Buffers: ``crow_indices`` (int32, ``[out_features + 1]``), ``col_indices`` (int32,
    ``[nnz]``), ``values`` (``[nnz]``) and ``bias`` (or None). On the CPU the product runs
    in ``dst_kernels._C`` (multithreaded, vectorised); elsewhere, or without the extension,
    the weight is expanded to a dense one for ``F.linear``. No gradients: an inference module.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        crow_indices: torch.Tensor,
        col_indices: torch.Tensor,
        values: torch.Tensor,
        bias: torch.Tensor | None = None,
    ):
        super().__init__()
        if crow_indices.shape != (out_features + 1,):
            raise ValueError(
                f"crow_indices must have shape [{out_features + 1}] (out_features + 1), "
                f"got {tuple(crow_indices.shape)}"
            )
        if col_indices.dim() != 1 or values.shape != col_indices.shape:
            raise ValueError(
                f"col_indices and values must be 1-D of one length, got {tuple(col_indices.shape)} "
                f"and {tuple(values.shape)}"
            )
        if bias is not None and bias.shape != (out_features,):
            raise ValueError(f"bias must have shape [{out_features}], got {tuple(bias.shape)}")
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer("crow_indices", crow_indices.to(torch.int32).contiguous())
        self.register_buffer("col_indices", col_indices.to(torch.int32).contiguous())
        self.register_buffer("values", values.detach().contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().clone().contiguous())

    @classmethod
    @torch.no_grad()
    def from_dense(cls, weight: torch.Tensor, threshold: torch.Tensor | None = None, bias=None):
        """From a weight and its thresholds (kept: ``|W| > t[row]``), or without thresholds
        from the nonzeros of ``weight``."""
        weight = weight.detach()
        if threshold is None:
            threshold = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
        threshold = threshold.detach()
        if _native() and weight.device.type == "cpu":
            crow, col, values = torch.ops.dst_kernels.dst_sparse_mask(weight.contiguous(), threshold)
        else:
            kept = weight.reshape(weight.shape[0], -1).abs() > threshold[:, None]
            crow = torch.cat([kept.new_zeros(1, dtype=torch.int64), kept.sum(1).cumsum(0)])
            col = kept.nonzero()[:, 1]
            values = weight.reshape(kept.shape)[kept]
        return cls(weight.shape[1], weight.shape[0], crow, col, values, bias)

    @property
    def nnz(self) -> int:
        return self.col_indices.numel()

    def density(self) -> float:
        return self.nnz / max(1, self.in_features * self.out_features)

    @torch.no_grad()
    def dense_weight(self) -> torch.Tensor:
        """``P`` as a dense ``[out_features, in_features]`` tensor."""
        rows = torch.repeat_interleave(
            torch.arange(self.out_features, device=self.values.device),
            self.crow_indices[1:].long() - self.crow_indices[:-1].long(),
        )
        out = self.values.new_zeros(self.out_features, self.in_features)
        out[rows, self.col_indices.long()] = self.values
        return out

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        buffers = self._buffers  # direct: Module.__getattr__ costs a microsecond per buffer
        values = buffers["values"]
        if _SPARSE_MM is not None and input.is_cpu and input.dtype == values.dtype:
            return _SPARSE_MM(input, buffers["crow_indices"], buffers["col_indices"], values, buffers["bias"])
        return F.linear(
            input,
            self.dense_weight().to(input.dtype),
            None if self.bias is None else self.bias.to(input.dtype),
        )

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, *args):
        # nnz differs from model to model: take the stored sizes.
        for name in ("col_indices", "values"):
            stored = state_dict.get(prefix + name)
            if isinstance(stored, torch.Tensor) and stored.shape != self._buffers[name].shape:
                self._buffers[name] = self._buffers[name].new_empty(stored.shape)
        stored_bias = state_dict.get(prefix + "bias")
        if self.bias is None and isinstance(stored_bias, torch.Tensor):
            self._buffers["bias"] = self.values.new_empty(stored_bias.shape)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, *args)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"nnz={self.nnz}, density={self.density():.4f}, bias={self.bias is not None}"
        )


def _sparse_linear_of(layer: nn.Module) -> SparseLinear | None:
    """A SparseLinear for a DST layer that masks a Linear's weight by rows, else None."""
    pairs = dict(getattr(layer, "_dst_pairs", ()))
    if "weight" not in pairs or getattr(layer, "_dst_axes", {}).get("weight", 0) != 0:
        return None
    weight = layer.dense_weight("weight") if hasattr(layer, "dense_weight") else layer.weight
    if weight.dim() != 2:
        return None
    return SparseLinear.from_dense(weight, getattr(layer, pairs["weight"]), layer.bias)


@torch.no_grad()
def to_sparse(model: nn.Module, *, max_density: float = DEFAULT_MAX_DENSITY) -> nn.Module:
    """A copy of ``model`` for inference on the kept weights.

    Every DST layer that folds to a plain ``nn.Linear`` and keeps at most ``max_density`` of
    its weights becomes a :class:`SparseLinear` (CSR of ``W * M``; the product runs in
    ``dst_kernels._C`` on the CPU); the other DST layers (denser ones, convolutions,
    LSTMs) are folded to their plain classes as :func:`dst_kernels.export.fold` does.
    The copy computes ``model``'s eval-mode function; ``model`` is unchanged.
    """
    if not 0.0 <= max_density <= 1.0:
        raise ValueError(f"max_density must be in [0, 1], got {max_density!r}")
    if is_dst_layer(model) and type(fold(model)) is nn.Linear:
        sparse = _sparse_linear_of(model)
        if sparse is not None and sparse.density() <= max_density:
            return sparse.train(model.training)
    folded = fold(model)
    originals = dict(model.named_modules(remove_duplicate=False))
    replaced: dict[int, SparseLinear] = {}
    for parent_name, parent in list(folded.named_modules(remove_duplicate=False)):
        for name, child in list(parent.named_children()):
            full = f"{parent_name}.{name}" if parent_name else name
            original = originals.get(full)
            if type(child) is not nn.Linear or original is None or not is_dst_layer(original):
                continue
            if id(child) not in replaced:
                sparse = _sparse_linear_of(original)
                if sparse is None or sparse.density() > max_density:
                    continue
                replaced[id(child)] = sparse.train(child.training)
            setattr(parent, name, replaced[id(child)])
    return folded


def save_sparse(model: nn.Module, path) -> None:
    """Write ``to_sparse(model)`` (or ``model`` if it has no DST layers left) to ``path``.

    The file holds the pickled inference model (its CSR buffers stored once) under
    ``"model"``, and ``"format"`` / ``"version"``; :func:`load_sparse` reads it back.
    """
    sparse = to_sparse(model) if any(is_dst_layer(m) for m in model.modules()) else model
    torch.save({"format": SPARSE_FORMAT, "version": _FORMAT_VERSION, "model": sparse}, path)


def load_sparse(path, map_location=None) -> nn.Module:
    """The inference model :func:`save_sparse` wrote to ``path``.

    It is unpickled (``torch.load(..., weights_only=False)``): load only files you trust,
    with the model's classes importable.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"no sparse checkpoint at {path!r}")
    obj = torch.load(path, map_location=map_location, weights_only=False)
    if not isinstance(obj, dict) or obj.get("format") != SPARSE_FORMAT:
        raise ValueError(f"{path!r} is not a file written by dst_kernels.export.save_sparse")
    if obj.get("version", 0) > _FORMAT_VERSION:
        raise ValueError(
            f"{path!r} has sparse format version {obj['version']}; this dst_kernels reads "
            f"up to {_FORMAT_VERSION}"
        )
    return obj["model"]
