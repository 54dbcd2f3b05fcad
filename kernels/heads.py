"""A projection's rows into attention's layout and back: the scatter of the rows into padded sequences, and the
gradient's gather back into rows with the projection's bias gradient.

Forward: the Q/K/V GEMM's output rows [M, P * H * D] (P parts: q, k, v) are laid out per sequence and split into P
tensors [S, H, L, D], attention's layout (views of one [S * L, P * H * D] tensor); row i of the GEMM sits at slot
``slots[i]`` = s * L + l of the [S, L] layout (padded sequences), or at slot i when the rows already are that layout
(then there is nothing to move). ``rows_to_heads`` writes each slot once, its row or zeros, and adds each row's
task bias on the way for a task table: cuBLAS has no epilogue for it, and here it costs no pass of its own (against
a zero fill and torch's index_copy: two writes of the layout; for a table also a gather of its rows into the GEMM's C
matrix, a copy of it and the GEMM's read).
Backward, ONE pass per part, no prologue and no bias-gradient pass after it:
    g[i, part * H * D + h * D + d] = dpart[s, h, l, d]      for the R rows of g (zeros after the M real ones)
    db partials                    = per-program fp32 column sums of g, then one reduction (deterministic)
It replaces three passes over the [M, 3 * H * D] gradient of the unfused path (pack the heads into rows, gather the
real rows, sum the columns for the bias): for BERT-base at 256 x 128 tokens in bf16 that gradient is 151 MB, so
about 0.09 ms of an H100's HBM time per layer. The dX GEMM that follows is a plain GEMM (cuBLAS).
"""

import torch
import triton
import triton.language as tl

from . import task_tables
from .utils import (
    INTERPRETER,
    SUPPORTED_DTYPES,
    KernelInputError,
    LastResults,
    cdiv,
    check_bias,
    check_device,
    check_row_task,
    launches_on_input_device,
    reduction_programs,
)

# A 16 x 128 tile on 2 warps: best of seven on an H200 (bitfit_fast_benches.sweep: BERT-base's q/k/v gradients at
# batch 256, 0.089 ms, against 0.199 ms on 4 warps).
_BLOCK_M, _BLOCK_N, _WARPS = (16, 32, 1) if INTERPRETER else (16, 128, 2)


@triton.jit
def _gather_rows(src_ptr, slot_ptr, g_ptr, rows, real, written, cols, col_ok, head_offsets, L, row_stride, col_offset,
                 stride_s, stride_l, HAS_SLOTS: tl.constexpr):
    """Rows ``rows`` [BLOCK_M] (int64) of g from the part's [S, H, L, D] gradient, written where ``written`` (zeros
    where not ``real``); returned as loaded."""
    if HAS_SLOTS:
        slot = tl.load(slot_ptr + rows, mask=real, other=0)
    else:
        slot = rows
    src = src_ptr + (slot // L) * stride_s + (slot % L) * stride_l
    g = tl.load(src[:, None] + head_offsets[None, :], mask=real[:, None] & col_ok[None, :], other=0.0)
    tl.store(g_ptr + rows[:, None] * row_stride + col_offset + cols[None, :], g,
             mask=written[:, None] & col_ok[None, :])
    return g


@triton.jit(do_not_specialize=["M", "R", "L", "T", "chunk_rows"])  # they change with each batch: no recompiles
def _heads_to_rows_kernel(
    # Pointers
    src_ptr,  # [S, H, L, D] one part's gradient, any strides (coalesced when D's is 1, as SDPA's on a GPU)
    slot_ptr,  # [M] int64: each real row's slot s * L + l (read only with HAS_SLOTS)
    g_ptr,  # [R, row_stride] rows of the GEMM's output gradient; this part's columns start at col_offset
    db_partial_ptr,  # this part's fp32 column sums of g (written with COMPUTE_DB): [num_programs(0), N]; with
    #                  PER_TASK the pieces [num_programs(0) + T - 1, N] of task_tables. Each part has its own, so
    #                  that its bias gradient comes out contiguous (a part's own parameter in BERT's q/k/v)
    order_ptr,  # [R] int64: the rows sorted by task (read only with PER_TASK, as the next one)
    sorted_task_ptr,  # [R] int64: each sorted row's task number in the batch
    # Sizes and strides
    M,  # real rows
    R,  # rows of g: M real ones, then zeros (a row bucket)
    L,  # the attention layout's sequence length
    N,  # this part's columns, H * D
    D,  # head size
    T,  # with PER_TASK, the bound on the batch's task numbers (task_tables.TaskOrder)
    chunk_rows,  # sorted rows per program with PER_TASK
    row_stride,  # columns of g, P * H * D
    col_offset,  # this part's first column, part * H * D
    stride_s,
    stride_h,
    stride_l,
    stride_d,
    # Features
    HAS_SLOTS: tl.constexpr,
    COMPUTE_DB: tl.constexpr,
    PER_TASK: tl.constexpr,  # the bias is a task table: sum g per task (needs COMPUTE_DB)
    # Tiles
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # Each gradient element is read once, written once, and summed into registers until one store per program (per
    # piece with PER_TASK).
    pid_m = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    head_offsets = (cols // D) * stride_h + (cols % D) * stride_d
    db = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if PER_TASK:
        # Program (c, j) walks chunk c of the rows sorted by task, in row blocks; each task met adds its rows of
        # the block to the running piece (task_tables' step 1).
        lo, hi, piece_task = task_tables.chunk_bounds(pid_m, chunk_rows, R, sorted_task_ptr, T)
        for start in range(lo, hi, BLOCK_M):
            rows, ok, tasks = task_tables.sorted_block(order_ptr, sorted_task_ptr, start, hi, BLOCK_M)
            g = _gather_rows(src_ptr, slot_ptr, g_ptr, rows, ok & (rows < M), ok, cols, col_ok, head_offsets, L,
                             row_stride, col_offset, stride_s, stride_l, HAS_SLOTS).to(tl.float32)
            block_last = task_tables.block_last_task(sorted_task_ptr, start, hi, T, BLOCK_M)
            db = task_tables.add_block(db_partial_ptr, pid_m, piece_task, block_last, db, g, tasks, cols, col_ok,
                                       N, T)
            piece_task = block_last
        task_tables.store_piece(db_partial_ptr, pid_m, piece_task, db, cols, col_ok, N, T)
    else:
        # Program (i, j) walks row blocks i, i + P, ... of column block j.
        for start in range(pid_m * BLOCK_M, R, tl.num_programs(0) * BLOCK_M):
            rows = tl.cast(start, tl.int64) + tl.arange(0, BLOCK_M)  # the loop variable is a plain int when interpreted
            g = _gather_rows(src_ptr, slot_ptr, g_ptr, rows, rows < M, rows < R, cols, col_ok, head_offsets, L,
                             row_stride, col_offset, stride_s, stride_l, HAS_SLOTS)
            if COMPUTE_DB:
                db += tl.sum(g.to(tl.float32), axis=0)
        if COMPUTE_DB:
            tl.store(db_partial_ptr + pid_m * N + cols, db, mask=col_ok)


@triton.jit(do_not_specialize=["num_slots"])  # it changes with every batch's lengths: no recompiles
def _rows_to_heads_kernel(
    # Pointers
    rows_ptr,  # [R, W] the projection's rows, row-major
    slot_row_ptr,  # [num_slots] int64: the row at each slot, -1 where none (padding)
    b_ptr,  # [T, W] task table, read as fp32 (read only with HAS_TABLE)
    task_ptr,  # [R] integer: the row of b each row adds (read only with HAS_TABLE)
    out_ptr,  # [num_slots, W] the layout, rows' dtype
    # Sizes
    num_slots,
    W,
    # Features
    HAS_TABLE: tl.constexpr,
    # Tile
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # Each output element is written once (its row, plus its task's bias, or zero), each real row read once.
    slots = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    slot_ok = slots < num_slots
    col_ok = cols < W
    row = tl.load(slot_row_ptr + slots, mask=slot_ok, other=-1)
    real = (row >= 0)[:, None] & col_ok[None, :]
    x = tl.load(rows_ptr + row[:, None] * W + cols[None, :], mask=real, other=0.0)
    if HAS_TABLE:
        x = tl.where(real, x.to(tl.float32) + task_tables.table_rows(b_ptr, task_ptr, row, row >= 0, cols, real, W),
                     0.0)
    tl.store(out_ptr + slots[:, None] * W + cols[None, :], x.to(out_ptr.dtype.element_ty),
             mask=slot_ok[:, None] & col_ok[None, :])


def _slot_rows(slots: torch.Tensor, num_slots: int) -> torch.Tensor:
    """The row at each of ``num_slots`` slots, -1 where none: the inverse of ``slots``. One forward scatters every
    layer's q/k/v with the same slots, so the last one is kept (``utils.LastResults``)."""
    return _LAST_SLOT_ROWS.get(slots, num_slots, lambda: torch.full(
        (num_slots,), -1, dtype=torch.int64, device=slots.device).index_copy_(
            0, slots, torch.arange(slots.shape[0], device=slots.device)))


_LAST_SLOT_ROWS = LastResults()


@launches_on_input_device
def rows_to_heads(
    rows: torch.Tensor,
    slots: torch.Tensor,
    num_slots: int,
    *,
    table: torch.Tensor | None = None,
    row_task: torch.Tensor | None = None,
) -> torch.Tensor:
    """The layout [num_slots, W] of a projection's rows [R, W]: row i (of the first M = len(slots)) at slot
    ``slots[i]`` (int64, distinct), zeros at every other slot. With ``table`` [T, W] and ``row_task`` ([R]
    integers), row i adds the table's row ``row_task[i]`` (read as fp32, rounded once with the sum)."""
    check_device("rows", rows)
    if rows.dtype not in SUPPORTED_DTYPES or rows.dim() != 2 or not rows.is_contiguous():
        raise KernelInputError(f"rows must be a contiguous 2-D float32, float16 or bfloat16 tensor, got "
                               f"{rows.dtype} of shape {tuple(rows.shape)}")
    _check_slots(slots, rows.device)
    if slots.shape[0] > min(rows.shape[0], num_slots):
        raise KernelInputError(f"{slots.shape[0]} slots, one per real row, need as many rows and room in the layout; "
                               f"got {rows.shape[0]} rows and a layout of {num_slots} slots")
    if (table is None) != (row_task is None):
        raise KernelInputError("a task table needs each row's task and a row's task its table: give both or neither")
    check_bias("table", table, rows.shape[1], rows.shape[0], row_task, rows.device)
    out = torch.empty((num_slots, rows.shape[1]), dtype=rows.dtype, device=rows.device)
    _rows_to_heads_kernel[(cdiv(num_slots, _BLOCK_M), cdiv(rows.shape[1], _BLOCK_N))](
        rows, _slot_rows(slots, num_slots), table if table is not None else rows,
        row_task if row_task is not None else rows, out, num_slots, rows.shape[1],
        HAS_TABLE=table is not None,
        BLOCK_M=_BLOCK_M,
        BLOCK_N=_BLOCK_N,
        num_warps=_WARPS,
    )
    return out


def _check_slots(slots: torch.Tensor, device: torch.device) -> None:
    if slots.dtype != torch.int64 or slots.dim() != 1 or not slots.is_contiguous() or slots.device != device:
        raise KernelInputError(f"slots must be a contiguous 1-D int64 tensor on {device}")


@launches_on_input_device
def heads_to_rows(
    grads: tuple[torch.Tensor | None, ...],
    slots: torch.Tensor | None,
    num_rows: int,
    *,
    compute_db: bool = True,
    row_task: torch.Tensor | None = None,
    num_tasks: int = 1,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The gradient of rows [num_rows, P * H * D] split into P parts [S, H, L, D] at ``slots``, from the parts'
    gradients ``grads`` (None for a part without one: zeros). ``slots`` [M] (int64): each real row's place s * L + l
    in the [S, L] layout, or None when row i sits at slot i; rows M..num_rows-1 get zeros.

    Returns (g in the gradients' dtype, db): db is the fp32 column sums of g, the bias gradient of the projection
    whose rows these were, part by part: [P, H * D], or [P, num_tasks, H * D] per task with ``row_task`` ([num_rows]
    integers), so that each part's is contiguous; None without ``compute_db``.
    """
    present = [grad for grad in grads if grad is not None]
    if not present:
        raise KernelInputError("heads_to_rows needs at least one part's gradient")
    sequences, heads, length, dim = present[0].shape
    for grad in present:
        check_device("grad", grad)
        if grad.shape != present[0].shape or grad.dtype != present[0].dtype or grad.device != present[0].device:
            raise KernelInputError("every part's gradient must have one [S, H, L, D] shape, dtype and device")
    if present[0].dtype not in SUPPORTED_DTYPES:
        raise KernelInputError(f"the gradients are {present[0].dtype}; supported are float32, float16 and bfloat16")
    if heads * dim == 0:
        raise KernelInputError(f"the gradients have no features (shape {tuple(present[0].shape)})")
    real_rows = slots.shape[0] if slots is not None else sequences * length
    if slots is not None:
        _check_slots(slots, present[0].device)
    if num_rows < real_rows:
        raise KernelInputError(f"num_rows ({num_rows}) is less than the {real_rows} real rows")
    check_row_task(row_task if compute_db else None, num_rows, present[0].device)
    width = heads * dim
    g = torch.empty((num_rows, len(grads) * width), dtype=present[0].dtype, device=present[0].device)
    col_blocks = cdiv(width, _BLOCK_N)
    row_programs = max(1, min(cdiv(num_rows, _BLOCK_M), reduction_programs(num_rows, g.device) // col_blocks))
    reduction = task_tables.bias_reduction(row_task if compute_db else None, num_tasks, num_rows, row_programs)
    db_partial = reduction.partials(width, g.device, tables=len(grads)) if compute_db else None
    # Each part's partials (one op, not P selects); without them the kernels get g for the pointer they do not read.
    part_partials = db_partial.unbind(0) if db_partial is not None else (g,) * len(grads)
    order, sorted_numbers, numbers, chunk_rows = reduction.walk(g)
    for part, (grad, partial) in enumerate(zip(grads, part_partials)):
        if grad is None:
            g[:, part * width:(part + 1) * width].zero_()
            if db_partial is not None:
                partial.zero_()
            continue
        _heads_to_rows_kernel[(reduction.programs, col_blocks)](
            grad, slots if slots is not None else g, g, partial,
            order, sorted_numbers, real_rows, num_rows, length, width, dim, numbers, chunk_rows,
            g.shape[1], part * width,
            *grad.stride(),
            HAS_SLOTS=slots is not None,
            COMPUTE_DB=db_partial is not None,
            PER_TASK=reduction.per_task,
            BLOCK_M=_BLOCK_M,
            BLOCK_N=_BLOCK_N,
            num_warps=_WARPS,
        )
    # One deterministic reduction of the partial sums: no float atomics, same bits every run.
    return g, (reduction.total(db_partial) if db_partial is not None else None)
