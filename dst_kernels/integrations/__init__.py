"""DST in the training frameworks people already use, one callback each.

* :mod:`dst_kernels.integrations.lightning`: ``DSTCallback`` for PyTorch Lightning.
* :mod:`dst_kernels.integrations.hf`: ``DSTTrainerCallback`` for the HuggingFace ``Trainer``.

Each module imports its framework, so import the one you use; neither framework is a
dependency of ``dst_kernels``. Both add the regulariser's gradient ``alpha * d/dt sum
exp(-t)`` to the thresholds once per optimiser step, after the backward passes of the step
and before gradient clipping and the optimiser: the user's loss stays as it is and the
result is that of adding ``alpha * dst.sparsity_loss(model)`` to it.
"""

__all__: list[str] = []
