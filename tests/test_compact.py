"""dst.export.compact: dead neurons / filters removed, same outputs, fewer parameters; fold and
torch.export of the folded model."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close_rel
from torch import nn

import dst_kernels as dst
from dst_kernels.train.models import build_model


def _prune(model, dead_fraction=0.3, seed=0):
    """Random thresholds: about ``dead_fraction`` of the rows of every DST layer keep nothing."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if dst.is_dst_layer(m):
                for t in m.thresholds():
                    t.copy_(torch.rand(t.shape, generator=g) * 0.05)
                    t[torch.rand(t.shape, generator=g) < dead_fraction] = 100.0
    return model


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _same_function(model, compacted, x, tol):
    model.eval()
    with torch.no_grad():
        assert_close_rel(compacted(x), model(x), tol, "output")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", ["lenet300", "lenet5"])
def test_cli_models_shrink_with_the_same_outputs(name, dtype):
    torch.manual_seed(0)
    model = _prune(dst.sparsify(build_model(name)).to(dtype))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    compacted = dst.export.compact(model)
    x = torch.randn(7, 1, 28, 28, dtype=dtype)
    _same_function(model, compacted, x, 1e-12 if dtype == torch.float64 else 1e-5)
    assert _params(compacted) < 0.8 * _params(dst.export.fold(model))
    assert not any(dst.is_dst_layer(m) for m in compacted.modules())
    assert not compacted.training
    for k, v in model.state_dict().items():  # the model itself is untouched
        assert torch.equal(v, before[k]), k


def test_vgg16_shrinks_with_the_same_outputs():
    torch.manual_seed(0)
    model = _prune(dst.sparsify(build_model("vgg16")).double(), dead_fraction=0.2)
    with torch.no_grad():  # BatchNorm statistics that are not the identity
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 2.0)
                m.bias.uniform_(-0.1, 0.1)
    compacted = dst.export.compact(model)
    _same_function(model, compacted, torch.randn(2, 3, 32, 32, dtype=torch.float64), 1e-12)
    assert _params(compacted) < _params(dst.export.fold(model))


def test_dead_rows_fold_their_bias_into_the_next_layer():
    fc1, fc2 = nn.Linear(6, 5), nn.Linear(5, 3, bias=False)
    model = nn.Sequential(fc1, nn.Tanh(), nn.Dropout(0.5), fc2).double()
    with torch.no_grad():
        model[0].weight[[1, 3]] = 0.0  # units 1, 3 output tanh(bias): constants
    compacted = dst.export.compact(model)
    assert compacted[0].out_features == 3 and compacted[3].in_features == 3
    assert compacted[3].bias is not None  # created to hold the constants
    _same_function(model, compacted, torch.randn(4, 6, dtype=torch.float64), 1e-12)


def test_dead_columns_remove_the_unit_that_feeds_them():
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).double()
    with torch.no_grad():
        model[2].weight[:, [0, 4]] = 0.0  # nothing reads units 0 and 4
    compacted = dst.export.compact(model)
    assert compacted[0].out_features == 3
    _same_function(model, compacted, torch.randn(4, 6, dtype=torch.float64), 1e-12)


def test_conv_batchnorm_chain_folds_constants_when_the_next_conv_has_no_padding():
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, bias=False),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 4, 3),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 2),
    ).double()
    with torch.no_grad():
        model[0].weight[[0, 2, 5]] = 0.0
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
        model[1].bias.uniform_(0.1, 0.5)  # relu(const) > 0: must go into conv 2's bias
    compacted = dst.export.compact(model)
    assert compacted[0].out_channels == 3 and compacted[1].num_features == 3
    assert compacted[4].in_channels == 3
    _same_function(model, compacted, torch.randn(2, 3, 12, 12, dtype=torch.float64), 1e-12)


def test_constant_channel_before_a_zero_padded_conv_is_kept():
    """At a zero-padded border a constant channel is not a constant contribution: keep it."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3, padding=1)).double()
    with torch.no_grad():
        model[0].weight[1] = 0.0
        model[0].bias[1] = 0.7  # relu(0.7): a nonzero constant
        model[0].weight[2] = 0.0
        model[0].bias[2] = -1.0  # relu(-1) = 0: removable
    compacted = dst.export.compact(model)
    assert compacted[0].out_channels == 3
    _same_function(model, compacted, torch.randn(2, 3, 9, 9, dtype=torch.float64), 1e-12)


def test_avgpool_with_padding_only_removes_zero_channels():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.AvgPool2d(3, stride=1, padding=1), nn.Flatten(), nn.Linear(4 * 7 * 7, 2)
    ).double()
    with torch.no_grad():
        model[0].weight[[0, 1]] = 0.0
        model[0].bias[0] = 0.5  # averaged with padding at the border: not a constant
        model[0].bias[1] = 0.0
    compacted = dst.export.compact(model)
    assert compacted[0].out_channels == 3
    _same_function(model, compacted, torch.randn(2, 3, 9, 9, dtype=torch.float64), 1e-12)


def test_a_layer_with_every_unit_dead_keeps_one():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).double()
    with torch.no_grad():
        model[0].weight.zero_()
    compacted = dst.export.compact(model)
    assert compacted[0].out_features == 1
    _same_function(model, compacted, torch.randn(3, 4, dtype=torch.float64), 1e-12)


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return x + self.fc(x)


@pytest.mark.parametrize(
    ("model", "error", "match"),
    [
        (build_model("lstm_a"), TypeError, "RowLSTM"),
        (build_model("wrn16_8"), TypeError, "WideResNet"),
        (_Residual(), TypeError, "_Residual"),
        (nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2)), ValueError, "LayerNorm"),
        (nn.Sequential(nn.Linear(4, 4), _Residual(), nn.Linear(4, 2)), ValueError, "_Residual"),
        (nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Conv2d(4, 2, 1)), ValueError, "groups"),
        (nn.Sequential(nn.Conv2d(2, 4, 1), nn.Softmax(dim=1), nn.Conv2d(4, 2, 1)), ValueError, "Softmax"),
        ("not a model", TypeError, "nn.Module"),
    ],
    ids=["rnn", "residual-net", "residual", "layernorm", "block", "grouped", "softmax", "str"],
)
def test_models_it_cannot_prove_safe_raise(model, error, match):
    with pytest.raises(error, match=match):
        dst.export.compact(model)


# ----------------------------------------------------------------------------- fold and export


def test_fold_covers_the_lstm():
    torch.manual_seed(0)
    model = _prune(dst.sparsify(build_model("lstm_a"), exclude=("fc",)))
    assert isinstance(model.lstm, dst.DSTLSTM)
    folded = dst.export.fold(model)
    assert type(folded.lstm) is nn.LSTM
    x = torch.randn(3, 1, 28, 28)
    _same_function(model, folded.eval(), x, 1e-5)
    for name, mask in model.lstm.masks().items():
        assert torch.equal(getattr(folded.lstm, name) != 0, mask & (getattr(model.lstm, name) != 0)), name


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("name", ["lenet5", "lstm_a"])
def test_folded_model_goes_through_torch_export(name):
    torch.manual_seed(0)
    model = _prune(dst.sparsify(build_model(name)))
    folded = dst.export.fold(model).eval()
    x = torch.randn(4, 1, 28, 28)
    program = torch.export.export(folded, (x,))
    with torch.no_grad():
        assert_close_rel(program.module()(x), model.eval()(x), 1e-5, "exported")


def test_compacted_model_goes_through_torch_export():
    torch.manual_seed(0)
    model = _prune(dst.sparsify(build_model("lenet5")))
    compacted = dst.export.compact(model)
    x = torch.randn(4, 1, 28, 28)
    program = torch.export.export(compacted, (x,))
    with torch.no_grad():
        assert_close_rel(program.module()(x), model.eval()(x), 1e-5, "exported")
