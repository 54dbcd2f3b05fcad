"""Per-task column sums: the gradient of a bias that is a task table [T, N] (per-example task biases).

    sums[t, :] = sum of grad[i, :] over the rows i whose task is t            (fp32, [T, N])

Rows are sorted by task once (a stable sort and a search, no host sync), then program (t, j) sums column block j
over task t's rows, in their order: one read of the gradient, no float atomics, the same bits every run. It
replaces a GEMM with the rows' one-hot task matrix, T·M·N multiply-adds in fp32 (CUDA cores: without TF32): for
64 tasks at BERT-base's 256 x 128 tokens, FC1's [32768, 3072] gradient is 6.4 G multiply-adds, ~0.2 ms on an H100,
against one 201 MB read here, ~0.06 ms.
"""

import torch
import triton
import triton.language as tl

from .utils import INTERPRETER, KernelInputError, check_compute_tensor

_BLOCK_M, _BLOCK_N, _WARPS = (8, 32, 1) if INTERPRETER else (16, 128, 4)


@triton.jit
def _task_sums_kernel(
    # Pointers
    grad_ptr,  # [M, N] the gradient of what the table's rows were added to
    order_ptr,  # [M] int64: the rows sorted by task, stably
    starts_ptr,  # [T + 1] int64: task t's rows are order[starts[t]:starts[t + 1]]
    sums_ptr,  # [T, N] fp32 output
    # Sizes
    N,
    # Tiles
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    task = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    begin = tl.load(starts_ptr + task)
    end = tl.load(starts_ptr + task + 1)
    # A [BLOCK_M, BLOCK_N] accumulator, reduced once at the end: BLOCK_M independent adds in flight per column.
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for start in range(begin, end, BLOCK_M):
        index = start + tl.arange(0, BLOCK_M)
        ok = index < end
        rows = tl.load(order_ptr + index, mask=ok, other=0)
        acc += tl.load(grad_ptr + rows[:, None] * N + cols[None, :], mask=ok[:, None] & col_ok[None, :],
                       other=0.0).to(tl.float32)
    tl.store(sums_ptr + task * N + cols, tl.sum(acc, axis=0), mask=col_ok)


def task_sums(grad: torch.Tensor, row_task: torch.Tensor, num_tasks: int) -> torch.Tensor:
    """Column sums of ``grad`` (..., N) per task, [num_tasks, N] in fp32, deterministic; ``row_task`` holds each
    row's task, integers in [0, num_tasks). A task without rows gets zeros."""
    check_compute_tensor("grad", grad)
    N = grad.shape[-1]
    grad = grad.reshape(-1, N)
    if row_task.dim() != 1 or row_task.shape[0] != grad.shape[0] or row_task.dtype not in (torch.int32, torch.int64):
        raise KernelInputError(f"row_task must be an integer ({grad.shape[0]},) tensor, one task per row; got "
                               f"{row_task.dtype} {tuple(row_task.shape)}")
    sorted_tasks, order = torch.sort(row_task, stable=True)
    bounds = torch.arange(num_tasks + 1, device=grad.device, dtype=sorted_tasks.dtype)
    starts = torch.searchsorted(sorted_tasks, bounds)  # starts[t]: the first sorted row of task t or later
    sums = torch.empty((num_tasks, N), dtype=torch.float32, device=grad.device)
    _task_sums_kernel[(num_tasks, triton.cdiv(N, _BLOCK_N))](
        grad, order, starts, sums, N,
        BLOCK_M=_BLOCK_M,
        BLOCK_N=_BLOCK_N,
        num_warps=_WARPS,
    )
    return sums
