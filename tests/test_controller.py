"""DensityController: alpha adapted on the device so that training ends at a target density."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import no_host_sync
from torch import nn

import dst_kernels as dst
from dst_kernels.controller import DensityController


def _net(min_density=0.01, device=None):
    return nn.Sequential(
        dst.DSTLinear(32, 64, min_density=min_density, device=device),
        nn.ReLU(),
        dst.DSTLinear(64, 4, min_density=min_density, device=device),
    )


def _data(dtype=torch.float32):
    # Drawn in float64: float32 normal draws take a vectorised path on some CPUs only.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 32, generator=g, dtype=torch.float64)
    y = (x[:, :8] @ torch.randn(8, 4, generator=g, dtype=torch.float64)).argmax(1)
    return x.to(dtype), y


def _train(model, controller, steps, x, y, lr=0.05, opt=None, start=0):
    if opt is None:
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    for s in range(start, start + steps):
        i = (s * 64) % len(x)
        loss = F.cross_entropy(model(x[i : i + 64]), y[i : i + 64]) + controller.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
        controller.step()
    return loss


def _density(model) -> float:
    layers = [m for m in model.modules() if dst.is_dst_layer(m)]
    return sum(m.kept().item() for m in layers) / sum(m.total() for m in layers)


@pytest.mark.parametrize("target", [0.15, 0.4])
def test_drives_a_small_model_to_the_target(target):
    """A closed loop through real training, in float64: the rounding differences between
    machines (summation orders, vector widths, thread counts) are ~1e-16 there, so no mask
    decision (|W| > t) differs between them and the trajectory is every machine's. In
    float32 the same run's differences grow to flipped masks within a few hundred steps."""
    torch.manual_seed(0)
    x, y = _data(torch.float64)
    model = _net().double()
    controller = DensityController(model, target, alpha=1e-3, every=10, total_steps=400)
    loss = _train(model, controller, 400, x, y)
    assert math.isfinite(loss.item())
    density = _density(model)
    assert abs(density - target) <= 0.2 * target, f"density {density:.4f} for target {target}"
    assert abs(controller.density.item() - density) < 0.05  # the last measurement, 0-9 steps ago
    assert (model(x).argmax(1) == y).float().mean().item() > 0.9  # it still learns


def test_alpha_moves_towards_the_target():
    model = _net()
    dense = DensityController(model, 0.1, alpha=1e-3, every=1)  # thresholds 0: density ~1
    before = dense.alpha.item()
    dense.step()
    assert dense.alpha.item() > before  # too dense: more pressure
    with torch.no_grad():
        for m in model.modules():
            if dst.is_dst_layer(m):
                m.threshold.fill_(1e3)  # nothing kept
    sparse = DensityController(model, 0.1, alpha=1e-3, every=1)
    sparse.step()
    assert sparse.alpha.item() < 1e-3  # too sparse: less pressure
    assert sparse.density.item() == 0.0
    assert math.isfinite(sparse.alpha.item())


def test_alpha_stays_within_bounds():
    model = _net()
    controller = DensityController(model, 0.01, alpha=1e-3, every=1, gain=10.0, alpha_max=2e-3)
    for _ in range(5):
        controller.step()
    assert controller.alpha.item() == pytest.approx(2e-3, rel=1e-6)


def test_penalty_is_alpha_times_sparsity_loss():
    model = _net()
    with torch.no_grad():
        model[0].threshold.uniform_(-0.5, 0.5)
    controller = DensityController(model, 0.1, alpha=3e-4)
    expected = controller.alpha * dst.sparsity_loss(model)
    assert torch.equal(controller.penalty(), expected)
    floored = DensityController(model, 0.1, alpha=3e-4, floors=0.02)  # no layer below: factors 1
    assert torch.equal(floored.penalty(), expected)


def test_every_update_runs_on_the_device_without_a_host_read():
    """Meta tensors have no values: any host read in step/update/penalty would raise."""
    model = _net(device="meta")
    controller = DensityController(model, 0.1, every=2, floors=0.05, total_steps=10)
    with no_host_sync():
        for _ in range(4):
            controller.penalty()
            controller.step()
    assert controller.steps == 4 and controller.updates == 2
    assert controller.alpha.device.type == "meta"


def test_called_with_the_global_step_it_updates_like_step():
    """The ``alpha_fn(global_step)`` form: same alphas as step(), repeated calls change nothing."""
    torch.manual_seed(0)
    x, y = _data()
    a, b = _net(), _net()
    b.load_state_dict(a.state_dict())
    by_step = DensityController(a, 0.2, alpha=1e-3, every=3)
    by_call = DensityController(b, 0.2, alpha=1e-3, every=3)
    opt_a = torch.optim.SGD(a.parameters(), lr=0.05, momentum=0.9)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.05, momentum=0.9)
    for s in range(10):
        i = (s * 64) % len(x)
        alpha = by_call(s)
        assert by_call(s) is alpha and by_call.steps == s
        for model, opt, penalty in ((a, opt_a, by_step.penalty()), (b, opt_b, by_call.penalty())):
            loss = F.cross_entropy(model(x[i : i + 64]), y[i : i + 64]) + penalty
            opt.zero_grad()
            loss.backward()
            opt.step()
        by_step.step()
        assert torch.equal(by_step.alpha, by_call(s + 1))
    assert by_call.updates == by_step.updates == 3
    with pytest.raises(ValueError, match="global_step"):
        by_call(-1)


def test_setpoint_ramps_from_one_to_the_target():
    model = _net()
    flat = DensityController(model, 0.05)
    assert flat.setpoint(0) == flat.setpoint(10**6) == 0.05
    ramped = DensityController(model, 0.05, total_steps=1000, ramp=0.5)
    assert ramped.setpoint(0) == 1.0
    assert ramped.setpoint(250) == pytest.approx(0.05 + 0.95 * 0.5**3)
    assert ramped.setpoint(500) == ramped.setpoint(1000) == 0.05


def test_floor_lowers_the_share_of_a_layer_below_it():
    model = _net()
    with torch.no_grad():
        model[2].threshold.fill_(0.5)  # the second layer keeps nothing (|W| <= 1/8)
    controller = DensityController(model, 0.5, every=1, floors={"2": 0.1})
    controller.step()
    scales = controller.state_dict()["layer_log_scale"]
    assert scales[0].item() == 0.0  # no floor
    assert scales[1].item() < 0.0  # below its floor: smaller share of alpha
    penalty = controller.penalty()
    assert penalty < controller.alpha * dst.sparsity_loss(model)


def test_state_dict_round_trip_continues_identically():
    """Resuming from a checkpoint (model, optimiser, controller) gives the uninterrupted run."""
    torch.manual_seed(0)
    x, y = _data()
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    controller = DensityController(model, 0.2, alpha=1e-3, every=5, total_steps=100)
    _train(model, controller, 40, x, y, opt=opt)
    state = {
        "model": copy.deepcopy(model.state_dict()),
        "opt": copy.deepcopy(opt.state_dict()),
        "controller": controller.state_dict(),
    }
    _train(model, controller, 20, x, y, opt=opt, start=40)

    resumed = _net()
    resumed.load_state_dict(state["model"])
    opt2 = torch.optim.SGD(resumed.parameters(), lr=0.05, momentum=0.9)
    opt2.load_state_dict(state["opt"])
    again = DensityController(resumed, 0.2, alpha=1e-3, every=5, total_steps=100)
    again.load_state_dict(state["controller"])
    assert again.steps == 40 and again.updates == 8
    _train(resumed, again, 20, x, y, opt=opt2, start=40)
    assert again.steps == controller.steps == 60
    assert torch.equal(again.alpha, controller.alpha)
    for (name, p), q in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name


def test_state_dict_survives_torch_save(tmp_path):
    model = _net()
    controller = DensityController(model, 0.1, every=1)
    controller.step()
    torch.save({"controller": controller.state_dict()}, tmp_path / "ckpt.pt")
    loaded = torch.load(tmp_path / "ckpt.pt", weights_only=True)["controller"]
    other = DensityController(model, 0.1, every=1)
    other.load_state_dict(loaded)
    assert torch.equal(other.alpha, controller.alpha) and other.steps == 1


def test_load_state_dict_checks_the_layers():
    controller = DensityController(_net(), 0.1)
    state = controller.state_dict()
    other = DensityController(nn.Sequential(dst.DSTLinear(3, 3)), 0.1)
    with pytest.raises(ValueError, match="DST layers"):
        other.load_state_dict(state)
    with pytest.raises(KeyError, match="log_alpha"):
        controller.load_state_dict({"steps": 1})


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"target": 0.0}, ValueError, "target"),
        ({"target": 1.0}, ValueError, "target"),
        ({"target": "0.1"}, TypeError, "target"),
        ({"every": 0}, ValueError, "every"),
        ({"gain": -1.0}, ValueError, "gain"),
        ({"damping": -1.0}, ValueError, "damping"),
        ({"recovery": 0.0}, ValueError, "recovery"),
        ({"alpha": 10.0}, ValueError, "alpha"),
        ({"alpha_min": 1.0, "alpha_max": 0.5}, ValueError, "alpha_min"),
        ({"floors": {"nope": 0.1}}, ValueError, "floors"),
        ({"floors": 1.5}, ValueError, "floors"),
        ({"total_steps": 0}, ValueError, "total_steps"),
        ({"ramp": 0.0}, ValueError, "ramp"),
        ({"max_error": 0.0}, ValueError, "max_error"),
    ],
)
def test_bad_arguments_raise(kwargs, error, match):
    args = {"target": 0.1, **kwargs}
    target = args.pop("target")
    with pytest.raises(error, match=match):
        DensityController(_net(), target, **args)


def test_model_without_dst_layers_raises():
    with pytest.raises(ValueError, match="no DST layers"):
        DensityController(nn.Linear(3, 3), 0.1)
    with pytest.raises(TypeError, match="model"):
        DensityController("model", 0.1)


def test_exported_at_the_top_level():
    assert dst.DensityController is DensityController


def test_a_target_below_the_reset_bounds_lowers_them():
    """The model cannot stay below the size-weighted mean of its layers' reset bounds (a layer
    at its bound resets to dense): "auto" lowers every bound above target / 4 to target / 4."""
    model = _net(min_density=0.01)
    roomy = DensityController(model, 0.3)
    assert roomy.lowered_reset_bounds == {} and model[0].min_density == 0.01
    tight = DensityController(model, 0.02)
    assert tight.lowered_reset_bounds == {"0": (0.01, 0.005), "2": (0.01, 0.005)}
    assert model[0].min_density == model[2].min_density == 0.005
    # The auto floors follow: twice the lowered bound.
    assert torch.equal(tight._floors, torch.tensor([0.01, 0.01], dtype=torch.float64))
    off = _net(min_density=None)
    assert DensityController(off, 0.001).lowered_reset_bounds == {}


def test_keeping_the_reset_bounds_refuses_a_target_at_or_below_them():
    with pytest.raises(ValueError, match=r"target 0.01 is at or below 0.01.*reset bounds"):
        DensityController(_net(min_density=0.01), 0.01, reset_bounds="keep")
    model = _net(min_density=0.01)
    kept = DensityController(model, 0.02, reset_bounds="keep", floors=None)
    assert kept.lowered_reset_bounds == {} and model[0].min_density == 0.01
    with pytest.raises(ValueError, match="reset_bounds"):
        DensityController(_net(), 0.1, reset_bounds="lower")


def test_floors_that_leave_no_room_for_the_target_raise():
    with pytest.raises(ValueError, match="floors keep the model at a density of at least 0.2"):
        DensityController(_net(), 0.1, floors=0.2)
    with pytest.raises(ValueError, match="floors keep"):
        DensityController(_net(), 0.01, reset_bounds="auto", floors=0.01)


def test_a_density_jump_counts_as_an_error_of_at_most_max_error():
    """A layer's reset sends its density from its bound to ~1 between two measurements, an
    error of log(1 / bound). The controller acts on at most ``max_error`` of it, so one
    update moves log(alpha) by at most gain * max_error + damping * (max_error - last error)."""
    model = _net(min_density=None)
    controller = DensityController(model, 0.5, alpha=1e-3, every=1, max_error=0.5, floors=None)
    with torch.no_grad():
        model[0].threshold.fill_(0.1)  # about the target's density
        model[2].threshold.fill_(0.1)
    controller.step()
    last = controller.state_dict()["error"].item()
    assert abs(last) < 0.5  # not clipped
    before = math.log(controller.alpha.item())
    with torch.no_grad():
        model[0].threshold.zero_()  # what the reset rule does: density ~1
    controller.step()
    assert controller.state_dict()["error"].item() == pytest.approx(0.5)  # log(1 / 0.5) clipped
    bound = controller.gain * 0.5 + controller.damping * (0.5 - last)
    assert math.log(controller.alpha.item()) - before == pytest.approx(bound, rel=1e-5)
    free = DensityController(model, 0.05, alpha=1e-3, every=1, max_error=100.0, floors=None)
    free.step()
    assert free.state_dict()["error"].item() == pytest.approx(math.log(_density(model) / 0.05), rel=1e-5)


def test_holds_the_target_through_forced_resets():
    """Resets fired on purpose (a layer's thresholds pushed above every weight, so the next
    training forward's reset rule sets them to 0, the layer back to dense) in a closed loop run
    in float64 (see test_drives_a_small_model_to_the_target): alpha stays bounded by the step
    limit through every reset, and the run still ends at the target."""
    torch.manual_seed(0)
    x, y = _data(torch.float64)
    model = _net(min_density=0.02).double()
    target, steps, every = 0.15, 600, 10
    controller = DensityController(model, target, alpha=1e-3, every=every, total_steps=steps)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    fired = 0
    log_alphas = []
    for s in range(steps):
        if s in (250, 350):
            with torch.no_grad():
                model[0].threshold.fill_(1e3)  # keeps nothing: the rule fires in this forward
        i = (s * 64) % len(x)
        loss = F.cross_entropy(model(x[i : i + 64]), y[i : i + 64]) + controller.penalty()
        if s in (250, 350):
            assert torch.count_nonzero(model[0].threshold).item() == 0  # reset
            fired += 1
        opt.zero_grad()
        loss.backward()
        opt.step()
        controller.step()
        log_alphas.append(math.log(controller.alpha.item()))
    assert fired == 2
    before = log_alphas[249]
    assert max(log_alphas[250:]) - before < math.log(20.0)  # each reset: a bounded transient
    density = _density(model)
    assert abs(density - target) <= 0.2 * target, f"density {density:.4f} for target {target}"
    assert (model(x).argmax(1) == y).float().mean().item() > 0.9
