"""Files written before the package was split by role still load (fixtures written by commit
35d1e86 with tests/fixtures/make_35d1e86.py): a whole sparsified model and DST layers pickled
with ``torch.save`` (classes under ``dst_kernels.nn``, generated masked classes), a state
dict, and a ``save_sparse`` file (``dst_kernels.sparse.SparseLinear``)."""

from __future__ import annotations

from pathlib import Path

import torch
from conftest import assert_close_rel

import dst_kernels as dst

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def test_models_pickled_before_the_split_load_and_compute_the_same():
    saved = torch.load(FIXTURES / "dst_models_35d1e86.pt", weights_only=False)
    model, rnn, mlp = saved["model"], saved["rnn"], saved["mlp"]
    assert type(model[0]) is dst.DSTConv2d and type(model[5]) is dst.DSTLinear
    assert dst.is_dst_layer(model[3]) and type(model[3]).__name__ == "DSTMaskedConv1d"
    assert type(rnn) is dst.DSTLSTM
    with torch.no_grad():
        assert_close_rel(model.eval()(saved["x"]), saved["y"], 1e-6, "sparsified model")
        assert_close_rel(rnn.eval()(saved["xr"])[0], saved["yr"], 1e-6, "DSTLSTM")
        assert_close_rel(mlp.eval()(saved["xm"]), saved["ym"], 1e-6, "DST layers")
    # It trains as before (thresholds get gradients) and folds.
    model.train()(saved["x"]).sum().backward()
    assert model[5].threshold.grad is not None and model[3].threshold.grad is not None
    dst.export.fold(model)


def test_a_state_dict_saved_before_the_split_loads_strictly():
    saved = torch.load(FIXTURES / "dst_models_35d1e86.pt", weights_only=False)
    model = saved["model"]
    state = saved["state"]
    model.load_state_dict(state, strict=True)
    assert any(k.endswith("threshold") for k in state)


def test_a_sparse_file_saved_before_the_split_loads():
    saved = torch.load(FIXTURES / "dst_models_35d1e86.pt", weights_only=False)
    sparse = dst.export.load_sparse(FIXTURES / "sparse_mlp_35d1e86.pt")
    assert type(sparse[0]) is dst.export.SparseLinear
    assert dst.export.SparseLinear is dst.sparse.SparseLinear  # the pickled path
    with torch.no_grad():
        assert_close_rel(sparse(saved["xm"]), saved["ym"], 1e-6, "load_sparse")
