"""Triton kernels of bitfit_fast, installed as ``bitfit_fast_kernels``.

Each module holds private ``@triton.jit`` kernels followed by host functions that check their inputs, allocate
the outputs and launch. Autograd lives in ``bitfit_fast``; nothing here knows about ``nn.Module``.
"""

from .heads import heads_to_rows, rows_to_heads
from .layer_norm import residual_layer_norm_backward, residual_layer_norm_forward
from .linear import linear_backward, linear_forward
from .task_tables import task_sums
from .utils import INTERPRETER, KernelInputError

__all__ = [
    "INTERPRETER",
    "KernelInputError",
    "heads_to_rows",
    "linear_backward",
    "linear_forward",
    "residual_layer_norm_backward",
    "residual_layer_norm_forward",
    "rows_to_heads",
    "task_sums",
]
