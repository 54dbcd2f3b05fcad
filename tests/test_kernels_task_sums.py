"""task_sums: per-task column sums (a task table's bias gradient) against float64, deterministic."""

import pytest
import torch

import bitfit_fast_kernels as K

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows,features,tasks", [(1, 1, 1), (13, 37, 4), (100, 130, 7), (9, 5, 64)])
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_sums_match_float64(dtype, rows, features, tasks, index_dtype):
    grad = torch.randn(rows, features, device=DEVICE, dtype=dtype)
    # Tasks drawn from the first half only: the others have no rows and must sum to zero.
    row_task = torch.randint(0, max(1, tasks // 2), (rows,), device=DEVICE, dtype=index_dtype)
    sums = K.task_sums(grad, row_task, tasks)
    truth = torch.zeros(tasks, features, dtype=torch.float64, device=DEVICE).index_add_(0, row_task.long(),
                                                                                        grad.double())
    assert sums.dtype == torch.float32 and sums.shape == (tasks, features)
    torch.testing.assert_close(sums.double(), truth, atol=1e-5 * max(1.0, truth.abs().max().item()), rtol=1e-6)
    assert not sums[max(1, tasks // 2):].any(), "tasks without rows get zeros"


def test_leading_dimensions_are_rows_and_sums_are_bit_identical_across_runs():
    grad = torch.randn(3, 41, 29, device=DEVICE, dtype=torch.float16)
    row_task = torch.randint(0, 5, (3 * 41,), device=DEVICE)
    runs = [K.task_sums(grad, row_task, 5) for _ in range(3)]
    assert all(torch.equal(run, runs[0]) for run in runs[1:])
    torch.testing.assert_close(runs[0], K.task_sums(grad.reshape(-1, 29), row_task, 5), atol=0, rtol=0)


def test_row_tasks_of_the_wrong_shape_get_a_clear_error():
    if DEVICE == "cuda":
        pytest.skip("the call builds CPU tensors")
    with pytest.raises(K.KernelInputError, match="one task per row"):
        K.task_sums(torch.randn(4, 3), torch.zeros(3, dtype=torch.int64), 2)
