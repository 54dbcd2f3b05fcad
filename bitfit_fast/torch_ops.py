"""The torch backend: frozen linear and frozen-gamma LayerNorm as autograd functions in plain torch ops.

They compute what BitFit needs and nothing more: no weight gradient, no saved layer input.
"""

import torch
import torch.nn.functional as F


def bias_grad(grad: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Column sum of a (..., N) gradient, accumulated in fp32, in the dtype of the bias it is for."""
    return grad.reshape(-1, grad.shape[-1]).sum(dim=0, dtype=torch.float32).to(like.dtype)


class FrozenLinearFunction(torch.autograd.Function):
    """y = x @ W^T + b with W frozen: saves only W (a parameter, so it costs nothing) and not x."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        if weight.requires_grad:
            raise RuntimeError("FrozenLinearFunction computes no weight gradient; freeze the weight first")
        ctx.save_for_backward(weight)
        ctx.x_dtype = x.dtype
        ctx.bias_like = bias
        return F.linear(x, weight, bias)  # autocast, when active, applies here as for nn.Linear

    @staticmethod
    def backward(ctx, dy):
        (weight,) = ctx.saved_tensors
        dx = db = None
        if ctx.needs_input_grad[0]:
            # Under autocast dy is in the low-precision dtype; cast W (not dy) so the GEMM runs there.
            dx = (dy @ weight.to(dy.dtype)).to(ctx.x_dtype)
        if ctx.needs_input_grad[2]:
            db = bias_grad(dy, ctx.bias_like)
        return dx, None, db


class FrozenGammaLayerNormFunction(torch.autograd.Function):
    """LayerNorm over the last dimension with gamma frozen: only d(input) and d(beta).

    Saves the output and rstd and rebuilds x_hat = (y - beta) / gamma; where gamma has zeros (``gamma_invertible``
    False) it saves the input and the mean instead.
    """

    @staticmethod
    def forward(ctx, x, gamma, beta, eps, gamma_invertible):
        if gamma.requires_grad:
            raise RuntimeError("FrozenGammaLayerNormFunction computes no gamma gradient; freeze gamma first")
        y, mean, rstd = torch.native_layer_norm(x, (x.shape[-1],), gamma, beta, eps)
        if gamma_invertible:
            ctx.save_for_backward(y, gamma, beta, rstd)
        else:
            ctx.save_for_backward(x, gamma, beta, rstd, mean)
        ctx.gamma_invertible = gamma_invertible
        ctx.x_dtype = x.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        saved, gamma, beta, rstd, *mean = ctx.saved_tensors
        dx = dbeta = None
        if ctx.needs_input_grad[0]:
            g = dy.float() * gamma.float()
            if ctx.gamma_invertible:
                x_hat = (saved.float() - beta.float()) / gamma.float()
            else:
                x_hat = (saved.float() - mean[0]) * rstd
            c1 = (x_hat * g).mean(dim=-1, keepdim=True)
            c2 = g.mean(dim=-1, keepdim=True)
            dx = ((g - x_hat * c1 - c2) * rstd).to(ctx.x_dtype)
        if ctx.needs_input_grad[2]:
            dbeta = bias_grad(dy, beta)
        return dx, None, dbeta, None, None
