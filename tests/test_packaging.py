"""The core package needs torch only; the training command says which extra it needs."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import dst_kernels.train as train


def test_the_library_imports_and_trains_without_the_train_extra():
    script = textwrap.dedent(
        """
        import sys
        for name in ("numpy", "tqdm", "matplotlib"):
            sys.modules[name] = None  # `import name` raises ImportError
        import torch
        import dst_kernels as dst
        layer = dst.DSTLinear(7, 5)
        model = torch.nn.Sequential(layer, torch.nn.ReLU(), torch.nn.Linear(5, 2))
        dst.sparsify(model)
        loss = model(torch.randn(3, 7)).sum() + 1e-3 * dst.sparsity_loss(model)
        loss.backward()
        assert layer.threshold.grad is not None
        dst.export.fold(model)
        print("ok")
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout + proc.stderr


def test_dst_train_names_the_extra_it_lacks(monkeypatch, capsys):
    monkeypatch.setattr(train, "missing_extra", lambda: ["tqdm", "matplotlib"])
    assert train.main(["--help"]) == 2
    err = capsys.readouterr().err
    assert "dst-train needs tqdm, matplotlib (the train extra): pip install 'dst_kernels[train]'" in err


def test_the_extra_lists_what_the_command_imports():
    assert train.EXTRA == ("numpy", "tqdm", "matplotlib")
    assert train.missing_extra() == []  # the test environment has the extra


def test_release_files_and_one_version():
    """LICENSE carries the license pyproject.toml names, py.typed marks the typed package,
    the version is defined once (dst_kernels/_version.py) and is what the installed
    distribution reports."""
    import importlib.metadata
    from pathlib import Path

    import tomllib

    import dst_kernels

    root = Path(__file__).resolve().parents[1]
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    assert project["license"]["text"] == "BSD-3-Clause"
    assert (root / "LICENSE").read_text().startswith("BSD 3-Clause License")
    assert "version" not in project and "version" in project["dynamic"]
    assert (root / "dst_kernels" / "py.typed").exists()
    assert (root / "CHANGELOG.md").read_text().count(f"## {dst_kernels.__version__}") == 1
    assert importlib.metadata.version("dst_kernels") == dst_kernels.__version__
    assert all(
        c.startswith(("Development", "Intended", "License", "Operating", "Programming", "Topic", "Typing"))
        for c in project["classifiers"]
    )
