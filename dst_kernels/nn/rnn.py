"""``DSTLSTM`` / ``DSTGRU``: PyTorch's fused RNNs on DST-masked gate matrices."""

from __future__ import annotations

from torch import nn

from dst_kernels import functional as DF
from dst_kernels.nn.base import _OUTSIDE_READS, DSTLayer

__all__ = ["DSTGRU", "DSTLSTM"]


class _DSTRNN(DSTLayer):
    """DST masks for the gate matrices of an ``nn.LSTM`` / ``nn.GRU``.

    Every ``weight_*`` matrix gets a ``threshold_*`` vector of its row count. The masks
    are computed once per forward, for all layers, and the masked weights run through
    PyTorch's fused RNN.
    """

    def __init__(self, *args, min_density: float | None = 0.01, backend: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self._init_dst(min_density, backend)
        self._init_rnn_thresholds()

    def _init_rnn_thresholds(self) -> None:
        pairs = []
        for w_name in self._flat_weights_names:  # nn.RNNBase's order: per layer and direction
            if w_name.startswith("weight_"):
                t_name = "threshold_" + w_name.removeprefix("weight_")
                self.register_parameter(t_name, self._new_threshold(self._parameters[w_name]))
                pairs.append((w_name, t_name))
        self._dst_pairs = tuple(pairs)

    def __getattr__(self, name: str):
        # nn.RNNBase keeps its weights in _parameters only: a read from outside the fused forward
        # (see _OutsideReads) gets W * M while a watched forward runs, the Parameter otherwise.
        if _OUTSIDE_READS.depth and any(w == name for w, _ in self.__dict__.get("_dst_pairs", ())):
            return self._masked_read(name)
        return super().__getattr__(name)

    def forward(self, input, hx=None):
        bound = self._reset_bound()
        # The layer's own forward: its attributes are its Parameters (as FSDP2 has set them).
        outer, _OUTSIDE_READS.depth = _OUTSIDE_READS.depth, 0
        try:
            masked = {
                w: DF.masked_weight(
                    getattr(self, w), getattr(self, t), backend=self.backend, min_density=bound
                )
                for w, t in self._dst_pairs
            }
            self._update_flat_weights()
        finally:
            _OUTSIDE_READS.depth = outer
        dense = self._flat_weights
        self._flat_weights = [masked.get(name, param) for name, param in zip(self._flat_weights_names, dense)]
        try:
            return super().forward(input, hx)
        finally:
            self._flat_weights = dense

    def flatten_parameters(self) -> None:
        # The RNN runs on masked copies of the weights; there is nothing to flatten.
        return None


class DSTLSTM(_DSTRNN, nn.LSTM):
    """``nn.LSTM`` whose gate matrices are DST-masked (docs/maths.md section 3).

    Every ``weight_ih_l{k}`` / ``weight_hh_l{k}`` (``[4H, *]``) gets a threshold
    ``threshold_ih_l{k}`` / ``threshold_hh_l{k}`` of shape ``[4H]``: one per unit
    per gate; likewise ``*_reverse`` for a bidirectional LSTM and
    ``threshold_hr_l{k}`` (``[proj_size]``) for the projections of one with
    ``proj_size > 0``. The masks are computed once per forward, for all layers,
    and the masked weights run through PyTorch's fused LSTM.
    """

    _dst_base = nn.LSTM

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        proj_size: int = 0,
        *,
        min_density: float | None = 0.01,
        backend: str = "auto",
        device=None,
        dtype=None,
    ):
        super().__init__(
            input_size,
            hidden_size,
            num_layers,
            bias=bias,
            batch_first=batch_first,
            dropout=dropout,
            bidirectional=bidirectional,
            proj_size=proj_size,
            min_density=min_density,
            backend=backend,
            device=device,
            dtype=dtype,
        )

    @classmethod
    def from_dense(cls, lstm: nn.LSTM, *, min_density=0.01, backend="auto") -> DSTLSTM:
        w = lstm.weight_ih_l0
        layer = cls(
            lstm.input_size,
            lstm.hidden_size,
            lstm.num_layers,
            lstm.bias,
            lstm.batch_first,
            lstm.dropout,
            lstm.bidirectional,
            lstm.proj_size,
            min_density=min_density,
            backend=backend,
            device=w.device,
            dtype=w.dtype,
        )
        layer.load_state_dict(lstm.state_dict())
        layer.train(lstm.training)
        return layer


class DSTGRU(_DSTRNN, nn.GRU):
    """``nn.GRU`` whose gate matrices (``[3H, *]``) are DST-masked, one threshold per row.

    Takes ``nn.GRU``'s arguments plus ``min_density`` and ``backend`` (keywords).
    ``sparsify(model, include=(..., nn.GRU))`` converts GRUs to it; it is not one of the
    paper's layers.
    """

    _dst_base = nn.GRU
