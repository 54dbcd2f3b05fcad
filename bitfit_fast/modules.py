"""Drop-in replacements for nn.Linear and nn.LayerNorm whose weights are frozen.

They subclass the torch modules and keep their parameters (the same Parameter objects), so state_dict keys,
``isinstance`` checks and hooks carry over. While the weight is frozen the backward computes only the input
and bias gradients; if a user unfreezes it, they fall back to the plain torch op so gradients stay correct.
"""

import copy
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import task_rows
from .functions import functions
from .torch_ops import ZeroGradient, compute_dtype, layer_norm_output_dtype


def retype(module: nn.Module, cls: type[nn.Module], **attributes) -> nn.Module:
    """A new instance of ``cls`` with module's state (parameters, buffers, hooks, flags) and extra attributes.

    The instance is new, the classes are untouched; parameters are shared, not copied.
    """
    new = cls.__new__(cls)
    new.__dict__ = {
        key: copy.copy(value) if isinstance(value, (dict, set, list)) else value
        for key, value in module.__dict__.items()
    }
    new.__dict__.update(attributes)
    return new


def replace_children(model: nn.Module, convert: Callable[[nn.Module], nn.Module | None]) -> int:
    """Swap every child for which ``convert`` returns a module; a module shared by several parents (ALBERT)
    is converted once and stays shared. Returns how many distinct modules were converted.

    Children come before their parents: a converted parent (a ``retype``) holds a copy of its children's dict,
    so a child swapped after it would be swapped in the old parent's dict only (merge left DistilBERT's and
    ModernBERT's LayerNorms, children of their layers, BitFit modules)."""
    converted: dict[int, nn.Module] = {}
    for parent in reversed(list(model.modules())):
        for name, child in list(parent._modules.items()):
            if child is None:
                continue
            if id(child) not in converted:
                replacement = convert(child)
                if replacement is None:
                    continue
                converted[id(child)] = replacement
            parent._modules[name] = converted[id(child)]
    return len(converted)


def is_last_dim_layer_norm(module: nn.Module) -> bool:
    """A plain ``nn.LayerNorm`` over the last dimension with a weight: what BitFitLayerNorm replaces (a missing
    bias can be added to it)."""
    return type(module) is nn.LayerNorm and module.weight is not None and len(module.normalized_shape) == 1


def parameter_like(data: torch.Tensor, original: nn.Parameter, requires_grad: bool) -> nn.Parameter:
    """A new Parameter of ``data`` in place of ``original``, keeping transformers' mark of a weight it loaded from
    the checkpoint (``_is_hf_initialized``; see ``model.weights_drawn_at_random``)."""
    param = nn.Parameter(data, requires_grad=requires_grad)
    if getattr(original, "_is_hf_initialized", False):
        param._is_hf_initialized = True
    return param


def check_batch(x: torch.Tensor) -> None:
    """Raise a ValueError for an empty batch, which the fused layers do not take: drop it before the forward."""
    if x.numel() == 0:
        raise ValueError(f"got an empty batch (input shape {tuple(x.shape)}); drop empty batches before the forward")


def _vector(bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A bias [N] in ``dtype`` for torch's op on no rows; a task table [T, N] adds nothing to none."""
    return None if bias is None or bias.dim() != 1 else bias.to(dtype)


def _row_tasks(module: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """Each row's task where the module's bias is a TaskBank's task table [T, N] (see ``task_rows``)."""
    bias = module.bias
    return task_rows.of_module_input(x, module.examples_dim) if bias is not None and bias.dim() == 2 else None


class BitFitLinear(nn.Linear):
    """nn.Linear with a frozen weight: the backward gives d(input) and d(bias) only and saves no input."""

    backend: str
    zero_bias_grad: bool
    examples_dim = 0  # where its input holds the examples: 1 where a TaskBank found it sequence first

    @classmethod
    def from_linear(cls, linear: nn.Linear, backend: str, zero_bias_grad: bool = False) -> "BitFitLinear":
        """``zero_bias_grad``: the bias's true gradient is identically zero (an attention key projection), so
        it gets exactly zero instead of rounding noise (see ``ZeroGradient``)."""
        return retype(linear, cls, backend=backend, zero_bias_grad=zero_bias_grad)

    def to_vanilla(self) -> nn.Linear:
        """A plain nn.Linear with the same parameters, buffers and hooks (what merge() puts back)."""
        plain = retype(self, nn.Linear)
        del plain.backend, plain.zero_bias_grad
        return plain

    def trained_bias(self) -> torch.Tensor | None:
        """The bias as the forward should use it: with a zero gradient where its true gradient is zero."""
        if self.zero_bias_grad and self.bias is not None and self.bias.requires_grad:
            return ZeroGradient.apply(self.bias)
        return self.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.requires_grad:
            return F.linear(x, self.weight, self.bias)
        if x.numel() == 0:  # rows a model routes nowhere (X-MOD's adapter of a language not in the batch)
            dtype = compute_dtype(x)
            return F.linear(x.to(dtype), self.weight.to(dtype), _vector(self.trained_bias(), dtype))
        ops = functions(self.backend, x)
        return ops.linear(x, self.weight, self.trained_bias(), row_task=_row_tasks(self, x))

    def extra_repr(self) -> str:
        zero = ", zero_bias_grad=True" if self.zero_bias_grad else ""
        return f"{super().extra_repr()}, backend={self.backend}{zero}"


class BitFitLayerNorm(nn.LayerNorm):
    """nn.LayerNorm over the last dimension with gamma frozen: d(input) and d(beta) only.

    It saves the normalised input x_hat and rstd rather than its input: exact for any gamma (see
    ``functions.LayerNormFunction``).
    """

    backend: str
    examples_dim = 0  # as BitFitLinear's

    @classmethod
    def from_layer_norm(cls, layer_norm: nn.LayerNorm, backend: str) -> "BitFitLayerNorm":
        """``layer_norm``, over the last dimension and with a bias, as a BitFitLayerNorm sharing its parameters."""
        if not is_last_dim_layer_norm(layer_norm) or layer_norm.bias is None:
            raise ValueError("BitFitLayerNorm needs a LayerNorm over the last dimension with weight and bias")
        return retype(layer_norm, cls, backend=backend)

    def to_vanilla(self) -> nn.LayerNorm:
        """A plain nn.LayerNorm with the same parameters, buffers and hooks (what merge() puts back)."""
        plain = retype(self, nn.LayerNorm)
        del plain.backend
        return plain

    def forward(self, x: torch.Tensor, row_task: torch.Tensor | None = None) -> torch.Tensor:
        """``row_task``: each row's task for a TaskBank's table where x's rows are not a block per example (an
        encoder's packed real tokens); by default they are (see ``task_rows.of_module_input``)."""
        if self.weight.requires_grad:
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        x = x.to(layer_norm_output_dtype(x.device.type, x.dtype))  # CUDA's autocast runs it in fp32, so do we
        if x.numel() == 0:  # as BitFitLinear's
            weight, bias = self.weight.to(x.dtype), _vector(self.bias, x.dtype)
            return F.layer_norm(x, self.normalized_shape, weight, bias, self.eps)
        ops = functions(self.backend, x)
        if row_task is None:
            row_task = _row_tasks(self, x)
        y, _ = ops.layer_norm(x, None, self.weight, self.bias, self.eps, row_task=row_task)
        return y

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, backend={self.backend}"
