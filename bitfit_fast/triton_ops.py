"""The Triton backend: autograd functions that only call the kernels' host functions.

Same signatures as ``torch_ops``. The GEMMs run in autocast's dtype when it is on, else in the input's (the
frozen weight is cast to it, as F.linear under autocast would); gradients come back in the inputs' dtypes.
"""

import torch

from .backend import triton_kernels
from .torch_ops import check_frozen, compute_dtype, layer_norm_output, table_row_tasks


class LinearFunction(torch.autograd.Function):
    """y = dropout(activation(x @ W^T + b)) with W frozen, as one GEMM with its epilogue.

    Saves W (a parameter: free) and, with an activation, the pre-activation; with ``recompute_from``, the
    (x_hat, gamma, beta, row_task) of the LayerNorm whose output x is, it saves nothing new and recomputes the
    pre-activation from x = gamma * x_hat + beta in the backward. Never a dropout mask. ``row_task``: each row's
    task for a bias that is a task table [T, N], gathered in the GEMM's epilogue.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, activation=None, dropout_p=0.0, seed=None, recompute_from=None, row_task=None):
        check_frozen("weight", weight)
        dtype = compute_dtype(x)
        needs_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[2]
        recompute = activation is not None and recompute_from is not None
        row_task = _row_task(bias, row_task)
        if row_task is not None:
            bias = bias.contiguous()  # a slice of the q/k/v tables (the classification shortcut) is not
        y, preact = triton_kernels().linear_forward(
            x.to(dtype).contiguous(),
            weight.to(dtype).contiguous(),
            bias,
            activation=activation,
            dropout_p=dropout_p,
            seed=seed,
            store_preact=activation is not None and needs_grad and not recompute,
            row_task=row_task,
        )
        ctx.save_for_backward(weight, preact, bias, row_task, *(recompute_from or (None,) * 4))
        ctx.x_dtype = x.dtype
        ctx.options = (activation, dropout_p, seed, recompute)
        return y

    @staticmethod
    def backward(ctx, dy):
        weight, preact, bias, row_task, *source = ctx.saved_tensors
        activation, dropout_p, seed, recompute = ctx.options
        kernels = triton_kernels()
        w_c = weight.to(dy.dtype).contiguous()
        if recompute:
            x = layer_norm_output(*source).to(dy.dtype).contiguous()
            preact, _ = kernels.linear_forward(x, w_c, bias, row_task=row_task)
        dx, db = kernels.linear_backward(
            dy.contiguous(),
            w_c,
            preact,
            activation=activation,
            dropout_p=dropout_p,
            seed=seed,
            compute_dx=ctx.needs_input_grad[0],
            compute_db=ctx.needs_input_grad[2],
            row_task=row_task,
            num_tasks=bias.shape[0] if row_task is not None else 1,
        )
        if dx is not None:
            dx = dx.to(ctx.x_dtype)
        if db is not None:
            db = db.to(bias.dtype)
        return dx, None, db, None, None, None, None, None


def _row_task(bias: torch.Tensor | None, row_task: torch.Tensor | None) -> torch.Tensor | None:
    """The rows' tasks, contiguous, where the bias is a task table [T, N] (the kernels gather it), else None."""
    row_task = table_row_tasks(bias, row_task)
    return None if row_task is None else row_task.contiguous()


class LayerNormFunction(torch.autograd.Function):
    """LayerNorm(dropout(x) + residual) with gamma frozen: gradients for x, residual and beta only.

    Returns (y, x_hat) in x's dtype, x_hat not differentiable; saves x_hat and rstd (see the kernel's docstring:
    exact for any gamma, and y is rebuilt from x_hat by whoever needs it later).
    """

    @staticmethod
    def forward(ctx, x, residual, gamma, beta, eps, dropout_p=0.0, seed=None, row_task=None):
        check_frozen("gamma", gamma)
        ctx.dtypes = (x.dtype, residual.dtype if residual is not None else None)
        ctx.beta_dtype = beta.dtype
        ctx.num_tasks = beta.shape[0] if beta.dim() == 2 else 1
        row_task = _row_task(beta, row_task)
        y, x_hat, rstd = triton_kernels().residual_layer_norm_forward(
            x.contiguous(),
            gamma,
            beta,
            eps,
            residual.to(x.dtype).contiguous() if residual is not None else None,
            dropout_p=dropout_p,
            seed=seed,
            row_task=row_task,
        )
        ctx.mark_non_differentiable(x_hat)
        ctx.save_for_backward(x_hat, gamma, rstd, row_task)
        ctx.options = dict(dropout_p=dropout_p, seed=seed)
        return y, x_hat

    @staticmethod
    def backward(ctx, dy, _):
        x_hat, gamma, rstd, row_task = ctx.saved_tensors
        needs_x, needs_residual, _, needs_beta = ctx.needs_input_grad[:4]
        dx, dresidual, dbeta = triton_kernels().residual_layer_norm_backward(
            dy.to(x_hat.dtype).contiguous(),
            x_hat,
            gamma,
            rstd,
            compute_dx=needs_x or needs_residual,
            row_task=row_task,
            num_tasks=ctx.num_tasks,
            **ctx.options,
        )
        x_dtype, residual_dtype = ctx.dtypes
        return (
            dx.to(x_dtype) if needs_x else None,
            dresidual.to(residual_dtype) if needs_residual else None,
            None,
            dbeta.to(ctx.beta_dtype) if needs_beta else None,
            None,
            None,
            None,
            None,
        )
