"""Residual + LayerNorm with a frozen gamma, and its BitFit backward.

Forward:   s = dropout(x) + residual;  x_hat = (s - mean(s)) * rstd;  y = gamma * x_hat + beta
Backward:  ds = rstd * (g - x_hat * mean(g * x_hat) - mean(g)),  g = gamma * dy;  d(beta) = sum_rows(dy)
           dx = dropout(ds), and optionally sum_rows(dx): the bias gradient of the linear layer whose output x is
           (BERT's attention output and FFN output), summed here from the rows as they are written, so that
           layer's backward is one plain GEMM with no pass over its gradient.

The forward saves x_hat (in x's dtype) and rstd: exactly what the backward needs, and stable for any gamma.
Pretrained LayerNorms have gamma entries down to 1e-33, where rebuilding x_hat = (y - beta) / gamma from the
output would be garbage. y is computed from the fp32 x_hat in registers, in the dtype of x + residual (an fp32
residual stream under autocast stays fp32, as torch's); a later consumer that needs y rebuilds it from the kept
x_hat, exactly where that is fp32 and within its rounding where it is half precision. gamma is frozen: only
d(beta) and the input gradients are computed.

A program holds BLOCK_M whole rows (``TILE_ELEMENTS``), indexed with int64 offsets: M * N may exceed 2**31. The
dropout mask is ``dropout.keep_mask``'s, drawn again in the backward. Bytes per row element: forward reads x
(+ residual), writes y and x_hat (+ y in the GEMMs' dtype: ``y_gemm``); backward reads dy (+ that copy's gradient)
and x_hat, writes ds (+ dx, with dropout or in the feeding GEMM's dtype). Under autocast the residual stream is
fp32 and the GEMMs half precision: the copy and the extra gradient replace a cast of y in the forward, and
autograd's sum of y's two gradients and two casts in the backward: ~24 bytes an element less traffic (28 with
dropout, whose dx was an fp32 tensor of its own) and 4 launches fewer. d(beta) and
sum_rows(dx) are reduced in registers over a persistent loop of row blocks, one fp32 partial per program each; for
task tables, a program walks a chunk of the rows sorted by task and writes one partial per task it meets
(``task_tables``).
"""

import torch
import triton
import triton.language as tl

from . import task_tables
from .dropout import keep_mask, load_seed
from .utils import (
    INTERPRETER,
    SUPPORTED_DTYPES,
    KernelInputError,
    cdiv,
    check_bias,
    check_compute_tensor,
    check_dropout,
    check_row_task,
    check_rows,
    check_same_device,
    check_vector,
    launches_on_input_device,
    next_power_of_2,
    reduction_programs,
    seed_pointer,
)

# A whole row lives in registers; 64K fp32 values is far beyond any encoder's hidden size.
MAX_FEATURES = 65536


# The number of rows changes every batch: specialising on its divisibility by 16 would compile again for it.
@triton.jit(do_not_specialize=["M"])
def _residual_layer_norm_fwd_kernel(
    # Pointers
    x_ptr,  # [M, N] sublayer output
    res_ptr,  # [M, N] residual (read only with HAS_RESIDUAL)
    gamma_ptr,  # [N] frozen scale, read as fp32
    beta_ptr,  # [N] shift, read as fp32; [T, N] with BETA_PER_ROW
    x_table_ptr,  # [T, N] the bias table of the linear layer whose output x is, read as fp32 (with X_TABLE)
    task_ptr,  # [M] integer: the row of beta (and of x's table) each row adds (read only with BETA_PER_ROW:
    #            per-example task biases)
    y_ptr,  # [M, N] output, in x's dtype or the residual's where it is wider
    y_gemm_ptr,  # [M, N] y again in the dtype of the GEMMs that read it (written only with STORE_Y_GEMM)
    x_hat_ptr,  # [M, N] normalised input, x's dtype (written only with STORE_X_HAT)
    rstd_ptr,  # [M] fp32 (written only with STORE_X_HAT)
    # Sizes and scalars
    M,
    N,
    eps,
    p,
    scale,
    seed_ptr,  # [1] int64 dropout seed (read only with HAS_DROPOUT), see dropout.py
    # Features
    HAS_RESIDUAL: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    BETA_PER_ROW: tl.constexpr,
    X_TABLE: tl.constexpr,  # x is a GEMM's output without its task biases: add them first (needs BETA_PER_ROW)
    STORE_X_HAT: tl.constexpr,  # the backward will run
    STORE_Y_GEMM: tl.constexpr,  # an fp32 residual stream's y also feeds half-precision GEMMs
    # Tile: BLOCK_M whole rows
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    mask = row_ok[:, None] & col_ok[None, :]
    offsets = rows[:, None] * N + cols[None, :]
    if BETA_PER_ROW:
        table_offsets = tl.load(task_ptr + rows, mask=row_ok, other=0).to(tl.int64)[:, None] * N + cols[None, :]

    s = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if X_TABLE:
        s += tl.load(x_table_ptr + table_offsets, mask=mask, other=0.0).to(tl.float32)
    if HAS_DROPOUT:
        s = tl.where(keep_mask(load_seed(seed_ptr), rows, 0, N, p, BLOCK_M, BLOCK_N), s * scale, 0.0)
    if HAS_RESIDUAL:
        s += tl.load(res_ptr + offsets, mask=mask, other=0.0).to(tl.float32)

    mean = tl.sum(s, axis=1) / N
    centered = tl.where(mask, s - mean[:, None], 0.0)
    # The mean is off by its sum's rounding, which x_hat = centered / std magnifies in a row of large mean and small
    # spread (the eps test's rows, mean 3 and spread 1e-3, failed on an H200). The centred values' own mean, summed
    # in registers, takes it out.
    centered = tl.where(mask, centered - (tl.sum(centered, axis=1) / N)[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=1) / N + eps)
    # y from the fp32 x_hat, as torch's LayerNorm; the x_hat stored for the backward is rounded to x's dtype.
    x_hat = centered * rstd[:, None]
    gamma = tl.load(gamma_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    if BETA_PER_ROW:
        beta = tl.load(beta_ptr + table_offsets, mask=mask, other=0.0).to(tl.float32)
    else:
        beta = tl.load(beta_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    y = x_hat * gamma[None, :] + beta
    tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=mask)
    if STORE_Y_GEMM:  # 2 bytes more written per element, where a cast of y would read 4 and write 2
        tl.store(y_gemm_ptr + offsets, y.to(y_gemm_ptr.dtype.element_ty), mask=mask)
    if STORE_X_HAT:
        tl.store(x_hat_ptr + offsets, x_hat.to(x_hat_ptr.dtype.element_ty), mask=mask)
        tl.store(rstd_ptr + rows, rstd, mask=row_ok)


@triton.jit
def _layer_norm_grad_rows(dy_ptr, dy_gemm_ptr, x_hat_ptr, rstd_ptr, ds_ptr, dx_ptr, rows, row_ok, cols, col_ok, gamma,
                          N, p, scale, seed, HAS_DY_GEMM: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                          COMPUTE_DX: tl.constexpr, STORE_DX: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr):
    """(dy, dx) of rows ``rows`` [BLOCK_M] (int64), fp32, zero where masked, dy the sum of y's and y_gemm's
    gradients with HAS_DY_GEMM; with COMPUTE_DX, ds and dx are written (dx with STORE_DX: where dropout or its
    dtype makes it differ from ds), else dx is dy and unused."""
    mask = row_ok[:, None] & col_ok[None, :]
    offsets = rows[:, None] * N + cols[None, :]
    dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if HAS_DY_GEMM:  # the two uses of y summed as they are read, in fp32: autograd's sum, without its pass
        dy += tl.load(dy_gemm_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    dx = dy
    if COMPUTE_DX:
        x_hat = tl.load(x_hat_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
        g = dy * gamma[None, :]
        c1 = tl.sum(x_hat * g, axis=1) / N
        c2 = tl.sum(g, axis=1) / N
        ds = (g - x_hat * c1[:, None] - c2[:, None]) * rstd[:, None]
        tl.store(ds_ptr + offsets, ds.to(ds_ptr.dtype.element_ty), mask=mask)
        dx = ds
        if HAS_DROPOUT:
            dx = tl.where(keep_mask(seed, rows, 0, N, p, BLOCK_M, BLOCK_N), ds * scale, 0.0)
        if STORE_DX:
            tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    return dy, dx


@triton.jit(do_not_specialize=["M", "T", "chunk_rows"])
def _residual_layer_norm_bwd_kernel(
    # Pointers
    dy_ptr,  # [M, N] gradient of the output
    dy_gemm_ptr,  # [M, N] gradient of the output's GEMM-dtype copy (read only with HAS_DY_GEMM)
    x_hat_ptr,  # [M, N] normalised input saved by the forward
    gamma_ptr,  # [N] frozen scale
    rstd_ptr,  # [M] fp32
    ds_ptr,  # [M, N] gradient of s, which is the residual's gradient (written with COMPUTE_DX)
    dx_ptr,  # [M, N] gradient of x: ds through the dropout mask, in the feeding GEMM's dtype (written with STORE_DX)
    dbeta_partial_ptr,  # [num_programs, N] fp32 per-program sums of dy; with PER_TASK [num_programs + T - 1, N] pieces
    dx_partial_ptr,  # the same for dx (written with SUM_DX)
    order_ptr,  # [M] int64: the rows sorted by task (read only with PER_TASK, as the next one)
    sorted_task_ptr,  # [M] int64: each sorted row's task number in the batch
    # Sizes and scalars
    M,
    N,
    T,  # with PER_TASK, the bound on the batch's task numbers (task_tables.TaskOrder)
    chunk_rows,  # sorted rows per program with PER_TASK
    p,
    scale,
    seed_ptr,  # [1] int64 dropout seed (read only with HAS_DROPOUT), see dropout.py
    # Features
    HAS_DY_GEMM: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    COMPUTE_DX: tl.constexpr,
    STORE_DX: tl.constexpr,  # needs COMPUTE_DX: dx differs from ds (dropout, or a half-precision dx of an fp32 ds)
    SUM_DX: tl.constexpr,  # needs COMPUTE_DX
    PER_TASK: tl.constexpr,  # beta is a task table: the sums per task (task_tables)
    # Tile: BLOCK_M whole rows
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # The column sums accumulate in registers and are written once per program (per piece with PER_TASK).
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    gamma = tl.load(gamma_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    seed = load_seed(seed_ptr) if HAS_DROPOUT else 0
    dbeta = tl.zeros((BLOCK_N,), dtype=tl.float32)
    dx_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if PER_TASK:
        # Program c walks chunk c of the rows sorted by task, a block of rows at a time; each task a block reaches
        # closes the running pieces (task_tables).
        lo, hi, piece_task = task_tables.chunk_bounds(pid, chunk_rows, M, sorted_task_ptr, T)
        for start in range(lo, hi, BLOCK_M):
            rows, ok, tasks = task_tables.sorted_block(order_ptr, sorted_task_ptr, start, hi, BLOCK_M)
            dy, dx = _layer_norm_grad_rows(dy_ptr, dy_gemm_ptr, x_hat_ptr, rstd_ptr, ds_ptr, dx_ptr, rows, ok, cols,
                                           col_ok, gamma, N, p, scale, seed, HAS_DY_GEMM, HAS_DROPOUT,
                                           COMPUTE_DX, STORE_DX, BLOCK_M, BLOCK_N)
            block_last = task_tables.block_last_task(sorted_task_ptr, start, hi, T, BLOCK_M)
            dbeta = task_tables.add_block(dbeta_partial_ptr, pid, piece_task, block_last, dbeta, dy, tasks, cols,
                                          col_ok, N, T)
            if SUM_DX:
                dx_sum = task_tables.add_block(dx_partial_ptr, pid, piece_task, block_last, dx_sum, dx, tasks, cols,
                                               col_ok, N, T)
            piece_task = block_last
        task_tables.store_piece(dbeta_partial_ptr, pid, piece_task, dbeta, cols, col_ok, N, T)
        if SUM_DX:
            task_tables.store_piece(dx_partial_ptr, pid, piece_task, dx_sum, cols, col_ok, N, T)
    else:
        # A persistent loop over row blocks pid, pid + P, ...
        for start in range(pid * BLOCK_M, M, tl.num_programs(0) * BLOCK_M):
            rows = tl.cast(start, tl.int64) + tl.arange(0, BLOCK_M)  # the loop variable is a plain int when interpreted
            dy, dx = _layer_norm_grad_rows(dy_ptr, dy_gemm_ptr, x_hat_ptr, rstd_ptr, ds_ptr, dx_ptr, rows, rows < M,
                                           cols, col_ok, gamma, N, p, scale, seed, HAS_DY_GEMM,
                                           HAS_DROPOUT, COMPUTE_DX, STORE_DX, BLOCK_M, BLOCK_N)
            dbeta += tl.sum(dy, axis=0)  # masked elements are 0
            if SUM_DX:
                dx_sum += tl.sum(dx, axis=0)
        tl.store(dbeta_partial_ptr + pid * N + cols, dbeta, mask=col_ok)
        if SUM_DX:
            tl.store(dx_partial_ptr + pid * N + cols, dx_sum, mask=col_ok)


def _check_like(name: str, tensor: torch.Tensor | None, like_name: str, like: torch.Tensor) -> None:
    """Raise unless ``tensor`` (if given) is a compute tensor of the shape of ``like`` on its device."""
    if tensor is None:
        return
    check_compute_tensor(name, tensor)
    if tensor.shape != like.shape:
        raise KernelInputError(f"{name} has shape {tuple(tensor.shape)} but {like_name} has {tuple(like.shape)}")
    if tensor.device != like.device:
        raise KernelInputError(f"{name} is on {tensor.device} but {like_name} is on {like.device}")


def _check_dtype(name: str, dtype: torch.dtype | None) -> None:
    """Raise unless ``dtype`` (if given) is one the kernels write."""
    if dtype is not None and dtype not in SUPPORTED_DTYPES:
        raise KernelInputError(f"{name} is {dtype}; supported are float32, float16 and bfloat16")


def _check_features(N: int) -> int:
    """BLOCK_N for rows of N features: at least 4, the lanes of one Philox draw (see ``dropout.keep_mask``)."""
    if N > MAX_FEATURES:
        raise KernelInputError(f"LayerNorm over {N} features exceeds the kernel's limit of {MAX_FEATURES}")
    return max(4, next_power_of_2(N))


# A program's tile is BLOCK_M whole rows, about TILE_ELEMENTS values, ELEMENTS_PER_THREAD of them per thread. Timed
# on an H200 at BERT-base's shapes with dropout (bitfit_fast_benches.sweep, benches/results/gpu/sweep.json): 2 rows
# on 4 warps, forward 0.069 ms and backward 0.082 ms, where one row per program on 4 warps with a Philox call per
# element took 0.121 and 0.129 ms (profile-86e182c.txt); tiles of 4096 values and more ran the backward 2.5-8x
# slower. The interpreter takes 4 rows whatever the width, so the tests cross row blocks.
TILE_ELEMENTS = 2048
ELEMENTS_PER_THREAD = 16


def _row_tile(N: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) of the kernels for rows of N features."""
    block_n = _check_features(N)
    block_m = 4 if INTERPRETER else max(1, TILE_ELEMENTS // block_n)
    warps = min(max(block_m * block_n // (32 * ELEMENTS_PER_THREAD), 1), 16)
    return block_m, block_n, warps


@launches_on_input_device
def residual_layer_norm_forward(
    x: torch.Tensor,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    *,
    dropout_p: float = 0.0,
    seed: int | torch.Tensor | None = None,
    store_x_hat: bool = True,
    row_task: torch.Tensor | None = None,
    x_table: torch.Tensor | None = None,
    y_gemm: torch.Tensor | None = None,
    y_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """LayerNorm(dropout(x) + residual) over the last dimension, y in the dtype of x + residual (an fp32 residual
    stream stays fp32 for a half-precision x, as torch promotes the sum). With ``row_task`` ([M] integers),
    beta is a table [T, N] and row i adds its row ``row_task[i]`` (per-example task biases); so does a table
    ``x_table`` [T, N] to x first, in fp32 (the bias of the linear layer whose output x is: cuBLAS has no epilogue
    for a bias per row, and here it costs no pass of its own). ``y_gemm``, a tensor shaped as x, receives y too,
    rounded to its dtype: the operand of the GEMMs that read an fp32 residual stream under autocast, without a pass
    to cast y. ``y_dtype`` gives y another dtype (a pre-norm layer's y, which only GEMMs read, in theirs).

    Returns (y, x_hat, rstd): with ``store_x_hat`` (when a backward will run) the normalised input in x's
    dtype (y = gamma * x_hat + beta, computed from x_hat before that rounding), and the fp32 per-row rstd; else
    (y, None, None).
    """
    check_compute_tensor("x", x)
    N = x.shape[-1]
    M = check_rows("x", x)
    _check_like("residual", residual, "x", x)
    check_vector("gamma", gamma, N, x.device)
    if beta is None:
        raise KernelInputError("beta is None: pass zeros for a LayerNorm without a bias")
    check_bias("beta", beta, N, M, row_task, x.device)
    if x_table is not None:
        if row_task is None:
            raise KernelInputError("x_table needs each row's task: pass row_task (and beta as a table)")
        check_bias("x_table", x_table, N, M, row_task, x.device)
    check_dropout(dropout_p, seed)
    _check_like("y_gemm", y_gemm, "x", x)
    _check_dtype("y_dtype", y_dtype)
    block_m, block_n, warps = _row_tile(N)

    y_dtype = y_dtype or (x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype))
    y = torch.empty_like(x, dtype=y_dtype)
    x_hat = torch.empty_like(x) if store_x_hat else None
    rstd = torch.empty(M, dtype=torch.float32, device=x.device) if store_x_hat else None
    _residual_layer_norm_fwd_kernel[(cdiv(M, block_m),)](
        x, residual if residual is not None else x, gamma, beta, x_table if x_table is not None else beta,
        row_task if row_task is not None else gamma, y, y_gemm if y_gemm is not None else y,
        x_hat if x_hat is not None else y, rstd if rstd is not None else gamma,
        M, N, eps, dropout_p, 1.0 / (1.0 - dropout_p), seed_pointer(seed, dropout_p, x.device, gamma),
        HAS_RESIDUAL=residual is not None,
        HAS_DROPOUT=dropout_p > 0.0,
        BETA_PER_ROW=row_task is not None,
        X_TABLE=x_table is not None,
        STORE_X_HAT=store_x_hat,
        STORE_Y_GEMM=y_gemm is not None,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        num_warps=warps,
    )
    return y, x_hat, rstd


@launches_on_input_device
def residual_layer_norm_backward(
    dy: torch.Tensor,
    x_hat: torch.Tensor,
    gamma: torch.Tensor,
    rstd: torch.Tensor,
    *,
    dropout_p: float = 0.0,
    seed: int | torch.Tensor | None = None,
    compute_dx: bool = True,
    sum_dx: bool = False,
    row_task: torch.Tensor | None = None,
    num_tasks: int = 1,
    dy_gemm: torch.Tensor | None = None,
    dx_dtype: torch.dtype | None = None,
    ds_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """Gradients of :func:`residual_layer_norm_forward` from its x_hat and rstd; never gamma's.

    Returns (dx, dresidual, dbeta, dx_sum): dresidual is the gradient of s (None without ``compute_dx``); dx
    equals it without dropout, and is then the same tensor unless ``dx_dtype`` differs from ``ds_dtype``; dbeta is
    fp32, [num_tasks, N] per task with the forward's ``row_task`` (each task's sum over its rows, taken in this pass:
    ``task_tables``). With ``sum_dx`` (which needs ``compute_dx``), dx_sum is the fp32 column sums of dx, summed
    before dx is rounded to its dtype (per task with ``row_task``): the bias gradient of the linear layer whose
    output x is; else None.

    ``dy_gemm``, the gradient of the forward's ``y_gemm``, is added to dy as it is read (y's two uses, summed in
    fp32 as autograd would, without its pass). ds comes in ``ds_dtype`` (default dy's: the residual's where y is
    narrower), dx in ``dx_dtype`` (default ds's: the feeding GEMM's operand where the stream is wider).
    """
    check_compute_tensor("dy", dy)
    check_compute_tensor("x_hat", x_hat)
    if x_hat.shape != dy.shape:
        raise KernelInputError(f"x_hat has shape {tuple(x_hat.shape)} but dy has {tuple(dy.shape)}")
    N = dy.shape[-1]
    M = check_rows("dy", dy)
    check_same_device(dy.device, x_hat=x_hat, rstd=rstd)
    check_row_task(row_task, M, dy.device)
    check_vector("gamma", gamma, N, dy.device)
    if rstd.dtype != torch.float32 or tuple(rstd.shape) != (M,) or not rstd.is_contiguous():
        raise KernelInputError(f"rstd must be the contiguous fp32 ({M},) tensor returned by the forward")
    check_dropout(dropout_p, seed)
    if sum_dx and not compute_dx:
        raise KernelInputError("sum_dx sums dx: it needs compute_dx=True")
    _check_like("dy_gemm", dy_gemm, "dy", dy)
    _check_dtype("ds_dtype", ds_dtype)
    _check_dtype("dx_dtype", dx_dtype)
    ds_dtype = ds_dtype or dy.dtype
    dx_dtype = dx_dtype or ds_dtype
    block_m, block_n, warps = _row_tile(N)

    programs = reduction_programs(cdiv(M, block_m), dy.device)
    reduction = task_tables.bias_reduction(row_task, num_tasks, M, programs)
    ds = torch.empty_like(dy, dtype=ds_dtype) if compute_dx else None
    store_dx = compute_dx and (dropout_p > 0.0 or dx_dtype != ds_dtype)
    dx = torch.empty_like(dy, dtype=dx_dtype) if store_dx else ds
    # beta's partials and dx's (with sum_dx) in one buffer: one reduction of both after the pass.
    partials = reduction.partials(N, dy.device, tables=2 if sum_dx else 1)
    order, sorted_numbers, numbers, chunk_rows = reduction.walk(rstd)
    _residual_layer_norm_bwd_kernel[(reduction.programs,)](
        dy, dy_gemm if dy_gemm is not None else dy, x_hat, gamma, rstd,
        ds if ds is not None else dy, dx if dx is not None else dy, partials[0], partials[-1],
        order, sorted_numbers, M, N, numbers, chunk_rows,
        dropout_p, 1.0 / (1.0 - dropout_p), seed_pointer(seed, dropout_p, dy.device, gamma),
        HAS_DY_GEMM=dy_gemm is not None,
        HAS_DROPOUT=dropout_p > 0.0,
        COMPUTE_DX=compute_dx,
        STORE_DX=store_dx,
        SUM_DX=sum_dx,
        PER_TASK=reduction.per_task,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        num_warps=warps,
    )
    # One deterministic reduction of the per-program partial sums, both tables at once: no float atomics, same bits
    # every run.
    sums = reduction.total(partials)
    return dx, ds, sums[0], (sums[1] if sum_dx else None)
