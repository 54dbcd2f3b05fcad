"""The BitFit autograd functions, written once over an implementation of the kernels' host functions.

An implementation ("impl") is a module with ``linear_forward``, ``linear_backward``,
``residual_layer_norm_forward``, ``residual_layer_norm_backward``, ``rows_to_heads`` and ``heads_to_rows``: the
Triton kernels (``bitfit_fast_kernels``) or the same functions in plain torch ops (``torch_ops``, the CPU path and
the kernels' oracle). The functions below hold what both share: what is saved for the backward, which gradients are
needed, the autocast dtype of the GEMMs, and the casts of the gradients back to the inputs' dtypes. Each impl keeps
its own numerics: the Triton GEMM and the task tables' passes add the bias in fp32 (the GEMM in its accumulator),
where cuBLAS's GEMM (the kernels' default for a plain bias or GELU epilogue on a GPU) and torch round it to the GEMM
dtype first, as F.linear under autocast does.

Nothing saved is an activation BitFit can do without: no weight or gamma gradient, no layer input, no dropout
mask (drawn again from its seed), a LayerNorm's x_hat and rstd rather than its input or output.
"""

import torch
from torch.autograd.function import once_differentiable

from . import torch_ops
from .backend import triton_kernels, uses_triton
from .graphs import check_not_capturing
from .torch_ops import check_frozen, compute_dtype, fresh_outputs, layer_norm_output, table_row_tasks


def _tables(bias: torch.Tensor | None, row_task: torch.Tensor | None):
    """(bias, row_task, num_tasks): for a task table [T, N] contiguous, with each row's task (see
    ``torch_ops.bias_rows``); for a bias [N] or none, row_task None and one task."""
    row_task = table_row_tasks(bias, row_task)
    if row_task is None:
        return bias, None, 1
    return bias.contiguous(), row_task.contiguous(), bias.shape[0]  # a slice of the q/k/v tables is not


def _cast(grad: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """``grad`` in the dtype of what it is the gradient of."""
    return grad if grad is None or grad.dtype == dtype else grad.to(dtype)


def _operand(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``tensor`` as an impl takes it: in ``dtype``, contiguous. It usually is already, and these checks cost the
    host a tenth of calling ``.to`` and ``.contiguous`` (~2 µs each, ~30 times per layer and step)."""
    if tensor.dtype == dtype and tensor.is_contiguous():
        return tensor
    return tensor.to(dtype).contiguous()


def _kernels_add_rows(impl, row_task: torch.Tensor | None) -> bool:
    """Whether a task table's rows are added by the Triton pass that reads the GEMM's output (the LayerNorm, the
    q/k/v scatter), which costs no pass of its own, rather than by the GEMM: cuBLAS has no epilogue for a bias per
    row, so it adds them as a C matrix gathered for it. The torch ops gather them into the GEMM's C as well, which
    on CPU costs no more."""
    return row_task is not None and impl is not torch_ops


def _seed_parts(seed: int | torch.Tensor | None) -> tuple[torch.Tensor | None, int | None]:
    """(tensor, int): a dropout seed as a function keeps it for its backward, which draws the mask again from it. A
    seed tensor goes through ``save_for_backward``, so a seed changed in place before the backward raises there
    (autograd's version check) rather than drawing another mask; an int seed is kept as it is."""
    return (seed, None) if isinstance(seed, torch.Tensor) else (None, seed)


def _seed(saved: torch.Tensor | None, kept: int | None) -> int | torch.Tensor | None:
    """The seed :func:`_seed_parts` split."""
    return kept if saved is None else saved


def _mark_x_hat(ctx, x_hat: torch.Tensor | None) -> None:
    """x_hat, an output of a LayerNorm's function for what recomputes from it, takes no gradient (and its gradient
    stays None: no zero-filled tensor per backward)."""
    if x_hat is not None:
        ctx.mark_non_differentiable(x_hat)
    ctx.set_materialize_grads(False)


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
            _operand(x, dtype), _operand(weight, dtype), bias,
            activation=activation, dropout_p=dropout_p, seed=seed, row_task=row_task,
            store_preact=activation is not None and needs_grad and not recompute,
        )
        # The bias only to recompute h: the q/k/v bias is a concatenation, not a parameter, and would cost memory.
        seed_tensor, seed = _seed_parts(seed)
        ctx.save_for_backward(weight, preact, bias if recompute else None, row_task, seed_tensor,
                              *(recompute_from or (None,) * 4))
        ctx.impl = impl
        ctx.dtypes = (x.dtype, bias.dtype if bias is not None else None)
        ctx.options = (activation, dropout_p, seed, recompute, num_tasks)
        return fresh_outputs(y)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        weight, preact, bias, row_task, seed_tensor, *source = ctx.saved_tensors
        activation, dropout_p, seed, recompute, num_tasks = ctx.options
        seed = _seed(seed_tensor, seed)
        impl = ctx.impl
        w_c = _operand(weight, dy.dtype)
        if recompute:
            x = _operand(layer_norm_output(*source), dy.dtype)
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

    x_hat is in x's dtype, y in that of x + residual (an fp32 residual stream stays fp32, as in torch) or in
    ``out_dtype`` (a pre-norm layer's y, which only GEMMs read, in their dtype: no pass casts it, none casts its
    gradient); x_hat is not differentiable. It saves x_hat and rstd, what the backward needs, in a form that is
    exact for any gamma: pretrained LayerNorms have gamma entries near 1e-33, where rebuilding
    x_hat = (y - beta) / gamma from the output would be garbage. y is ``layer_norm_output`` of the fp32 x_hat, so
    whoever needs y later rebuilds it from the kept x_hat instead of keeping y.

    ``grad_enabled`` is grad mode where the function is called (inside ``forward`` it is always off). Without it
    (inference) x_hat and rstd are not written, and x_hat is None; with it they are, even where none of the
    function's own inputs needs a gradient (a frozen lower layer): a later function's backward may recompute from
    x_hat (the memory modes' feed-forward and layer input).
    """

    @staticmethod
    def forward(ctx, impl, x, residual, gamma, beta, eps, dropout_p=0.0, seed=None, row_task=None, out_dtype=None,
                grad_enabled=True):
        check_frozen("gamma", gamma)
        beta, row_task, num_tasks = _tables(beta, row_task)
        y, x_hat, rstd = impl.residual_layer_norm_forward(
            x.contiguous(), gamma, beta, eps, residual,
            dropout_p=dropout_p, seed=seed, row_task=row_task, y_dtype=out_dtype,
            store_x_hat=grad_enabled,
        )
        y, x_hat = fresh_outputs(y, x_hat)
        _mark_x_hat(ctx, x_hat)
        seed_tensor, seed = _seed_parts(seed)
        ctx.save_for_backward(x_hat, gamma, rstd, row_task, seed_tensor)
        ctx.impl = impl
        ctx.dtypes = (x.dtype, residual.dtype if residual is not None else None, beta.dtype)
        ctx.options = (dropout_p, seed, num_tasks)
        return y, x_hat

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, _):
        x_hat, gamma, rstd, row_task, seed_tensor = ctx.saved_tensors
        dropout_p, seed, num_tasks = ctx.options
        needs_x, needs_residual, _, needs_beta = ctx.needs_input_grad[1:5]
        x_dtype, residual_dtype, beta_dtype = ctx.dtypes
        # ds, the residual's gradient, and dx in their inputs' dtypes, whatever y's (out_dtype).
        dx, dresidual, dbeta, _ = ctx.impl.residual_layer_norm_backward(
            dy.contiguous(), x_hat, gamma, rstd,
            compute_dx=needs_x or needs_residual, row_task=row_task, ds_dtype=residual_dtype or x_dtype,
            dx_dtype=x_dtype, dropout_p=dropout_p, seed=_seed(seed_tensor, seed), num_tasks=num_tasks,
        )
        dx = _cast(dx, x_dtype) if needs_x else None
        dresidual = _cast(dresidual, residual_dtype) if needs_residual else None
        return None, dx, dresidual, None, _cast(dbeta, beta_dtype) if needs_beta else None, *(None,) * 6


class LinearLayerNormFunction(torch.autograd.Function):
    """(y, x_hat, y_gemm) = LayerNorm(dropout(x @ W^T + b) + residual): a frozen linear layer and the residual
    LayerNorm its output feeds (BERT's attention output and feed-forward output), W and gamma frozen.

    With ``gemm_copy``, where y (the residual stream, fp32 under autocast) is wider than the GEMM dtype, the
    LayerNorm also writes y_gemm, y in the GEMM dtype, for the GEMMs that read y next (the feed-forward's, the next
    layer's q/k/v); else y_gemm is None. Its gradient is added to y's as the backward reads them: the cast of y,
    autograd's sum of y's two gradients and the casts around it are no passes of their own.

    The same as :class:`LinearFunction` then :class:`LayerNormFunction`, and it saves the same (W, x_hat, rstd),
    but one backward serves both: the LayerNorm's backward writes the linear's output gradient dropout(ds) and
    sums its columns while the rows are in registers (``sum_dx``), which is the linear's bias gradient. The
    linear's backward is then a plain GEMM, with no pass over its gradient for the bias. (Where only one of b and
    beta is a task table, their sums differ in kind, and the linear's backward sums b's as usual.) Where both are
    task tables, the Triton LayerNorm adds b's rows as it reads the GEMM's output (``x_table``). ``grad_enabled``:
    as :class:`LayerNormFunction`'s.
    """

    @staticmethod
    def forward(ctx, impl, x, weight, bias, residual, gamma, beta, eps, dropout_p=0.0, seed=None, row_task=None,
                gemm_copy=False, grad_enabled=True):
        check_frozen("weight", weight)
        check_frozen("gamma", gamma)
        dtype = compute_dtype(x)
        bias, bias_rows, bias_tasks = _tables(bias, row_task)
        beta, beta_rows, beta_tasks = _tables(beta, row_task)
        # Two task tables: the LayerNorm kernel adds b's rows to the GEMM's output as it reads it.
        in_layer_norm = _kernels_add_rows(impl, bias_rows) and beta_rows is not None
        h, _ = impl.linear_forward(_operand(x, dtype), _operand(weight, dtype), None if in_layer_norm else bias,
                                   row_task=None if in_layer_norm else bias_rows)
        y_dtype = h.dtype if residual is None else torch.promote_types(h.dtype, residual.dtype)
        y_gemm = torch.empty_like(h) if gemm_copy and y_dtype != h.dtype else None
        y, x_hat, rstd = impl.residual_layer_norm_forward(
            h, gamma, beta, eps, residual,
            dropout_p=dropout_p, seed=seed, row_task=beta_rows, y_gemm=y_gemm,
            store_x_hat=grad_enabled, **({"x_table": bias} if in_layer_norm else {}),
        )
        y, x_hat, y_gemm = fresh_outputs(y, x_hat, y_gemm)
        _mark_x_hat(ctx, x_hat)
        seed_tensor, seed = _seed_parts(seed)
        ctx.save_for_backward(weight, x_hat, gamma, rstd, bias_rows, beta_rows, seed_tensor)
        ctx.impl = impl
        ctx.dtypes = (x.dtype, bias.dtype if bias is not None else None, residual.dtype if residual is not None
                      else None, beta.dtype, y.dtype)
        ctx.options = (dropout_p, seed, bias_tasks, beta_tasks)
        return y, x_hat, y_gemm

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, _, dy_gemm):
        weight, x_hat, gamma, rstd, bias_rows, beta_rows, seed_tensor = ctx.saved_tensors
        dropout_p, seed, bias_tasks, beta_tasks = ctx.options
        seed = _seed(seed_tensor, seed)
        x_dtype, bias_dtype, residual_dtype, beta_dtype, y_dtype = ctx.dtypes
        needs_x, _, needs_bias, needs_residual, _, needs_beta = ctx.needs_input_grad[1:7]
        sum_in_layer_norm = needs_bias and (bias_rows is None) == (beta_rows is None)
        if dy is None:  # only the copy was used
            dy, dy_gemm = dy_gemm.to(y_dtype), None
        dh, dresidual, dbeta, db = ctx.impl.residual_layer_norm_backward(
            dy.contiguous(), x_hat, gamma, rstd,
            dropout_p=dropout_p, seed=seed, row_task=beta_rows, num_tasks=beta_tasks,
            compute_dx=needs_x or needs_bias or needs_residual, sum_dx=sum_in_layer_norm,
            dy_gemm=None if dy_gemm is None else dy_gemm.contiguous(), dx_dtype=x_hat.dtype,  # the GEMM dtype
        )
        dx = None
        if needs_x or (needs_bias and not sum_in_layer_norm):
            dx, db_rows = ctx.impl.linear_backward(
                dh, _operand(weight, dh.dtype), row_task=bias_rows, num_tasks=bias_tasks,
                compute_dx=needs_x, compute_db=needs_bias and not sum_in_layer_norm,
            )
            db = db if sum_in_layer_norm else db_rows
        db = _cast(db, bias_dtype) if needs_bias else None
        dresidual = _cast(dresidual, residual_dtype) if needs_residual else None
        dbeta = _cast(dbeta, beta_dtype) if needs_beta else None
        return None, _cast(dx, x_dtype), None, db, dresidual, None, dbeta, *(None,) * 6


class LinearHeadsFunction(torch.autograd.Function):
    """The rows x @ W^T + b [R, P * H * D] of a frozen projection split into P parts [S, H, L, D], attention's layout
    (BERT's packed q, k, v: P = 3; k, v: P = 2). Real row i sits at slot ``slots[i]`` = s * L + l of the [S, L]
    layout (None: row i at slot i); rows past the real ones (a row bucket) are not read. One pass writes every slot
    of the layout, its row or zeros (``rows_to_heads``; with the Triton kernels a task table's rows are added there).
    b is given part by part (``biases``: P vectors [H * D] or P task tables [T, H * D]), each part's own parameter.

    Saves W only. Its backward gathers the parts' gradients back into rows and sums their columns for the biases in
    one pass (``heads_to_rows``), then runs the dX GEMM plain: no copies into a packed buffer, no gather of the
    real rows, no pass for the bias gradient. Each part's bias gradient comes out contiguous: a slice of one
    [T, P * H * D] gradient would be strided, and autograd would copy it before accumulating it (two per layer
    in a TaskBank).
    """

    @staticmethod
    def forward(ctx, impl, x, weight, row_task, slots, layout, heads, *biases):
        check_frozen("weight", weight)
        dtype = compute_dtype(x)
        bias, row_task, num_tasks = _tables(torch.cat(biases, dim=-1), row_task)
        sequences, length = layout
        in_scatter = slots is not None and _kernels_add_rows(impl, row_task)  # the scatter adds the table's rows
        rows, _ = impl.linear_forward(_operand(x, dtype), _operand(weight, dtype), None if in_scatter else bias,
                                      row_task=None if in_scatter else row_task)
        if slots is None:
            real = rows[: sequences * length]
        else:
            real = impl.rows_to_heads(rows, slots, sequences * length, table=bias if in_scatter else None,
                                      row_task=row_task if in_scatter else None)
        ctx.save_for_backward(weight, slots, row_task)
        ctx.impl = impl
        ctx.dtypes = (x.dtype, [b.dtype for b in biases])
        ctx.num_rows, ctx.num_tasks = x.shape[0], num_tasks
        parts, width = len(biases), real.shape[1]
        return real.view(sequences, length, parts, heads, width // (parts * heads)).permute(2, 0, 3, 1, 4).unbind(0)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        weight, slots, row_task = ctx.saved_tensors
        needs_x, needs_biases = ctx.needs_input_grad[1], ctx.needs_input_grad[7:]
        g, db = ctx.impl.heads_to_rows(grads, slots, ctx.num_rows, compute_db=any(needs_biases), row_task=row_task,
                                       num_tasks=ctx.num_tasks)
        dx = None
        if needs_x:
            dx, _ = ctx.impl.linear_backward(g, _operand(weight, g.dtype), compute_db=False)
        x_dtype, bias_dtypes = ctx.dtypes
        part_dbs = db.unbind(0) if db is not None else [None] * len(needs_biases)  # one op, not P selects
        dbiases = [_cast(part_db, dtype) if needs else None
                   for part_db, needs, dtype in zip(part_dbs, needs_biases, bias_dtypes)]
        return None, _cast(dx, x_dtype), None, None, None, None, None, *dbiases


def host_seed(p: float) -> int | None:
    """The seed of a dropout mask drawn by torch ops (None without dropout): an int from torch's CPU generator,
    reproducible under torch.manual_seed, with no device sync."""
    return int(torch.randint(2**31 - 1, (1,)).item()) if p > 0.0 else None


class Ops:
    """The fused functions on one implementation, with keyword arguments; see :func:`functions`."""

    def __init__(self, impl):
        self.impl = impl

    @property
    def is_torch(self) -> bool:
        """Whether plain torch ops run (the CPU path), rather than the Triton kernels."""
        return self.impl is torch_ops

    def dropout_seed(self, p: float, device: torch.device) -> int | torch.Tensor | None:
        """The seed of a dropout mask these ops draw (None without dropout), reproducible under torch.manual_seed:
        for the Triton kernels a [1] int64 tensor drawn on ``device``, which they read from memory (a CUDA graph
        replaying the step draws a new one each time: ``graphs``); for the torch ops an int from torch's CPU
        generator, with no device sync."""
        if p == 0.0:
            return None
        if not self.is_torch:
            return torch.randint(2**31 - 1, (1,), device=device)
        check_not_capturing("the torch backend's dropout (its seeds are host integers)")
        return host_seed(p)

    def linear(self, x, weight, bias, activation=None, dropout_p=0.0, seed=None, recompute_from=None,
               row_task=None) -> torch.Tensor:
        """:class:`LinearFunction`."""
        return LinearFunction.apply(self.impl, x, weight, bias, activation, dropout_p, seed, recompute_from, row_task)

    def layer_norm(self, x, residual, gamma, beta, eps, dropout_p=0.0, seed=None, row_task=None, out_dtype=None):
        """:class:`LayerNormFunction`: (y, x_hat), x_hat None under grad mode off (no_grad, inference_mode)."""
        return LayerNormFunction.apply(self.impl, x, residual, gamma, beta, eps, dropout_p, seed, row_task,
                                       out_dtype, torch.is_grad_enabled())

    def linear_heads(self, x, weight, biases, tokens, heads: int, row_task=None):
        """:class:`LinearHeadsFunction` on the attention layout of ``tokens`` (an ``unpadding.Tokens``), a part per
        bias of ``biases``: P tensors [S, H, L, D]."""
        layout = (tokens.num_sequences, tokens.max_len)
        return LinearHeadsFunction.apply(self.impl, x, weight, row_task, tokens.slots, layout, heads, *biases)

    def linear_layer_norm(self, x, weight, bias, residual, gamma, beta, eps, dropout_p=0.0, seed=None,
                          row_task=None, gemm_copy=False):
        """:class:`LinearLayerNormFunction`: (y, x_hat, y_gemm), x_hat as :meth:`layer_norm`'s."""
        return LinearLayerNormFunction.apply(self.impl, x, weight, bias, residual, gamma, beta, eps, dropout_p, seed,
                                             row_task, gemm_copy, torch.is_grad_enabled())


TORCH = Ops(torch_ops)


def functions(backend: str, x: torch.Tensor) -> Ops:
    """The fused functions of the backend that runs on x: the Triton kernels or torch ops (see
    ``backend.uses_triton``)."""
    return Ops(triton_kernels()) if uses_triton(backend, x) else TORCH
