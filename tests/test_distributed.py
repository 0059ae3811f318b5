"""DST under torch.distributed: DDP is exact (float64, 2 gloo ranks on the CPU against one process
training on the concatenated batch, regulariser and reset rule included), on every backend.

The workers live in tests/dist_workers.py; each backend runs all its scenarios in one process
group, so a backend costs one spawn.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.distributed as dist

import dst_kernels as dst

sys.path.insert(0, os.path.dirname(__file__))
import dist_workers as W  # noqa: E402

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo is not built"
)
WORLD = 2
TOL = 1e-9

# scenario -> (model kind, micro-batches per step)
DDP_SCENARIOS = {
    "mlp": ("mlp", 1),
    "mlp_find_unused": ("mlp", 1),
    "unused_static_graph": ("unused", 1),
    "unused_find_unused": ("unused_reg_in_forward", 1),
    "accumulate": ("mlp", 2),
    "conv_lstm": ("conv_lstm", 1),
}


def _spawn(fn, tmp_path, backend):
    import torch.multiprocessing as mp

    mp.spawn(fn, args=(WORLD, str(tmp_path / "store"), str(tmp_path), backend), nprocs=WORLD, join=True)
    name = "ddp" if fn is W.ddp_worker else "fsdp"
    return [torch.load(tmp_path / f"{name}-{backend}-rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


@pytest.fixture(
    scope="module",
    params=[b for b in ("reference", "native", "triton") if b in dst.available_backends("cpu")],
)
def ddp_results(request, tmp_path_factory):
    backend = request.param
    return backend, _spawn(W.ddp_worker, tmp_path_factory.mktemp(f"ddp-{backend}"), backend)


@pytest.mark.parametrize("scenario", list(DDP_SCENARIOS))
def test_ddp_equals_one_process_on_the_whole_batch(ddp_results, scenario):
    backend, ranks = ddp_results
    kind, micro = DDP_SCENARIOS[scenario]
    expected = W.train_single(kind, backend, WORLD, micro)
    for rank, result in enumerate(ranks):
        state, _ = result[scenario]
        assert _max_diff(state, expected) <= TOL, f"rank {rank}, {scenario}"
    # The reset rule fired: the first layer's thresholds started at 10 (keeping nothing).
    first = next(k for k in expected if k.endswith("threshold"))
    assert expected[first].abs().max() < 1.0


def test_ddp_ranks_agree_with_different_local_batches(ddp_results):
    """The reset decision is a function of weights and thresholds only, which DDP keeps identical:
    with one rank's local batch changed, every rank still holds the same thresholds after every
    step (and the same weights at the end)."""
    _, ranks = ddp_results
    (s0, t0), (s1, t1) = ranks[0]["perturbed"], ranks[1]["perturbed"]
    assert _max_diff(s0, s1) == 0.0
    assert len(t0) == W.STEPS and all(torch.equal(a, b) for a, b in zip(t0, t1))
    reference = W.train_single("mlp", "reference", WORLD)
    assert _max_diff(s0, reference) > 1e-6, "the perturbation changed the training"


# ----------------------------------------------------------------------------- FSDP2


@pytest.fixture(
    scope="module", params=[b for b in ("reference", "native") if b in dst.available_backends("cpu")]
)
def fsdp_results(request, tmp_path_factory):
    if not W.fsdp_available():
        pytest.skip("this torch has no torch.distributed.fsdp.fully_shard (FSDP2)")
    backend = request.param
    return backend, _spawn(W.fsdp_worker, tmp_path_factory.mktemp(f"fsdp-{backend}"), backend)


def test_fsdp2_step_equals_one_process(fsdp_results):
    backend, ranks = fsdp_results
    state = ranks[0]["state"]  # the full state dict, gathered on rank 0
    assert ranks[0]["threshold_is_dtensor"] == "DTensor", "thresholds are sharded with their weights"
    expected = W.train_single("mlp", backend, WORLD)
    assert _max_diff(state, expected) <= TOL
    first = next(k for k in expected if k.endswith("threshold"))
    assert expected[first].abs().max() < 1.0, "the reset rule fired and persisted"


def test_fsdp2_sharded_weight_still_refuses_a_new_parameter(fsdp_results):
    _, ranks = fsdp_results
    for result in ranks:
        assert "cannot assign a new Parameter to 'weight'" in (result["guard_error"] or "")


def test_fsdp2_conv_lstm_step_equals_one_process(fsdp_results):
    backend, ranks = fsdp_results
    assert _max_diff(ranks[0]["conv_lstm"], W.train_single("conv_lstm", backend, WORLD)) <= TOL


def test_fsdp2_density_controller_penalty_sums_the_shards(fsdp_results):
    backend, ranks = fsdp_results
    expected = W.ALPHA * dst.sparsity_loss(W.build_model("mlp", backend)).detach()
    for result in ranks:
        assert result["penalty_type"] == "Tensor", "a plain tensor, added to a plain loss"
        torch.testing.assert_close(result["penalty"].to(expected.dtype), expected, rtol=1e-6, atol=0)


def test_fsdp2_report_and_fold_match_the_gathered_model(fsdp_results):
    backend, ranks = fsdp_results
    model = W.build_model("mlp", backend)
    model.load_state_dict(ranks[0]["state"])
    rows = dst.sparsity_report(model).rows()
    for result in ranks:  # every rank's report of the sharded model
        assert result["report"] == rows
        # density() is a float32 tensor; the report divides exact counts in Python
        assert [float(d) for d in result["density"]] == pytest.approx([r["density"] for r in rows], rel=1e-6)
    folded = dst.export.fold(model)
    x = torch.randn(5, 7, dtype=torch.float64)
    assert torch.equal(folded.eval()(x), model.eval()(x))


def test_fsdp2_full_state_dict_checkpoint_round_trip(fsdp_results):
    _, ranks = fsdp_results
    assert _max_diff(ranks[0]["reloaded"], ranks[0]["state"]) == 0.0


def test_fsdp2_mixed_precision_trains(fsdp_results):
    _, ranks = fsdp_results
    for result in ranks:
        assert bool(torch.isfinite(result["mp_losses"]).all())
        state = result.get("mp_state") or {}
        assert all(bool(torch.isfinite(v).all()) for v in state.values())
    state = ranks[0]["mp_state"]
    first = next(k for k in state if k.endswith("threshold"))
    assert state[first].abs().max() < 1.0, "the reset rule persisted under bf16 parameters"


def test_fsdp2_without_reset_hooks_is_an_error(fsdp_results):
    _, ranks = fsdp_results
    for result in ranks:
        assert "no reset hook" in (result["unhooked_error"] or "")
        assert "dst_kernels.distributed.fully_shard" in result["unhooked_error"]


def test_fsdp2_with_a_rank_that_holds_no_rows(tmp_path):
    """3 ranks, a head of 2 rows: FSDP2 leaves rank 2 an empty shard; the reset rule still counts
    over all rows and the step equals one process."""
    if not W.fsdp_available():
        pytest.skip("this torch has no torch.distributed.fsdp.fully_shard (FSDP2)")
    import torch.multiprocessing as mp

    world = 3
    backend = "native" if "native" in dst.available_backends("cpu") else "reference"
    mp.spawn(
        W.fsdp_uneven_worker, args=(world, str(tmp_path / "store"), str(tmp_path), backend), nprocs=world
    )
    state = torch.load(tmp_path / f"uneven-{backend}-rank0.pt", weights_only=False)
    torch.manual_seed(0)
    single = W.build_model("narrow_head", backend).train()
    with torch.no_grad():
        single[2].threshold.fill_(10.0)
    opt = torch.optim.SGD(single.parameters(), lr=W.LR, momentum=0.9)
    for step in W.global_batches("narrow_head", world):
        x = torch.cat([p[0] for p in step[0]])
        y = torch.cat([p[1] for p in step[0]])
        W.loss_fn(single(x), y, single).backward()
        opt.step()
        opt.zero_grad()
    assert _max_diff(state, single.state_dict()) <= TOL
    assert single[2].threshold.abs().max() < 1.0, "the head's reset fired"
