"""The torch implementation: the Triton kernels' host functions (``bitfit_fast_kernels``) with the same
signatures, in plain torch ops. ``functions`` runs either behind one set of autograd functions; this one runs on
CPU and is the kernels' test oracle.

They compute what BitFit needs and nothing more: no weight or gamma gradient, no stored dropout mask of a
linear layer or LayerNorm (it is drawn again from its seed in the backward).
"""

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The GEMM dtype: autocast's when it is on (as F.linear would), else the input's."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


_LAYER_NORM_IN_FP32_UNDER_AUTOCAST: dict[str, bool] = {}


@torch.compiler.assume_constant_result  # dynamo takes the answer as a constant rather than tracing the probe
def _autocast_runs_layer_norm_in_fp32(device_type: str) -> bool:
    """Whether autocast on ``device_type`` runs layer_norm in fp32 (CUDA's policy) or leaves it in its input's dtype
    (CPU's), probed once on a low-precision input. Cached in a dict, not functools.cache: dynamo traces through a
    cache's wrapper (with a warning) and would ignore the constant mark."""
    if device_type not in _LAYER_NORM_IN_FP32_UNDER_AUTOCAST:
        dtype = torch.get_autocast_dtype(device_type)
        with torch.autocast(device_type, dtype=dtype):
            probe = F.layer_norm(torch.zeros(1, 1, dtype=dtype, device=device_type), (1,))
        _LAYER_NORM_IN_FP32_UNDER_AUTOCAST[device_type] = probe.dtype == torch.float32
    return _LAYER_NORM_IN_FP32_UNDER_AUTOCAST[device_type]


def layer_norm_output_dtype(device_type: str, input_dtype: torch.dtype) -> torch.dtype:
    """The dtype torch's LayerNorm returns for an input of ``input_dtype`` under the autocast active now: what a
    drop-in module returns."""
    if torch.is_autocast_enabled(device_type) and _autocast_runs_layer_norm_in_fp32(device_type):
        return torch.float32
    return input_dtype


def wide(t: torch.Tensor) -> torch.Tensor:
    """``t`` in fp32, or as it is where it is wider (a model cast to fp64): the precision of sums and statistics.
    A dtype comparison, not ``torch.promote_types``: that one is a dispatched operation, host time on every call."""
    return t if t.dtype == torch.float64 else t.float()


def task_sums(grad: torch.Tensor, row_task: torch.Tensor, num_tasks: int) -> torch.Tensor:
    """Column sums of ``grad`` [M, N] per task, [num_tasks, N] in fp32 (:func:`wide`), deterministic: index_add_,
    which adds in row order on CPU (the torch ops' device); on CUDA, where index_add_ adds with atomics in no fixed
    order, one GEMM with the rows' one-hot task matrix (T·M·N; the Triton kernels sum per task in the pass that
    writes the gradient instead, ``bitfit_fast_kernels.task_tables``)."""
    grad = wide(grad)
    if grad.is_cuda:
        return one_hot_task_sums(grad, row_task, num_tasks)
    return grad.new_zeros(num_tasks, grad.shape[-1]).index_add_(0, row_task, grad)


def one_hot_task_sums(grad: torch.Tensor, row_task: torch.Tensor, num_tasks: int) -> torch.Tensor:
    """:func:`task_sums` by one GEMM with the rows' one-hot task matrix, in which an inf or NaN stays in its own
    task's sum (as NaN): the product with the matrix's zeros would make it NaN in every task's (inf · 0), and an
    overflow of one task (fp16 under a loss scaler) would skip every task's step. A second GEMM, of the rows'
    non-finite flags, finds the sums that hold one."""
    of_task = F.one_hot(row_task, num_tasks).to(grad.dtype).t()  # [T, M]
    finite = grad.isfinite()
    sums = of_task @ grad.where(finite, 0.0)
    return sums.masked_fill_(of_task @ finite.logical_not_().to(grad.dtype) > 0, math.nan)


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
    """x @ W^T + b, with b per row for a task table (see :func:`bias_rows`). Allocated in x's leading shape and
    computed through an [M, N] view of it (F.linear of a 3-D x returns a view of its [M, N] result): a custom
    autograd Function's output that is a view may not be changed in place, and models change their projections so
    (DeBERTa: ``pos_query_layer /= scale``)."""
    out = x.new_empty(*x.shape[:-1], weight.shape[0])
    rows, x2d = out.view(-1, weight.shape[0]), x.reshape(-1, x.shape[-1])
    if bias is None:
        torch.mm(x2d, weight.t(), out=rows)
    elif bias.dim() == 1:
        torch.addmm(bias, x2d, weight.t(), out=rows)
    else:  # the rows' biases gathered into the output: the GEMM adds into them, with no copy of them first
        torch.index_select(bias, 0, table_row_tasks(bias, row_task), out=rows).addmm_(x2d, weight.t())
    return out


# Masks are drawn as 16-bit lanes of 64-bit words: a quarter of a 64-bit draw per element, where ``torch.rand``
# spends a 32-bit draw per element and ``bernoulli_`` (dropout's CPU draw) is slower still.
_LANES = 2**16


def _quantized(p: float) -> int:
    """How many of the 2^16 lane values drop: p rounded to a multiple of 2^-16 (flash-attention rounds to 2^-8)."""
    return min(round(p * _LANES), _LANES - 1)


def _random_words(count: int, seed: int, device) -> torch.Tensor:
    """``count`` uniformly random int64 words from a generator seeded with ``seed``."""
    if count == 0:  # numpy's empty array has stride 0, which no view to int16 takes
        return torch.empty(0, dtype=torch.int64, device=device)
    if torch.device(device).type == "cpu":
        # numpy's PCG64 draws them ~1.6x as fast as torch's CPU generator (a Mersenne twister; 1.2 vs 2.0 ms for a
        # BERT-base layer's 1.1 M mask elements on 2 cores): torch's draws took ~3% of a real-length step.
        generator = np.random.Generator(np.random.PCG64(seed % 2**64))  # torch takes negative seeds, numpy not
        words = generator.integers(0, 2**64, size=count, dtype=np.uint64)
        return torch.from_numpy(words.view(np.int64))
    generator = torch.Generator(device=device).manual_seed(seed)
    # random_(from=int64 min, to=None) covers all 64 bits; random_() leaves the sign bit, a lane's top bit, 0.
    return torch.empty(count, dtype=torch.int64, device=device).random_(-(2**63), None, generator=generator)


def dropout_keep(shape, p: float, seed: int, device) -> torch.Tensor:
    """A boolean keep mask of ``shape`` from a generator seeded with ``seed``, so that the backward can draw the
    forward's mask again: each element drops with probability ``_quantized(p) / 2^16``, within 2^-17 of p."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    numel = math.prod(shape)
    words = _random_words(-(-numel // 4), seed, device)
    return words.view(torch.int16)[:numel].view(shape) >= _quantized(p) - _LANES // 2


def keep_scale(p: float) -> float:
    """1 / (1 - p') for the quantized drop probability p' of :func:`dropout_keep`: kept values' expectation is
    exact."""
    return _LANES / (_LANES - _quantized(p))


def dropout_scale(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """keep / (1 - p) for x's shape, in x's dtype (the scale rounded to it), keep from :func:`dropout_keep`."""
    return dropout_keep(x.shape, p, seed, x.device).to(x.dtype).mul_(keep_scale(p))


def apply_dropout(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """x with dropout whose mask is drawn from ``seed`` (see :func:`dropout_keep`), so the backward can redraw it;
    kept values are scaled in one rounding (a scale rounded to bf16 first would be 0.16% low at p = 0.1)."""
    return (x * keep_scale(p)).mul_(dropout_keep(x.shape, p, seed, x.device))  # one allocation, not where's two


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


# pytorch#180642, measured under torch 2.11 and not under 2.13 (2.12 unmeasured, so treated as 2.11).
_COMPILE_MISROUTES_IN_PLACE_OUTPUTS = torch.torch_version.TorchVersion(torch.__version__) < (2, 13)


def fresh_outputs(*outputs):
    """An autograd.Function's outputs as its forward returns them. Under torch 2.11's torch.compile a returned
    tensor that was written in place in the forward (an ``out=``/``index_copy_``/``mul_``, a kernel's output buffer)
    or returned by a no-op ``.to`` gets the gradient of another output, or none (pytorch#180642): there, while
    compiling, each is returned as a copy, a tensor of its own (not a view: a model may write into a layer's output
    in place, as XLM does, which autograd refuses on a function's view output). Elsewhere they are returned as
    they are."""
    if _COMPILE_MISROUTES_IN_PLACE_OUTPUTS and torch.compiler.is_compiling():
        outputs = tuple(t if t is None else t.clone() for t in outputs)
    return outputs if len(outputs) > 1 else outputs[0]


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


def linear_forward(x, weight, bias=None, *, activation=None, dropout_p=0.0, seed=None, store_preact=False,
                   row_task=None):
    """``bitfit_fast_kernels.linear_forward`` in torch ops: (y, h) with y = dropout(activation(h)),
    h = x @ W^T + b (returned with ``store_preact``, else None). The bias is rounded to x's dtype first, as
    F.linear under autocast does."""
    h = linear(x, weight, bias.to(x.dtype) if bias is not None else None, row_task)
    if activation == "gelu" and not store_preact:  # h is ours and not kept: in place saves a pass and a buffer
        y = torch.ops.aten.gelu_(h)
    else:
        y = activation_forward(activation, h)
    if dropout_p > 0.0:
        y = apply_dropout(y, dropout_p, seed)
    return y, (h if store_preact else None)


def linear_backward(dy, weight, preact=None, *, activation=None, dropout_p=0.0, seed=None, compute_dx=True,
                    compute_db=True, row_task=None, num_tasks=1):
    """``bitfit_fast_kernels.linear_backward`` in torch ops: (dx or None, db in fp32 or None; per task with
    ``row_task``)."""
    g = dy
    if dropout_p > 0.0:
        g = apply_dropout(g, dropout_p, seed)
    if activation is not None:
        g = activation_backward(activation, g, preact)
    dx = g @ weight if compute_dx else None
    return dx, (column_sums(g, row_task, num_tasks) if compute_db else None)


def column_sums(grad: torch.Tensor, row_task: torch.Tensor | None = None, num_tasks: int = 1) -> torch.Tensor:
    """The gradient of a bias from the (..., N) gradient of what it was added to, in fp32 (:func:`wide`): the
    column sums [N]; with ``row_task``, each task's sums over its rows [num_tasks, N] (:func:`task_sums`)."""
    grad = grad.reshape(-1, grad.shape[-1])
    if row_task is None:
        return grad.sum(dim=0, dtype=torch.float64 if grad.dtype == torch.float64 else torch.float32)  # wide()'s
    return task_sums(grad, row_task, num_tasks)


def layer_norm_output(x_hat: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor,
                      row_task: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """y = gamma * x_hat + beta in fp32 (:func:`wide`), in ``dtype`` (x_hat's by default; beta per row for a task
    table, see :func:`bias_rows`). The forward computes y with this from its fp32 x_hat and saves x_hat in the GEMM
    dtype, so a backward that needs y rebuilds it from the saved x_hat (stable for any gamma, unlike x_hat from y):
    bit for bit in fp32, within x_hat's rounding in half precision."""
    if beta.dim() == 1:
        return torch.addcmul(wide(beta), wide(x_hat), wide(gamma)).to(dtype or x_hat.dtype)
    y = torch.empty(x_hat.shape, dtype=wide(beta).dtype, device=x_hat.device)  # not a view: see :func:`linear`
    torch.index_select(wide(beta.detach()), 0, table_row_tasks(beta, row_task), out=y.view(-1, y.shape[-1]))
    return y.addcmul_(wide(x_hat), wide(gamma)).to(dtype or x_hat.dtype)


def residual_layer_norm_forward(x, gamma, beta, eps, residual=None, *, dropout_p=0.0, seed=None,
                                store_x_hat=True, row_task=None, x_table=None, y_gemm=None, y_dtype=None):
    """``bitfit_fast_kernels.residual_layer_norm_forward`` in torch ops: (y, x_hat, rstd), x_hat and rstd
    None without ``store_x_hat``. Normalises in fp32 (:func:`wide`); y is :func:`layer_norm_output` of the fp32
    x_hat, in the dtype of x + residual (fp32 for a half-precision x with an fp32 residual, as torch promotes the
    sum) or ``y_dtype``, copied into ``y_gemm`` (if given) in its dtype."""
    s = wide(x)
    if x_table is not None:
        s = s + wide(bias_rows(x_table, row_task)).view(s.shape)
    if dropout_p > 0.0:
        s = apply_dropout(s, dropout_p, seed)
    if residual is not None:
        s = s + wide(residual)
    with torch.autocast(x.device.type, enabled=False):
        x_hat, _, rstd = torch.native_layer_norm(s, (s.shape[-1],), None, None, eps)
    y = layer_norm_output(x_hat, gamma, beta, row_task, y_dtype or (x.dtype if residual is None else
                                                                     torch.promote_types(x.dtype, residual.dtype)))
    if y_gemm is not None:
        y_gemm.copy_(y)
    x_hat = x_hat.to(x.dtype)
    return (y, x_hat, rstd.view(-1)) if store_x_hat else (y, None, None)


def residual_layer_norm_backward(dy, x_hat, gamma, rstd, *, dropout_p=0.0, seed=None, compute_dx=True,
                                 sum_dx=False, row_task=None, num_tasks=1, dy_gemm=None, dx_dtype=None,
                                 ds_dtype=None):
    """``bitfit_fast_kernels.residual_layer_norm_backward`` in torch ops: (dx, dresidual, dbeta, dx_sum), the
    sums in fp32 (dx_sum, dx's column sums, with ``sum_dx`` only), dy plus ``dy_gemm`` (if given) in fp32, ds in
    ``ds_dtype`` and dx in ``dx_dtype`` (each fp32 by default)."""
    if dy_gemm is not None:
        dy = wide(dy) + wide(dy_gemm)
    ds = dx = None
    if compute_dx:
        # torch's fused LayerNorm backward on x_hat (mean 0, rstd 1) gives the gradient up to the factor rstd.
        rows = rstd.view(*x_hat.shape[:-1], 1)
        ds, _, _ = torch.ops.aten.native_layer_norm_backward(
            wide(dy), wide(x_hat), (x_hat.shape[-1],), torch.zeros_like(rows), torch.ones_like(rows),
            wide(gamma), None, [True, False, False],
        )
        ds = ds.mul_(rows)
        dx = apply_dropout(ds, dropout_p, seed) if dropout_p > 0.0 else ds
    dx_sum = column_sums(dx, row_task, num_tasks) if sum_dx else None
    if dx is not None and dx_dtype is not None:
        dx = dx.to(dx_dtype)
    if ds is not None and ds_dtype is not None:
        ds = ds.to(ds_dtype)
    return dx, ds, column_sums(dy, row_task, num_tasks), dx_sum


def packed_heads(grads) -> torch.Tensor:
    """The parts' gradients [S, H, L, D] (P of them; None for zeros) interleaved as rows [S, L, P * H * D], the
    layout their projection wrote. Gradients that already sit that way (``unpadding._GroupViews`` writes them
    so) are used as they are: no copy."""
    first = next(grad for grad in grads if grad is not None)
    sequences, heads, length, dim = first.shape
    width = len(grads) * heads * dim
    step = heads * dim * first.element_size()  # from one part to the next within a row, in bytes
    if all(grad is not None and grad.shape == first.shape and grad.dtype == first.dtype
           and grad.stride() == (length * width, dim, width, 1)
           and grad.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
           and grad.data_ptr() == first.data_ptr() + part * step for part, grad in enumerate(grads)):
        return first.as_strided((sequences, length, width), (length * width, width, 1))
    packed = first.new_empty(sequences, length, len(grads), heads, dim)
    for part, grad in enumerate(grads):
        if grad is None:
            packed[:, :, part].zero_()
        else:
            packed[:, :, part].copy_(grad.transpose(1, 2))
    return packed.view(sequences, length, width)


def rows_to_heads(rows, slots, num_slots, *, table=None, row_task=None):
    """``bitfit_fast_kernels.rows_to_heads`` in torch ops: [num_slots, W], row i (plus its task's row of ``table``)
    at slot ``slots[i]``, zeros elsewhere."""
    real = rows[: slots.shape[0]]
    if table is not None:
        real = real + bias_rows(table, row_task[: slots.shape[0]]).to(real.dtype)
    return real.new_zeros(num_slots, rows.shape[1]).index_copy_(0, slots, real)


def heads_to_rows(grads, slots, num_rows, *, compute_db=True, row_task=None, num_tasks=1):
    """``bitfit_fast_kernels.heads_to_rows`` in torch ops: (g [num_rows, P * H * D], db in fp32 part by part,
    [P, H * D] or [P, num_tasks, H * D], or None)."""
    g = packed_heads(grads).flatten(0, 1)
    if slots is not None:
        g = g.index_select(0, slots)
    if num_rows > g.shape[0]:
        g = torch.cat([g, g.new_zeros(num_rows - g.shape[0], g.shape[1])])
    if not compute_db:
        return g, None
    db = column_sums(g, row_task, num_tasks)
    return g, db.unflatten(-1, (len(grads), -1)).movedim(-2, 0).contiguous()


def _at_least_fp32(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Half-precision tensors in fp32, others as they are: attention computes in fp32 and rounds its output once,
    as scaled_dot_product_attention's CPU math path does (bf16 scores would err by 2^-9 of every logit). Call it
    with autocast off, which would cast the fp32 GEMMs down again."""
    return [wide(t) for t in tensors]


def _attention_probabilities(q, k, mask, scale, logsumexp=None):
    """softmax(q k^T * scale + mask) for q, k in at least fp32, and its row logsumexp."""
    scores = torch.matmul(q, k.transpose(-2, -1)).mul_(scale)
    if mask is not None:
        scores.add_(mask)
    if logsumexp is None:
        logsumexp = torch.logsumexp(scores, dim=-1, keepdim=True)
    return scores.sub_(logsumexp).exp_(), logsumexp


def dropout_attention(q, k, v, mask, dropout_p: float, seed: int, scale: float) -> torch.Tensor:
    """dropout(softmax(q k^T * scale + mask)) v in autograd's ops, with the mask of :func:`dropout_keep`: what
    scaled_dot_product_attention's CPU math path computes with dropout (in fp32, the output rounded once), with
    its mask drawn in a third of ``bernoulli_``'s time (SDPA's draw took ~7% of a BERT-base step on real lengths).
    Autograd keeps the probabilities and a boolean mask; SDPA's path kept the probabilities and a float mask."""
    dtype = v.dtype
    with torch.autocast(q.device.type, enabled=False):
        q, k, v = _at_least_fp32(q, k, v)
        scores = torch.matmul(q, k.transpose(-2, -1)).mul_(scale)
        if mask is not None:
            scores = scores.add_(mask)
        probs = torch.softmax(scores, dim=-1)
        kept = torch.where(dropout_keep(probs.shape, dropout_p, seed, probs.device), probs, 0.0)
        # The scale on the output [.., L, D], half the probabilities' size, before its one rounding.
        return torch.matmul(kept, v).mul_(keep_scale(dropout_p)).to(dtype)


class DropoutAttentionFunction(torch.autograd.Function):
    """dropout(softmax(q k^T * scale + mask)) v, as flash attention does it in the backward: it saves q, k, v and
    the row logsumexp, recomputes the probabilities and redraws the dropout mask from its seed.

    For the torch backend's lean memory mode: on CPU, scaled_dot_product_attention with dropout keeps the whole
    probability matrix and mask for every layer, which is faster but far larger. On CUDA, SDPA's own kernels are
    already lean.
    """

    @staticmethod
    def forward(ctx, q, k, v, mask, dropout_p, seed, scale):
        with torch.autocast(q.device.type, enabled=False):
            q32, k32, v32 = _at_least_fp32(q, k, v)
            probs, logsumexp = _attention_probabilities(q32, k32, mask, scale)
            out = torch.matmul(apply_dropout(probs, dropout_p, seed), v32).to(v.dtype)
        ctx.save_for_backward(q, k, v, mask, logsumexp)
        ctx.options = (dropout_p, seed, scale)
        return fresh_outputs(out)

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        q, k, v, mask, logsumexp = ctx.saved_tensors
        dropout_p, seed, scale = ctx.options
        with torch.autocast(q.device.type, enabled=False):
            q32, k32, v32, dout = _at_least_fp32(q, k, v, dout)
            probs, _ = _attention_probabilities(q32, k32, mask, scale, logsumexp)
            keep = dropout_scale(probs, dropout_p, seed)  # drawn once for both uses
            dv = torch.matmul((probs * keep).transpose(-2, -1), dout)
            dprobs = torch.matmul(dout, v32.transpose(-2, -1)).mul_(keep)
            del keep
            dscores = probs.mul_(dprobs - (dprobs * probs).sum(dim=-1, keepdim=True)).mul_(scale)
            dq = torch.matmul(dscores, k32)
            dk = torch.matmul(dscores.transpose(-2, -1), q32)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None
