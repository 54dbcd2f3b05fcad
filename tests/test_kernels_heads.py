"""rows_to_heads: a projection's rows into attention's padded layout (plus a task table's rows); heads_to_rows: the
attention heads' gradients back into rows, and the projection's bias gradient. Against the torch implementation and
float64."""

import pytest
import torch
from kernel_checks import TorchWithNanEmpty

import bitfit_fast_kernels as K
from bitfit_fast import torch_ops
from bitfit_fast_kernels import heads, task_tables

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (sequences, heads, length, head size, real rows or None for all, extra bucket rows): primes, a single row, and
# head sizes that are not powers of two.
LAYOUTS = [(1, 1, 1, 3, None, 0), (3, 2, 7, 5, 13, 4), (2, 3, 11, 12, None, 9), (5, 4, 6, 16, 17, 0)]


def _grads(sequences, heads, length, dim, parts, dtype, transposed):
    """Each part's gradient [S, H, L, D]: contiguous, or laid out as [S, L, H, D] (what a packed buffer's views
    give) with its last two dimensions swapped too, so that the kernel sees strides of every kind."""
    if not transposed:
        return [torch.randn(sequences, heads, length, dim, device=DEVICE, dtype=dtype) for _ in range(parts)]
    return [torch.randn(sequences, length, dim, heads, device=DEVICE, dtype=dtype).permute(0, 3, 1, 2)
            for _ in range(parts)]


def _slots(sequences, length, real):
    """Real rows' places in the [S, L] layout, in order (as unpadding lays them out), or None for all."""
    if real is None:
        return None
    return torch.randperm(sequences * length, device=DEVICE)[:real].sort().values


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("parts", [3, 2])
@pytest.mark.parametrize("transposed", [False, True])
def test_rows_and_bias_gradient_match_torch(dtype, layout, parts, transposed):
    sequences, heads, length, dim, real, extra = layout
    grads = _grads(sequences, heads, length, dim, parts, dtype, transposed)
    slots = _slots(sequences, length, real)
    num_rows = (real if real is not None else sequences * length) + extra
    g, db = K.heads_to_rows(grads, slots, num_rows)
    g_ref, _ = torch_ops.heads_to_rows(grads, slots, num_rows)
    assert g.dtype == dtype and g.shape == (num_rows, parts * heads * dim)
    assert torch.equal(g, g_ref), "a gather: exact"
    assert not g[num_rows - extra:].any(), "the bucket's rows are zeros"
    truth = g_ref.double().sum(dim=0).view(parts, -1)  # part by part
    assert db.dtype == torch.float32 and db.shape == truth.shape
    torch.testing.assert_close(db.double(), truth, atol=1e-5 * max(1.0, truth.abs().max().item()), rtol=1e-6)


def test_a_part_without_gradient_gives_zero_columns_and_db_only_when_asked(monkeypatch):
    for module in (heads, task_tables):  # the outputs and partials start as NaN: zeros must be written
        monkeypatch.setattr(module, "torch", TorchWithNanEmpty())
    grads = _grads(2, 3, 5, 4, 3, torch.float32, False)
    grads[1] = None
    g, db = K.heads_to_rows(grads, None, 10)
    assert not g[:, 12:24].any() and not db[1].any() and db[[0, 2]].all()
    torch.testing.assert_close(g, torch_ops.heads_to_rows(grads, None, 10)[0], atol=0, rtol=0)
    _, none = K.heads_to_rows(grads, None, 10, compute_db=False)
    assert none is None


def test_per_task_bias_gradient():
    grads = _grads(3, 2, 7, 5, 3, torch.float32, False)
    slots = _slots(3, 7, 13)
    row_task = torch.randint(0, 4, (16,), device=DEVICE)
    g, dtable = K.heads_to_rows(grads, slots, 16, row_task=row_task, num_tasks=4)
    expected = torch.zeros(4, g.shape[1], dtype=torch.float64, device=DEVICE).index_add_(0, row_task, g.double())
    assert dtable.shape == (3, 4, 10), "part by part: [P, T, H * D]"
    torch.testing.assert_close(dtable.double(), expected.view(4, 3, 10).transpose(0, 1), atol=1e-5, rtol=1e-6)
    _, torch_dtable = torch_ops.heads_to_rows(grads, slots, 16, row_task=row_task, num_tasks=4)
    torch.testing.assert_close(dtable, torch_dtable, atol=1e-5, rtol=1e-6)


def test_bias_gradient_is_bit_identical_across_runs():
    grads = _grads(5, 4, 6, 16, 3, torch.float16, True)
    runs = [K.heads_to_rows(grads, None, 40) for _ in range(3)]
    assert all(torch.equal(db, runs[0][1]) for _, db in runs[1:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("layout", [layout for layout in LAYOUTS if layout[4] is not None])
@pytest.mark.parametrize("tasks", [None, 1, 4])
def test_rows_scatter_into_the_layout_with_their_tasks_bias(dtype, layout, tasks):
    """Every slot written: its row (plus the row's task bias, rounded once) or zeros; the bucket's rows unread."""
    sequences, heads, length, dim, real, extra = layout
    width = 3 * heads * dim
    rows = torch.randn(real + extra, width, device=DEVICE, dtype=dtype)
    slots = _slots(sequences, length, real)
    table = torch.randn(tasks, width, device=DEVICE) if tasks else None
    row_task = torch.randint(0, tasks, (real + extra,), device=DEVICE) if tasks else None
    out = K.rows_to_heads(rows, slots, sequences * length, table=table, row_task=row_task)
    assert out.dtype == dtype and out.shape == (sequences * length, width)
    expected = torch.zeros(sequences * length, width, dtype=dtype, device=DEVICE)
    expected[slots] = (rows[:real].float() + (table[row_task[:real]] if tasks else 0.0)).to(dtype)  # in fp32
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    reference = torch_ops.rows_to_heads(rows, slots, sequences * length, table=table, row_task=row_task)
    torch.testing.assert_close(out.double(), reference.double(), atol=2e-3 if dtype == torch.float16 else 1e-6,
                               rtol=2e-3 if dtype == torch.float16 else 1e-6)  # torch rounds the bias first


def test_the_scatter_writes_every_slot_and_derives_the_inverse_once_per_slots(monkeypatch):
    monkeypatch.setattr(heads, "torch", TorchWithNanEmpty())  # the output starts as NaN: every zero is written
    rows = torch.randn(6, 8, device=DEVICE)
    slots = torch.tensor([0, 1, 2, 5, 6, 9], device=DEVICE)
    inverses = []
    real_slot_rows = heads._slot_rows
    monkeypatch.setattr(heads, "_slot_rows", lambda *args: inverses.append(real_slot_rows(*args)) or inverses[-1])
    first = K.rows_to_heads(rows, slots, 12)
    second = K.rows_to_heads(rows * 2, slots, 12)
    assert not first[[3, 4, 7, 8, 10, 11]].any() and torch.equal(first[slots], rows)
    assert torch.equal(second, first * 2)
    assert inverses[0] is inverses[1], "the same slots: one inverse"
    assert inverses[0].tolist() == [0, 1, 2, -1, -1, 3, 4, -1, -1, 5, -1, -1]
    slots.add_(1)  # changed in place: derived again
    K.rows_to_heads(rows, slots, 12)
    assert inverses[2] is not inverses[0] and inverses[2].tolist()[:3] == [-1, 0, 1]


def test_the_scatter_runs_under_inference_mode():
    """Inference tensors have no version counter to key the inverse's cache by: it is derived each call."""
    with torch.inference_mode():
        rows = torch.randn(3, 8, device=DEVICE)
        slots = torch.tensor([0, 2, 3], device=DEVICE)
        for _ in range(2):
            out = K.rows_to_heads(rows, slots, 5)
            assert torch.equal(out[slots], rows) and not out[[1, 4]].any()


def test_the_same_slots_in_a_longer_layout_get_their_own_inverse():
    rows = torch.randn(3, 8, device=DEVICE)
    slots = torch.tensor([0, 2, 3], device=DEVICE)
    short = K.rows_to_heads(rows, slots, 4)
    assert heads._slot_rows(slots, 6).tolist() == [0, -1, 1, 2, -1, -1], "not the 4 slots' inverse"
    long = K.rows_to_heads(rows, slots, 6)
    assert long.shape == (6, 8) and torch.equal(long[:4], short) and not long[4:].any()


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: K.heads_to_rows((None, None), None, 4), "at least one"),
        (lambda: K.heads_to_rows((torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 5)), None, 3), "one"),
        (lambda: K.heads_to_rows((torch.randn(1, 2, 3, 4),), torch.tensor([0, 2], dtype=torch.int32), 3), "int64"),
        (lambda: K.heads_to_rows((torch.randn(1, 2, 3, 4),), None, 2), "less than"),
        (lambda: K.heads_to_rows((torch.ones(1, 2, 3, 4, dtype=torch.int32),), None, 3), "supported are float32"),
        (lambda: K.heads_to_rows((torch.randn(1, 0, 3, 4),), None, 3), "no features"),
        (lambda: K.heads_to_rows((torch.randn(1, 2, 3, 4),), None, 3, row_task=torch.zeros(2, dtype=torch.long)),
         r"row_task must be an integer \(3,\) tensor"),
        (lambda: K.rows_to_heads(torch.randn(3, 4), torch.tensor([0, 2]), 3, table=torch.randn(2, 4)), "both"),
        (lambda: K.rows_to_heads(torch.randn(3, 4).t(), torch.tensor([0, 2]), 3), "contiguous 2-D"),
        (lambda: K.rows_to_heads(torch.randn(3, 4), torch.tensor([0, 2]).int(), 3), "int64"),
        (lambda: K.rows_to_heads(torch.randn(1, 4), torch.tensor([0, 2]), 3), "got 1 rows and a layout of 3"),
        (lambda: K.rows_to_heads(torch.randn(3, 4), torch.tensor([0, 1, 2]), 2), "got 3 rows and a layout of 2 slots"),
        (lambda: K.rows_to_heads(torch.randn(3, 4), torch.tensor([0, 2]), 3, table=torch.randn(2, 5),
                                 row_task=torch.zeros(3, dtype=torch.long)), r"table must have shape \(2, 4\)"),
    ],
)
def test_bad_input_gets_a_clear_error(call, message):
    with torch.device(DEVICE), pytest.raises(K.KernelInputError, match=message):  # the calls' tensors on DEVICE
        call()
