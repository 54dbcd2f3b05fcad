"""Per-task column sums: the gradient of a bias that is a task table [T, N] (per-example task biases).

    sums[t, :] = sum of grad[i, :] over the rows i whose task is t            (fp32, [T, N])

Rows are sorted by task once per backward (a stable sort and a search, no host sync; the same rows' order serves
every table of the step). The sorted rows are then cut into chunks of CHUNK_ROWS, whatever the tasks: the work
spreads over the GPU the same way whether a batch holds 64 tasks or one (one program per task would leave a
single-task batch's whole gradient to N / BLOCK_N programs). Two kernels, as in every bias-gradient reduction
here, per-program fp32 partials and then one reduction:

1. Program (c, j) sums column block j of chunk c's rows, one partial per task in the chunk. Tasks are
   contiguous in sorted order, so piece (c, t) gets slot c + t of the partials [chunks + T - 1, N]: along the
   sorted rows both c and t only grow and each new piece grows one of them, so no two pieces share a slot.
2. Program (t, j) adds task t's pieces, slots c + t for the chunks c its rows span, in a fixed order.

One read of the gradient, no float atomics, the same bits every run. It replaces a GEMM with the rows' one-hot
task matrix, T·M·N multiply-adds in fp32 (CUDA cores: without TF32): for 64 tasks at BERT-base's 256 x 128
tokens, FC1's [32768, 3072] gradient is 6.4 G multiply-adds, ~0.2 ms on an H100, against one 201 MB read here,
~0.06 ms (the partials, 191 x 3072 fp32, add 2.4 MB).
"""

import weakref

import torch
import triton
import triton.language as tl

from .utils import INTERPRETER, KernelInputError, check_compute_tensor

# The interpreter's chunk is two row blocks and its reduction reads two pieces at a time, so that small test shapes
# cross chunk, task and piece-block boundaries alike.
_BLOCK_M, _BLOCK_N, _WARPS, _CHUNK_ROWS, _BLOCK_PIECES = (8, 32, 1, 16, 2) if INTERPRETER else (16, 128, 4, 256, 16)


@triton.jit(do_not_specialize=["M"])  # it changes with every batch's lengths: no recompiles
def _task_chunk_sums_kernel(
    # Pointers
    grad_ptr,  # [M, N] the gradient of what the table's rows were added to
    order_ptr,  # [M] int64: the rows sorted by task, stably
    sorted_task_ptr,  # [M] int64: the task of each sorted row
    starts_ptr,  # [T + 1] int64: task t's rows are order[starts[t]:starts[t + 1]]
    partial_ptr,  # [chunks + T - 1, N] fp32 output: piece (chunk c, task t) in row c + t
    # Sizes
    M,
    N,
    T,
    # Tiles
    CHUNK_ROWS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    chunk = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    lo = chunk * CHUNK_ROWS
    hi = tl.minimum(lo + CHUNK_ROWS, M)
    # Rows of a task outside [0, T) are in no task's range of starts: clamped, they are summed nowhere.
    first_task = tl.maximum(tl.load(sorted_task_ptr + lo), 0)
    last_task = tl.minimum(tl.load(sorted_task_ptr + hi - 1), T - 1)
    for task in range(first_task, last_task + 1):
        begin = tl.maximum(tl.load(starts_ptr + task), lo)
        end = tl.minimum(tl.load(starts_ptr + task + 1), hi)
        # A [BLOCK_M, BLOCK_N] accumulator, reduced once at the end: BLOCK_M independent adds in flight per column.
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for start in range(begin, end, BLOCK_M):
            index = start + tl.arange(0, BLOCK_M)
            ok = index < end
            rows = tl.load(order_ptr + index, mask=ok, other=0)
            acc += tl.load(grad_ptr + rows[:, None] * N + cols[None, :], mask=ok[:, None] & col_ok[None, :],
                           other=0.0).to(tl.float32)
        # A task between the chunk's first and last with no rows at all writes zeros that no one reads.
        tl.store(partial_ptr + (chunk + task) * N + cols, tl.sum(acc, axis=0), mask=col_ok)


@triton.jit
def _task_pieces_sum_kernel(
    # Pointers
    partial_ptr,  # [chunks + T - 1, N] fp32: the first kernel's pieces
    starts_ptr,  # [T + 1] int64: task t's sorted rows are starts[t]:starts[t + 1]
    sums_ptr,  # [T, N] fp32 output
    # Sizes
    N,
    # Tiles
    CHUNK_ROWS: tl.constexpr,
    BLOCK_PIECES: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    task = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    begin = tl.load(starts_ptr + task)
    end = tl.load(starts_ptr + task + 1)
    first_chunk = begin // CHUNK_ROWS
    # The chunks holding the task's rows; none for a task without rows (its sums are zero).
    chunks = tl.where(end > begin, (end - 1) // CHUNK_ROWS - first_chunk + 1, 0)
    # BLOCK_PIECES pieces per step, reduced once at the end: a single task's 128 pieces (BERT-base's 32768 rows)
    # take 8 steps of independent loads, not 128 dependent ones; the order is fixed, so are the bits.
    acc = tl.zeros((BLOCK_PIECES, BLOCK_N), dtype=tl.float32)
    for start in range(0, chunks, BLOCK_PIECES):
        piece = start + tl.arange(0, BLOCK_PIECES)
        slots = first_chunk + task + piece
        acc += tl.load(partial_ptr + slots[:, None] * N + cols[None, :],
                       mask=(piece < chunks)[:, None] & col_ok[None, :], other=0.0)
    tl.store(sums_ptr + task * N + cols, tl.sum(acc, axis=0), mask=col_ok)


# The last rows' order by task: (key, weak reference to row_task, (sorted tasks, order, starts)).
_last_order: tuple | None = None


def _task_order(row_task: torch.Tensor, num_tasks: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(each sorted row's task, the rows sorted by task stably, starts [T + 1]: task t's sorted rows are
    starts[t]:starts[t + 1]). One backward sums several tables' gradients over the same rows, 6 per BERT layer, so
    the last order is kept: for the same ``row_task`` tensor, unchanged since, the sort and search run once."""
    global _last_order
    key = (row_task._version, num_tasks)
    last = _last_order
    if last is not None and last[0] == key and last[1]() is row_task:
        return last[2]
    sorted_tasks, order = torch.sort(row_task.long(), stable=True)
    bounds = torch.arange(num_tasks + 1, device=row_task.device, dtype=torch.int64)
    starts = torch.searchsorted(sorted_tasks, bounds)  # starts[t]: the first sorted row of task t or later
    _last_order = (key, weakref.ref(row_task), (sorted_tasks, order, starts))
    return sorted_tasks, order, starts


def task_sums(grad: torch.Tensor, row_task: torch.Tensor, num_tasks: int) -> torch.Tensor:
    """Column sums of ``grad`` (..., N) per task, [num_tasks, N] in fp32, deterministic; ``row_task`` holds each
    row's task, integers in [0, num_tasks). A task without rows gets zeros."""
    check_compute_tensor("grad", grad)
    N = grad.shape[-1]
    grad = grad.reshape(-1, N)
    M = grad.shape[0]
    if row_task.dim() != 1 or row_task.shape[0] != M or row_task.dtype not in (torch.int32, torch.int64):
        raise KernelInputError(f"row_task must be an integer ({M},) tensor, one task per row; got "
                               f"{row_task.dtype} {tuple(row_task.shape)}")
    sums = torch.empty((num_tasks, N), dtype=torch.float32, device=grad.device)
    if M == 0:
        return sums.zero_()
    sorted_tasks, order, starts = _task_order(row_task, num_tasks)
    chunks = triton.cdiv(M, _CHUNK_ROWS)
    partial = torch.empty((chunks + num_tasks - 1, N), dtype=torch.float32, device=grad.device)
    column_blocks = triton.cdiv(N, _BLOCK_N)
    _task_chunk_sums_kernel[(chunks, column_blocks)](
        grad, order, sorted_tasks, starts, partial, M, N, num_tasks,
        CHUNK_ROWS=_CHUNK_ROWS,
        BLOCK_M=_BLOCK_M,
        BLOCK_N=_BLOCK_N,
        num_warps=_WARPS,
    )
    _task_pieces_sum_kernel[(num_tasks, column_blocks)](
        partial, starts, sums, N,
        CHUNK_ROWS=_CHUNK_ROWS,
        BLOCK_PIECES=_BLOCK_PIECES,
        BLOCK_N=_BLOCK_N,
        num_warps=_WARPS,
    )
    return sums
