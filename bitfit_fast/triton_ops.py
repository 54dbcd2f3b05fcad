"""The Triton backend: autograd functions that only call the kernels' host functions.

Same signatures as ``torch_ops``. The GEMMs run in autocast's dtype when it is on, else in the input's (the
frozen weight is cast to it, as F.linear under autocast would); gradients come back in the inputs' dtypes.
"""

import torch

from .backend import triton_kernels
from .torch_ops import check_frozen, compute_dtype


class FusedLinearFunction(torch.autograd.Function):
    """y = dropout(activation(x @ W^T + b)) with W frozen, as one GEMM with its epilogue.

    Saves W (a parameter: free) and, with an activation, the pre-activation; with ``recompute_preact`` it saves
    x instead and recomputes the pre-activation in the backward. Never a dropout mask.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, activation=None, dropout_p=0.0, seed=None, recompute_preact=False):
        check_frozen("weight", weight)
        dtype = compute_dtype(x)
        x_c = x.to(dtype).contiguous()
        needs_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[2]
        y, preact = triton_kernels().linear_forward(
            x_c,
            weight.to(dtype).contiguous(),
            bias,
            activation=activation,
            dropout_p=dropout_p,
            seed=seed,
            store_preact=activation is not None and needs_grad and not recompute_preact,
        )
        ctx.save_for_backward(weight, x_c if activation and recompute_preact else preact, bias)
        ctx.x_dtype = x.dtype
        ctx.options = (activation, dropout_p, seed, recompute_preact)
        return y

    @staticmethod
    def backward(ctx, dy):
        weight, saved, bias = ctx.saved_tensors
        activation, dropout_p, seed, recompute_preact = ctx.options
        kernels = triton_kernels()
        w_c = weight.to(dy.dtype).contiguous()
        preact = saved
        if activation and recompute_preact:
            preact, _ = kernels.linear_forward(saved, w_c, bias)
        dx, db = kernels.linear_backward(
            dy.contiguous(),
            w_c,
            preact,
            activation=activation,
            dropout_p=dropout_p,
            seed=seed,
            compute_dx=ctx.needs_input_grad[0],
            compute_db=ctx.needs_input_grad[2],
        )
        if dx is not None:
            dx = dx.to(ctx.x_dtype)
        if db is not None:
            db = db.to(bias.dtype)
        return dx, None, db, None, None, None, None


class ResidualLayerNormFunction(torch.autograd.Function):
    """LayerNorm(dropout(x) + residual) with gamma frozen: gradients for x, residual and beta only.

    Returns x's dtype. Saves the output and rstd when gamma has no zeros (``gamma_invertible``), else the
    normalised input and the mean.
    """

    @staticmethod
    def forward(ctx, x, residual, gamma, beta, eps, dropout_p=0.0, seed=None, gamma_invertible=True):
        check_frozen("gamma", gamma)
        ctx.dtypes = (x.dtype, residual.dtype if residual is not None else None)
        y, s, mean, rstd = triton_kernels().residual_layer_norm_forward(
            x.contiguous(),
            gamma,
            beta,
            eps,
            residual.to(x.dtype).contiguous() if residual is not None else None,
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
            dy.to(saved.dtype).contiguous(),
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
