"""The BitFit autograd functions, written once over an implementation of the kernels' host functions.

An implementation ("impl") is a module with ``linear_forward``, ``linear_backward``,
``residual_layer_norm_forward`` and ``residual_layer_norm_backward``: the Triton kernels (``bitfit_fast_kernels``)
or the same functions in plain torch ops (``torch_ops``, the CPU path and the kernels' oracle). The functions
below hold what both share: what is saved for the backward, which gradients are needed, the autocast dtype of the
GEMMs, and the casts of the gradients back to the inputs' dtypes. Each impl keeps its own numerics: the kernels
add the bias in their fp32 accumulator, torch rounds it to the GEMM dtype first, as F.linear under autocast does.

Nothing saved is an activation BitFit can do without: no weight or gamma gradient, no layer input, no dropout
mask (drawn again from its seed), a LayerNorm's x_hat and rstd rather than its input or output.
"""

import torch

from . import torch_ops
from .backend import triton_kernels, uses_triton
from .torch_ops import check_frozen, compute_dtype, layer_norm_output, table_row_tasks


def _tables(bias: torch.Tensor | None, row_task: torch.Tensor | None):
    """(bias, row_task, num_tasks): for a task table [T, N] contiguous, with each row's task (see
    ``torch_ops.bias_rows``); for a bias [N] or none, row_task None and one task."""
    row_task = table_row_tasks(bias, row_task)
    if row_task is None:
        return bias, None, 1
    return bias.contiguous(), row_task.contiguous(), bias.shape[0]  # a slice of the q/k/v tables is not


def _cast(grad: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """``grad`` in the dtype of what it is the gradient of."""
    return None if grad is None else grad.to(dtype)


class LinearFunction(torch.autograd.Function):
    """y = dropout(activation(x @ W^T + b)) with W frozen; activation None, "gelu" or "geglu" (see
    ``torch_ops.activation_forward``).

    Saves W (a parameter: free) and, with an activation, the pre-activation h. With ``recompute_from``, the
    (x_hat, gamma, beta, row_task) of the LayerNorm whose output x is, it saves nothing new (that LayerNorm keeps
    x_hat anyway) and recomputes h from x = ``layer_norm_output(*recompute_from)`` in the backward.
    ``row_task`` [M]: each row's task, for a bias that is a task table [T, N].
    """

    @staticmethod
    def forward(ctx, impl, x, weight, bias, activation=None, dropout_p=0.0, seed=None, recompute_from=None,
                row_task=None):
        check_frozen("weight", weight)
        dtype = compute_dtype(x)
        needs_grad = ctx.needs_input_grad[1] or ctx.needs_input_grad[3]
        recompute = activation is not None and recompute_from is not None
        bias, row_task, num_tasks = _tables(bias, row_task)
        y, preact = impl.linear_forward(
            x.to(dtype).contiguous(), weight.to(dtype).contiguous(), bias,
            activation=activation, dropout_p=dropout_p, seed=seed, row_task=row_task,
            store_preact=activation is not None and needs_grad and not recompute,
        )
        # The bias only to recompute h: the q/k/v bias is a concatenation, not a parameter, and would cost memory.
        ctx.save_for_backward(weight, preact, bias if recompute else None, row_task, *(recompute_from or (None,) * 4))
        ctx.impl = impl
        ctx.dtypes = (x.dtype, bias.dtype if bias is not None else None)
        ctx.options = (activation, dropout_p, seed, recompute, num_tasks)
        return y

    @staticmethod
    def backward(ctx, dy):
        weight, preact, bias, row_task, *source = ctx.saved_tensors
        activation, dropout_p, seed, recompute, num_tasks = ctx.options
        impl = ctx.impl
        w_c = weight.to(dy.dtype).contiguous()
        if recompute:
            x = layer_norm_output(*source).to(dy.dtype).contiguous()
            preact, _ = impl.linear_forward(x, w_c, bias, row_task=row_task)
        dx, db = impl.linear_backward(
            dy.contiguous(), w_c, preact,
            activation=activation, dropout_p=dropout_p, seed=seed, row_task=row_task, num_tasks=num_tasks,
            compute_dx=ctx.needs_input_grad[1], compute_db=ctx.needs_input_grad[3],
        )
        x_dtype, bias_dtype = ctx.dtypes
        return None, _cast(dx, x_dtype), None, _cast(db, bias_dtype), None, None, None, None, None


class LayerNormFunction(torch.autograd.Function):
    """(y, x_hat) = LayerNorm(dropout(x) + residual) over the last dimension with gamma frozen: gradients for x,
    residual and beta only.

    y and x_hat are in x's dtype (a residual is cast to it); x_hat is not differentiable. It saves x_hat and
    rstd, what the backward needs, in a form that is exact for any gamma: pretrained LayerNorms have gamma
    entries near 1e-33, where rebuilding x_hat = (y - beta) / gamma from the output would be garbage. y is
    ``layer_norm_output(x_hat, gamma, beta)``, so whoever needs y later rebuilds it from x_hat instead of
    keeping it.
    """

    @staticmethod
    def forward(ctx, impl, x, residual, gamma, beta, eps, dropout_p=0.0, seed=None, row_task=None):
        check_frozen("gamma", gamma)
        beta, row_task, num_tasks = _tables(beta, row_task)
        y, x_hat, rstd = impl.residual_layer_norm_forward(
            x.contiguous(), gamma, beta, eps, residual.to(x.dtype).contiguous() if residual is not None else None,
            dropout_p=dropout_p, seed=seed, row_task=row_task,
        )
        ctx.mark_non_differentiable(x_hat)
        ctx.save_for_backward(x_hat, gamma, rstd, row_task)
        ctx.impl = impl
        ctx.dtypes = (x.dtype, residual.dtype if residual is not None else None, beta.dtype)
        ctx.options = dict(dropout_p=dropout_p, seed=seed, num_tasks=num_tasks)
        return y, x_hat

    @staticmethod
    def backward(ctx, dy, _):
        x_hat, gamma, rstd, row_task = ctx.saved_tensors
        needs_x, needs_residual, _, needs_beta = ctx.needs_input_grad[1:5]
        dx, dresidual, dbeta = ctx.impl.residual_layer_norm_backward(
            dy.to(x_hat.dtype).contiguous(), x_hat, gamma, rstd,
            compute_dx=needs_x or needs_residual, row_task=row_task, **ctx.options,
        )
        x_dtype, residual_dtype, beta_dtype = ctx.dtypes
        return (
            None,
            _cast(dx, x_dtype) if needs_x else None,
            _cast(dresidual, residual_dtype) if needs_residual else None,
            None,
            _cast(dbeta, beta_dtype) if needs_beta else None,
            None,
            None,
            None,
            None,
        )


class Ops:
    """The fused functions on one implementation, with keyword arguments; see :func:`functions`."""

    def __init__(self, impl):
        self.impl = impl

    @property
    def is_torch(self) -> bool:
        """Whether plain torch ops run (the CPU path), rather than the Triton kernels."""
        return self.impl is torch_ops

    def linear(self, x, weight, bias, activation=None, dropout_p=0.0, seed=None, recompute_from=None,
               row_task=None) -> torch.Tensor:
        """:class:`LinearFunction`."""
        return LinearFunction.apply(self.impl, x, weight, bias, activation, dropout_p, seed, recompute_from, row_task)

    def layer_norm(self, x, residual, gamma, beta, eps, dropout_p=0.0, seed=None, row_task=None):
        """:class:`LayerNormFunction`: (y, x_hat)."""
        return LayerNormFunction.apply(self.impl, x, residual, gamma, beta, eps, dropout_p, seed, row_task)


TORCH = Ops(torch_ops)


def functions(backend: str, x: torch.Tensor) -> Ops:
    """The fused functions of the backend that runs on x: the Triton kernels or torch ops (see
    ``backend.uses_triton``)."""
    return Ops(triton_kernels()) if uses_triton(backend, x) else TORCH
