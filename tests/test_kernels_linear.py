"""The fused linear kernels against float64 torch and torch at the same precision."""

import pytest
import torch
import torch.nn.functional as F
import triton
from kernel_checks import assert_as_accurate_as_torch, torch_grads

import bitfit_fast_kernels as K
from bitfit_fast.functions import Ops
from bitfit_fast.torch_ops import activation_forward
from bitfit_fast_kernels.utils import cdiv, next_power_of_2, row_bucket, seed_pointer

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KERNELS = Ops(K)
DTYPES = [torch.float32, torch.float16]
# (leading shape of x, K, N): a single row, primes, and sizes that are not multiples of the tiles.
# (5, 29): 145 rows, so that each of the interpreter's reduction programs sums several row blocks.
SHAPES = [((1,), 17, 5), ((3, 11), 70, 37), ((13,), 64, 96), ((2, 1), 3, 1), ((5, 29), 24, 40)]


def make(lead, k, n, dtype, bias=True):
    x = torch.randn(*lead, k, device=DEVICE, dtype=dtype)
    w = (torch.randn(n, k, device=DEVICE) / k**0.5).to(dtype)
    b = torch.randn(n, device=DEVICE) if bias else None  # biases are fp32 masters
    return x, w, b


def torch_linear(x, w, b, activation, dtype):
    return activation_forward(activation, F.linear(x.to(dtype), w.to(dtype), b.to(dtype) if b is not None else None))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,k,n", SHAPES)
@pytest.mark.parametrize("activation", [None, "gelu"])
@pytest.mark.parametrize("has_bias", [True, False])
@pytest.mark.parametrize("gemm", ["triton", "cublas"])
def test_forward_matches_torch(dtype, lead, k, n, activation, has_bias, gemm):
    """Both GEMMs of a bias or GELU epilogue (on CPU "cublas" is torch.addmm on the CPU: the same host code)."""
    x, w, b = make(lead, k, n, dtype, has_bias)
    y, h = K.linear_forward(x, w, b, activation=activation, store_preact=activation is not None, gemm=gemm)
    truth = torch_linear(x, w, b, activation, torch.float64)
    assert_as_accurate_as_torch(y, torch_linear(x, w, b, activation, dtype), truth, "y")
    if activation is not None:
        truth_h = torch_linear(x, w, b, None, torch.float64)
        assert_as_accurate_as_torch(h, torch_linear(x, w, b, None, dtype), truth_h, "h")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,k,n", SHAPES)
@pytest.mark.parametrize("activation", [None, "gelu"])
def test_backward_matches_torch(dtype, lead, k, n, activation):
    x, w, b = make(lead, k, n, dtype)
    _, h = K.linear_forward(x, w, b, activation=activation, store_preact=True)
    dy = torch.randn(*lead, n, device=DEVICE, dtype=dtype)
    dx, db = K.linear_backward(dy, w, h if activation else None, activation=activation)

    def linear(xp, bp, precision):
        return torch_linear(xp, w, bp, activation, precision)

    truth_dx, truth_db = torch_grads(linear, x, b, dy, torch.float64)
    same_dx, same_db = torch_grads(linear, x, b, dy, dtype)
    assert_as_accurate_as_torch(dx, same_dx, truth_dx, "dx")
    assert db.dtype == torch.float32
    assert_as_accurate_as_torch(db.to(dtype), same_db, truth_db, "db")


@pytest.mark.parametrize("activation,p", [(None, 0.0), ("gelu", 0.0), ("gelu", 0.2)])
def test_backward_computes_only_what_is_asked(activation, p):
    x, w, b = make((9,), 20, 11, torch.float32)
    _, h = K.linear_forward(x, w, b, activation=activation, store_preact=True)
    dy = torch.randn(9, 11, device=DEVICE)
    options = dict(activation=activation, dropout_p=p, seed=5 if p else None)
    dx, db = K.linear_backward(dy, w, h, **options)
    dx_only = K.linear_backward(dy, w, h, compute_db=False, **options)
    db_only = K.linear_backward(dy, w, h, compute_dx=False, **options)
    assert dx_only[1] is None and db_only[0] is None
    assert torch.equal(dx_only[0], dx) and torch.equal(db_only[1], db)
    assert K.linear_backward(dy, w, h, compute_dx=False, compute_db=False, **options) == (None, None)
    if activation is None:
        torch.testing.assert_close(dx, dy @ w)
        torch.testing.assert_close(db, dy.sum(0))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,k,n", [((3, 11), 70, 37), ((13,), 64, 48)])
def test_geglu_forward_and_backward_match_torch(dtype, lead, k, n):
    # One GEMM over the [input | gate] weight rows (2n of them), y = gelu(input) * gate with n columns.
    x, w, b = make(lead, k, 2 * n, dtype)
    y, h = K.linear_forward(x, w, b, activation="geglu", store_preact=True)
    assert y.shape == (*lead, n) and h.shape == (*lead, 2 * n)
    assert_as_accurate_as_torch(y, torch_linear(x, w, b, "geglu", dtype), torch_linear(x, w, b, "geglu", torch.float64))
    assert_as_accurate_as_torch(h, torch_linear(x, w, b, None, dtype), torch_linear(x, w, b, None, torch.float64))
    dy = torch.randn(*lead, n, device=DEVICE, dtype=dtype)
    dx, db = K.linear_backward(dy, w, h, activation="geglu")

    def linear(xp, bp, precision):
        return torch_linear(xp, w, bp, "geglu", precision)

    truth_dx, truth_db = torch_grads(linear, x, b, dy, torch.float64)
    same_dx, same_db = torch_grads(linear, x, b, dy, dtype)
    assert_as_accurate_as_torch(dx, same_dx, truth_dx, "dx")
    assert_as_accurate_as_torch(db.to(dtype), same_db, truth_db, "db")
    db_only = K.linear_backward(dy, w, h, activation="geglu", compute_dx=False)[1]
    assert torch.equal(db_only, db), "the bias gradient does not depend on whether g is stored"


def test_bias_gradient_is_bit_identical_across_runs():
    x, w, b = make((67,), 45, 53, torch.float16)
    _, h = K.linear_forward(x, w, b, activation="gelu", store_preact=True)
    dy = torch.randn(67, 53, device=DEVICE, dtype=torch.float16)
    runs = [K.linear_backward(dy, w, h, activation="gelu") for _ in range(3)]
    for dx, db in runs[1:]:
        assert torch.equal(db, runs[0][1]) and torch.equal(dx, runs[0][0])


def _dropout_run(seed, p=0.3, m=64, n=96, k=24):
    # x = 0 and b = 1 make the pre-dropout value 1 everywhere, so y is exactly the scaled keep mask.
    x = torch.zeros(m, k, device=DEVICE)
    w = torch.randn(n, k, device=DEVICE)
    b = torch.ones(n, device=DEVICE)
    y, _ = K.linear_forward(x, w, b, dropout_p=p, seed=seed)
    return y, w


def test_dropout_keep_rate_scale_and_seeds():
    p = 0.3
    y, _ = _dropout_run(seed=1234, p=p)
    kept = y != 0
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 1 / (1 - p)))
    rate = kept.float().mean().item()
    sigma = (p * (1 - p) / y.numel()) ** 0.5
    assert abs(rate - (1 - p)) < 5 * sigma, rate
    assert torch.equal(y, _dropout_run(seed=1234, p=p)[0]), "same seed must give the same mask"
    assert not torch.equal(y, _dropout_run(seed=4321, p=p)[0]), "two seeds must differ"


def test_dropout_uses_all_four_philox_outputs_independently():
    # Columns 4q..4q+3 come from one Philox call: two of them agree with probability p^2 + (1-p)^2 if independent.
    p = 0.3
    kept = _dropout_run(seed=77, p=p, m=128, n=96)[0] != 0
    agree = 1 - p * (1 - p) * 2
    n = kept[:, 0::4].numel()
    for lane in (1, 2, 3):
        rate = (kept[:, 0::4] == kept[:, lane::4]).float().mean().item()
        assert abs(rate - agree) < 5 * (agree * (1 - agree) / n) ** 0.5, (lane, rate)


def test_dropout_mask_does_not_depend_on_the_batch_shape():
    # Counters follow (row, column) only: a row keeps its mask whatever the number of rows or the tiles.
    small, _ = _dropout_run(seed=3, m=40, n=37)
    large, _ = _dropout_run(seed=3, m=100, n=37)
    assert torch.equal(small, large[:40])


def test_row_buckets_are_coarse():
    assert [row_bucket(m) for m in (1, 256, 257, 5000, 16384, 16385, 10**7)] == [
        256, 256, 1024, 16384, 16384, 65536, 65536]


def test_host_cdiv_and_next_power_of_2_are_tritons():
    """The plain-Python host helpers give what triton.cdiv and triton.next_power_of_2 give: exact multiples and
    exact powers of 2 included (a block of 2N for N features would be twice the work); next_power_of_2 is 1 for
    n <= 1 (triton's is 0 for 0)."""
    for n in range(1, 70):
        assert next_power_of_2(n) == triton.next_power_of_2(n), n
    for n in range(0, 70):
        for b in (1, 3, 4, 16):
            assert cdiv(n, b) == triton.cdiv(n, b), (n, b)
    assert [next_power_of_2(n) for n in (0, 1, 2, 768, 1024, 1025, 65536)] == [1, 1, 2, 1024, 1024, 2048, 65536]


def test_a_seed_tensor_draws_the_mask_of_the_int_it_holds_forward_and_backward():
    # The kernels read the seed from memory, so that a CUDA graph replays a seed drawn on the device.
    seed = torch.tensor([1234], device=DEVICE)
    y, w = _dropout_run(seed=seed)
    assert torch.equal(y, _dropout_run(seed=1234)[0])
    assert not torch.equal(y, _dropout_run(seed=torch.tensor([1235], device=DEVICE))[0])
    dx, db = K.linear_backward(torch.ones_like(y), w, dropout_p=0.3, seed=seed)
    torch.testing.assert_close(db, y.sum(0))  # dy = 1: db counts the forward's kept (scaled) elements
    torch.testing.assert_close(dx, y @ w)


@pytest.mark.parametrize("seed", [torch.tensor([5], dtype=torch.int32), torch.tensor([5, 6]), torch.tensor([5.0])])
def test_a_seed_tensor_holds_one_int64(seed):
    with pytest.raises(K.KernelInputError, match="one int64"):
        _dropout_run(seed=seed.to(DEVICE))


@pytest.mark.parametrize("activation", [None, "gelu"])
def test_backward_regenerates_the_forward_mask(activation):
    y, w = _dropout_run(seed=99)
    mask_scaled = y  # keep / (1 - p), from the forward
    dy = torch.ones_like(y)
    preact = torch.zeros_like(y) if activation else None  # gelu'(0) = 0.5
    dx, db = K.linear_backward(dy, w, preact, activation=activation, dropout_p=0.3, seed=99)
    factor = 0.5 if activation else 1.0
    torch.testing.assert_close(db, factor * mask_scaled.sum(0))
    torch.testing.assert_close(dx, factor * mask_scaled @ w)


@pytest.mark.parametrize("activation,rows", [("gelu", 29), ("geglu", 2 * 29)])
def test_autograd_function_with_activation_and_dropout_matches_torch_on_the_same_mask(activation, rows):
    x, w, b = make((5, 7), 33, rows, torch.float32)
    x.requires_grad_()
    b.requires_grad_()
    y = KERNELS.linear(x, w, b, activation, 0.25, 2024)
    keep = (y != 0).float()
    dy = torch.randn_like(y)
    dx, db = torch.autograd.grad(y, (x, b), dy)

    xr, br = x.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    yr = activation_forward(activation, F.linear(xr, w.double(), br)) * keep.double() / 0.75
    torch.testing.assert_close(y.double(), yr, atol=1e-5, rtol=1e-5)
    dxr, dbr = torch.autograd.grad(yr, (xr, br), dy.double())
    torch.testing.assert_close(dx.double(), dxr, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(db.double(), dbr, atol=1e-5, rtol=1e-5)


def test_autograd_function_returns_gradients_only_where_needed():
    x, w, b = make((4,), 16, 8, torch.float32)
    b.requires_grad_()
    y = KERNELS.linear(x, w, b)
    (db,) = torch.autograd.grad(y.sum(), (b,))
    torch.testing.assert_close(db, torch.full_like(b, 4.0))
    with pytest.raises(RuntimeError, match="no weight gradient"):
        KERNELS.linear(x, w.requires_grad_(), b)


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: K.linear_forward(torch.randn(3, 5), torch.randn(4, 6)), "x has 5 features but weight expects 6"),
        (lambda: K.linear_forward(torch.randn(3, 5), torch.randn(4, 5).half()), "cast them to one dtype"),
        (lambda: K.linear_forward(torch.randn(3, 5).double(), torch.randn(4, 5).double()), "supported are float32"),
        (lambda: K.linear_forward(torch.randn(5, 3).t(), torch.randn(4, 5)), "must be contiguous"),
        (lambda: K.linear_forward(torch.randn(0, 5), torch.randn(4, 5)), "empty"),
        (lambda: K.linear_forward(torch.randn(3, 5), torch.randn(4, 5), torch.randn(3)), r"bias must have shape \(4"),
        (lambda: K.linear_forward(torch.randn(3, 5), torch.randn(4, 5), dropout_p=0.1), "needs a seed"),
        (lambda: K.linear_forward(torch.randn(3, 5), torch.randn(4, 5), dropout_p=1.0, seed=1), r"in \[0, 1\)"),
        (lambda: K.linear_forward(torch.randn(3, 5), torch.randn(4, 5), activation="relu"), "activation must be"),
        (lambda: K.linear_backward(torch.randn(3, 4), torch.randn(4, 5), activation="gelu"), "pre-activation"),
        (lambda: K.linear_forward(torch.randn(3, 5), torch.randn(4, 5), gemm="cutlass"), "gemm must be one of"),
        (lambda: K.linear_forward(torch.randn(3, 5), torch.randn(4, 5), dropout_p=0.1, seed=1, gemm="cublas"),
         "takes a bias or GELU epilogue only"),
        (lambda: K.linear_forward(torch.randn(3, 6), torch.randn(4, 6), activation="geglu", gemm="cublas"),
         "takes a bias or GELU epilogue only"),
        (lambda: K.linear_forward(torch.randn(3, 5), torch.randn(7, 5), activation="geglu"), "even number of weight"),
        (lambda: K.linear_backward(torch.randn(3, 4), torch.randn(4, 5), torch.randn(3, 4), activation="geglu"),
         "dy has 4 features but the layer produces 2"),
        (lambda: K.linear_backward(torch.randn(3, 4), torch.randn(4, 5), row_task=torch.zeros(3, dtype=torch.long,
                                                                                            device="meta")),
         r"row_task must be contiguous and on (cpu|cuda:0), got meta"),
        (lambda: K.linear_backward(torch.randn(3, 4), torch.randn(4, 5), row_task=torch.zeros(2, dtype=torch.long)),
         r"row_task must be an integer \(3,\) tensor"),
        (lambda: K.linear_forward(torch.randn(3, 5), torch.randn(4, 5), torch.zeros(0, 4),
                                  row_task=torch.zeros(3, dtype=torch.long)), r"a \[tasks, 4\] table"),
        (lambda: K.linear_forward(torch.randn(3, 5), torch.randn(4, 5), torch.zeros(2, 3),
                                  row_task=torch.zeros(3, dtype=torch.long)), r"bias must have shape \(2, 4\)"),
        (lambda: K.linear_forward(torch.randn(3, 5), torch.randn(4, 5), torch.zeros(4, 2).t(),
                                  row_task=torch.zeros(3, dtype=torch.long)), "bias must be contiguous"),
    ],
)
def test_bad_input_gets_a_clear_error(call, message):
    with torch.device(DEVICE), pytest.raises(K.KernelInputError, match=message):  # the calls' tensors on DEVICE
        call()


@pytest.mark.skipif(DEVICE == "cuda", reason="checks the CPU paths")
def test_bf16_under_the_interpreter_and_cpu_without_it_are_refused(monkeypatch):
    with pytest.raises(K.KernelInputError, match="triton#11584"):
        K.linear_forward(torch.randn(3, 5, dtype=torch.bfloat16), torch.randn(4, 5, dtype=torch.bfloat16))
    monkeypatch.setattr("bitfit_fast_kernels.utils.INTERPRETER", False)
    with pytest.raises(K.KernelInputError, match="TRITON_INTERPRET=1"):
        K.linear_forward(torch.randn(3, 5), torch.randn(4, 5))


# BERT-base and BERT-large shapes of the four linears of a layer (fused QKV included), in bf16 on a GPU.
GPU_SHAPES = [(768, 2304), (768, 768), (768, 3072), (3072, 768), (1024, 3072), (1024, 4096), (4096, 1024)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("k,n", GPU_SHAPES)
@pytest.mark.parametrize("activation", [None, "gelu", "geglu"])
@pytest.mark.parametrize("gemm", ["triton", "auto"])  # "auto": cuBLAS for the bias and GELU epilogues on a GPU
def test_gpu_bert_shapes(dtype, k, n, activation, gemm):
    x, w, b = make((4, 509), k, n, dtype)  # 2036 tokens: not a multiple of any tile
    y, h = K.linear_forward(x, w, b, activation=activation, store_preact=True, gemm=gemm)
    truth = torch_linear(x, w, b, activation, torch.float64)
    assert_as_accurate_as_torch(y, torch_linear(x, w, b, activation, dtype), truth, "y")
    dy = torch.randn_like(y)  # y's shape: half of n columns with the GeGLU
    dx, db = K.linear_backward(dy, w, h if activation else None, activation=activation)
    xp, bp = x.double().requires_grad_(), b.double().requires_grad_()
    truth_dx, truth_db = torch.autograd.grad(torch_linear(xp, w, bp, activation, torch.float64), (xp, bp), dy.double())
    xs, bs = x.clone().requires_grad_(), b.to(dtype).requires_grad_()
    same_dx, same_db = torch.autograd.grad(torch_linear(xs, w, bs, activation, dtype), (xs, bs), dy)
    assert_as_accurate_as_torch(dx, same_dx, truth_dx, "dx")
    assert_as_accurate_as_torch(db.to(dtype), same_db, truth_db, "db")


def test_cublas_gelu_pass_adds_the_rows_in_fp32_and_takes_the_gelu_of_h_as_stored():
    """A task table with the GELU after cuBLAS: h = x @ W^T plus each row's fp32 bias, rounded once, and y the GELU
    of that stored h (the one its backward reads), bit for bit the same pass on h itself (W = I, a zero table)."""
    x, w, _ = make((13,), 64, 96, torch.float16)
    table = torch.randn(5, 96, device=DEVICE)
    row_task = torch.randint(0, 5, (13,), device=DEVICE)
    y, h = K.linear_forward(x, w, table, activation="gelu", store_preact=True, row_task=row_task, gemm="cublas")
    assert torch.equal(h, (torch.mm(x, w.t()).float() + table[row_task]).half())
    gelu_of_h, _ = K.linear_forward(h, torch.eye(96, device=DEVICE, dtype=torch.float16),
                                    torch.zeros(1, 96, device=DEVICE), activation="gelu",
                                    row_task=torch.zeros(13, dtype=torch.long, device=DEVICE), gemm="cublas")
    assert torch.equal(y, gelu_of_h)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,k,n", SHAPES)
@pytest.mark.parametrize("activation,gemm", [(None, "triton"), (None, "cublas"), ("gelu", "triton"),
                                             ("gelu", "cublas"), ("geglu", "triton")])
def test_per_row_task_biases_match_torch(dtype, lead, k, n, activation, gemm):
    """A bias table [T, N] gathered by each row's task (TaskBank's mixed batches): forward against torch with the
    gathered rows; the table's gradient, each task's sum over its rows, against torch autograd of that gather."""
    n = 2 * n if activation == "geglu" else n
    x, w, _ = make(lead, k, n, dtype)
    rows = x[..., 0].numel()
    table = torch.randn(5, n, device=DEVICE)
    row_task = torch.randint(0, 5, (rows,), device=DEVICE)
    row_task[0] = 4  # the last task always has a row

    def linear(xp, tp, precision):
        h = F.linear(xp.to(precision), w.to(precision)) + tp.to(precision)[row_task].view(*lead, n)
        return activation_forward(activation, h)

    y, h = K.linear_forward(x, w, table, activation=activation, store_preact=activation is not None,
                            row_task=row_task, gemm=gemm)
    assert_as_accurate_as_torch(y, linear(x, table, dtype), linear(x, table, torch.float64), "y")
    alone, none = K.linear_forward(x, w, table, activation=activation, row_task=row_task, gemm=gemm)
    assert none is None and torch.equal(alone, y), "without the pre-activation kept, the same output"
    dy = torch.randn_like(y)
    dx, dtable = K.linear_backward(dy, w, h, activation=activation, row_task=row_task, num_tasks=5)
    truth_dx, truth_dtable = torch_grads(linear, x, table, dy, torch.float64)
    same_dx, same_dtable = torch_grads(linear, x, table, dy, dtype)
    assert_as_accurate_as_torch(dx, same_dx, truth_dx, "dx")
    assert dtable.dtype == torch.float32 and dtable.shape == (5, n)
    assert_as_accurate_as_torch(dtable.to(dtype), same_dtable, truth_dtable, "dtable")
    assert not dtable[1:4][torch.bincount(row_task, minlength=5)[1:4] == 0].any(), "a task without rows gets 0"


def test_a_seed_tensor_lives_on_the_inputs_device_and_is_read_as_it_is():
    # A CUDA graph replays the launch with this very tensor, which a seed drawn inside the graph rewrites: a copy
    # (or the int it holds) would repeat the capture's mask on every replay.
    elsewhere = torch.tensor([5], device="cpu" if DEVICE == "cuda" else "meta")
    with pytest.raises(K.KernelInputError, match="one int64"):
        _dropout_run(seed=elsewhere)
    seed, unused = torch.tensor([5], device=DEVICE), torch.empty(1, device=DEVICE)
    assert seed_pointer(seed, 0.1, seed.device, unused) is seed
    assert seed_pointer(None, 0.0, seed.device, unused) is unused
