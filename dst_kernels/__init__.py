"""dst_kernels: Dynamic Sparse Training (Liu et al., ICLR 2020) as fused PyTorch layers.

Public API (docs/maths.md section 3)::

    import dst_kernels as dst
    layer = dst.DSTLinear(784, 300)            # or dst.sparsify(model)
    loss = task_loss + alpha * dst.sparsity_loss(model)
    print(dst.sparsity_report(model))
    plain = dst.export.fold(model)
"""

from dst_kernels import (
    _ops,  # noqa: F401  (loads the compiled ops when built)
    export,
    functional,
    reference,
    sparse,
)
from dst_kernels._version import __version__ as __version__
from dst_kernels.controller import DensityController
from dst_kernels.convert import plan_sparsify, register_layer, sparsify
from dst_kernels.functional import available_backends
from dst_kernels.nn import (
    DSTGRU,
    DSTLSTM,
    DSTConv2d,
    DSTLinear,
    is_dst_layer,
    sparsity_loss,
    threshold_parameters,
)
from dst_kernels.report import sparsity_report

__all__ = [
    "DensityController",
    "DSTConv2d",
    "DSTLinear",
    "DSTLSTM",
    "DSTGRU",
    "available_backends",
    "export",
    "functional",
    "is_dst_layer",
    "plan_sparsify",
    "register_layer",
    "reference",
    "sparse",
    "sparsify",
    "sparsity_loss",
    "sparsity_report",
    "threshold_parameters",
]
