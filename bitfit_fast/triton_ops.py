"""The Triton backend: autograd functions that only call the kernels' host functions.

AMP: under torch.autocast the GEMMs run in the autocast dtype (x and the frozen weight are cast, as F.linear
would); LayerNorm runs in fp32 as torch's autocast policy prescribes. Gradients come back in the inputs' dtypes.
"""

import torch

from .backend import triton_kernels


def _autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None


class FusedLinearFunction(torch.autograd.Function):
    """y = dropout(activation(x @ W^T + b)) with W frozen.

    Saves W (a parameter: free) and, with an activation, the pre-activation; never x or a dropout mask.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, activation=None, dropout_p=0.0, seed=None):
        if weight.requires_grad:
            raise RuntimeError("FusedLinearFunction computes no weight gradient; freeze the weight first")
        kernels = triton_kernels()
        compute_dtype = _autocast_dtype(x) or x.dtype
        needs_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[2]
        y, preact = kernels.linear_forward(
            x.to(compute_dtype).contiguous(),
            weight.to(compute_dtype).contiguous(),
            bias,
            activation=activation,
            dropout_p=dropout_p,
            seed=seed,
            store_preact=activation is not None and needs_grad,
        )
        ctx.save_for_backward(weight, preact)
        ctx.x_dtype = x.dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.options = dict(activation=activation, dropout_p=dropout_p, seed=seed)
        return y

    @staticmethod
    def backward(ctx, dy):
        weight, preact = ctx.saved_tensors
        dx, db = triton_kernels().linear_backward(
            dy.contiguous(),
            weight.to(dy.dtype).contiguous(),
            preact,
            compute_dx=ctx.needs_input_grad[0],
            compute_db=ctx.needs_input_grad[2],
            **ctx.options,
        )
        if dx is not None:
            dx = dx.to(ctx.x_dtype)
        if db is not None:
            db = db.to(ctx.bias_dtype)
        return dx, None, db, None, None, None


class ResidualLayerNormFunction(torch.autograd.Function):
    """LayerNorm(dropout(x) + residual) with gamma frozen: gradients for x, residual and beta only.

    Saves the output and rstd when gamma has no zeros (``gamma_invertible``), else the normalised input.
    """

    @staticmethod
    def forward(ctx, x, residual, gamma, beta, eps, dropout_p=0.0, seed=None, gamma_invertible=True):
        if gamma.requires_grad:
            raise RuntimeError("ResidualLayerNormFunction computes no gamma gradient; freeze gamma first")
        ctx.dtypes = (x.dtype, residual.dtype if residual is not None else None)
        if _autocast_dtype(x) is not None:
            x = x.float()
            residual = residual.float() if residual is not None else None
        y, s, mean, rstd = triton_kernels().residual_layer_norm_forward(
            x.contiguous(),
            gamma,
            beta,
            eps,
            residual.contiguous() if residual is not None else None,
            dropout_p=dropout_p,
            seed=seed,
            store_input=not gamma_invertible,
        )
        # The mean is needed only to rebuild x_hat from s; from the output, gamma and beta suffice.
        ctx.save_for_backward(y if gamma_invertible else s, gamma, beta, rstd, None if gamma_invertible else mean)
        ctx.options = dict(saved_is_output=gamma_invertible, dropout_p=dropout_p, seed=seed)
        return y

    @staticmethod
    def backward(ctx, dy):
        saved, gamma, beta, rstd, mean = ctx.saved_tensors
        needs_x, needs_residual, _, needs_beta = ctx.needs_input_grad[:4]
        dx, dresidual, dbeta = triton_kernels().residual_layer_norm_backward(
            dy.contiguous().to(saved.dtype),
            saved,
            gamma,
            beta,
            mean,
            rstd,
            compute_dx=needs_x or needs_residual,
            **ctx.options,
        )
        x_dtype, residual_dtype = ctx.dtypes
        return (
            dx.to(x_dtype) if needs_x else None,
            dresidual.to(residual_dtype) if needs_residual else None,
            None,
            dbeta.to(beta.dtype) if needs_beta else None,
            None,
            None,
            None,
            None,
        )
