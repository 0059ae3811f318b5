"""The framework callbacks (dst_kernels.integrations): a Lightning ``Trainer`` and a HuggingFace
``Trainer`` with the callback reach the weights that the same training with
``alpha * sparsity_loss`` added to the loss (thresholds out of weight decay) reaches, with
gradient accumulation, clipping, AMP's GradScaler and both SGD and AdamW; the density
controller's state survives each framework's own checkpoints.

Both frameworks are installed in the test environment (``make test``); runs in float64 where
the comparison crosses two computations (no mask decision differs between them there).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dst_kernels as dst
from dst_kernels.integrations._common import DSTRegulariser, exclude_thresholds_from_weight_decay_
from dst_kernels.regulariser import add_penalty_grad_

pl = pytest.importorskip("lightning.pytorch", reason="lightning is installed by make test")
transformers = pytest.importorskip("transformers", reason="transformers is installed by make test")

from dst_kernels.integrations.hf import DSTTrainerCallback  # noqa: E402
from dst_kernels.integrations.lightning import DSTCallback  # noqa: E402


def _data(n=96, dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 12, generator=g, dtype=torch.float64)
    y = (x[:, :4] @ torch.randn(4, 3, generator=g, dtype=torch.float64)).argmax(1)
    return x.to(dtype), y


def _net(dtype=torch.float64):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 3)).to(dtype)
    dst.sparsify(net)
    with torch.no_grad():
        net[0].threshold.fill_(0.05)  # some weights masked from the start
    return net


def _max_diff(a: nn.Module, b: nn.Module) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    return max((sa[k].double() - sb[k].double()).abs().max().item() for k in sa)


# ----------------------------------------------------------------------------- shared pieces


def test_regulariser_gradient_is_the_losss():
    net = _net()
    ref = copy.deepcopy(net)
    (3e-3 * dst.sparsity_loss(ref)).backward()
    reg = DSTRegulariser(alpha=3e-3)
    reg.bind(net)
    reg.add_grad()
    for a, b in zip(dst.threshold_parameters(net), dst.threshold_parameters(ref)):
        assert torch.equal(a.grad, b.grad)
    reg.add_grad(factor=torch.tensor(4.0, dtype=torch.float64))  # a GradScaler's scale
    for a, b in zip(dst.threshold_parameters(net), dst.threshold_parameters(ref)):
        assert torch.allclose(a.grad, 5 * b.grad, rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_penalty_gradient_after_a_backward_is_autograds_bit_for_bit(dtype):
    """add_penalty_grad_ after the task loss's backward (the gradients exist; the float-alpha
    path) equals one backward of task + alpha * sparsity_loss, bit for bit, with thresholds on
    both sides of the linear tail."""
    net = _net(dtype)
    with torch.no_grad():
        net[2].threshold.copy_(torch.tensor([-30.0, 0.2, -10.0], dtype=dtype))
    ref = copy.deepcopy(net)
    x = torch.randn(5, 12, dtype=dtype)
    task = net(x).square().sum()
    task.backward()
    add_penalty_grad_([m for m in net.modules() if dst.is_dst_layer(m)], 3e-3)
    (ref(x).square().sum() + 3e-3 * dst.sparsity_loss(ref)).backward()
    for a, b in zip(dst.threshold_parameters(net), dst.threshold_parameters(ref)):
        assert torch.equal(a.grad, b.grad)


def test_controller_gradient_is_its_penaltys():
    net = _net()
    ref = copy.deepcopy(net)
    a = dst.DensityController(net, 0.3, alpha=2e-3, floors=0.1)
    b = dst.DensityController(ref, 0.3, alpha=2e-3, floors=0.1)
    b.penalty().backward()
    a.add_penalty_grad_()
    for p, q in zip(dst.threshold_parameters(net), dst.threshold_parameters(ref)):
        assert torch.allclose(p.grad, q.grad, rtol=1e-12, atol=0)


def test_thresholds_leave_weight_decay_in_a_group_of_their_own():
    net = _net()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.1, betas=(0.8, 0.9))
    assert exclude_thresholds_from_weight_decay_(opt, net) == 2
    assert len(opt.param_groups) == 2
    moved = opt.param_groups[1]
    assert moved["weight_decay"] == 0.0 and moved["betas"] == (0.8, 0.9) and moved["lr"] == 1e-3
    assert {id(p) for p in moved["params"]} == {id(t) for t in dst.threshold_parameters(net)}
    assert exclude_thresholds_from_weight_decay_(opt, net) == 0  # idempotent


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "pass alpha="),
        ({"alpha": -1.0}, "alpha must be"),
        ({"target_density": 1.5}, "target_density"),
        ({"alpha": 1e-3, "controller": {"every": 5}}, "need target_density"),
        ({"alpha": 1e-3, "log_every": 0}, "log_every"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DSTCallback(**kwargs)
    if "log_every" not in kwargs:
        with pytest.raises(ValueError, match=match):
            DSTTrainerCallback(**kwargs)


def test_a_model_without_dst_layers_is_refused():
    reg = DSTRegulariser(alpha=1e-3)
    with pytest.raises(ValueError, match="no DST layers.*sparsify"):
        reg.bind(nn.Linear(3, 3))


# ----------------------------------------------------------------------------- Lightning


class _Module(pl.LightningModule):
    def __init__(self, net, opt="sgd", alpha_in_loss=None, wd=0.01):
        super().__init__()
        self.net, self.opt, self.alpha_in_loss, self.wd = net, opt, alpha_in_loss, wd

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        if self.alpha_in_loss is not None:
            loss = loss + self.alpha_in_loss * dst.sparsity_loss(self.net)
        return loss

    def configure_optimizers(self):
        if self.alpha_in_loss is not None:  # the reference: thresholds in a no-decay group
            ids = {id(t) for t in dst.threshold_parameters(self.net)}
            groups = [
                {"params": [p for p in self.net.parameters() if id(p) not in ids]},
                {"params": dst.threshold_parameters(self.net), "weight_decay": 0.0},
            ]
        else:
            groups = self.net.parameters()
        if self.opt == "sgd":
            return torch.optim.SGD(groups, lr=0.05, momentum=0.9, weight_decay=self.wd)
        return torch.optim.AdamW(groups, lr=1e-2, weight_decay=self.wd)


def _fit(module, callbacks=(), steps=12, accumulate=2, precision="64-true", plugins=None, **kwargs):
    x, y = _data(dtype=torch.float64 if precision == "64-true" and not plugins else torch.float32)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        precision=None if plugins else precision,
        plugins=plugins,
        callbacks=list(callbacks),
        accumulate_grad_batches=accumulate,
        gradient_clip_val=0.5,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )
    trainer.fit(module, loader)
    return trainer


@pytest.mark.parametrize("opt", ["sgd", "adamw"])
def test_lightning_callback_equals_the_regulariser_in_the_loss(opt):
    alpha = 2e-2
    ours = _Module(_net(), opt)
    ref = _Module(_net(), opt, alpha_in_loss=alpha)
    _fit(ours, [DSTCallback(alpha=alpha)])
    _fit(ref)
    assert _max_diff(ours.net, ref.net) < 1e-10
    assert _max_diff(ours.net, _net()) > 1e-3  # it trained


def test_lightning_callback_equals_a_hand_written_loop():
    """SGD, accumulation over 2 micro-batches, clipping at 0.5: the loop a user would write."""
    alpha, net = 2e-2, _net()
    ours = _Module(_net(), "sgd", wd=0.0)
    _fit(ours, [DSTCallback(alpha=alpha)])
    x, y = _data()
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    for step in range(12):
        for micro in range(2):
            i = (step * 2 + micro) * 8 % len(x)
            loss = F.cross_entropy(net(x[i : i + 8]), y[i : i + 8]) + alpha * dst.sparsity_loss(net)
            (loss / 2).backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 0.5)
        opt.step()
        opt.zero_grad()
    assert _max_diff(ours.net, net) < 1e-10


def test_lightning_callback_with_a_grad_scaler():
    """fp16 autocast with a GradScaler: Lightning unscales before the callback's hook, so the
    term goes in unscaled; the result matches the regulariser in the loss."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    alpha = 2e-2
    ours = _Module(_net(torch.float32), "adamw")
    ref = _Module(_net(torch.float32), "adamw", alpha_in_loss=alpha)

    def plugin():
        return [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**10))]

    _fit(ours, [DSTCallback(alpha=alpha)], plugins=plugin())
    _fit(ref, plugins=plugin())
    assert _max_diff(ours.net, ref.net) < 1e-4
    assert _max_diff(ours.net, _net(torch.float32)) > 1e-3


def test_lightning_controller_resumes_from_lightnings_checkpoint(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    def run(steps, ckpt=None, save=False):
        module = _Module(_net(), "sgd")
        cb = DSTCallback(target_density=0.4, alpha=1e-3, controller={"every": 2}, log_every=4)
        every6 = ModelCheckpoint(dirpath=tmp_path, filename="{step}", save_top_k=-1, every_n_train_steps=6)
        extra = [every6] if save else []
        trainer = pl.Trainer(
            max_steps=steps,
            accelerator="cpu",
            precision="64-true",
            callbacks=[cb, *extra],
            accumulate_grad_batches=2,
            logger=False,
            enable_checkpointing=save,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        x, y = _data()
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
        trainer.fit(module, loader, ckpt_path=ckpt)
        return module, cb, trainer

    whole, cb_whole, _ = run(12)
    run(12, save=True)  # writes step=6.ckpt on the way
    resumed, cb_resumed, trainer = run(12, ckpt=str(tmp_path / "step=6.ckpt"))
    assert cb_resumed.controller.steps == cb_whole.controller.steps == 12
    assert torch.equal(cb_resumed.controller.alpha, cb_whole.controller.alpha)
    assert _max_diff(whole.net, resumed.net) < 1e-12
    assert "dst/density" in trainer.callback_metrics and "dst/alpha" in trainer.callback_metrics


def test_lightning_sparsify_option_converts_before_the_optimiser():
    module = _Module(nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 3)).double(), "adamw")
    trainer = _fit(module, [DSTCallback(alpha=1e-3, sparsify=True)], steps=2)
    assert dst.is_dst_layer(module.net[0])
    opt = trainer.optimizers[0]
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert all(id(t) in in_opt for t in dst.threshold_parameters(module))
    assert opt.param_groups[-1]["weight_decay"] == 0.0  # thresholds out of weight decay


# ----------------------------------------------------------------------------- HF Trainer


class _HFModel(nn.Module):
    def __init__(self, dtype=torch.float64):
        super().__init__()
        self.net = _net(dtype)

    def forward(self, x, labels=None):
        logits = self.net(x)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits, labels)
        return out


class _Dataset(torch.utils.data.Dataset):
    def __init__(self):
        self.x, self.y = _data()

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


class _RefTrainer(transformers.Trainer):
    """The regulariser in the loss, the thresholds out of weight decay: the hand-written way."""

    alpha = 0.0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = model(**inputs)
        loss = out["loss"] + self.alpha * dst.sparsity_loss(model)
        return (loss, out) if return_outputs else loss

    def get_decay_parameter_names(self, model):
        ids = {id(t) for t in dst.threshold_parameters(model)}
        keep = {n for n, p in model.named_parameters() if id(p) not in ids}
        return [n for n in super().get_decay_parameter_names(model) if n in keep]


def _hf_args(tmp_path, optim, steps=12, **kwargs):
    return transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=steps,
        per_device_train_batch_size=8,
        gradient_accumulation_steps=2,
        learning_rate=1e-2 if optim != "sgd" else 0.05,
        weight_decay=0.01,
        max_grad_norm=0.5,
        optim=optim,
        lr_scheduler_type="constant",
        logging_steps=4,
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        **{"save_strategy": "no", **kwargs},
    )


@pytest.mark.parametrize("optim", ["sgd", "adamw_torch"])
def test_hf_callback_equals_the_regulariser_in_the_loss(tmp_path, optim):
    alpha = 2e-2
    ours = _HFModel()
    trainer = transformers.Trainer(
        ours,
        _hf_args(tmp_path / "a", optim),
        train_dataset=_Dataset(),
        callbacks=[DSTTrainerCallback(alpha=alpha)],
    )
    trainer.train()
    ref = _HFModel()
    ref_trainer = _RefTrainer(ref, _hf_args(tmp_path / "b", optim), train_dataset=_Dataset())
    ref_trainer.alpha = alpha
    ref_trainer.train()
    assert _max_diff(ours, ref) < 1e-10
    assert _max_diff(ours, _HFModel()) > 1e-3
    logged = [h for h in trainer.state.log_history if "dst/density" in h]
    assert logged and 0 < logged[-1]["dst/density"] < 1 and logged[-1]["dst/alpha"] == pytest.approx(alpha)


def test_hf_controller_resumes_from_the_trainers_checkpoint(tmp_path):
    def trainer_for(out, steps):
        cb = DSTTrainerCallback(target_density=0.4, alpha=1e-3, controller={"every": 2})
        args = _hf_args(out, "adamw_torch", steps=steps, save_strategy="steps", save_steps=6)
        return transformers.Trainer(_HFModel(), args, train_dataset=_Dataset(), callbacks=[cb])

    whole = trainer_for(tmp_path / "whole", 12)
    whole.train()
    first = trainer_for(tmp_path / "part", 12)
    first.train()  # writes checkpoint-6 and checkpoint-12
    resumed = trainer_for(tmp_path / "part", 12)
    resumed.train(resume_from_checkpoint=str(tmp_path / "part" / "checkpoint-6"))

    def callback(trainer):
        return next(c for c in trainer.callback_handler.callbacks if isinstance(c, DSTTrainerCallback))

    a, b = callback(whole).controller, callback(resumed).controller
    assert a.steps == b.steps == 12
    assert torch.equal(a.alpha, b.alpha)
    assert _max_diff(whole.model, resumed.model) < 1e-12


def test_hf_sparsify_option_and_the_decay_it_undoes(tmp_path):
    model = _HFModel()
    plain = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 3)).double()
    model.net = plain
    cb = DSTTrainerCallback(alpha=1e-3, sparsify=True)
    trainer = transformers.Trainer(
        model, _hf_args(tmp_path, "adamw_torch", steps=2), train_dataset=_Dataset(), callbacks=[cb]
    )
    assert dst.is_dst_layer(model.net[0])  # converted when the Trainer was built
    trainer.train()
    assert model.net[0].threshold.abs().sum().item() > 0  # the regulariser moved the thresholds


def test_hf_callback_refuses_a_decay_it_cannot_undo(tmp_path):
    args = _hf_args(tmp_path, "adafactor", steps=1)
    trainer = transformers.Trainer(
        _HFModel(), args, train_dataset=_Dataset(), callbacks=[DSTTrainerCallback(alpha=1e-3)]
    )
    with pytest.raises(ValueError, match="threshold_weight_decay=True"):
        trainer.train()


def test_hf_callback_scales_the_term_like_the_grad_scalers_gradients():
    """Under fp16 the Trainer's gradients are still scaled when its step begins: the term is
    multiplied by the scaler's scale (its initial one before the first step: no host sync).
    An fp16 Trainer run needs a GPU; this checks the event itself."""

    class _Accelerated:  # what accelerate hands the callback: the optimizer with .scaler
        def __init__(self, scaler):
            self.scaler = scaler

    net = _net()
    ref = copy.deepcopy(net)
    (1e-2 * dst.sparsity_loss(ref)).backward()
    cb = DSTTrainerCallback(alpha=1e-2)
    cb.reg.bind(net)
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    cb.on_step_begin(None, None, None, optimizer=_Accelerated(scaler))
    for p, q in zip(dst.threshold_parameters(net), dst.threshold_parameters(ref)):
        assert torch.allclose(p.grad, 8.0 * q.grad, rtol=1e-6, atol=0)  # the scale is float32
    scaler._scale = torch.tensor(2.0, dtype=torch.float64)  # after the scaler's first update
    for p in dst.threshold_parameters(net):
        p.grad = None
    cb.on_step_begin(None, None, None, optimizer=_Accelerated(scaler))
    for p, q in zip(dst.threshold_parameters(net), dst.threshold_parameters(ref)):
        assert torch.allclose(p.grad, 2.0 * q.grad, rtol=1e-6, atol=0)  # the scale is float32


class _InOrderTrainer(transformers.Trainer):
    def _get_train_sampler(self, train_dataset=None):
        return torch.utils.data.SequentialSampler(train_dataset or self.train_dataset)


def test_hf_callback_equals_a_hand_written_loop(tmp_path):
    """The Trainer with the callback (SGD with momentum, weight decay 0.01 on the weights, 2-step
    accumulation, clipping at 0.5, batches in order) against the loop a user would write with
    ``alpha * sparsity_loss`` in the loss and the thresholds and biases out of weight decay."""
    alpha = 2e-2
    ours = _HFModel()
    args = _hf_args(tmp_path, "sgd", optim_args="momentum=0.9")
    _InOrderTrainer(ours, args, train_dataset=_Dataset(), callbacks=[DSTTrainerCallback(alpha=alpha)]).train()
    model = _HFModel()
    ids = {id(t) for t in dst.threshold_parameters(model)}
    decay = [p for n, p in model.named_parameters() if id(p) not in ids and "bias" not in n]
    rest = [p for n, p in model.named_parameters() if id(p) in ids or "bias" in n]
    opt = torch.optim.SGD(
        [{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}],
        lr=0.05,
        momentum=0.9,
    )
    data = _Dataset()
    for step in range(12):
        for micro in range(2):
            i = (step * 2 + micro) * 8 % len(data)
            out = model(data.x[i : i + 8], data.y[i : i + 8])
            ((out["loss"] + alpha * dst.sparsity_loss(model)) / 2).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        opt.step()
        opt.zero_grad()
    assert _max_diff(ours, model) < 1e-10
    assert _max_diff(ours, _HFModel()) > 1e-3
