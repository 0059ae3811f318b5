"""The sparse op family's recurrent kernel: one LSTM / GRU layer and direction on the masked
gate matrices (``dst_sparse_rnn_train`` / ``dst_sparse_rnn_backward``, ``dst_sparse_rnn`` for
inference), and ``DSTLSTM`` / ``DSTGRU`` running on it on the CPU."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import assert_close_rel, tol_for
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import dst_kernels as dst
from dst_kernels import functional as DF
from dst_kernels.sparse import sparse_mode

pytestmark = pytest.mark.skipif(
    os.environ.get("DST_KERNELS_NO_EXTENSION") == "1", reason="pure-Python install requested"
)

ops = torch.ops.dst_kernels
CELLS = {"lstm": (dst.DSTLSTM, nn.LSTM), "gru": (dst.DSTGRU, nn.GRU)}

# (input, hidden, layers, bidirectional, batch_first, bias, steps, batch): 1s, primes, batches
# under, at and over one vector of 16 lanes.
CASES = [
    (1, 1, 1, False, False, True, 1, 1),
    (5, 7, 2, True, True, True, 4, 3),
    (3, 11, 1, False, False, False, 2, 17),
    (13, 5, 3, False, True, True, 6, 2),
    (4, 16, 2, True, False, True, 3, 16),
    (2, 3, 1, False, True, True, 5, 33),
    # The tiled transposes of h, dy, x and dx: whole 16 x 16 blocks and ragged edges.
    (19, 37, 1, True, False, True, 5, 7),
]
DENSITIES = [0.0, 0.3, 1.0]


def _set_density(layer, density: float) -> None:
    with torch.no_grad():
        for w, t in layer._dst_pairs:
            rows = layer._parameters[w].abs()
            if density <= 0.0:
                getattr(layer, t).copy_(rows.amax(1) + 1.0)
            elif density >= 1.0:
                getattr(layer, t).fill_(-1.0)
            else:
                getattr(layer, t).copy_(torch.quantile(rows.double(), 1.0 - density, dim=1).to(rows.dtype))


def _pair(cell, case, density, dtype=torch.float64, **kw):
    cls, _ = CELLS[cell]
    n_in, hidden, layers, bi, bf, bias = case[:6]
    torch.manual_seed(0)
    ours = cls(n_in, hidden, layers, bias=bias, batch_first=bf, bidirectional=bi, backend="native", **kw)
    ours = ours.to(dtype)
    _set_density(ours, density)
    ref = cls(n_in, hidden, layers, bias=bias, batch_first=bf, bidirectional=bi, backend="reference", **kw)
    ref = ref.double()
    ref.load_state_dict({k: v.double() for k, v in ours.state_dict().items()})
    return ours, ref


def _inputs(cell, case, dtype=torch.float64, seed=1):
    n_in, hidden, layers, bi, bf, _, steps, batch = case
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((batch, steps, n_in) if bf else (steps, batch, n_in), generator=g, dtype=torch.float64)
    states = layers * (2 if bi else 1)
    h0 = torch.randn(states, batch, hidden, generator=g, dtype=torch.float64)
    c0 = torch.randn(states, batch, hidden, generator=g, dtype=torch.float64)
    return (
        [t.to(dtype).requires_grad_(True) for t in (x, h0, c0)]
        if cell == "lstm"
        else [t.to(dtype).requires_grad_(True) for t in (x, h0)]
    )


def _run(layer, cell, inputs, with_state=True):
    x, *state = inputs
    hx = None if not with_state else (tuple(state) if cell == "lstm" else state[0])
    out, h = layer(x, hx)
    h = h if isinstance(h, tuple) else (h,)
    # A loss that weights every output and state differently.
    loss = (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum()
    loss = loss + sum(1.3 * s.sum() for s in h)
    return out, h, loss


def _compare(cell, case, density, mode="always", dtype=torch.float64, with_state=True):
    ours, ref = _pair(cell, case, density, dtype)
    inputs = _inputs(cell, case, dtype)
    ref_inputs = [t.detach().double().requires_grad_(True) for t in inputs]
    with sparse_mode(mode):
        out, h, loss = _run(ours, cell, inputs, with_state)
        grads = torch.autograd.grad(loss, [*inputs, *ours.parameters()], allow_unused=True)
    r_out, r_h, r_loss = _run(ref, cell, ref_inputs, with_state)
    r_grads = torch.autograd.grad(r_loss, [*ref_inputs, *ref.parameters()], allow_unused=True)
    tol = tol_for(dtype)
    assert_close_rel(out, r_out, tol, "output")
    for a, b in zip(h, r_h):
        assert_close_rel(a, b, tol, "state")
    names = ["x", "h0", "c0"][: len(inputs)] + [n for n, _ in ours.named_parameters()]
    for name, a, b in zip(names, grads, r_grads):
        if a is None or b is None:  # an initial state that was not passed
            assert a is None and b is None and not with_state, name
            continue
        # The threshold gradient is a row reduction (SPEC section 4): scaled by the row length.
        scale = ours._parameters[name.replace("threshold", "weight")].shape[1] if "threshold" in name else 1
        assert_close_rel(a, b, tol * scale, name)


@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("cell", sorted(CELLS))
def test_the_kernel_equals_the_reference(cell, case, density):
    _compare(cell, case, density)


@pytest.mark.parametrize("cell", sorted(CELLS))
@pytest.mark.parametrize("mode", ["auto", "never"])
def test_every_mode_equals_the_reference(cell, mode):
    _compare(cell, CASES[1], 0.3, mode=mode)


@pytest.mark.parametrize("cell", sorted(CELLS))
def test_float32_within_tolerance(cell):
    _compare(cell, CASES[4], 0.3, dtype=torch.float32)
    _compare(cell, CASES[5], 1.0, dtype=torch.float32)
    _compare(cell, CASES[6], 0.3, dtype=torch.float32)


@pytest.mark.parametrize("cell", sorted(CELLS))
def test_no_initial_state_and_unbatched_input(cell):
    _compare(cell, CASES[1], 0.3, with_state=False)
    ours, ref = _pair(cell, (5, 7, 2, True, False, True), 0.3)
    x = torch.randn(4, 5, dtype=torch.float64)  # unbatched: [steps, input]
    with sparse_mode("always"):
        assert ours._runs_sparse(x, None, {w: ours._parameters[w] for w, _ in ours._dst_pairs})
        out, h = ours(x)
    r_out, r_h = ref(x)
    assert_close_rel(out, r_out, 1e-12, "output")
    for a, b in zip(h if cell == "lstm" else (h,), r_h if cell == "lstm" else (r_h,)):
        assert a.shape == b.shape
        assert_close_rel(a, b, 1e-12, "state")


@pytest.mark.parametrize("cell", sorted(CELLS))
def test_dropout_between_layers(cell):
    ours, ref = _pair(cell, CASES[3], 0.3, dropout=0.4)
    x = _inputs(cell, CASES[3])[0]
    ours.eval()
    ref.eval()
    with sparse_mode("always"):
        assert_close_rel(ours(x)[0], ref(x.detach())[0], 1e-12, "eval output")
        ours.train()
        torch.manual_seed(3)
        a = ours(x)[0]
        torch.manual_seed(3)
        b = ours(x)[0]
        ours.dropout = 0.0
        c = ours(x)[0]
    assert torch.equal(a, b)  # the dropout masks come from torch's generator
    assert not torch.equal(a, c)  # and are applied (0.4 of 30 units per step is never none)
    (g,) = torch.autograd.grad(a.sum(), x)
    assert torch.isfinite(g).all()


@pytest.mark.parametrize("cell", sorted(CELLS))
def test_the_other_paths_stay_on_the_fused_rnn(cell):
    cls, _ = CELLS[cell]
    layer = cls(3, 4, 1, backend="native").double()
    masked = {w: layer._parameters[w] for w, _ in layer._dst_pairs}
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    with sparse_mode("always"):
        assert layer._runs_sparse(x, None, masked)
        assert not layer._runs_sparse(x.half(), None, masked)
        packed = pack_padded_sequence(x, [5, 3])
        assert not layer._runs_sparse(packed, None, masked)
        out, _ = layer(packed)  # runs, through the fused RNN
        assert out.data.shape == (8, 4)
    with sparse_mode("never"):
        assert not layer._runs_sparse(x, None, masked)
    if cell == "lstm":
        proj = dst.DSTLSTM(3, 4, 1, proj_size=2, backend="native").double()
        with sparse_mode("always"):
            assert not proj._runs_sparse(x, None, {w: proj._parameters[w] for w, _ in proj._dst_pairs})


def test_auto_mode_takes_the_kernel_below_the_crossover_only():
    layer = dst.DSTLSTM(6, 8, 1, backend="native").double()
    x = torch.randn(4, 3, 6, dtype=torch.float64)
    _set_density(layer, 1.0)
    masked = {w: layer._parameters[w] * layer.masks()[w] for w, _ in layer._dst_pairs}
    assert not layer._runs_sparse(x, None, masked)
    _set_density(layer, 0.0)
    masked = {w: layer._parameters[w] * layer.masks()[w] for w, _ in layer._dst_pairs}
    assert layer._runs_sparse(x, None, masked)


def test_the_reset_rule_applies_on_the_kernel_path():
    layer = dst.DSTLSTM(5, 6, 1, backend="native", min_density=0.5).double().train()
    _set_density(layer, 0.0)  # nothing kept: every threshold vector resets to 0
    with sparse_mode("always"):
        layer(torch.randn(3, 2, 5, dtype=torch.float64))
    for t in layer.thresholds():
        assert torch.equal(t.detach(), torch.zeros_like(t))


@pytest.mark.parametrize("cell", sorted(CELLS))
def test_deterministic_for_any_thread_count(cell):
    torch.manual_seed(0)
    g = 4 if cell == "lstm" else 3
    x, h0, c0 = torch.randn(7, 19, 9), torch.randn(19, 24), torch.randn(19, 24)
    w_ih = torch.randn(g * 24, 9) * (torch.rand(g * 24, 9) < 0.2)
    w_hh = torch.randn(g * 24, 24) * (torch.rand(g * 24, 24) < 0.2)
    b = torch.randn(g * 24)
    c = c0 if cell == "lstm" else None
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            with sparse_mode("always"):
                y, h_n, c_n, saved = ops.dst_sparse_rnn_train(x, h0, c, w_ih, w_hh, b, b, cell, False)
                back = ops.dst_sparse_rnn_backward(
                    y, h_n, None, x, h0, c, w_ih, w_hh, y, saved, cell, False, True
                )
            results.append((y, h_n, c_n, *back[:3]))
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        for a, b_ in zip(results[0], other):
            assert torch.equal(a, b_)


@pytest.mark.parametrize("cell", sorted(CELLS))
@pytest.mark.parametrize("reverse", [False, True])
def test_the_inference_op_equals_the_training_op(cell, reverse):
    torch.manual_seed(0)
    g = 4 if cell == "lstm" else 3
    x, h0, c0 = torch.randn(5, 3, 6), torch.randn(3, 7), torch.randn(3, 7)
    w_ih = torch.randn(g * 7, 6) * (torch.rand(g * 7, 6) < 0.3)
    w_hh = torch.randn(g * 7, 7) * (torch.rand(g * 7, 7) < 0.3)
    b_ih, b_hh = torch.randn(g * 7), torch.randn(g * 7)
    c = c0 if cell == "lstm" else None
    zero = torch.zeros(g * 7)
    csr_ih = ops.dst_sparse_mask(w_ih, zero)
    csr_hh = ops.dst_sparse_mask(w_hh, zero)
    with sparse_mode("always"):
        y, h_n, c_n, _ = ops.dst_sparse_rnn_train(x, h0, c, w_ih, w_hh, b_ih, b_hh, cell, reverse)
    y2, h2, c2 = ops.dst_sparse_rnn(x, h0, c, *csr_ih, *csr_hh, b_ih, b_hh, cell, reverse)
    assert torch.equal(y, y2) and torch.equal(h_n, h2) and torch.equal(c_n, c2)


@pytest.mark.parametrize("cell", sorted(CELLS))
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (5, 3, 6, 7), (3, 17, 1, 5), (1, 4, 9, 2), (7, 2, 3, 1)])
def test_the_feature_major_hand_off(cell, shape):
    """y with feature_major is the same values laid out as h^T ([batch, 1, steps * batch]
    strides), and a layer reading it as x computes what it computes from a contiguous x."""
    steps, batch, n_in, hidden = shape
    torch.manual_seed(0)
    g = 4 if cell == "lstm" else 3
    x, h0 = torch.randn(steps, batch, n_in), torch.randn(batch, hidden)
    c0 = torch.randn(batch, hidden) if cell == "lstm" else None
    zero = torch.zeros(g * hidden)
    csr = [*ops.dst_sparse_mask(torch.randn(g * hidden, n_in) * (torch.rand(g * hidden, n_in) < 0.4), zero)]
    csr += [
        *ops.dst_sparse_mask(torch.randn(g * hidden, hidden) * (torch.rand(g * hidden, hidden) < 0.4), zero)
    ]
    csr2 = [
        *ops.dst_sparse_mask(torch.randn(g * hidden, hidden) * (torch.rand(g * hidden, hidden) < 0.4), zero)
    ]
    csr2 += csr[3:]
    b = torch.randn(g * hidden)
    y, h_n, c_n = ops.dst_sparse_rnn(x, h0, c0, *csr, b, b, cell, False)
    y_fm, h_fm, c_fm = ops.dst_sparse_rnn(x, h0, c0, *csr, b, b, cell, False, True)
    # h_n owns its values (a hidden size or batch of 1 once returned a view of a freed buffer)
    assert torch.equal(h_n, y[-1])
    assert torch.equal(y_fm, y) and torch.equal(h_fm, h_n) and torch.equal(c_fm, c_n)
    assert y_fm.stride() == (batch, 1, steps * batch)
    assert y_fm.is_contiguous() == (steps * batch == 1 or hidden == 1)
    for reverse in (False, True):
        want = ops.dst_sparse_rnn(y.contiguous(), h0, c0, *csr2, b, None, cell, reverse)
        got = ops.dst_sparse_rnn(y_fm, h0, c0, *csr2, b, None, cell, reverse)
        for a, e in zip(got, want):
            assert torch.equal(a, e)
    torch.library.opcheck(ops.dst_sparse_rnn, (y_fm, h0, c0, *csr2, b, None, cell, True, True))


@pytest.mark.parametrize("cell", sorted(CELLS))
def test_opcheck(cell):
    g = 4 if cell == "lstm" else 3
    x = torch.randn(3, 2, 4, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(2, 5, dtype=torch.float64, requires_grad=True) if cell == "lstm" else None
    w_ih = (torch.randn(g * 5, 4, dtype=torch.float64) * (torch.rand(g * 5, 4) < 0.5)).requires_grad_(True)
    w_hh = (torch.randn(g * 5, 5, dtype=torch.float64) * (torch.rand(g * 5, 5) < 0.5)).requires_grad_(True)
    b = torch.randn(g * 5, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(ops.dst_sparse_rnn_train, (x, h0, c0, w_ih, w_hh, b, b, cell, True))
    zero = torch.zeros(g * 5, dtype=torch.float64)
    csr = [*ops.dst_sparse_mask(w_ih.detach(), zero), *ops.dst_sparse_mask(w_hh.detach(), zero)]
    args = (x.detach(), h0.detach(), None if c0 is None else c0.detach(), *csr, b.detach(), None, cell, False)
    torch.library.opcheck(ops.dst_sparse_rnn, args)


def test_the_functional_entry_point():
    x, h0, c0 = torch.randn(3, 2, 4), torch.randn(2, 5), torch.randn(2, 5)
    w_ih, w_hh = torch.randn(20, 4), torch.randn(20, 5)
    y, h_n, c_n = DF.rnn_layer(x, h0, c0, w_ih, w_hh, None, None, mode="lstm")
    assert y.shape == (3, 2, 5) and h_n.shape == (2, 5) and c_n.shape == (2, 5)
    assert torch.equal(h_n, y[-1])
    with pytest.raises(ValueError, match="mode must be 'lstm' or 'gru'"):
        DF.rnn_layer(x, h0, c0, w_ih, w_hh, None, None, mode="rnn")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"mode": "rnn"}, "mode must be 'lstm' or 'gru'"),
        ({"x": torch.randn(3, 4)}, r"x must be \[steps, batch, input_size\]"),
        ({"x": torch.randn(3, 2, 4).half()}, "x must be float32 or float64"),
        ({"w_hh": torch.randn(19, 5)}, "the recurrent weight must be"),
        ({"w_ih": torch.randn(20, 3)}, "the input weight must be"),
        ({"h0": torch.randn(3, 5)}, r"h0 must be \[2, 5\]"),
        ({"c0": None}, "the LSTM needs c0"),
        ({"b": torch.randn(19)}, r"the biases must be \[20\]"),
        ({"w_ih": torch.randn(20, 4).double()}, "weight_ih and weight_hh must share a dtype"),
        ({"x": torch.randn(3, 2, 4).double()}, "the weights have dtype"),
    ],
)
def test_bad_input_names_the_argument(change, message):
    args = {
        "x": torch.randn(3, 2, 4),
        "h0": torch.randn(2, 5),
        "c0": torch.randn(2, 5),
        "w_ih": torch.randn(20, 4),
        "w_hh": torch.randn(20, 5),
        "b": torch.randn(20),
        "mode": "lstm",
    }
    args.update(change)
    a = args
    with pytest.raises(RuntimeError, match=message):
        ops.dst_sparse_rnn_train(
            a["x"], a["h0"], a["c0"], a["w_ih"], a["w_hh"], a["b"], None, a["mode"], False
        )


def test_a_bad_compressed_matrix_is_refused():
    x, h0, c0 = torch.randn(3, 2, 4), torch.randn(2, 5), torch.randn(2, 5)
    zero = torch.zeros(20)
    crow, col, val = ops.dst_sparse_mask(torch.randn(20, 4), zero)
    hh = ops.dst_sparse_mask(torch.randn(20, 5), zero)
    bad = col.clone()
    bad[0] = 9
    with pytest.raises(RuntimeError, match=r"col_indices must lie in \[0, 4\)"):
        ops.dst_sparse_rnn(x, h0, c0, crow, bad, val, *hh, None, None, "lstm", False)


def test_compiles_fullgraph():
    # Dynamo refuses nn.LSTM subclasses unless told otherwise (its RNN support is experimental).
    torch._dynamo.reset()
    layer = dst.DSTLSTM(4, 6, 2, backend="native", min_density=None)
    _set_density(layer, 0.3)
    x = torch.randn(5, 3, 4)
    with sparse_mode("always"), torch._dynamo.config.patch(allow_rnn=True):
        expected = layer(x)[0]
        compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
        got = compiled(x)[0]
    assert_close_rel(got, expected, 1e-6, "compiled output")


# ----------------------------------------------------------------------------- inference


@pytest.mark.parametrize("cell", sorted(CELLS))
@pytest.mark.parametrize("case", [CASES[1], CASES[3], CASES[4]])
def test_to_sparse_computes_the_folded_model(cell, case, tmp_path):
    ours, _ = _pair(cell, case, 0.1, torch.float32)
    model = nn.Sequential(ours).eval()
    sparse = dst.export.to_sparse(model)
    kind = dst.export.SparseLSTM if cell == "lstm" else dst.export.SparseGRU
    assert isinstance(sparse[0], kind)
    kept = sum(int(m.sum()) for m in ours.masks().values())
    assert sparse[0].nnz == kept
    folded = dst.export.fold(model)
    x, *state = _inputs(cell, case, torch.float32)
    x = x.detach()
    hx = tuple(s.detach() for s in state) if cell == "lstm" else state[0].detach()
    with torch.no_grad():
        expected, want = folded[0](x, hx)
        got, have = sparse[0](x, hx)
    assert_close_rel(got, expected, 1e-5, "output")
    for a, b in zip(have if cell == "lstm" else (have,), want if cell == "lstm" else (want,)):
        assert_close_rel(a, b, 1e-5, "state")
    # state_dict round trip into a module of another density, and the file format
    other, _ = _pair(cell, case, 0.2, torch.float32)
    again = dst.export.to_sparse(nn.Sequential(other).eval())
    again.load_state_dict(sparse.state_dict())
    with torch.no_grad():
        assert torch.equal(again[0](x, hx)[0], got)
    path = tmp_path / "rnn.pt"
    dst.export.save_sparse(model, path)
    loaded = dst.export.load_sparse(path)
    with torch.no_grad():
        assert torch.equal(loaded[0](x, hx)[0], got)


def test_to_sparse_keeps_dense_what_it_cannot_run():
    proj = dst.DSTLSTM(3, 4, 1, proj_size=2, backend="native")
    _set_density(proj, 0.1)
    assert type(dst.export.to_sparse(nn.Sequential(proj))[0]) is nn.LSTM
    dense = dst.DSTLSTM(3, 4, 1, backend="native")
    _set_density(dense, 1.0)
    assert type(dst.export.to_sparse(nn.Sequential(dense))[0]) is nn.LSTM


def test_sparse_lstm_refuses_packed_input():
    layer = dst.DSTLSTM(3, 4, 1, backend="native")
    _set_density(layer, 0.1)
    sparse = dst.export.to_sparse(layer)
    with pytest.raises(TypeError, match="takes a tensor input"):
        sparse(pack_padded_sequence(torch.randn(5, 2, 3), [5, 3]))


@pytest.mark.parametrize("cell", sorted(CELLS))
@pytest.mark.parametrize("reverse", [False, True])
def test_the_dense_products_of_the_op_equal_its_sparse_ones(cell, reverse):
    """The op's GEMM path (a matrix above the crossover; forced here with "never") against its
    CSR path, forward and backward, in float64."""
    torch.manual_seed(0)
    g = 4 if cell == "lstm" else 3
    x, h0, c0 = torch.randn(6, 5, 4).double(), torch.randn(5, 7).double(), torch.randn(5, 7).double()
    w_ih = torch.randn(g * 7, 4).double() * (torch.rand(g * 7, 4) < 0.4)
    w_hh = torch.randn(g * 7, 7).double() * (torch.rand(g * 7, 7) < 0.4)
    b_ih, b_hh = torch.randn(g * 7).double(), torch.randn(g * 7).double()
    gy, gh = torch.randn(6, 5, 7).double(), torch.randn(5, 7).double()
    c = c0 if cell == "lstm" else None
    gc = torch.randn(5, 7).double() if cell == "lstm" else None
    results = {}
    for mode in ("always", "never"):
        with sparse_mode(mode):
            y, h_n, c_n, saved = ops.dst_sparse_rnn_train(x, h0, c, w_ih, w_hh, b_ih, b_hh, cell, reverse)
            back = ops.dst_sparse_rnn_backward(
                gy, gh, gc, x, h0, c, w_ih, w_hh, y, saved, cell, reverse, True
            )
        results[mode] = (y, h_n, c_n, *back)
    for a, b in zip(results["never"], results["always"]):
        assert_close_rel(a, b, 1e-12)


@pytest.mark.parametrize("cell", sorted(CELLS))
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("hidden, steps", [(37, 6), (1100, 2)])
def test_one_image_is_its_row_of_a_batch(cell, reverse, dtype, hidden, steps):
    # Batch 1 has its own walk (the input parts before it, the recurrent products 16 rows at a
    # time; above a work size two threads): every row sums in the batched walk's order, so an
    # image alone gives its row of the batch bit for bit. Hidden 37: two whole slices of 16
    # rows and a partial one per gate; rows without kept weights and rows with many.
    g = 4 if cell == "lstm" else 3
    gen = torch.Generator().manual_seed(hidden)
    n_in, batch = 11, 3
    density = 0.3 if hidden < 100 else 0.01
    w_ih = torch.randn(g * hidden, n_in, generator=gen, dtype=dtype)
    w_ih *= torch.rand(g * hidden, n_in, generator=gen) < density
    w_hh = torch.randn(g * hidden, hidden, generator=gen, dtype=dtype)
    w_hh *= torch.rand(g * hidden, hidden, generator=gen) < density
    w_hh[::5] = 0.0
    w_hh[1] = torch.randn(hidden, generator=gen, dtype=dtype)
    b_ih = torch.randn(g * hidden, generator=gen, dtype=dtype)
    b_hh = torch.randn(g * hidden, generator=gen, dtype=dtype)
    x = torch.randn(steps, batch, n_in, generator=gen, dtype=dtype)
    h0 = torch.randn(batch, hidden, generator=gen, dtype=dtype)
    c0 = torch.randn(batch, hidden, generator=gen, dtype=dtype) if cell == "lstm" else None
    zero = torch.zeros(g * hidden, dtype=dtype)
    csr = [*ops.dst_sparse_mask(w_ih, zero), *ops.dst_sparse_mask(w_hh, zero)]
    y, h_n, c_n = ops.dst_sparse_rnn(x, h0, c0, *csr, b_ih, b_hh, cell, reverse)
    with sparse_mode("always"):
        train = ops.dst_sparse_rnn_train(x, h0, c0, w_ih, w_hh, b_ih, b_hh, cell, reverse)
    assert torch.equal(train[0], y)
    for b in range(batch):
        c0b = None if c0 is None else c0[b : b + 1]
        y1, h1, c1 = ops.dst_sparse_rnn(x[:, b : b + 1], h0[b : b + 1], c0b, *csr, b_ih, b_hh, cell, reverse)
        assert torch.equal(y1[:, 0], y[:, b]) and torch.equal(h1[0], h_n[b])
        if cell == "lstm":
            assert torch.equal(c1[0], c_n[b])
        with sparse_mode("always"):
            t1 = ops.dst_sparse_rnn_train(
                x[:, b : b + 1], h0[b : b + 1], c0b, w_ih, w_hh, b_ih, b_hh, cell, reverse
            )
        assert torch.equal(t1[0][:, 0], y[:, b])
