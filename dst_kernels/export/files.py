"""Checkpoint files in the formats people share: safetensors and HuggingFace ``save_pretrained``.

* ``save_safetensors(model, path)`` writes the DST training state (the dense weights ``W``
  and the thresholds, under the model's parameter names: it loads back into the sparsified
  model); ``dense=True`` writes ``dense_state_dict(model)`` instead (``W * M``, no
  thresholds: it loads, ``strict=True``, into the model as built before ``sparsify``).
* ``load_safetensors(model, path)`` loads either file into a model.
* ``save_pretrained(model, path)`` is HuggingFace's ``model.save_pretrained`` with the dense
  state dict: ``from_pretrained`` of the original class then gives the trained function.

``safetensors`` is not a dependency of dst_kernels (transformers installs it).
"""

from __future__ import annotations

import os

from torch import nn

from dst_kernels.export.fold import dense_state_dict

__all__ = ["load_safetensors", "save_pretrained", "save_safetensors"]


def _safetensors():
    try:
        import safetensors.torch as st
    except ImportError as e:
        raise ImportError(
            "the safetensors format needs the safetensors package: pip install safetensors"
        ) from e
    return st


def save_safetensors(
    model: nn.Module, path, *, dense: bool = False, metadata: dict[str, str] | None = None
) -> None:
    """Write the model's DST state (or, with ``dense=True``, its dense state dict) to ``path``."""
    st = _safetensors()
    state = dense_state_dict(model) if dense else model.state_dict()
    # safetensors stores each tensor once and refuses shared storage: contiguous copies.
    tensors = {k: v.detach().contiguous().clone() for k, v in state.items()}
    info = {"format": "pt", "dst_kernels": "dense" if dense else "dst", **(metadata or {})}
    st.save_file(tensors, os.fspath(path), metadata=info)


def load_safetensors(model: nn.Module, path, *, strict: bool = True, device: str = "cpu"):
    """Load a file written by :func:`save_safetensors` into ``model``; returns what
    ``load_state_dict`` returns."""
    st = _safetensors()
    if not os.path.exists(path):
        raise FileNotFoundError(f"no safetensors file at {os.fspath(path)!r}")
    return model.load_state_dict(st.load_file(os.fspath(path), device=device), strict=strict)


def save_pretrained(model: nn.Module, path, **kwargs) -> None:
    """``model.save_pretrained(path, state_dict=dense_state_dict(model), **kwargs)``: a
    HuggingFace model saved so that ``from_pretrained`` of its class loads ``W * M``."""
    if not callable(getattr(model, "save_pretrained", None)):
        raise TypeError(
            f"save_pretrained: {type(model).__name__} has no save_pretrained method (not a "
            "HuggingFace model); use save_safetensors(model, path, dense=True)"
        )
    model.save_pretrained(path, state_dict=dense_state_dict(model), **kwargs)
