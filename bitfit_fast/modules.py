"""Drop-in replacements for nn.Linear and nn.LayerNorm whose weights are frozen.

They subclass the torch modules and keep their parameters (the same Parameter objects), so state_dict keys,
``isinstance`` checks and hooks carry over. While the weight is frozen the backward computes only the input
and bias gradients; if a user unfreezes it, they fall back to the plain torch op so gradients stay correct.
"""

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from .backend import uses_triton
from .torch_ops import FrozenGammaLayerNormFunction, FrozenLinearFunction
from .triton_ops import FusedLinearFunction, ResidualLayerNormFunction


def functions(backend: str, x: torch.Tensor) -> tuple[type, type]:
    """(linear, residual LayerNorm) autograd functions of the backend that runs on x; same signatures."""
    if uses_triton(backend, x):
        return FusedLinearFunction, ResidualLayerNormFunction
    return FrozenLinearFunction, FrozenGammaLayerNormFunction


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


def check_batch(x: torch.Tensor) -> None:
    if x.numel() == 0:
        raise ValueError(f"got an empty batch (input shape {tuple(x.shape)}); drop empty batches before the forward")


class BitFitLinear(nn.Linear):
    """nn.Linear with a frozen weight: the backward gives d(input) and d(bias) only and saves no input."""

    backend: str

    @classmethod
    def from_linear(cls, linear: nn.Linear, backend: str) -> "BitFitLinear":
        return retype(linear, cls, backend=backend)

    def to_vanilla(self) -> nn.Linear:
        plain = retype(self, nn.Linear)
        del plain.backend
        return plain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.requires_grad:
            return F.linear(x, self.weight, self.bias)
        check_batch(x)
        linear, _ = functions(self.backend, x)
        return linear.apply(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, backend={self.backend}"


class BitFitLayerNorm(nn.LayerNorm):
    """nn.LayerNorm over the last dimension with gamma frozen: d(input) and d(beta) only.

    It saves its output and rstd rather than its input, rebuilding x_hat = (y - beta) / gamma; if gamma has
    zeros (checked again whenever gamma changes) it saves the input instead.
    """

    backend: str

    @classmethod
    def from_layer_norm(cls, layer_norm: nn.LayerNorm, backend: str) -> "BitFitLayerNorm":
        if len(layer_norm.normalized_shape) != 1 or layer_norm.weight is None or layer_norm.bias is None:
            raise ValueError("BitFitLayerNorm needs a LayerNorm over the last dimension with weight and bias")
        return retype(layer_norm, cls, backend=backend, _gamma_state=None, _gamma_invertible=True)

    def to_vanilla(self) -> nn.LayerNorm:
        plain = retype(self, nn.LayerNorm)
        for name in ("backend", "_gamma_state", "_gamma_invertible"):
            delattr(plain, name)
        return plain

    def gamma_invertible(self) -> bool:
        # One device sync when gamma is first seen or has changed (its version counter moves on in-place edits).
        state = (self.weight.data_ptr(), self.weight._version)
        if state != self._gamma_state:
            self._gamma_invertible = bool((self.weight != 0).all())
            self._gamma_state = state
        return self._gamma_invertible

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.requires_grad:
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        check_batch(x)
        if torch.is_autocast_enabled(x.device.type):
            x = x.float()  # autocast runs layer_norm in fp32; a drop-in module does the same
        _, layer_norm = functions(self.backend, x)
        return layer_norm.apply(x, None, self.weight, self.bias, self.eps, 0.0, None, self.gamma_invertible())

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, backend={self.backend}"
