"""sparsify on other people's models: exactness, identity, coverage, the summary (issue 13).

Pure-torch stand-ins of the patterns third-party models use (MultiheadAttention, a Conv2dSame-
and a StdConv2d-like subclass, a subclass with its own forward, tied embedding/head, GPT-2's
``[in, out]`` Conv1D, frozen layers, hooks, an optimiser built before sparsify); the real
models (transformers) are in tests/test_sparsify_models.py under importorskip.
"""

from __future__ import annotations

import copy
import inspect
import io
import logging
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close_rel, row_length
from torch import nn

import dst_kernels as dst
from dst_kernels import reference
from dst_kernels.convert import DSTMaskedModule
from dst_kernels.export import dense_state_dict, fold


def _random_thresholds(model, low=0.0, high=0.08):
    """Thresholds that mask a good share of default-initialised weights."""
    with torch.no_grad():
        for t in dst.threshold_parameters(model):
            t.uniform_(low, high)


def _masked_copy(dense: nn.Module, sparse: nn.Module) -> nn.Module:
    """The dense model with every masked weight replaced by W * M (computed here, by name)."""
    out = copy.deepcopy(dense)
    params = dict(out.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for name, module in sparse.named_modules():
            if dst.is_dst_layer(module):
                for w, m in module.masks().items():
                    params[f"{name}.{w}" if name else w].mul_(m)
    return out


def _assert_same_function(a: nn.Module, b: nn.Module, *inputs, tol=1e-5):
    a.eval()
    b.eval()
    with torch.no_grad():
        ya, yb = a(*inputs), b(*inputs)
    ya = ya[0] if isinstance(ya, tuple) else ya
    yb = yb[0] if isinstance(yb, tuple) else yb
    assert ya.shape == yb.shape
    assert_close_rel(ya, yb, tol)


# ----------------------------------------------------------------------------- stand-ins


class Conv2dSame(nn.Conv2d):
    """timm's Conv2dSame: TensorFlow "same" padding computed from the input in its own forward."""

    def forward(self, x):
        ih, iw = x.shape[-2:]
        pads = []
        for size, k, s, d in zip((ih, iw), self.kernel_size, self.stride, self.dilation):
            pads.append(max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0))
        x = F.pad(x, [pads[1] // 2, pads[1] - pads[1] // 2, pads[0] // 2, pads[0] - pads[0] // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class StdConv2d(nn.Conv2d):
    """timm's StdConv2d: the weight is standardised per output channel in the forward."""

    def forward(self, x):
        w = F.batch_norm(
            self.weight.reshape(1, self.out_channels, -1), None, None, training=True, momentum=0.0, eps=1e-6
        ).reshape_as(self.weight)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class ScaledLinear(nn.Linear):
    """A user's subclass with its own forward."""

    def forward(self, x):
        return 0.5 * super().forward(x) + 1.0


class GPT2Conv1D(nn.Module):
    """HuggingFace's GPT-2 ``Conv1D``: a linear layer whose weight is ``[in, out]``."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.3)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        size_out = x.size()[:-1] + (self.nf,)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size_out)


dst.register_layer(GPT2Conv1D, {"weight": 1})


class TinyViT(nn.Module):
    """Attention block as torchvision's ViT builds it (nn.MultiheadAttention), zero-init head."""

    def __init__(self, d=8, heads=2, zero_head=False):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 16), nn.GELU(), nn.Linear(16, d))
        self.head = nn.Linear(d, 3)
        if zero_head:
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def forward(self, x):
        a, _ = self.attn(x, x, x, need_weights=False)
        x = x + a
        x = x + self.mlp(x)
        return self.head(x.mean(1))


class TiedLM(nn.Module):
    """Embedding and output head share one weight (BERT, GPT-2)."""

    def __init__(self, vocab=11, d=6):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.body = nn.Linear(d, d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.body(self.embed(ids))))


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = Conv2dSame(3, 6, 3, stride=2)
        self.std = StdConv2d(6, 6, 3, padding=1)
        self.conv = nn.Conv2d(6, 5, 3, padding=1)
        self.fc = ScaledLinear(5, 4)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(self.std(x))
        x = self.conv(x).mean((2, 3))
        return self.fc(x)


class SharedNet(nn.Module):
    """One Linear used twice, hooks, a frozen layer."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.block = nn.Linear(7, 7, dtype=dtype)
        self.frozen = nn.Linear(7, 7, dtype=dtype)
        self.frozen.requires_grad_(False)
        self.out = nn.Linear(7, 3, dtype=dtype)
        self.again = self.block  # the same module, registered under two names

    def forward(self, x):
        x = torch.tanh(self.block(x))
        x = torch.tanh(self.again(x))
        return self.out(self.frozen(x))


# ----------------------------------------------------------------------------- 1. exactness


def test_mha_out_proj_is_masked_in_the_real_forward_and_fold_matches():
    model = TinyViT()
    dense = copy.deepcopy(model)
    dst.sparsify(model)
    assert dst.is_dst_layer(model.attn.out_proj)  # reported as masked ...
    assert not dst.is_dst_layer(model.attn)  # in_proj_weight: opt-in
    _random_thresholds(model)
    m = model.attn.out_proj.mask()
    assert 0 < int(m.sum()) < m.numel()
    x = torch.randn(2, 5, 8)
    # ... and the mask is applied in the model's forward: it computes the masked dense model.
    _assert_same_function(model, _masked_copy(dense, model), x)
    _assert_same_function(model, fold(model), x)
    with torch.no_grad():  # MHA's fast path (eval, no grad) reads the masked weight too
        assert_close_rel(model.eval()(x), fold(model).eval()(x), 1e-5)
    names = [r.name for r in dst.sparsity_report(model)]
    assert "attn.out_proj.weight" in names


def test_subclasses_keep_their_own_forward():
    model = ConvNet()
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        shape_before = model.stem(x).shape
    dense = copy.deepcopy(model)
    dst.sparsify(model)
    assert type(model.stem).__bases__ == (DSTMaskedModule, Conv2dSame)
    assert isinstance(model.stem, Conv2dSame) and isinstance(model.std, StdConv2d)
    assert isinstance(model.fc, ScaledLinear)
    assert type(model.conv) is dst.DSTConv2d  # the exact type keeps the fused layer
    _assert_same_function(model, dense, x, tol=1e-6)  # thresholds at 0: nothing changes
    with torch.no_grad():
        assert model.stem(x).shape == shape_before == (2, 6, 5, 5)
    _random_thresholds(model)
    _assert_same_function(model, _masked_copy(dense, model), x)
    folded = fold(model)
    assert [type(m) for m in folded.children()] == [Conv2dSame, StdConv2d, nn.Conv2d, ScaledLinear]
    _assert_same_function(model, folded, x)
    fresh = ConvNet()
    fresh.load_state_dict(dense_state_dict(model), strict=True)
    _assert_same_function(model, fresh, x)


def test_masked_attribute_gradients_follow_the_estimator():
    layer = Conv2dSame(3, 4, 3, stride=2, dtype=torch.float64)
    dst.sparsify(layer)
    _random_thresholds(layer)
    w = layer.dense_weight("weight")
    t = layer.threshold
    x = torch.randn(2, 3, 7, 6, dtype=torch.float64)
    layer.eval()(x).square().sum().backward()
    p = (w.detach() * reference.mask(w.detach(), t.detach())).requires_grad_(True)
    ref = Conv2dSame(3, 4, 3, stride=2, dtype=torch.float64)
    ref.weight = nn.Parameter(p)
    with torch.no_grad():
        ref.bias.copy_(layer.bias)
    ref(x).square().sum().backward()
    gw, gt = reference.weight_grad(ref.weight.grad, w.detach(), t.detach())
    assert_close_rel(w.grad, gw, 1e-12, "dW")
    assert_close_rel(t.grad, gt, 1e-12 * row_length(w), "dt")


def test_masked_attribute_reset_rule_in_training_only():
    layer = dst.sparsify(nn.Conv1d(3, 4, 3), include=(nn.Conv1d,))
    x = torch.randn(2, 3, 8)
    with torch.no_grad():
        layer.threshold.fill_(10.0)
    layer.eval()(x)
    assert torch.equal(layer.threshold.detach(), torch.full((4,), 10.0))
    layer.train()(x)
    assert torch.equal(layer.threshold.detach(), torch.zeros(4))


# ----------------------------------------------------------------------------- 2. identity


def test_identity_parameters_sharing_hooks_mode_dtype():
    model = SharedNet(dtype=torch.float64).eval()
    params = dict(model.named_parameters())
    calls = []
    model.block.register_forward_hook(lambda m, i, o: calls.append("fwd"))
    model.out.register_forward_pre_hook(lambda m, i: calls.append("pre"))
    out = dst.sparsify(model)
    assert out is model
    assert model.again is model.block and type(model.block) is dst.DSTLinear
    after = dict(model.named_parameters())
    for name, p in params.items():
        assert after[name] is p, name  # the same Parameter objects, under the same names
    assert set(after) - set(params) == {"block.threshold", "out.threshold"}
    assert not model.frozen.weight.requires_grad and not dst.is_dst_layer(model.frozen)
    assert not any(m.training for m in model.modules())  # eval mode kept
    assert model.block.threshold.dtype == torch.float64
    model(torch.randn(2, 7, dtype=torch.float64))
    assert calls == ["fwd", "fwd", "pre"]  # hooks still fire (block runs twice)


def test_optimizer_built_before_sparsify_keeps_training_the_weights():
    model = SharedNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    dst.sparsify(model)
    opt.add_param_group({"params": dst.threshold_parameters(model)})
    before = model.out.weight.detach().clone()
    model.train()(torch.randn(4, 7)).square().sum().backward()
    opt.step()
    assert not torch.equal(model.out.weight.detach(), before)
    assert model.out.threshold.grad is not None


def test_frozen_layers_stay_dense_unless_asked():
    summary = dst.plan_sparsify(SharedNet())
    reasons = {e.name: e.reason for e in summary.dense}
    assert reasons["frozen"].startswith("frozen")
    model = dst.sparsify(SharedNet(), include_frozen=True)
    assert dst.is_dst_layer(model.frozen)
    assert not model.frozen.weight.requires_grad and not model.frozen.bias.requires_grad
    assert model.frozen.threshold.requires_grad  # asked for: its mask trains


def test_tied_weights_stay_tied_and_dense():
    model = TiedLM()
    dense = copy.deepcopy(model)
    dst.sparsify(model)
    assert model.head.weight is model.embed.weight  # still one Parameter
    assert not dst.is_dst_layer(model.head) and dst.is_dst_layer(model.body)
    summary = dst.plan_sparsify(TiedLM())
    (entry,) = [e for e in summary.dense if e.name == "head"]
    assert "tied" in entry.reason and "embed.weight" in entry.reason
    _random_thresholds(model)
    ids = torch.tensor([[1, 2, 3], [4, 5, 10]])
    _assert_same_function(model, _masked_copy(dense, model), ids)
    folded = fold(model)
    assert folded.head.weight is folded.embed.weight
    fresh = TiedLM()
    fresh.load_state_dict(dense_state_dict(model), strict=True)
    _assert_same_function(model, fresh, ids)


def test_pickle_and_deepcopy_of_masked_attribute_layers():
    model = TinyViT()
    dst.sparsify(model, include=(nn.Linear, nn.MultiheadAttention))
    _random_thresholds(model)
    x = torch.randn(2, 4, 8)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert type(loaded.attn) is type(model.attn)
    _assert_same_function(model, loaded, x, tol=0)
    _assert_same_function(model, copy.deepcopy(model), x, tol=0)


# ----------------------------------------------------------------------------- 3. coverage


class ZooNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(4, 6, 3, padding=1)
        self.c3 = nn.Conv3d(2, 3, (1, 2, 2))
        self.gru = nn.GRU(6, 5, batch_first=True)
        self.attn = nn.MultiheadAttention(5, 1, batch_first=True)
        self.proj = GPT2Conv1D(7, 5)

    def forward(self, seq, vol):
        h = self.c1(seq).transpose(1, 2)  # [N, L, 6]
        h, _ = self.gru(h)
        a, _ = self.attn(h, h, h, need_weights=False)
        return self.proj(a.contiguous()).sum() + self.c3(vol).sum()


ZOO_INPUTS = (torch.randn(2, 4, 6), torch.randn(1, 2, 2, 3, 3))
ZOO_ALL = (nn.Linear, nn.Conv1d, nn.Conv3d, nn.GRU, nn.MultiheadAttention, GPT2Conv1D)


def test_default_include_names_what_it_leaves_dense():
    summary = dst.plan_sparsify(ZooNet())
    dense = {e.name: e.reason for e in summary.dense}
    for name in ("c1", "c3", "gru", "attn", "proj"):
        assert dense[name] == "type not in include", name
    assert [e.name for e in summary.converted] == ["attn.out_proj"]
    text = str(summary)
    assert "attn (MultiheadAttention: in_proj_weight): type not in include" in text


def test_opt_in_types_are_masked_per_output_row_and_fold_matches():
    model = ZooNet()
    dense = copy.deepcopy(model)
    dst.sparsify(model, include=ZOO_ALL)
    summary = dst.plan_sparsify(model, include=ZOO_ALL)
    assert not summary.dense
    assert type(model.gru) is dst.DSTGRU
    assert model.attn.in_proj_threshold.shape == (15,)  # per output row of the packed q, k, v
    assert model.proj.threshold.shape == (7,)  # per output column of the [in, out] weight
    _random_thresholds(model)
    m = model.proj.mask()
    assert torch.equal(m, (model.proj.dense_weight().abs() > model.proj.threshold[None, :]).detach())
    rows = {r.name: r for r in dst.sparsity_report(model)}
    assert set(rows) >= {"c1.weight", "c3.weight", "gru.weight_ih_l0", "attn.in_proj_weight", "proj.weight"}
    _assert_same_function(model, _masked_copy(dense, model), *ZOO_INPUTS)
    folded = fold(model)
    assert type(folded.gru) is nn.GRU and type(folded.proj) is GPT2Conv1D
    _assert_same_function(model, folded, *ZOO_INPUTS)
    fresh = ZooNet()
    fresh.load_state_dict(dense_state_dict(model), strict=True)
    _assert_same_function(model, fresh, *ZOO_INPUTS)


def test_dst_gru_matches_nn_gru_with_masked_weights():
    gru = dst.DSTGRU(5, 4, num_layers=2, batch_first=True, bidirectional=True)
    _random_thresholds(gru)
    ref = nn.GRU(5, 4, num_layers=2, batch_first=True, bidirectional=True)
    masks = gru.masks()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p.copy_(getattr(gru, name) * masks[name] if name in masks else getattr(gru, name))
    x = torch.randn(3, 6, 5)
    assert_close_rel(gru.eval()(x)[0], ref(x)[0], 1e-6)
    assert type(gru.to_dense()) is nn.GRU


def test_register_layer_checks_its_arguments():
    with pytest.raises(TypeError, match="layer_type"):
        dst.register_layer(3, {"weight": 0})
    with pytest.raises(TypeError, match="weights"):
        dst.register_layer(GPT2Conv1D, {"weight": "1"})
    with pytest.raises(ValueError, match="RNNBase"):
        dst.register_layer(nn.LSTM, {"weight_ih_l0": 0})


# ----------------------------------------------------------------------------- 4. the summary


def test_nothing_convertible_is_said(caplog):
    model = nn.Sequential(nn.Embedding(5, 3), nn.LayerNorm(3), nn.Bilinear(3, 3, 2))
    with caplog.at_level(logging.INFO, logger="dst_kernels.sparsify"):
        dst.sparsify(model)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "nothing" in warnings[0].getMessage()
    assert "2 (Bilinear: weight): no masking rule for this type" in warnings[0].getMessage()
    assert "0 (Embedding: weight): embedding table" in warnings[0].getMessage()


def test_summary_logged_once_and_as_data(caplog):
    with caplog.at_level(logging.INFO, logger="dst_kernels.sparsify"):
        dst.sparsify(TiedLM())
    infos = [r for r in caplog.records if r.levelno == logging.INFO]
    assert len(infos) == 1 and "masked  body (Linear: weight)" in infos[0].getMessage()
    warns = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warns) == 1 and "head (Linear): weight tied" in warns[0]
    rows = dst.plan_sparsify(TiedLM()).rows()
    assert {r["name"] for r in rows} == {"embed", "body", "head"}


def test_all_zero_weights_are_left_dense_with_a_warning(caplog):
    model = TinyViT(zero_head=True)
    with caplog.at_level(logging.WARNING, logger="dst_kernels.sparsify"):
        dst.sparsify(model)
    assert not dst.is_dst_layer(model.head) and dst.is_dst_layer(model.mlp[0])
    assert any("head (Linear): all-zero weight" in r.getMessage() for r in caplog.records)
    # It still trains as a dense layer.
    model.train()(torch.randn(2, 3, 8)).sum().backward()
    assert model.head.weight.grad.abs().sum() > 0


def test_report_states_what_its_total_covers():
    model = dst.sparsify(TiedLM())
    report = dst.sparsity_report(model)
    assert [r.name for r in report] == ["body.weight"]
    assert report.dense_weights == ("embed.weight",)
    assert report.unmasked == 11 * 6 + 6  # the embedding (also the head) and body.bias
    last = str(report).splitlines()[-1]
    assert "masked weights only" in last and "72 other parameters" in last and "embed.weight" in last


# ----------------------------------------------------------------------------- 6. the smaller cases


def test_fuse_conv_bn_eval_raises_and_says_fold_first():
    conv = dst.sparsify(nn.Conv2d(3, 4, 3)).eval()
    bn = nn.BatchNorm2d(4).eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    _random_thresholds(conv, 0.05, 0.15)
    with pytest.raises(RuntimeError, match=r"fold"):
        torch.nn.utils.fuse_conv_bn_eval(conv, bn)
    fused = torch.nn.utils.fuse_conv_bn_eval(fold(conv), bn)
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        assert_close_rel(fused(x), bn(conv(x)), 1e-5)


@pytest.mark.parametrize(
    ("make", "x"),
    [
        (lambda: dst.DSTLinear(5, 3), torch.randn(0, 5)),
        (lambda: dst.DSTLinear(5, 3), torch.randn(2, 0, 5)),
        (lambda: dst.DSTConv2d(3, 4, 3, padding=1), torch.randn(0, 3, 6, 6)),
        (lambda: dst.DSTConv2d(3, 4, 3, padding=1, padding_mode="reflect"), torch.randn(0, 3, 6, 6)),
        (lambda: dst.sparsify(nn.Conv1d(3, 4, 3), include=(nn.Conv1d,)), torch.randn(0, 3, 7)),
    ],
    ids=["linear", "linear-3d", "conv", "conv-reflect", "conv1d"],
)
def test_empty_batch_like_the_dense_layer(make, x):
    layer = make()
    dense = fold(layer)
    y = layer.train()(x.requires_grad_(True))
    assert y.shape == dense(x).shape
    y.sum().backward()
    assert x.grad.shape == x.shape


def test_torch_jit_script_says_what_to_do():
    model = dst.sparsify(nn.Sequential(nn.Linear(4, 3), nn.ReLU()))
    with pytest.raises(
        RuntimeError, match=r"torch\.jit\.script cannot compile the DST layer DSTLinear.*fold"
    ):
        torch.jit.script(model)
    scripted = torch.jit.script(fold(model).eval())
    x = torch.randn(2, 4)
    assert torch.equal(scripted(x), model.eval()(x))


@pytest.mark.parametrize(
    "parametrize",
    [
        lambda m: torch.nn.utils.parametrizations.weight_norm(m),
        lambda m: torch.nn.utils.parametrizations.spectral_norm(m),
        lambda m: torch.nn.utils.weight_norm(m),
    ],
    ids=["weight_norm", "spectral_norm", "weight_norm-hook"],
)
@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_parametrized_layers_are_left_dense_and_said_so(parametrize):
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    parametrize(model[0])
    x = torch.randn(2, 4)
    with torch.no_grad():
        y_before = model.eval()(x)
    summary = dst.plan_sparsify(model)
    (entry,) = summary.dense
    assert entry.name == "0" and "parametriz" in entry.reason
    dst.sparsify(model)
    assert not dst.is_dst_layer(model[0]) and dst.is_dst_layer(model[2])
    with torch.no_grad():
        assert torch.equal(model(x), y_before)


def test_second_sparsify_with_other_options_raises():
    model = dst.sparsify(SharedNet(), min_density=0.2, backend="reference")
    assert dst.sparsify(model, min_density=0.2, backend="reference") is model
    with pytest.raises(ValueError, match=r"block is already a DST layer with min_density=0.2"):
        dst.sparsify(model)
    with pytest.raises(ValueError, match="backend='native'"):
        dst.sparsify(model, min_density=0.2, backend="native")
    # Layers built with their own options stay as they are when excluded from the call.
    model.extra = nn.Linear(3, 3)
    dst.sparsify(model, exclude=("block", "again", "out"))
    assert model.block.min_density == 0.2 and model.extra.min_density == 0.01


def test_dst_state_dict_into_dense_model_warns():
    model = dst.sparsify(SharedNet())
    _random_thresholds(model)
    plain = SharedNet()
    with pytest.warns(dst.nn.DSTStateDictWarning) as record:
        plain.load_state_dict(model.state_dict(), strict=False)
    assert len(record) == 1  # once for the whole state dict, naming the layers
    assert "'block.weight', 'out.weight', 'again.weight' come from DST layers" in str(record[0].message)
    assert "dense_state_dict" in str(record[0].message)
    # The documented path: no warning, the same function, strict.
    plain = SharedNet()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", dst.nn.DSTStateDictWarning)
        plain.load_state_dict(dense_state_dict(model), strict=True)
        again = dst.sparsify(SharedNet())  # a DST model loading DST state: no warning
        again.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(3, 7)
    _assert_same_function(model, plain, x)
    _assert_same_function(model, again, x, tol=0)
    # Saved to disk, the state dict stays a plain one (loadable with weights_only=True).
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    assert torch.load(buf, weights_only=True).keys() == model.state_dict().keys()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_masked_attribute_layers_compile_fullgraph():
    torch._dynamo.reset()
    eager = nn.Sequential(nn.Conv1d(3, 4, 3), nn.ReLU(), nn.Flatten(), GPT2Conv1D(5, 24))
    dst.sparsify(eager, include=(nn.Conv1d, GPT2Conv1D))
    _random_thresholds(eager, 0.0, 0.1)
    with torch.no_grad():
        eager[0].threshold.fill_(10.0)  # the reset rule runs inside the compiled graph
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")  # raises on graph breaks
    x = torch.randn(2, 3, 8)
    y_eager, y = eager.train()(x), compiled(x)
    assert_close_rel(y, y_eager, 1e-6)
    y_eager.square().sum().backward()
    y.square().sum().backward()
    named = dict(model.named_parameters())
    for name, p in eager.named_parameters():
        assert torch.equal(named[name].detach(), p.detach()), name
        assert_close_rel(named[name].grad, p.grad, 1e-5, name)
    assert torch.equal(model[0].threshold.detach(), torch.zeros(4))


def test_fold_state_dict_is_dense_state_dict_and_plain_state_loads():
    model = ZooNet()
    plain_state = copy.deepcopy(model.state_dict())
    dst.sparsify(model, include=ZOO_ALL)
    _random_thresholds(model)
    folded, dense = fold(model).state_dict(), dense_state_dict(model)
    assert list(folded) == list(dense) == list(plain_state)  # the original names, in order
    for key, value in folded.items():
        assert torch.equal(dense[key], value), key
    # A plain state dict loads into the sparsified model, thresholds back to 0.
    model.load_state_dict(plain_state, strict=True)
    assert all(torch.equal(t.detach(), torch.zeros_like(t)) for t in dst.threshold_parameters(model))
    for key, value in plain_state.items():
        assert torch.equal(model.state_dict()[key], value), key


def test_second_sparsify_masks_only_what_is_new():
    model = dst.sparsify(nn.Sequential(nn.Linear(4, 4)))
    _random_thresholds(model)
    first, t_first = model[0], model[0].threshold.detach().clone()
    model.append(nn.Linear(4, 2))
    summary = dst.plan_sparsify(model)
    assert [(e.name, e.how) for e in summary.converted] == [("0", "(already DST)"), ("1", "(fused layer)")]
    dst.sparsify(model)
    assert model[0] is first and torch.equal(model[0].threshold.detach(), t_first)
    assert type(model[1]) is dst.DSTLinear


def test_meta_model_sparsifies_and_loads_with_assign():
    with torch.device("meta"):
        model = SharedNet()
    dst.sparsify(model)
    assert type(model.block) is dst.DSTLinear and model.block.threshold.is_meta
    source = dst.sparsify(SharedNet())
    _random_thresholds(source)
    model.load_state_dict(source.state_dict(), assign=True)
    assert not model.block.weight.is_meta and model.block.threshold.requires_grad
    _assert_same_function(model, source, torch.randn(2, 7), tol=0)


def test_transformer_encoder_layer_fast_path_sees_the_masks():
    """nn.TransformerEncoderLayer's eval fast path hands linear1.weight / linear2.weight (and the
    attention's weights) to one fused op, bypassing the children's forward."""
    make = lambda: nn.TransformerEncoder(  # noqa: E731
        nn.TransformerEncoderLayer(8, 2, dim_feedforward=12, dropout=0.0, batch_first=True),
        num_layers=2,
        enable_nested_tensor=False,
    )
    model = make()
    dense = copy.deepcopy(model)
    dst.sparsify(model, include=(nn.Linear, nn.MultiheadAttention))
    layer = model.layers[0]
    assert dst.is_dst_layer(layer.linear1) and isinstance(layer.linear1, DSTMaskedModule)
    _random_thresholds(model)
    x = torch.randn(2, 5, 8)
    _assert_same_function(model, _masked_copy(dense, model), x)  # under no_grad: the fast path
    _assert_same_function(model, fold(model), x)
    model.train()
    y = model(x)  # the slow path, with gradients
    with torch.no_grad():
        y_ref = _masked_copy(dense, model).train()(x)
    assert_close_rel(y, y_ref, 1e-5)


def test_lazy_layers_are_left_dense_until_materialised():
    model = nn.Sequential(nn.LazyLinear(4), nn.ReLU(), nn.Linear(4, 2))
    summary = dst.plan_sparsify(model)
    assert [e.name for e in summary.converted] == ["2"]
    assert "lazy" in summary.dense[0].reason
    model(torch.randn(3, 5))  # materialise: LazyLinear becomes nn.Linear
    dst.sparsify(model)
    assert type(model[0]) is dst.DSTLinear and type(model[2]) is dst.DSTLinear


def test_rnn_subclasses_and_plain_rnns_are_left_dense_and_said_so():
    class MyLSTM(nn.LSTM):
        pass

    summary = dst.plan_sparsify(nn.ModuleList([MyLSTM(3, 4), nn.RNN(3, 4)]))
    assert not summary.converted
    assert [e.name for e in summary.dense] == ["0", "1"]
    assert all("exact nn.LSTM / nn.GRU" in e.reason for e in summary.dense)


# ----------------------------------------------------------------------------- reads from outside


def _window_attention(x, qkv_weight, proj_weight, qkv_bias, proj_bias, heads):
    """torchvision's shifted_window_attention pattern: a function given the children's weights."""
    b, n, c = x.shape
    qkv = F.linear(x, qkv_weight, qkv_bias).reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    a = torch.softmax(q @ k.transpose(-2, -1) * (c // heads) ** -0.5, -1) @ v
    return F.linear(a.transpose(1, 2).reshape(b, n, c), proj_weight, proj_bias)


class WindowAttention(nn.Module):
    """Swin's ShiftedWindowAttention: exact nn.Linear children, read by the parent's forward."""

    def __init__(self, dim=16, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        return _window_attention(
            x, self.qkv.weight, self.proj.weight, self.qkv.bias, self.proj.bias, self.heads
        )


class SwinLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 2, stride=2)
        self.blocks = nn.Sequential(WindowAttention(), nn.LayerNorm(16), WindowAttention())
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = self.stem(x).flatten(2).transpose(1, 2)
        return self.head(self.blocks(x).mean(1))


def _median_thresholds(model):
    with torch.no_grad():
        for m in model.modules():
            if dst.is_dst_layer(m):
                for w, t in m._dst_pairs:
                    rows = m.dense_weight(w).detach().flatten(1).abs()
                    getattr(m, t).copy_(rows.median(1).values)


def test_a_parent_reading_a_fused_childs_weight_gets_the_masked_weight():
    model = SwinLike()
    dense = copy.deepcopy(model)
    dst.sparsify(model)
    qkv = model.blocks[0].qkv
    assert type(qkv) is dst.DSTLinear  # fused: its own forward is not the one that reads it
    _median_thresholds(model)
    x = torch.randn(2, 3, 8, 8)
    _assert_same_function(model, fold(model), x)
    _assert_same_function(model, _masked_copy(dense, model), x)
    # Outside a forward, the attribute is the Parameter: a handle for init, .data, optimisers.
    assert qkv.weight is qkv.dense_weight("weight") and isinstance(qkv.weight, nn.Parameter)
    with torch.no_grad():
        nn.init.normal_(qkv.weight)  # writes the Parameter itself
    assert qkv.weight.std() > 0.5


def test_outside_reads_get_the_estimator_gradient_and_the_reset_rule():
    """Training through the parent's read equals training the masked-attribute stand-in."""
    model = SwinLike()
    dst.sparsify(model)
    _median_thresholds(model)
    with torch.no_grad():
        model.blocks[2].proj.threshold.fill_(10.0)  # all pruned: the reset rule fires in the read
    x = torch.randn(2, 3, 8, 8)
    model.train()(x).square().sum().backward()
    assert torch.equal(model.blocks[2].proj.threshold.detach(), torch.zeros(16))
    # The same gradients from the reference: the model written with masked_weight by hand.
    ref = SwinLike()
    ref.load_state_dict({k: v for k, v in model.state_dict().items() if "threshold" not in k})
    thresholds = {
        n: nn.Parameter(t.detach().clone()) for n, t in model.named_parameters() if "threshold" in n
    }
    with torch.no_grad():
        thresholds["blocks.2.proj.threshold"].fill_(10.0)

    def mw(prefix):
        w = ref.get_submodule(prefix).weight
        return dst.functional.masked_weight(
            w, thresholds[prefix + ".threshold"], backend="reference", min_density=0.01
        )

    def attn(i, h):
        a = ref.blocks[i]
        return _window_attention(h, mw(f"blocks.{i}.qkv"), mw(f"blocks.{i}.proj"), a.qkv.bias, a.proj.bias, 2)

    h = F.conv2d(x, mw("stem"), ref.stem.bias, stride=2).flatten(2).transpose(1, 2)
    h = attn(2, ref.blocks[1](attn(0, h)))
    F.linear(h.mean(1), mw("head"), ref.head.bias).square().sum().backward()
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        expected = thresholds[name].grad if name in thresholds else ref_params[name].grad
        tol = 1e-5 * (row_length(p) if "threshold" in name else 1)
        assert_close_rel(p.grad, expected, tol, name)


def test_outside_reads_compile_fullgraph_and_fold_drops_the_hooks():
    torch._dynamo.reset()
    model = SwinLike()
    dst.sparsify(model)
    _median_thresholds(model)
    x = torch.randn(2, 3, 8, 8)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        assert_close_rel(compiled.eval()(x), fold(model).eval()(x), 1e-5)
    folded = fold(model)
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in folded.modules())
    buf = io.BytesIO()
    torch.save(folded, buf)  # plain classes, no dst_kernels hook in the pickle
    assert b"dst_kernels" not in buf.getvalue()


def test_a_forward_that_raises_leaves_no_read_scope_open():
    model = SwinLike()
    dst.sparsify(model)
    with pytest.raises(ValueError, match="channels"):
        model(torch.randn(2, 4, 8, 8))  # wrong channel count: the stem raises
    from dst_kernels.nn import _OUTSIDE_READS

    assert _OUTSIDE_READS.depth == 0
    assert model.blocks[0].qkv.weight is model.blocks[0].qkv.dense_weight()


class LSTMReader(nn.Module):
    """A parent that reads an nn.LSTM's gate matrix itself (weight tying, weight-drop)."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(4, 6)

    def forward(self, x):
        y, _ = self.rnn(x)
        return y @ self.rnn.weight_ih_l0[:6]


def test_rnn_weights_read_by_the_parent_are_masked():
    model = LSTMReader()
    dst.sparsify(model)
    _median_thresholds(model)
    x = torch.randn(3, 2, 4)
    _assert_same_function(model, fold(model), x)
    assert model.rnn.weight_ih_l0 is model.rnn.dense_weight("weight_ih_l0")


_FUSED_CLASSES = [
    (dst.DSTLinear, nn.Linear),
    (dst.DSTConv2d, nn.Conv2d),
    (dst.DSTLSTM, nn.LSTM),
    (dst.DSTGRU, nn.GRU),
    (dst.export.SparseLinear, nn.Linear),  # what to_sparse makes of a DSTLinear
]


@pytest.mark.parametrize(("fused", "base"), _FUSED_CLASSES, ids=lambda c: c.__name__)
def test_fused_classes_take_their_base_class_call_signature(fused, base):
    """Names, kinds and defaults of forward's parameters (annotations aside)."""

    def params(cls):
        return [(p.name, p.kind, p.default) for p in inspect.signature(cls.forward).parameters.values()]

    assert params(fused) == params(base)


@pytest.mark.parametrize(
    ("make", "x"),
    [
        (lambda: nn.Linear(5, 3), torch.randn(2, 5)),
        (lambda: nn.Conv2d(3, 4, 3), torch.randn(1, 3, 6, 6)),
        (lambda: nn.LSTM(4, 3), torch.randn(2, 1, 4)),
        (lambda: nn.GRU(4, 3), torch.randn(2, 1, 4)),
    ],
    ids=["linear", "conv", "lstm", "gru"],
)
def test_converted_layers_accept_the_keyword_call(make, x):
    dense = make()
    layer = dst.sparsify(copy.deepcopy(dense), include=(type(dense),))
    assert dst.is_dst_layer(layer)
    y, y_dense = layer(input=x), dense(input=x)
    y, y_dense = (y[0], y_dense[0]) if isinstance(y, tuple) else (y, y_dense)
    assert_close_rel(y, y_dense, 1e-6)


def test_sparse_inference_modules_accept_the_keyword_call():
    model = nn.Sequential(dst.DSTLinear(6, 4))
    with torch.no_grad():
        model[0].threshold.fill_(0.2)
    sparse = dst.export.to_sparse(model, max_density=1.0)
    x = torch.randn(3, 6)
    assert_close_rel(sparse[0](input=x), fold(model)[0](x), 1e-6)
