"""Per-task column sums (a task table's bias gradient) against float64, deterministic: task_sums on its own, and
the sums the gradient passes take while they write the gradient (linear g pass, LayerNorm backward, q/k/v gather)."""

import pytest
import torch
from kernel_checks import TorchWithNanEmpty

import bitfit_fast_kernels as K
from bitfit_fast_kernels import heads, layer_norm, linear, task_tables, utils
from bitfit_fast_kernels.utils import LastResults

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


def _layout(name: str, rows: int, generator: torch.Generator) -> torch.Tensor:
    """Row tasks (of 6) placed against the kernel's chunks of sorted rows (16 under the interpreter, 256 on a GPU)."""
    if name == "one task":  # a single-task batch: its rows span every chunk
        return torch.full((rows,), 4)
    if name == "boundary on a chunk edge":  # task 0 fills whole chunks, task 5 starts a chunk; 1-4 have no rows
        edge = 2 * task_tables._CHUNK_ROWS
        return torch.cat([torch.zeros(min(edge, rows), dtype=torch.int64), torch.full((max(0, rows - edge),), 5)])
    if name == "few rows per task":  # many tasks per chunk, in shuffled row order
        return torch.randint(0, 6, (rows,), generator=generator)
    if name == "outside the table":  # rows of tasks -1 and 9 are summed nowhere, but their gradients are written
        return torch.tensor([9, -1, 3, 0, 3, 3, 1])[torch.arange(rows) % 7][torch.randperm(rows, generator=generator)]
    if name == "every task and outside":  # numbered 0 to 7: task 5, the last, is number 6, past T
        tasks = torch.tensor([-1, 0, 1, 2, 3, 4, 5, 6])[torch.arange(rows) % 8]
        return tasks[torch.randperm(rows, generator=generator)]
    # "uneven": one task with most rows, two with one row each, shuffled
    tasks = torch.full((rows,), 2)
    tasks[:2] = torch.tensor([0, 5])[:rows]
    return tasks[torch.randperm(rows, generator=generator)]


@pytest.mark.parametrize("rows", [1, 31, 3 * task_tables._CHUNK_ROWS + 5])
@pytest.mark.parametrize("layout", ["one task", "boundary on a chunk edge", "few rows per task", "uneven"])
def test_sums_match_float64_wherever_tasks_fall_against_the_chunks(layout, rows, monkeypatch):
    monkeypatch.setattr(task_tables, "torch", TorchWithNanEmpty())
    generator = torch.Generator().manual_seed(rows)
    row_task = _layout(layout, rows, generator).to(DEVICE)
    grad = torch.randn(rows, 45, generator=generator).to(DEVICE)
    sums = K.task_sums(grad, row_task, 6)
    truth = torch.zeros(6, 45, dtype=torch.float64, device=DEVICE).index_add_(0, row_task, grad.double())
    torch.testing.assert_close(sums.double(), truth, atol=1e-5 * max(1.0, truth.abs().max().item()), rtol=1e-6)
    absent = sorted(set(range(6)) - set(row_task.tolist()))
    assert not sums[absent].any(), "tasks without rows get zeros"


def test_a_bank_of_a_thousand_tasks_sums_a_batch_of_two_far_apart(monkeypatch):
    """Tasks 0 and T - 1 of a bank of 1,000 (a server's mixed batch): each program walks only the tasks its rows
    hold (it walked every id between, up to T per row block), and the sums are float64's, zeros elsewhere. Both
    walks: task_sums' and the LayerNorm backward's (its beta's and the feeding linear's sums)."""
    monkeypatch.setattr(task_tables, "torch", TorchWithNanEmpty())
    monkeypatch.setattr(layer_norm, "torch", TorchWithNanEmpty())
    tasks, rows, n = 1000, 37, 45
    row_task = torch.full((rows,), tasks - 1)
    row_task[torch.randperm(rows, generator=torch.Generator().manual_seed(0))[:5]] = 0
    row_task = row_task.to(DEVICE)
    grad, x, residual = (torch.randn(rows, n, device=DEVICE) for _ in range(3))
    truth = torch.zeros(tasks, n, dtype=torch.float64, device=DEVICE).index_add_(0, row_task, grad.double())
    torch.testing.assert_close(K.task_sums(grad, row_task, tasks).double(), truth, atol=1e-5, rtol=1e-6)
    gamma = torch.randn(n, device=DEVICE)
    _, x_hat, rstd = K.residual_layer_norm_forward(x, gamma, torch.zeros(n, device=DEVICE), 1e-5, residual)
    dx, _, dbeta, dx_sum = K.residual_layer_norm_backward(grad, x_hat, gamma, rstd, sum_dx=True, row_task=row_task,
                                                         num_tasks=tasks)
    torch.testing.assert_close(dbeta.double(), truth, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(dx_sum.double(), torch.zeros_like(truth).index_add_(0, row_task, dx.double()),
                               atol=1e-5, rtol=1e-6)


def test_the_pieces_take_a_slot_per_task_of_the_batch_not_of_the_table():
    """A pass's partials grow with the tasks a batch can hold (min(T + 2, M)), not with the bank's T: a batch of 37
    rows of a bank of 100,000 tasks needs 37 - 1 slots beyond one per chunk, not 99,999. The task numbers the walks
    step through are the batch's tasks in order, rows outside the table counted as a task below it or above it."""
    row_task = torch.tensor([99_999, 7, -3, 7, 50_000, 100_000, 99_999] * 5 + [0, 7], device=DEVICE)
    reduction = task_tables.bias_reduction(row_task, 100_000, 37, programs=3)
    assert reduction.partials(5, row_task.device).shape == (1, reduction.programs + 37 - 1, 5)
    order = reduction.chunks.order
    tasks = row_task[order.order]
    numbers = {-3: 0, 0: 1, 7: 2, 50_000: 3, 99_999: 4, 100_000: 5}
    assert order.sorted_numbers.tolist() == [numbers[task] for task in tasks.tolist()]
    assert order.task_numbers[[0, 1, 8, 50_001, 100_000, 100_001]].tolist() == [0, 1, 2, 3, 4, 5]  # tasks -1, 0, ...
    assert order.starts[[0, 1, 2, 8, 9, 100_000, 100_001, 100_002]].tolist() == [0, 5, 6, 6, 17, 22, 32, 37]


def test_the_rows_are_sorted_once_for_every_table_of_the_same_rows(monkeypatch):
    """A backward sums several tables over one row_task: one sort serves them all, until the rows' tasks change."""
    sorts = []

    class CountingTorch:
        def __getattr__(self, name):
            return getattr(torch, name)

        @staticmethod
        def sort(*args, **kwargs):
            sorts.append(1)
            return torch.sort(*args, **kwargs)

    monkeypatch.setattr(task_tables, "torch", CountingTorch())
    row_task = torch.randint(0, 4, (37,), device=DEVICE)
    grads = [torch.randn(37, n, device=DEVICE) for n in (5, 12, 5)]

    def check(grad, num_tasks=4):
        truth = torch.zeros(num_tasks, grad.shape[1], dtype=torch.float64, device=DEVICE)
        truth.index_add_(0, row_task, grad.double())
        torch.testing.assert_close(K.task_sums(grad, row_task, num_tasks).double(), truth, atol=1e-5, rtol=1e-6)

    for grad in grads:
        check(grad)
    assert len(sorts) == 1
    row_task[:5] = 3 - row_task[:5]  # the same tensor with other tasks: sorted again
    check(grads[0])
    check(grads[1], num_tasks=6)  # another table size: its starts differ
    row_task = row_task.clone()  # equal values, another tensor
    check(grads[2])
    assert len(sorts) == 4


def test_the_last_few_row_task_tensors_keep_their_order_while_they_live():
    """A bank's backward interleaves a few row_task tensors (all rows, each sequence's first row, the embeddings'
    padded rows): each is derived once while it lives and is unchanged, whatever the order they come in."""
    cache = LastResults(size=3)
    made = []

    def derive(tensor):
        return cache.get(tensor, "key", lambda: made.append(tensor.sum().item()) or len(made))

    a, b, c = (torch.full((3,), float(i)) for i in range(3))
    assert [derive(t) for t in (a, b, a, c, b, a, c)] == [1, 2, 1, 3, 2, 1, 3] and made == [0.0, 3.0, 6.0]
    assert cache.get(a, "other key", lambda: "again") == "again"  # a's value for "key" is dropped: size 3
    d = torch.full((3,), 9.0)
    assert derive(d) == 4 and derive(c) == 3 and derive(a) == 5
    a.add_(1)  # changed in place: derived again
    assert derive(a) == 6
    e = torch.full((3,), 1.0)
    assert derive(e) == 7
    del e  # freed: its entry cannot answer for a new tensor, perhaps at its address
    assert derive(torch.full((3,), 1.0)) == 8


def test_a_freed_tensors_entry_goes_before_a_live_ones():
    cache = LastResults(size=2)
    a, b = torch.zeros(3), torch.ones(3)
    assert cache.get(a, "key", lambda: "a") == "a" and cache.get(b, "key", lambda: "b") == "b"
    del b  # freed: its entry makes room for the next
    assert cache.get(torch.full((3,), 2.0), "key", lambda: "c") == "c"
    assert cache.get(a, "key", lambda: "a again") == "a"


def test_a_graph_capture_never_takes_a_value_computed_outside_it(monkeypatch):
    """A capture must record the computation (its replays see new values in the same tensor, at the same version),
    and eager code must not read a capture's values (its graph's memory); inference tensors have no version."""
    cache = LastResults()
    tasks = torch.zeros(3)
    in_capture = [False]
    monkeypatch.setattr(utils, "capturing", lambda: in_capture[0])
    assert cache.get(tasks, "key", lambda: "eager") == "eager"
    in_capture[0] = True
    assert cache.get(tasks, "key", lambda: "captured") == "captured"
    assert cache.get(tasks, "key", lambda: "again") == "captured", "within the capture, reused"
    in_capture[0] = False
    assert cache.get(tasks, "key", lambda: "eager again") == "eager again", "the eager entry went at the capture"
    with torch.inference_mode():
        frozen = torch.zeros(3)
        assert cache.get(frozen, "key", lambda: 1) == 1 and cache.get(frozen, "key", lambda: 2) == 2


def test_rows_of_tasks_outside_the_table_are_summed_nowhere():
    grad = torch.randn(40, 9, device=DEVICE)
    row_task = torch.tensor([-1, 3, 0, 7, 1] * 8, device=DEVICE)  # 3 tasks: -1, 3 and 7 are outside
    inside = (row_task >= 0) & (row_task < 3)
    truth = torch.zeros(3, 9, dtype=torch.float64, device=DEVICE).index_add_(0, row_task[inside], grad[inside].double())
    torch.testing.assert_close(K.task_sums(grad, row_task, 3).double(), truth, atol=1e-5, rtol=1e-6)


def test_an_empty_gradient_sums_to_zeros():
    sums = K.task_sums(torch.randn(0, 7, device=DEVICE), torch.zeros(0, dtype=torch.int64, device=DEVICE), 3)
    assert sums.shape == (3, 7) and not sums.any()


def test_leading_dimensions_are_rows_and_sums_are_bit_identical_across_runs():
    grad = torch.randn(3, 41, 29, device=DEVICE, dtype=torch.float16)
    row_task = torch.randint(0, 5, (3 * 41,), device=DEVICE)
    runs = [K.task_sums(grad, row_task, 5) for _ in range(3)]
    assert all(torch.equal(run, runs[0]) for run in runs[1:])
    torch.testing.assert_close(runs[0], K.task_sums(grad.reshape(-1, 29), row_task, 5), atol=0, rtol=0)


def test_row_tasks_of_the_wrong_shape_get_a_clear_error():
    with pytest.raises(K.KernelInputError, match="one task per row"):
        K.task_sums(torch.randn(4, 3, device=DEVICE), torch.zeros(3, dtype=torch.int64, device=DEVICE), 2)


def _linear_pass(activation):
    """FC1's (GELU) or ModernBERT's (GeGLU) gradient pass with dropout, through an identity weight: dx is g."""
    def run(rows, generator, row_task, dtype, compute_dx):
        n_out = 40
        n = 2 * n_out if activation == "geglu" else n_out
        h = torch.randn(rows, n, generator=generator).to(DEVICE, dtype)
        dy = torch.randn(rows, n_out, generator=generator).to(DEVICE, dtype)
        dx, db = K.linear_backward(dy, torch.eye(n, device=DEVICE, dtype=dtype), h, activation=activation,
                                   dropout_p=0.3, seed=7, compute_dx=compute_dx, row_task=row_task,
                                   num_tasks=TASKS)
        return [dx], [(db, dx)]  # the gradients written; each bias gradient with the rows it sums
    return run


def _layer_norm_pass(rows, generator, row_task, dtype, compute_dx):
    """The residual LayerNorm backward with dropout, summing the feeding linear's bias gradient too (sum_dx); or
    beta's gradient alone."""
    n = 45
    x, residual, dy = (torch.randn(rows, n, generator=generator).to(DEVICE, dtype) for _ in range(3))
    gamma = torch.randn(n, generator=generator).to(DEVICE)
    _, x_hat, rstd = K.residual_layer_norm_forward(x, gamma, torch.zeros(n, device=DEVICE), 1e-5, residual)
    dx, ds, dbeta, dx_sum = K.residual_layer_norm_backward(dy, x_hat, gamma, rstd, dropout_p=0.3, seed=7,
                                                           compute_dx=compute_dx, sum_dx=compute_dx,
                                                           row_task=row_task, num_tasks=TASKS)
    return [dx, ds], [(dbeta, dy), (dx_sum, dx)][:1 + compute_dx]


def _heads_pass(rows, generator, row_task, dtype, compute_dx):
    """The q/k/v gather of a padded batch into ``rows`` rows of g, of which the last ones (up to 3) are a bucket's
    zeros. It always writes g (the dX GEMM's input)."""
    real = max(1, rows - 3)
    sequences, length = 3, -(-real // 3) + 1
    grads = [torch.randn(sequences, 2, length, 5, generator=generator).to(DEVICE, dtype) for _ in range(3)]
    slots = torch.randperm(sequences * length, generator=generator)[:real].sort().values.to(DEVICE)
    g, db = K.heads_to_rows(grads, slots, rows, row_task=row_task, num_tasks=TASKS)
    if row_task is not None:  # part by part, [P, T, H * D]: compared as the [T, P * H * D] sums of g's columns
        assert db.shape == (3, TASKS, 10) and all(part.is_contiguous() for part in db.unbind(0))
        db = db.transpose(0, 1).flatten(1)
    else:
        db = db.flatten()
    return [g], [(db, g)]


TASKS = 6
PASSES = {"linear gelu": _linear_pass("gelu"), "linear geglu": _linear_pass("geglu"),
          "layer norm": _layer_norm_pass, "heads to rows": _heads_pass}


def _check_pass_per_task(name, rows, layout, monkeypatch, dtype=torch.float32, compute_dx=True):
    """A pass walking the rows sorted by task writes exactly the gradient that the same pass over a shared bias
    writes (every row, in its place, through its dropout mask), and its sums per task equal float64 sums of those
    rows (summed before they are rounded to ``dtype``: exactly for fp32, to fp32 accuracy of the shared pass's own
    sums for 16-bit), the same bits every run."""
    for module in (linear, layer_norm, heads, task_tables):  # a value read but never written shows as NaN
        monkeypatch.setattr(module, "torch", TorchWithNanEmpty())
    row_task = _layout(layout, rows, torch.Generator().manual_seed(rows)).to(DEVICE)
    run = PASSES[name]
    shared_written, shared_sums = run(rows, torch.Generator().manual_seed(1), None, dtype, True)
    written, sums = run(rows, torch.Generator().manual_seed(1), row_task, dtype, compute_dx)
    _, sums_again = run(rows, torch.Generator().manual_seed(1), row_task, dtype, compute_dx)
    if compute_dx:
        for ours, expected in zip(written, shared_written, strict=True):
            assert torch.equal(ours, expected), "every row's gradient, as the pass over a shared bias writes it"
    inside = (row_task >= 0) & (row_task < TASKS)
    absent = sorted(set(range(TASKS)) - set(row_task.tolist()))
    for (table_grad, _), (again, _), (shared, summed) in zip(sums, sums_again, shared_sums[:len(sums)], strict=True):
        truth = torch.zeros(TASKS, summed.shape[1], dtype=torch.float64, device=DEVICE)
        truth.index_add_(0, row_task[inside], summed[inside].double())
        assert table_grad.dtype == torch.float32 and table_grad.shape == truth.shape
        scale = max(1.0, truth.abs().max().item())
        if dtype == torch.float32:
            torch.testing.assert_close(table_grad.double(), truth, atol=1e-5 * scale, rtol=1e-6)
        elif inside.all():  # the rows are rounded to 16 bits, the sums are not: compare with the shared pass's
            torch.testing.assert_close(table_grad.sum(0), shared, atol=1e-5 * scale, rtol=1e-5)
        assert not table_grad[absent].any(), "tasks without rows get zeros"
        assert torch.equal(table_grad, again), "deterministic: the same bits every run"


LAYOUTS = ["one task", "boundary on a chunk edge", "few rows per task", "uneven", "outside the table"]


@pytest.mark.parametrize("layout", LAYOUTS)
# Under the interpreter, 64 rows make chunks of 16, so that the layout's task edge at 32 falls on a chunk edge;
# 150 rows make chunks of 38, three row blocks each. The LayerNorm walks single rows: slow interpreted.
@pytest.mark.parametrize("name,rows", [(name, rows) for name in PASSES for rows in (1, 37, 64, 150)
                                       if (name, rows) != ("layer norm", 150)])
def test_gradient_passes_write_every_row_and_sum_it_per_task(name, rows, layout, monkeypatch):
    _check_pass_per_task(name, rows, layout, monkeypatch)


@pytest.mark.parametrize("name", list(PASSES))
def test_gradient_passes_walk_every_task_number_when_rows_outside_the_table_take_numbers_too(name, monkeypatch):
    """Tasks outside the table count among the numbers: with every task present, the last ones' numbers pass T,
    and a walk bounded by T would drop them."""
    _check_pass_per_task(name, 37, "every task and outside", monkeypatch)


def test_a_gather_of_no_rows_sums_zeros_per_task():
    """No rows at all: the numbers' bound stays 1, the pieces' table a row."""
    grads = [torch.randn(0, 2, 4, 5, device=DEVICE) for _ in range(3)]
    g, db = K.heads_to_rows(grads, None, 0, row_task=torch.zeros(0, dtype=torch.int64, device=DEVICE), num_tasks=3)
    assert g.shape == (0, 30) and db.shape == (3, 3, 10) and not db.any()


@pytest.mark.parametrize("layout", ["uneven", "outside the table"])
@pytest.mark.parametrize("name", ["linear gelu", "linear geglu", "layer norm"])
def test_gradient_passes_sum_per_task_without_writing_the_input_gradient(name, layout, monkeypatch):
    """No dx wanted (a first layer's input): the linear pass only sums g, the LayerNorm only dy for beta."""
    _check_pass_per_task(name, 64, layout, monkeypatch, compute_dx=False)


@pytest.mark.parametrize("layout", ["few rows per task", "uneven"])
@pytest.mark.parametrize("name", list(PASSES))
def test_gradient_passes_per_task_in_fp16(name, layout, monkeypatch):
    _check_pass_per_task(name, 64, layout, monkeypatch, dtype=torch.float16)


@pytest.mark.gpu
@pytest.mark.parametrize("programs", [None, 7])  # None: utils.PROGRAMS_PER_SM a SM; 7: chunks hundreds of rows long
@pytest.mark.parametrize("layout", ["one task", "boundary on a chunk edge", "few rows per task", "outside the table",
                                    "every task and outside"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(PASSES))
def test_gpu_gradient_passes_sum_per_task(name, dtype, layout, programs, monkeypatch):
    """The compiled kernels over 5,000 rows: with a GPU's program count the LayerNorm's chunks are a few rows long
    and the others' one row block (their columns fit one block); with 7 programs every pass walks long chunks."""
    if programs is not None:
        for module in (linear, layer_norm, heads):
            monkeypatch.setattr(module, "reduction_programs", lambda rows, device: min(rows, programs))
    _check_pass_per_task(name, 5000, layout, monkeypatch, dtype=dtype)
