"""The torch backend: the same autograd functions as ``triton_ops``, in plain torch ops.

They compute what BitFit needs and nothing more: no weight or gamma gradient, no saved layer input, no stored
dropout mask (it is drawn again from its seed in the backward).
"""

import torch
import torch.nn.functional as F


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The GEMM dtype: autocast's when it is on (as F.linear would), else the input's."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def bias_grad(grad: torch.Tensor, bias: torch.Tensor, row_task: torch.Tensor | None = None) -> torch.Tensor:
    """The gradient of a bias from the (..., N) gradient of what it was added to, accumulated in fp32, in the
    bias's dtype: the column sum for a bias [N]; for a task table [T, N] (see :func:`bias_rows`) each task's sum
    over its rows, one GEMM with the one-hot task matrix (deterministic, no atomics)."""
    grad = grad.reshape(-1, grad.shape[-1])
    if bias.dim() == 1:
        return grad.sum(dim=0, dtype=torch.float32).to(bias.dtype)
    return task_sums(grad, row_task, bias.shape[0]).to(bias.dtype)


def task_sums(grad: torch.Tensor, row_task: torch.Tensor, num_tasks: int) -> torch.Tensor:
    """Column sums of ``grad`` [M, N] per task, [num_tasks, N] in fp32, deterministic. On CUDA one GEMM with the
    rows' one-hot task matrix (index_add_ would add with atomics, in no fixed order); elsewhere index_add_, which
    adds in row order there and costs M·N instead of T·M·N. The kernels' host functions do the same
    (``bitfit_fast_kernels.utils.task_sums``, which cannot import this package)."""
    if grad.is_cuda:
        return F.one_hot(row_task, num_tasks).to(torch.float32).t() @ grad.float()
    sums = torch.zeros(num_tasks, grad.shape[-1], dtype=torch.float32, device=grad.device)
    return sums.index_add_(0, row_task, grad.float())


def table_row_tasks(bias: torch.Tensor | None, row_task: torch.Tensor | None) -> torch.Tensor | None:
    """``row_task`` [M], each row's task, where ``bias`` is a task table [T, N] (per-example task biases, see
    ``bitfit_fast.task_bank``); None for a bias [N] or none. A table without the rows' tasks is an error."""
    if bias is None or bias.dim() == 1:
        return None
    if row_task is None:
        raise ValueError(f"a task bias table of shape {tuple(bias.shape)} needs each row's task: run the model "
                         "through bitfit_fast.TaskBank")
    return row_task


def bias_rows(bias: torch.Tensor | None, row_task: torch.Tensor | None) -> torch.Tensor | None:
    """What a bias adds to (M, N) rows: a bias [N] as it is (broadcast); a task table [T, N] gathered by each row's
    task into [M, N]."""
    row_task = table_row_tasks(bias, row_task)
    return bias if row_task is None else bias.index_select(0, row_task)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           row_task: torch.Tensor | None = None) -> torch.Tensor:
    """x @ W^T + b, with b per row for a task table (see :func:`bias_rows`)."""
    if bias is None or bias.dim() == 1:
        return F.linear(x, weight, bias)
    rows = bias_rows(bias, row_task)
    return torch.addmm(rows, x.reshape(-1, x.shape[-1]), weight.t()).view(*x.shape[:-1], -1)


def dropout_scale(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """keep / (1 - p) for x's shape and dtype, keep drawn from a generator seeded with ``seed``: the backward
    draws the forward's mask again."""
    generator = torch.Generator(device=x.device).manual_seed(seed)
    scale = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return scale.ge_(p).mul_(1.0 / (1.0 - p))


def apply_dropout(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """x with dropout whose mask is drawn from ``seed`` (see :func:`dropout_scale`), so the backward can redraw it."""
    return x * dropout_scale(x, p, seed)


class ZeroGradient(torch.autograd.Function):
    """Identity whose gradient is exactly zero, for a parameter whose true gradient is identically zero.

    The attention key bias is one: it adds q·b_k to every score of a query row and softmax ignores a per-row
    constant. Its computed gradient is rounding noise, which Adam-style optimizers would normalise into
    lr-sized random steps; with this it gets its true gradient, zero.
    """

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return torch.zeros_like(grad)


def check_frozen(name: str, tensor: torch.Tensor) -> None:
    """Raise if ``tensor`` (the weight or gamma, called ``name``) requires grad: the BitFit backward gives it none."""
    if tensor.requires_grad:
        raise RuntimeError(f"the BitFit backward computes no {name} gradient; freeze the {name} first")


def activation_forward(activation: str | None, h: torch.Tensor) -> torch.Tensor:
    """activation(h): None, "gelu" (exact), or "geglu": gelu(first half of h) * second half (a GLU such as
    ModernBERT's, whose up-projection stacks its input and gate halves), half as wide as h."""
    if activation == "gelu":
        return F.gelu(h)
    if activation == "geglu":
        value, gate = h.chunk(2, dim=-1)
        return F.gelu(value) * gate
    return h


def activation_backward(activation: str, g: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """The gradient of h from the gradient g of :func:`activation_forward` (activation, h)."""
    if activation == "gelu":
        return torch.ops.aten.gelu_backward(g, h)
    value, gate = h.chunk(2, dim=-1)
    return torch.cat([torch.ops.aten.gelu_backward(g * gate, value), g * F.gelu(value)], dim=-1)


class LinearFunction(torch.autograd.Function):
    """y = dropout(activation(x @ W^T + b)) with W frozen; activation: see :func:`activation_forward`.

    Saves W (a parameter: free) and, with an activation, the pre-activation h. With ``recompute_from``, the
    (x_hat, gamma, beta, row_task) of the LayerNorm whose output x is, it saves nothing new (that LayerNorm keeps
    x_hat anyway) and recomputes h from x = :func:`layer_norm_output` (x_hat, gamma, beta, row_task) in the
    backward. ``row_task`` [M]: each row's task, for a bias that is a task table [T, N] (see :func:`bias_rows`).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, activation=None, dropout_p=0.0, seed=None, recompute_from=None, row_task=None):
        check_frozen("weight", weight)
        dtype = compute_dtype(x)
        h = linear(x.to(dtype), weight.to(dtype), bias.to(dtype) if bias is not None else None, row_task)
        y = activation_forward(activation, h)
        if dropout_p > 0.0:
            y = apply_dropout(y, dropout_p, seed)
        recompute = activation is not None and recompute_from is not None
        ctx.save_for_backward(weight, h if activation and not recompute else None, row_task,
                              *(recompute_from or (None,) * 4))
        ctx.x_dtype = x.dtype
        ctx.bias_like = bias
        ctx.options = (activation, dropout_p, seed, recompute)
        return y

    @staticmethod
    def backward(ctx, dy):
        weight, h, row_task, *source = ctx.saved_tensors
        activation, dropout_p, seed, recompute = ctx.options
        w_c = weight.to(dy.dtype)
        g = dy.contiguous()
        if dropout_p > 0.0:
            g = apply_dropout(g, dropout_p, seed)
        if activation is not None:
            if recompute:
                bias = ctx.bias_like.to(dy.dtype) if ctx.bias_like is not None else None
                h = linear(layer_norm_output(*source).to(dy.dtype), w_c, bias, row_task)
            g = activation_backward(activation, g, h)
        dx = (g @ w_c).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
        db = bias_grad(g, ctx.bias_like, row_task) if ctx.needs_input_grad[2] else None
        return dx, None, db, None, None, None, None, None


def layer_norm_output(x_hat: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor,
                      row_task: torch.Tensor | None = None) -> torch.Tensor:
    """y = gamma * x_hat + beta in fp32, in x_hat's dtype (beta per row for a task table, see :func:`bias_rows`).
    The forward computes y with exactly this from the x_hat it saves, so a backward that needs y rebuilds it bit
    for bit (stable for any gamma, unlike x_hat from y)."""
    beta = bias_rows(beta, row_task).view(*x_hat.shape[:-1], -1) if beta.dim() == 2 else beta
    return torch.addcmul(beta.float(), x_hat.float(), gamma.float()).to(x_hat.dtype)


class LayerNormFunction(torch.autograd.Function):
    """LayerNorm(dropout(x) + residual) over the last dimension with gamma frozen: d(x), d(residual), d(beta).

    Normalises in fp32 and returns (y, x_hat) in x's dtype; x_hat is not differentiable. It saves x_hat and
    rstd, what the backward needs, in a form that is exact for any gamma (pretrained LayerNorms have gamma
    entries near 1e-33: dividing by gamma to rebuild x_hat from y would be garbage there). y is computed from the
    saved x_hat by :func:`layer_norm_output`, so whoever needs y later rebuilds it from x_hat instead of keeping it.
    """

    @staticmethod
    def forward(ctx, x, residual, gamma, beta, eps, dropout_p=0.0, seed=None, row_task=None):
        check_frozen("gamma", gamma)
        s = x.float()
        if dropout_p > 0.0:
            s = apply_dropout(s, dropout_p, seed)
        if residual is not None:
            s = s + residual.float()
        with torch.autocast(x.device.type, enabled=False):
            x_hat, _, rstd = torch.native_layer_norm(s, (s.shape[-1],), None, None, eps)
        x_hat = x_hat.to(x.dtype)
        ctx.mark_non_differentiable(x_hat)
        ctx.save_for_backward(x_hat, gamma, rstd, row_task)
        ctx.dtypes = (x.dtype, residual.dtype if residual is not None else None)
        ctx.beta_like = beta
        ctx.options = (dropout_p, seed)
        return layer_norm_output(x_hat, gamma, beta, row_task), x_hat

    @staticmethod
    def backward(ctx, dy, _):
        x_hat, gamma, rstd, row_task = ctx.saved_tensors
        dropout_p, seed = ctx.options
        x_dtype, residual_dtype = ctx.dtypes
        needs_x, needs_residual, _, needs_beta = ctx.needs_input_grad[:4]
        dx = dresidual = dbeta = None
        if needs_x or needs_residual:
            # torch's fused LayerNorm backward on x_hat (mean 0, rstd 1) gives the gradient up to the factor rstd.
            ds, _, _ = torch.ops.aten.native_layer_norm_backward(
                dy.float(), x_hat.float(), (x_hat.shape[-1],), torch.zeros_like(rstd), torch.ones_like(rstd),
                gamma.float(), None, [True, False, False],
            )
            ds = ds.mul_(rstd)
            if needs_residual:
                dresidual = ds.to(residual_dtype)
            if needs_x:
                if dropout_p > 0.0:
                    ds = apply_dropout(ds, dropout_p, seed)
                dx = ds.to(x_dtype)
        if needs_beta:
            dbeta = bias_grad(dy, ctx.beta_like, row_task)
        return dx, dresidual, None, dbeta, None, None, None, None


def _attention_probabilities(q, k, mask, scale, logsumexp=None):
    """softmax(q k^T * scale + mask) in at least fp32, and its row logsumexp. The dropout mask is drawn in this
    dtype in the forward and the backward alike (torch.rand's stream depends on the dtype)."""
    scores = torch.matmul(q, k.transpose(-2, -1)).to(torch.promote_types(q.dtype, torch.float32)).mul_(scale)
    if mask is not None:
        scores.add_(mask)
    if logsumexp is None:
        logsumexp = torch.logsumexp(scores, dim=-1, keepdim=True)
    return scores.sub_(logsumexp).exp_(), logsumexp


class DropoutAttentionFunction(torch.autograd.Function):
    """dropout(softmax(q k^T * scale + mask)) v, as flash attention does it in the backward: it saves q, k, v and
    the row logsumexp, recomputes the probabilities and redraws the dropout mask from its seed.

    For the torch backend's lean memory mode: on CPU, scaled_dot_product_attention with dropout keeps the whole
    probability matrix and mask for every layer, which is faster but far larger. On CUDA, SDPA's own kernels are
    already lean.
    """

    @staticmethod
    def forward(ctx, q, k, v, mask, dropout_p, seed, scale):
        probs, logsumexp = _attention_probabilities(q, k, mask, scale)
        out = torch.matmul(apply_dropout(probs, dropout_p, seed).to(v.dtype), v)
        ctx.save_for_backward(q, k, v, mask, logsumexp)
        ctx.options = (dropout_p, seed, scale)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, mask, logsumexp = ctx.saved_tensors
        dropout_p, seed, scale = ctx.options
        probs, _ = _attention_probabilities(q, k, mask, scale, logsumexp)
        keep = dropout_scale(probs, dropout_p, seed)  # drawn once for both uses
        dv = torch.matmul((probs * keep).to(v.dtype).transpose(-2, -1), dout)
        dprobs = torch.matmul(dout, v.transpose(-2, -1)).to(probs.dtype).mul_(keep)
        del keep
        dscores = probs.mul_(dprobs - (dprobs * probs).sum(dim=-1, keepdim=True)).mul_(scale).to(q.dtype)
        dq = torch.matmul(dscores, k)
        dk = torch.matmul(dscores.transpose(-2, -1), q)
        return dq, dk, dv, None, None, None, None
