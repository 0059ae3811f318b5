"""sparsify on real third-party models, built from a config (random init, no download).

Each test needs its package (transformers, torchvision, timm) and is skipped without it;
tests/test_sparsify.py covers the same patterns with pure-torch stand-ins.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_close_rel
from torch import nn

import dst_kernels as dst
from dst_kernels.export import dense_state_dict, fold


def _random_thresholds(model, low=0.0, high=0.03):
    with torch.no_grad():
        for t in dst.threshold_parameters(model):
            t.uniform_(low, high)


def _logits(model, *args):
    with torch.no_grad():
        out = model.eval()(*args)
    return getattr(out, "logits", out)


def _check_drop_in(model, make_fresh, *inputs, tol=1e-5):
    """Masks bite, the model computes what fold says, and the dense state dict loads strictly
    into a freshly built model of the original architecture and computes the same."""
    report = dst.sparsity_report(model)
    assert 0 < report.kept < report.total
    y = _logits(model, *inputs)
    assert_close_rel(_logits(fold(model), *inputs), y, tol, "fold")
    fresh = make_fresh()
    fresh.load_state_dict(dense_state_dict(model), strict=True)
    assert_close_rel(_logits(fresh, *inputs), y, tol, "dense_state_dict")
    return fresh


def test_bert_two_heads(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(
        vocab_size=60,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=24,
        max_position_embeddings=16,
    )
    model = transformers.BertForMaskedLM(cfg).eval()
    ids = torch.randint(0, 60, (2, 9))
    y_dense = _logits(model, ids)
    params = dict(model.named_parameters())
    dst.sparsify(model)
    assert torch.equal(_logits(model, ids), y_dense)  # thresholds 0: the same model
    after = dict(model.named_parameters())
    assert all(after[k] is p for k, p in params.items())
    decoder = model.cls.predictions.decoder
    assert decoder.weight is model.bert.embeddings.word_embeddings.weight  # the tie holds
    assert not dst.is_dst_layer(decoder)
    assert type(model.bert.encoder.layer[0].attention.self.query) is dst.DSTLinear
    _random_thresholds(model)
    _check_drop_in(model, lambda: transformers.BertForMaskedLM(cfg), ids)
    # HuggingFace checkpoints: save the dense state dict, load with from_pretrained.
    model.save_pretrained(tmp_path, state_dict=dense_state_dict(model))
    loaded = transformers.BertForMaskedLM.from_pretrained(tmp_path)
    assert_close_rel(_logits(loaded, ids), _logits(model, ids), 1e-5, "from_pretrained")


def test_gpt2_conv1d_registered():
    transformers = pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    cfg = transformers.GPT2Config(vocab_size=60, n_embd=16, n_layer=2, n_head=2, n_positions=16)
    cfg.bos_token_id = cfg.eos_token_id = 0
    model = transformers.GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, 60, (2, 9))
    dst.register_layer(Conv1D, {"weight": 1})  # weight [in, out]: one threshold per output column
    summary = dst.plan_sparsify(model)
    assert "transformer.h.0.attn.c_attn" in {e.name for e in summary.dense}  # opt-in, and said so
    dst.sparsify(model, include=(nn.Linear, Conv1D))
    c_attn = model.transformer.h[0].attn.c_attn
    assert isinstance(c_attn, Conv1D) and dst.is_dst_layer(c_attn)
    assert c_attn.threshold.shape == (3 * 16,)
    assert model.lm_head.weight is model.transformer.wte.weight
    _random_thresholds(model)
    _check_drop_in(model, lambda: transformers.GPT2LMHeadModel(cfg), ids)


def test_torchvision_vit_mha_and_zero_head():
    torchvision = pytest.importorskip("torchvision")
    make = lambda: torchvision.models.VisionTransformer(  # noqa: E731
        image_size=32, patch_size=16, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=24, num_classes=5
    )
    model = make().eval()
    x = torch.randn(2, 3, 32, 32)
    summary = dst.plan_sparsify(model)
    zero = [e for e in summary.dense if "all-zero" in e.reason]
    assert [e.name for e in zero] == ["heads.head"]  # zero-initialised: would never train
    dst.sparsify(model, include=(nn.Linear, nn.Conv2d, nn.MultiheadAttention))
    attn = model.encoder.layers[0].self_attention
    assert dst.is_dst_layer(attn) and dst.is_dst_layer(attn.out_proj)
    with torch.no_grad():
        nn.init.normal_(model.heads.head.weight)
    _random_thresholds(model)
    _check_drop_in(model, make, x)


@pytest.mark.parametrize("name", ["tf_efficientnet_b0", "resnet10t"])
def test_timm_models(name):
    timm = pytest.importorskip("timm")
    make = lambda: timm.create_model(name, pretrained=False, num_classes=5)  # noqa: E731
    model = make().eval()
    x = torch.randn(1, 3, 48, 48)
    y_dense = _logits(model, x)
    types = {type(m) for m in model.modules()}
    dst.sparsify(model)
    assert {m._dst_base if dst.is_dst_layer(m) else type(m) for m in model.modules()} == types
    y = _logits(model, x)
    assert y.shape == y_dense.shape
    assert_close_rel(y, y_dense, 1e-5)
    _random_thresholds(model, 0.0, 0.01)
    _check_drop_in(model, make, x, tol=1e-4)
    copy.deepcopy(model)


def test_torchvision_swin_parent_reads_the_masked_weights():
    """ShiftedWindowAttention passes qkv.weight / proj.weight to a function: it must see W * M."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.swin_t(num_classes=5).eval()
    x = torch.randn(1, 3, 64, 64)
    dst.sparsify(model)
    attn = model.features[1][0].attn
    assert type(attn.qkv) is dst.DSTLinear and type(attn.proj) is dst.DSTLinear
    with torch.no_grad():  # thresholds at each row's median |W|: half of every layer kept
        for m in model.modules():
            if dst.is_dst_layer(m):
                for w, t in m._dst_pairs:
                    getattr(m, t).copy_(m.dense_weight(w).detach().flatten(1).abs().median(1).values)
    assert_close_rel(_logits(model, x), _logits(fold(model), x), 1e-4, "swin_t against its fold")
    fresh = torchvision.models.swin_t(num_classes=5)
    fresh.load_state_dict(dense_state_dict(model), strict=True)
    assert_close_rel(_logits(fresh, x), _logits(model, x), 1e-4, "dense_state_dict")


def test_t5_reads_a_childs_weight_in_its_forward():
    """T5's feed-forward reads ``self.wo.weight.dtype`` inside its forward: under sparsify that
    read is a masked weight (no effect on the dtype), and the model still computes its fold."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.T5Config(
        vocab_size=40, d_model=16, d_kv=8, d_ff=24, num_layers=1, num_heads=2, decoder_start_token_id=0
    )

    class Seq2Seq(nn.Module):  # positional inputs for the helpers
        def __init__(self):
            super().__init__()
            self.t5 = transformers.T5ForConditionalGeneration(cfg)

        def forward(self, ids, dec):
            return self.t5(input_ids=ids, decoder_input_ids=dec).logits

    torch.manual_seed(0)
    model = Seq2Seq().eval()
    ids = torch.randint(0, 40, (2, 7))
    dec = torch.randint(0, 40, (2, 5))
    dst.sparsify(model)
    assert type(model.t5.encoder.block[0].layer[1].DenseReluDense.wo) is dst.DSTLinear
    _random_thresholds(model, 0.0, 0.2)
    _check_drop_in(model, Seq2Seq, ids, dec, tol=1e-4)
