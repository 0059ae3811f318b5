"""``DSTLSTM`` / ``DSTGRU``: DST-masked gate matrices, run by the sparse recurrent kernel on the
CPU and by PyTorch's fused RNNs elsewhere."""

from __future__ import annotations

import torch
import torch.nn.functional as F
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
        batched = input.dim() == 3
        x = input if batched else input.unsqueeze(1)
        if self.batch_first and batched:
            x = x.transpose(0, 1)
        directions = 2 if self.bidirectional else 1
        hidden = self.hidden_size
        if hx is None:
            zeros = x.new_zeros(self.num_layers * directions, x.shape[1], hidden)
            h0, c0 = zeros, zeros
        else:
            h0, c0 = hx if lstm else (hx, None)
            if not batched:
                h0 = h0.unsqueeze(1)
                c0 = c0.unsqueeze(1) if c0 is not None else None
            self._check_state(h0, x, directions, "h0" if lstm else "hx")
            if lstm:
                self._check_state(c0, x, directions, "c0")
        layer_in = x.contiguous()
        hs, cs = [], []
        for layer in range(self.num_layers):
            outs = []
            for d in range(directions):
                suffix = f"_l{layer}" + ("_reverse" if d else "")
                k = layer * directions + d
                y, h_n, c_n = DF.rnn_layer(
                    layer_in,
                    h0[k],
                    c0[k] if lstm else None,
                    masked["weight_ih" + suffix],
                    masked["weight_hh" + suffix],
                    self._parameters.get("bias_ih" + suffix),
                    self._parameters.get("bias_hh" + suffix),
                    mode="lstm" if lstm else "gru",
                    reverse=bool(d),
                )
                outs.append(y)
                hs.append(h_n)
                cs.append(c_n)
            layer_in = outs[0] if directions == 1 else torch.cat(outs, 2)
            if self.dropout and self.training and layer < self.num_layers - 1:
                layer_in = F.dropout(layer_in, self.dropout, True)
        out = layer_in
        if self.batch_first and batched:
            out = out.transpose(0, 1)
        h_n = torch.stack(hs)
        if not batched:
            out, h_n = out.squeeze(1), h_n.squeeze(1)
        if not lstm:
            return out, h_n
        c_n = torch.stack(cs)
        return out, (h_n, c_n if batched else c_n.squeeze(1))

    def _check_state(self, h, x, directions, name) -> None:
        expected = (self.num_layers * directions, x.shape[1], self.hidden_size)
        if tuple(h.shape) != expected:
            raise RuntimeError(f"Expected hidden size {expected} for {name}, got {tuple(h.shape)}")

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
