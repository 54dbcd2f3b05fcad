"""Per-task column sums: the gradient of a bias that is a task table [T, N] (per-example task biases).

    sums[t, :] = sum of grad[i, :] over the rows i whose task is t            (fp32, [T, N])

Rows are sorted by task once per backward (a stable sort and a search, no host sync; the same rows' order serves
every table of the step), and the batch's tasks numbered 0, 1, ... in order, whatever their ids in the table
(``TaskOrder``): a batch of tasks 0 and 999 of a bank of 1,000 is walked as tasks 0 and 1. A walk steps through
every number between a chunk's first row's and last row's, so it meets only tasks the chunk holds, and the pieces
need a slot per task of the batch, not of the table (min(T + 2, M) at most: the numbers count tasks outside the
table too). The sorted rows are then cut into chunks, whatever the tasks: the work spreads over the
GPU the same way whether a batch holds 64 tasks or one (one program per task would leave a single-task batch's
whole gradient to N / BLOCK_N programs). Two steps, as in every bias-gradient reduction here, per-program fp32
partials and then one reduction:

1. A program walks one chunk of the sorted rows and writes piece (chunk c, task number k), its sum over the k-th
   task's rows, for every number k from its first row's to its last row's. Tasks are contiguous in sorted order, so
   piece (c, k) goes to slot c + k of the partials [chunks + K - 1, N] (K: the bound on the batch's task numbers):
   along the sorted rows both c and k only grow and each new piece grows one of them, so no two pieces share a
   slot.
2. Program (t, j) of ``_task_pieces_sum_kernel`` adds task t's pieces, slots c + k for its number k and the chunks
   c its rows span, in a fixed order, and writes zeros for a task without rows; one launch serves every table a
   pass sums (the LayerNorm backward's two).

Step 1 runs inside the pass that produces the gradient, wherever there is one: the linear layer's g pass
(``linear._linear_grad_kernel``), the LayerNorm backward (its beta's and the feeding linear's sums) and the q/k/v
gather (``heads._heads_to_rows_kernel``) walk their chunk's rows in task order, writing each row where it belongs,
and sum the rows while they sit in registers: the same one read of the gradient as a single-task batch, no second
pass. A row of a task other than the running piece's closes that piece (``next_piece``). Those kernels share
:func:`bias_reduction` (which also plans a shared bias's reduction) and the ``@triton.jit`` helpers below.
:func:`task_sums` is step 1 on its own, for a gradient that is already in memory with nothing to compute (a linear
layer without an epilogue, whose g is dy).

One read of the gradient, no float atomics, the same bits every run. It replaces a GEMM with the rows' one-hot
task matrix, T·M·N multiply-adds in fp32 (CUDA cores: without TF32): for 64 tasks at BERT-base's 256 x 128
tokens, FC1's [32768, 3072] gradient is 6.4 G multiply-adds, ~0.2 ms on an H100, against one 201 MB read here,
~0.06 ms, in the g pass that reads it anyway. The partials add little: a chunk per program of the pass, so for
FC1 on an H100 (88 row programs x 24 column blocks: ``utils.PROGRAMS_PER_SM`` x 132 SMs) 88 + 65 rows (chunks +
K - 1, K = min(T + 2, M) = 66) of 3072 fp32, 1.9 MB.
"""

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .utils import INTERPRETER, LastResults, cdiv, check_compute_tensor, check_row_task, launches_on_input_device

# task_sums' tiles. The interpreter's chunk is two row blocks and its reduction reads two pieces at a time, so that
# small test shapes cross chunk, task and piece-block boundaries alike.
_BLOCK_M, _BLOCK_N, _WARPS, _CHUNK_ROWS, _BLOCK_PIECES = (8, 32, 1, 16, 2) if INTERPRETER else (16, 128, 4, 256, 16)


@triton.jit
def table_rows(table_ptr, task_ptr, rows, row_ok, cols, mask, width):
    """The rows of a task table [T, width] that rows ``rows`` [BLOCK_M] add, at columns ``cols``: row
    ``task[rows]`` of the table each, in fp32, zeros where not ``mask``."""
    task = tl.load(task_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    return tl.load(table_ptr + task[:, None] * width + cols[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def clamped_task(sorted_task_ptr, index, T):
    """The task number of sorted row ``index``, clamped to [-1, T]: a loop over the numbers between two rows stays
    short, and writes no piece out of place, whatever the value."""
    return tl.minimum(tl.maximum(tl.load(sorted_task_ptr + index), -1), T)


@triton.jit
def store_piece(partial_ptr, chunk, task, acc, cols, mask, row_stride, T):
    """Piece (chunk, task), the chunk's sum over the rows of the batch's task number ``task``, to slot chunk + task;
    none outside [0, T)."""
    task = tl.cast(task, tl.int64)  # the loop variable is a plain int when interpreted
    # tl.where, not `mask & scalar`: the interpreter cannot broadcast a scalar boolean into a mask.
    mask = tl.where((task >= 0) & (task < T), mask, False)
    tl.store(partial_ptr + (chunk + task) * row_stride + cols, acc, mask=mask)


@triton.jit
def next_piece(partial_ptr, chunk, piece_task, task, acc, cols, col_ok, row_stride, T):
    """A kernel's running sum ``acc`` of ``piece_task``'s rows, now that the walk reached ``task``'s: where that
    starts a new piece, store ``acc`` as piece (chunk, piece_task) and start again from zeros."""
    new = task != piece_task
    store_piece(partial_ptr, chunk, piece_task, acc, cols, tl.where(new, col_ok, False), row_stride, T)
    return tl.where(new, 0.0, acc)


@triton.jit
def chunk_bounds(chunk, chunk_rows, rows, sorted_task_ptr, T):
    """(lo, hi, task): chunk ``chunk`` is sorted rows lo..hi-1, its first row of task ``task`` (clamped)."""
    lo = chunk * chunk_rows
    return lo, tl.minimum(lo + chunk_rows, rows), clamped_task(sorted_task_ptr, lo, T)


@triton.jit
def sorted_block(order_ptr, sorted_task_ptr, start, hi, BLOCK_M: tl.constexpr):
    """Sorted rows start.. start + BLOCK_M - 1, those below ``hi``: (their rows [BLOCK_M] int64, which exist, their
    tasks: -2 where none, never summed)."""
    index = tl.cast(start, tl.int64) + tl.arange(0, BLOCK_M)  # the loop variable is a plain int when interpreted
    ok = index < hi
    return tl.load(order_ptr + index, mask=ok, other=0), ok, tl.load(sorted_task_ptr + index, mask=ok, other=-2)


@triton.jit
def block_last_task(sorted_task_ptr, start, hi, T, BLOCK_M: tl.constexpr):
    """The task of the block's last sorted row, clamped. Loaded once the block's gradient is: loaded with the block,
    it stays live across the gradient's loads (heads_to_rows then spilled 24 B under triton 3.9)."""
    return clamped_task(sorted_task_ptr, tl.minimum(start + BLOCK_M, hi) - 1, T)


@triton.jit
def add_block(partial_ptr, chunk, piece_task, block_last, acc, values, tasks, cols, col_ok, row_stride, T):
    """The running piece ``acc`` of ``piece_task`` after a block of sorted rows, ``values`` [BLOCK_M, BLOCK_N] fp32 of
    tasks ``tasks`` up to ``block_last``: each task the block reaches closes the piece before it. The running task
    is ``block_last`` after it."""
    for task in range(piece_task, block_last + 1):
        acc = next_piece(partial_ptr, chunk, piece_task, task, acc, cols, col_ok, row_stride, T)
        acc += tl.sum(tl.where((tasks == task)[:, None], values, 0.0), axis=0)
        piece_task = task
    return acc


@triton.jit(do_not_specialize=["M", "T", "chunk_rows"])  # they change with every batch's lengths: no recompiles
def _task_chunk_sums_kernel(
    # Pointers
    grad_ptr,  # [M, N] the gradient of what the table's rows were added to
    order_ptr,  # [M] int64: the rows sorted by task, stably
    sorted_task_ptr,  # [M] int64: the task number of each sorted row
    starts_ptr,  # [T + 1] int64: task number k's rows are order[starts[k]:starts[k + 1]]
    partial_ptr,  # [chunks + T - 1, N] fp32 output: piece (chunk c, task number k) in row c + k
    # Sizes
    M,
    N,
    T,  # the bound on the batch's task numbers
    chunk_rows,
    # Tiles
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    chunk = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    lo, hi, first_task = chunk_bounds(chunk, chunk_rows, M, sorted_task_ptr, T)
    # Clamped to the numbers there are, whatever the values.
    first_task = tl.maximum(first_task, 0)
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
        store_piece(partial_ptr, chunk, task, tl.sum(acc, axis=0), cols, col_ok, N, T)


@triton.jit(do_not_specialize=["chunk_rows"])
def _task_pieces_sum_kernel(
    # Pointers
    partial_ptr,  # [tables, chunks + K - 1, N] fp32: the pieces of step 1, for each table over the same rows
    starts_ptr,  # [T + 3] int64: task t's sorted rows are starts[t + 1]:starts[t + 2]
    number_ptr,  # [T + 2] int64: task t's number in the batch at [t + 1], which its pieces' slots add (any value for
    # an absent task)
    sums_ptr,  # [tables, T, N] fp32 output
    # Sizes
    N,
    T,
    table_slots,  # chunks + K - 1: one table's pieces
    chunk_rows,
    # Tiles
    BLOCK_PIECES: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # Program (t, j, k) sums task t's pieces of table k, columns block j: one launch for every table of a pass.
    task = tl.program_id(0).to(tl.int64)  # task * N passes 2^31 in a bank of 131072 tasks of 16384 features
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    table = tl.program_id(2).to(tl.int64)
    partial_ptr += table * table_slots * N
    sums_ptr += table * T * N
    col_ok = cols < N
    # The tables start at task -1: from their tensors' first element, the pointers are aligned as AOT compiles them.
    begin = tl.load(starts_ptr + task + 1)
    end = tl.load(starts_ptr + task + 2)
    first_chunk = begin // chunk_rows
    # The chunks holding the task's rows; none for a task without rows (its sums are zero).
    chunks = tl.where(end > begin, (end - 1) // chunk_rows - first_chunk + 1, 0)
    number = tl.load(number_ptr + task + 1)
    # BLOCK_PIECES pieces per step, reduced once at the end: a single task's 2,112 pieces (the LayerNorm backward's
    # chunk per program, 16 programs per SM on an H100) take 132 steps of independent loads, not 2,112 dependent
    # ones; the order is fixed, so are the bits.
    acc = tl.zeros((BLOCK_PIECES, BLOCK_N), dtype=tl.float32)
    for start in range(0, chunks, BLOCK_PIECES):
        piece = start + tl.arange(0, BLOCK_PIECES)
        slots = first_chunk + number + piece
        acc += tl.load(partial_ptr + slots[:, None] * N + cols[None, :],
                       mask=(piece < chunks)[:, None] & col_ok[None, :], other=0.0)
    tl.store(sums_ptr + task * N + cols, tl.sum(acc, axis=0), mask=col_ok)


class TaskOrder(NamedTuple):
    """The rows sorted by task (the sorted row j is row ``order[j]``), and the batch's tasks numbered 0, 1, ... in
    order: the k-th task the batch holds is number k. A task outside the table counts as -1 below it or T above it,
    numbered like the others: its pieces are written and summed into no task's sums."""

    sorted_numbers: torch.Tensor  # [M] int64: each sorted row's task number
    order: torch.Tensor  # [M] int64
    starts: torch.Tensor  # [T + 3] int64: task t's sorted rows are starts[t + 1]:starts[t + 2], for t in -1..T + 1
    task_numbers: torch.Tensor  # [T + 2] int64: task t's number at [t + 1], for t in -1..T (one less than the next
    # task's, for one without rows)
    numbers: int  # the bound on the numbers, known without reading them: min(T + 2, M), at least 1


class TaskChunks(NamedTuple):
    """Rows sorted by task and cut into chunks: what a kernel summing per task walks. Chunk c is sorted rows
    c * chunk_rows up to (c + 1) * chunk_rows."""

    order: TaskOrder
    num_tasks: int
    chunk_rows: int
    chunks: int


def _task_order(row_task: torch.Tensor, num_tasks: int) -> TaskOrder:
    """The rows of tasks ``row_task`` sorted and numbered. One backward sums several tables' gradients over the same
    rows, 6 per BERT layer, so the last order is kept: for the same ``row_task`` tensor, unchanged since, the sort
    and search run once. No host sync (the number of tasks present is never read) and few launches: an eager bank
    step is bound by its host's launches."""
    def sort():
        tasks, order = torch.sort(row_task.long().clamp(-1, num_tasks), stable=True)
        bounds = torch.arange(-1, num_tasks + 2, device=row_task.device, dtype=torch.int64)
        # starts[i]: the first sorted row of task i - 1 or later, for the tasks -1 to T + 1.
        starts = torch.searchsorted(tasks, bounds)
        # Each of the tasks -1 to T that has rows counts 1: the count up to a task is one more than its number.
        task_numbers = torch.cumsum(starts[1:] > starts[:-1], 0).sub_(1)
        numbers = max(1, min(num_tasks + 2, row_task.shape[0]))
        sorted_numbers = task_numbers[tasks + 1]
        return TaskOrder(sorted_numbers, order, starts, task_numbers, numbers)

    return _LAST_ORDER.get(row_task, num_tasks, sort)


_LAST_ORDER = LastResults()


def task_chunks(row_task: torch.Tensor, num_tasks: int, rows: int, chunk_rows: int) -> TaskChunks:
    """The ``rows`` rows of tasks ``row_task`` (checked by the host function: ``utils.check_row_task``) sorted by
    task, in chunks of ``chunk_rows`` (the last one shorter)."""
    return TaskChunks(_task_order(row_task, num_tasks), num_tasks, chunk_rows, cdiv(rows, chunk_rows))


def empty_pieces(chunks: TaskChunks, width: int, device: torch.device, tables: int = 1) -> torch.Tensor:
    """The partials [tables, chunks + K - 1, width] (fp32, K the bound on the batch's task numbers) that step 1
    writes over ``chunks``, for ``tables`` tables summed over the same rows."""
    return torch.empty((tables, chunks.chunks + chunks.order.numbers - 1, width), dtype=torch.float32, device=device)


def sum_pieces(partial: torch.Tensor, chunks: TaskChunks) -> torch.Tensor:
    """Step 2: each task's pieces in ``partial`` [tables, slots, width] added in a fixed order, [tables, T, width]
    fp32, in one launch."""
    tables, slots, width = partial.shape
    sums = torch.empty((tables, chunks.num_tasks, width), dtype=torch.float32, device=partial.device)
    _task_pieces_sum_kernel[(chunks.num_tasks, cdiv(width, _BLOCK_N), tables)](
        partial, chunks.order.starts, chunks.order.task_numbers, sums, width, chunks.num_tasks, slots,
        chunks.chunk_rows,
        BLOCK_PIECES=_BLOCK_PIECES,
        BLOCK_N=_BLOCK_N,
        num_warps=_WARPS,
    )
    return sums


class BiasReduction(NamedTuple):
    """How a gradient pass sums its bias gradient: ``programs`` programs along the rows each write fp32 partial
    sums, then one deterministic reduction adds them up; over all rows for a bias [N], or per task for a task table
    (``chunks``: each program walks one chunk of the task-sorted rows and writes pieces)."""

    programs: int
    chunks: TaskChunks | None

    @property
    def per_task(self) -> bool:
        return self.chunks is not None

    def partials(self, width: int, device: torch.device, tables: int = 1) -> torch.Tensor:
        """The fp32 partials the pass writes for ``tables`` biases summed over the same rows, [tables, rows, width]:
        a row per program, or the pieces."""
        if self.chunks is not None:
            return empty_pieces(self.chunks, width, device, tables)
        return torch.empty((tables, self.programs, width), dtype=torch.float32, device=device)

    def walk(self, placeholder: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        """The pass's (order, sorted_numbers, T, chunk_rows) arguments: the sorted rows, their task numbers and the
        numbers' bound; ``placeholder`` for the unused pointers of a shared bias's pass."""
        if self.chunks is None:
            return placeholder, placeholder, 1, 1
        order = self.chunks.order
        return order.order, order.sorted_numbers, order.numbers, self.chunks.chunk_rows

    def total(self, partials: torch.Tensor) -> torch.Tensor:
        """The bias gradients from the partials, one reduction for every table: [tables, width], or
        [tables, T, width] per task."""
        return sum_pieces(partials, self.chunks) if self.chunks is not None else partials.sum(dim=1)


def bias_reduction(row_task: torch.Tensor | None, num_tasks: int, rows: int, programs: int) -> BiasReduction:
    """The reduction of a pass over ``rows`` rows that would run ``programs`` programs along them: per task when
    ``row_task`` is given (then a chunk per program), else over all rows."""
    if row_task is None:
        return BiasReduction(programs, None)
    chunks = task_chunks(row_task, num_tasks, rows, max(1, cdiv(rows, programs)))
    return BiasReduction(chunks.chunks, chunks)


@launches_on_input_device
def task_sums(grad: torch.Tensor, row_task: torch.Tensor, num_tasks: int) -> torch.Tensor:
    """Column sums of ``grad`` (..., N) per task, [num_tasks, N] in fp32, deterministic; ``row_task`` holds each
    row's task, integers in [0, num_tasks). A task without rows gets zeros."""
    check_compute_tensor("grad", grad)
    N = grad.shape[-1]
    grad = grad.reshape(-1, N)
    M = grad.shape[0]
    check_row_task(row_task, M, grad.device)
    chunks = task_chunks(row_task, num_tasks, M, _CHUNK_ROWS)
    if M == 0:
        return torch.zeros((num_tasks, N), dtype=torch.float32, device=grad.device)
    partial = empty_pieces(chunks, N, grad.device)  # one table
    # The only walk that reads each task number's first row: made here, not for every pass's order.
    order = chunks.order
    bounds = torch.arange(order.numbers + 1, device=grad.device, dtype=torch.int64)
    number_starts = torch.searchsorted(order.sorted_numbers, bounds)  # number k's sorted rows: [k]:[k + 1]
    _task_chunk_sums_kernel[(chunks.chunks, cdiv(N, _BLOCK_N))](
        grad, order.order, order.sorted_numbers, number_starts, partial, M, N, order.numbers, chunks.chunk_rows,
        BLOCK_M=_BLOCK_M,
        BLOCK_N=_BLOCK_N,
        num_warps=_WARPS,
    )
    return sum_pieces(partial, chunks)[0]
