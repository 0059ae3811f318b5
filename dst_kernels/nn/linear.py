"""``DSTLinear``: ``nn.Linear`` with a trainable threshold per output row."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dst_kernels import functional as DF
from dst_kernels.nn.base import DSTLayer, _outside_read_attribute

__all__ = ["DSTLinear"]


class DSTLinear(DSTLayer, nn.Linear):
    """``nn.Linear`` with a trainable per-output-row threshold (docs/maths.md section 3)."""

    _dst_base = nn.Linear
    weight = _outside_read_attribute("weight")

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        min_density: float | None = 0.01,
        backend: str = "auto",
        device=None,
        dtype=None,
    ):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self._init_dst(min_density, backend)
        self.threshold = self._new_threshold(self._parameters["weight"])

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        params = self._parameters  # (attribute lookups through nn.Module cost a small layer)
        weight, bias = params["weight"], params["bias"]
        threshold = params.get("threshold")
        if threshold is None:
            threshold = self.threshold
        if input.numel() == 0:  # an empty batch: nn.Linear's answer's shape (the ops reject empty x)
            p = DF.masked_weight(weight, threshold, backend=self.backend, min_density=self._reset_bound())
            return F.linear(input, p, bias)
        return DF.dst_linear(
            input, weight, threshold, bias, backend=self.backend, min_density=self._reset_bound()
        )

    @classmethod
    def from_dense(cls, linear: nn.Linear, *, min_density=0.01, backend="auto") -> DSTLinear:
        """A DSTLinear sharing nothing with ``linear`` but holding copies of its weights."""
        w = linear.weight
        layer = cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            min_density=min_density,
            backend=backend,
            device=w.device,
            dtype=w.dtype,
        )
        layer.load_state_dict(linear.state_dict())
        layer.train(linear.training)
        return layer
