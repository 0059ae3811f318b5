"""``DSTLSTM`` / ``DSTGRU``: DST-masked gate matrices, run by the sparse recurrent kernel on the
CPU and by PyTorch's fused RNNs elsewhere."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from dst_kernels import _ops
from dst_kernels import functional as DF
from dst_kernels.nn.base import _OUTSIDE_READS, DSTLayer

__all__ = ["DSTGRU", "DSTLSTM"]


class _DSTRNN(DSTLayer):
    """DST masks for the gate matrices of an ``nn.LSTM`` / ``nn.GRU``.

    Every ``weight_*`` matrix gets a ``threshold_*`` vector of its row count. The masks
    are computed once per forward, for all layers. On the CPU with the native backend the
    layers run on the sparse family's recurrent kernel (``DF.rnn_layer``: each gate matrix
    through its compressed form below the density crossover); packed sequences,
    ``proj_size > 0``, autocast, other dtypes and devices run the masked weights through
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
        if self._runs_sparse(input, hx, masked):
            return self._sparse_forward(input, hx, masked)
        dense = self._flat_weights
        self._flat_weights = [masked.get(name, param) for name, param in zip(self._flat_weights_names, dense)]
        try:
            return super().forward(input, hx)
        finally:
            self._flat_weights = dense

    def _runs_sparse(self, input, hx, masked) -> bool:
        """Whether this forward runs on the sparse recurrent kernel (decided without a host sync)."""
        if isinstance(input, PackedSequence) or not isinstance(input, torch.Tensor):
            return False
        if getattr(self, "proj_size", 0) or input.device.type != "cpu" or input.dim() not in (2, 3):
            return False
        if input.dtype not in (torch.float32, torch.float64) or torch.is_autocast_enabled("cpu"):
            return False
        if DF.resolve_backend(self.backend, input.device) != "native" or not _ops.has_op(
            "dst_sparse_rnn_train"
        ):
            return False
        tensors = [*masked.values(), *(self._parameters[n] for n in self._flat_weights_names)]
        states = () if hx is None else (hx if isinstance(hx, tuple) else (hx,))
        tensors += [h for h in states if isinstance(h, torch.Tensor)]
        if not all(
            type(t) in (torch.Tensor, nn.Parameter) and t.dtype == input.dtype and t.device.type == "cpu"
            for t in tensors
        ):
            return False
        return self._sparse_pays(input, masked)

    def _sparse_pays(self, input, masked) -> bool:
        """The sparse mode, else whether a recurrent matrix is below the crossover of its product
        (the linear family's, for ``batch`` rows). The kept counts are read on the host: these
        are CPU tensors (no device round trip); under ``torch.compile`` the kernel is taken."""
        if torch.compiler.is_compiling():
            return True
        mode = torch.ops.dst_kernels.sparse_mode(-1)
        if mode != 0:
            return mode == 1  # "always": the kernel; "never": PyTorch's fused RNN
        batch = 1 if input.dim() == 2 else input.shape[0 if self.batch_first else 1]
        for name, p in masked.items():
            if name.startswith("weight_hh"):
                rows, cols = p.shape
                crossover = torch.ops.dst_kernels.sparse_crossover(batch, cols, rows)
                if int(torch.count_nonzero(p)) < crossover * p.numel():
                    return True
        return False

    def _sparse_forward(self, input, hx, masked):
        lstm = isinstance(self, nn.LSTM)
        mode = "lstm" if lstm else "gru"

        def layer(suffix, x, h0, c0, reverse):
            return DF.rnn_layer(
                x,
                h0,
                c0,
                masked["weight_ih" + suffix],
                masked["weight_hh" + suffix],
                self._parameters.get("bias_ih" + suffix),
                self._parameters.get("bias_hh" + suffix),
                mode=mode,
                reverse=reverse,
            )

        return DF.rnn_layers(
            input,
            hx,
            layer,
            mode=mode,
            num_layers=self.num_layers,
            bidirectional=self.bidirectional,
            batch_first=self.batch_first,
            hidden_size=self.hidden_size,
            dropout=self.dropout if self.training else 0.0,
        )

    def flatten_parameters(self) -> None:
        # The RNN runs on masked copies of the weights; there is nothing to flatten.
        return None


class DSTLSTM(_DSTRNN, nn.LSTM):
    """``nn.LSTM`` whose gate matrices are DST-masked (docs/maths.md section 3).

    Every ``weight_ih_l{k}`` / ``weight_hh_l{k}`` (``[4H, *]``) gets a threshold
    ``threshold_ih_l{k}`` / ``threshold_hh_l{k}`` of shape ``[4H]``: one per unit
    per gate; likewise ``*_reverse`` for a bidirectional LSTM and
    ``threshold_hr_l{k}`` (``[proj_size]``) for the projections of one with
    ``proj_size > 0``. The masks are computed once per forward, for all layers; the
    layers run on the sparse recurrent kernel on the CPU (see ``_DSTRNN``), elsewhere
    through PyTorch's fused LSTM on the masked weights.
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
