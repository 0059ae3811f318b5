"""Deployment formats: ONNX (``dst.export.to_onnx``, checked with onnxruntime) and
``torch.export`` of folded, compacted and ``to_sparse`` models; safetensors files of the DST
and the dense state; HuggingFace ``save_pretrained`` in one call.

onnx, onnxscript, onnxruntime and transformers are installed in the test environment
(``make test``)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import dst_kernels as dst
from dst_kernels.train.models import build_model

onnxruntime = pytest.importorskip("onnxruntime", reason="onnxruntime is installed by make test")
pytest.importorskip("onnxscript", reason="onnxscript is installed by make test")


def _trained_like(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = build_model(name)
    dst.sparsify(model, exclude=("fc",) if name.startswith("lstm") else ())
    with torch.no_grad():
        for m in model.modules():
            if dst.is_dst_layer(m):
                for t in m.thresholds():
                    t.uniform_(0.0, 0.08)  # a sparse model
    return model.eval()


def _ort(program, *inputs):
    path = program.model_proto if hasattr(program, "model_proto") else program
    session = onnxruntime.InferenceSession(path.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {i.name: x.numpy() for i, x in zip(session.get_inputs(), inputs)}
    return [torch.from_numpy(o) for o in session.run(None, feeds)]


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> None:
    err = (a - b).abs().max().item() / max(b.abs().max().item(), 1e-12)
    assert err <= tol, f"relative error {err:.2e} > {tol:g}"


def _export_quietly(model, args, path=None, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dst.export.to_onnx(model, args, path, **kwargs)


@pytest.mark.parametrize("name", ["lenet300", "lenet5", "lstm_a"])
def test_folded_model_through_onnxruntime(name, tmp_path):
    model = _trained_like(name)
    x = torch.randn(5, 1, 28, 28)
    folded = dst.export.fold(model)
    path = tmp_path / f"{name}.onnx"
    program = _export_quietly(folded, (x,), path)
    assert path.stat().st_size > 0
    (out,) = _ort(program, x)
    with torch.no_grad():
        _close(out, model(x))


@pytest.mark.parametrize("name", ["lenet300", "lenet5"])
def test_compacted_model_through_onnxruntime(name):
    model = _trained_like(name)
    x = torch.randn(3, 1, 28, 28)
    compacted = dst.export.compact(model)
    (out,) = _ort(_export_quietly(compacted, (x,)), x)
    with torch.no_grad():
        _close(out, model(x), 1e-4)


def test_small_transformer_through_onnxruntime():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=24, dropout=0.0, batch_first=True)
    model = nn.Sequential(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), nn.Linear(16, 4))
    dst.sparsify(model)
    with torch.no_grad():
        for m in model.modules():
            if dst.is_dst_layer(m):
                m.threshold.uniform_(0.0, 0.1)
    model.eval()
    x = torch.randn(2, 7, 16)
    (out,) = _ort(_export_quietly(dst.export.fold(model), (x,)), x)
    with torch.no_grad():
        _close(out, model(x), 1e-4)


def test_onnx_refuses_dst_layers_and_to_sparse_models_saying_fold_first():
    model = _trained_like("lenet300")
    x = torch.randn(2, 1, 28, 28)
    with pytest.raises(ValueError, match=r"still has DST layers \(1, 3, 5\).*fold\(model\)"):
        dst.export.to_onnx(model, (x,))
    with pytest.raises(ValueError, match="to_sparse SparseLinear.*fold"):
        dst.export.to_onnx(dst.export.to_sparse(model, max_density=1.0), (x,))
    lenet5 = _trained_like("lenet5")
    with pytest.raises(ValueError, match=r"0, 3, 7, 9 are to_sparse SparseConv2d/SparseLinear layer"):
        dst.export.to_onnx(dst.export.to_sparse(lenet5, max_density=1.0), (x,))


@pytest.mark.parametrize("form", ["fold", "compact", "to_sparse"])
def test_torch_export_of_each_form(form):
    model = _trained_like("lenet300")
    x = torch.randn(4, 1, 28, 28)
    if form == "to_sparse" and not dst.export.sparse._native():
        pytest.skip("to_sparse needs the compiled extension (a build without it cannot run it)")
    exported = {
        "fold": dst.export.fold,
        "compact": dst.export.compact,
        "to_sparse": lambda m: dst.export.to_sparse(m, max_density=1.0),
    }[form](model)
    program = torch.export.export(exported, (x,))
    with torch.no_grad():
        _close(program.module()(x), model(x), 1e-5)
    if form == "to_sparse":
        assert "dst_kernels.dst_sparse_mm" in str(program.graph)


# ----------------------------------------------------------------------------- files


def test_safetensors_of_the_dst_state_and_of_the_dense_state(tmp_path):
    pytest.importorskip("safetensors", reason="safetensors comes with transformers in make test")
    from safetensors import safe_open

    model = _trained_like("lenet5")
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        y = model(x)
    dst.export.save_safetensors(model, tmp_path / "dst.safetensors")
    again = _trained_like("lenet5", seed=1)
    dst.export.load_safetensors(again, tmp_path / "dst.safetensors")
    with torch.no_grad():
        assert torch.equal(again(x), y)  # the same W and thresholds, the same kernels
    dst.export.save_safetensors(model, tmp_path / "dense.safetensors", dense=True)
    plain = build_model("lenet5").eval()
    dst.export.load_safetensors(plain, tmp_path / "dense.safetensors", strict=True)
    with torch.no_grad():
        _close(plain(x), y, 1e-6)
    with safe_open(str(tmp_path / "dense.safetensors"), "pt") as f:
        assert f.metadata()["dst_kernels"] == "dense"
        assert not any("threshold" in k for k in f.keys())
    with pytest.raises(FileNotFoundError, match="no safetensors file"):
        dst.export.load_safetensors(plain, tmp_path / "missing.safetensors")


def test_save_pretrained_in_one_call(tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers is installed by make test")
    cfg = transformers.GPT2Config(vocab_size=60, n_embd=16, n_layer=2, n_head=2, n_positions=16)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    dst.sparsify(model)
    with torch.no_grad():
        for m in model.modules():
            if dst.is_dst_layer(m):
                m.threshold.uniform_(0.0, 0.05)
    ids = torch.randint(0, 60, (2, 9))
    with torch.no_grad():
        y = model(ids).logits
    dst.export.save_pretrained(model, tmp_path)
    loaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        _close(loaded(ids).logits, y, 1e-5)
    with pytest.raises(TypeError, match="no save_pretrained"):
        dst.export.save_pretrained(nn.Linear(2, 2), tmp_path)
