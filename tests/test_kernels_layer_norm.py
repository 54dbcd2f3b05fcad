"""The residual + LayerNorm kernels against float64 torch and torch at the same precision."""

import pytest
import torch
import torch.nn.functional as F
from kernel_checks import TorchWithGuardRows, assert_as_accurate_as_torch, torch_grads

import bitfit_fast_kernels as K
from bitfit_fast.functions import Ops
from bitfit_fast.torch_ops import layer_norm_output
from bitfit_fast_kernels import layer_norm, task_tables

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KERNELS = Ops(K)
EPS = 1e-12  # BERT's
SHAPES = [((1,), 36), ((3, 7), 37), ((5,), 257), ((2, 3), 768)]


def adversarial_gamma(n: int) -> torch.Tensor:
    """gamma as pretrained LayerNorms have it: entries near 1e-33 (all-MiniLM-L6-v2's last LayerNorm), zeros,
    negatives and small values, beside ordinary ones."""
    gamma = 1 + 0.3 * torch.randn(n, device=DEVICE)
    for start, value in enumerate([4.8e-33, 0.0, -0.7, 1e-4, -2e-6]):
        gamma[start::6] = value
    return gamma


def make(lead, n, dtype, gamma_kind="plain"):
    x = torch.randn(*lead, n, device=DEVICE, dtype=dtype)
    residual = torch.randn(*lead, n, device=DEVICE, dtype=dtype)
    if gamma_kind == "plain":
        return x, residual, 1 + 0.3 * torch.randn(n, device=DEVICE), torch.randn(n, device=DEVICE)
    # |beta / gamma| up to 1e33: anything that divides by gamma is lost here.
    return x, residual, adversarial_gamma(n), 5 * torch.randn(n, device=DEVICE)


def assert_keep_rate(keep: torch.Tensor, p: float) -> None:
    """The kernel keeps an element where its uniform draw is >= p (p is not quantized): each is kept with
    probability 1 - p, so the kept fraction is within 5 sigma of it."""
    rate = keep.float().mean().item()
    assert abs(rate - (1 - p)) < 5 * (p * (1 - p) / keep.numel()) ** 0.5, f"keep rate {rate:.4f}, expected {1 - p}"


def torch_ln(x, residual, gamma, beta, precision, keep=None, p=0.2):
    s = x.to(precision)
    if keep is not None:
        s = s * keep.to(precision) / (1 - p)
    if residual is not None:
        s = s + residual.to(precision)
    return F.layer_norm(s, (s.shape[-1],), gamma.to(precision), beta.to(precision), EPS)


def assert_rebuilds_from_x_hat(y, x_hat, gamma, beta):
    """y = gamma * x_hat + beta of the fp32 x_hat, which the backward keeps rounded to its dtype: rebuilt from the
    kept x_hat (the lean and minimal recomputes), y is off by no more than that rounding and y's own."""
    rebuilt = layer_norm_output(x_hat, gamma, beta, dtype=torch.float32)
    rounding = torch.finfo(x_hat.dtype).eps * gamma.abs() * x_hat.float().abs() + torch.finfo(y.dtype).eps * (
        y.float().abs() + beta.abs())
    assert ((y.float() - rebuilt).abs() <= rounding).all(), "y is gamma * x_hat + beta of the x_hat kept"


@pytest.mark.parametrize("implementation", ["triton", "torch"])
@pytest.mark.parametrize("lead,n", SHAPES)
def test_an_fp32_residual_stream_stays_fp32(implementation, lead, n):
    """A half-precision sublayer output plus an fp32 residual (the residual stream under autocast): y in fp32, the
    LayerNorm of their fp32 sum, as torch's type promotion computes it; x_hat kept in x's dtype."""
    from bitfit_fast import torch_ops

    forward = {"triton": K, "torch": torch_ops}[implementation].residual_layer_norm_forward
    x, _, gamma, beta = make(lead, n, torch.float16, "adversarial")
    residual = 4 * torch.randn(*lead, n, device=DEVICE)
    y, x_hat, _ = forward(x, gamma, beta, EPS, residual)
    assert y.dtype == torch.float32 and x_hat.dtype == torch.float16
    torch.testing.assert_close(y, F.layer_norm(x.float() + residual, (n,), gamma, beta, EPS), atol=2e-6, rtol=1e-5)
    assert_rebuilds_from_x_hat(y, x_hat, gamma, beta)


@pytest.mark.parametrize("implementation", ["triton", "torch"])
@pytest.mark.parametrize("lead,n", SHAPES)
@pytest.mark.parametrize("dropout", [0.0, 0.2])
@pytest.mark.parametrize("per_task", [False, True])
def test_the_gemm_copy_and_its_gradient_are_the_cast_and_the_sum_they_replace(implementation, lead, n, dropout,
                                                                               per_task):
    """Under autocast an fp32 residual stream's y also feeds half-precision GEMMs: the forward writes y_gemm, y
    rounded to fp16, and the backward takes y_gemm's gradient beside y's, dx in the GEMMs' dtype. To the bit, what a
    cast of y, autograd's fp32 sum of the two gradients and a cast of dx would give."""
    from bitfit_fast import torch_ops

    impl = {"triton": K, "torch": torch_ops}[implementation]
    x, _, gamma, beta = make(lead, n, torch.float16, "adversarial")
    residual = 4 * torch.randn(*lead, n, device=DEVICE)
    rows = x.numel() // n
    row_task = torch.randint(0, 3, (rows,), device=DEVICE) if per_task else None
    table = torch.randn(3, n, device=DEVICE) if per_task else beta
    seed = 1234 if dropout else None
    y_gemm = torch.empty_like(x)
    y, x_hat, rstd = impl.residual_layer_norm_forward(x, gamma, table, EPS, residual, dropout_p=dropout, seed=seed,
                                                      row_task=row_task, y_gemm=y_gemm)
    assert y.dtype == torch.float32 and torch.equal(y_gemm, y.to(torch.float16))

    dy, dy_gemm = torch.randn_like(y), torch.randn_like(y_gemm)
    options = dict(dropout_p=dropout, seed=seed, sum_dx=True, row_task=row_task, num_tasks=3)
    dx, ds, dbeta, dx_sum = impl.residual_layer_norm_backward(dy, x_hat, gamma, rstd, dy_gemm=dy_gemm,
                                                               dx_dtype=torch.float16, **options)
    dx_ref, ds_ref, dbeta_ref, dx_sum_ref = impl.residual_layer_norm_backward(dy + dy_gemm.float(), x_hat, gamma,
                                                                               rstd, **options)
    assert ds.dtype == torch.float32 and dx.dtype == torch.float16
    assert torch.equal(ds, ds_ref) and torch.equal(dx, dx_ref.to(torch.float16))
    assert torch.equal(dbeta, dbeta_ref) and torch.equal(dx_sum, dx_sum_ref)


@pytest.mark.parametrize("implementation", ["triton", "torch"])
@pytest.mark.parametrize("lead,n", SHAPES)
def test_an_output_in_the_gemm_dtype_and_its_gradient_are_the_casts_they_replace(implementation, lead, n):
    """A pre-norm LayerNorm of the fp32 stream whose output only GEMMs read writes it in their dtype (y_dtype), and
    its backward reads that gradient and writes the stream's in fp32 (ds_dtype): to the bit, the fp32 output rounded
    and the backward of the gradient cast up."""
    from bitfit_fast import torch_ops

    impl = {"triton": K, "torch": torch_ops}[implementation]
    x, _, gamma, beta = make(lead, n, torch.float32, "adversarial")
    y, x_hat, rstd = impl.residual_layer_norm_forward(x, gamma, beta, EPS, y_dtype=torch.float16)
    y32, _, _ = impl.residual_layer_norm_forward(x, gamma, beta, EPS)
    assert torch.equal(y, y32.to(torch.float16))
    dy = torch.randn_like(y)
    dx, ds, dbeta, _ = impl.residual_layer_norm_backward(dy, x_hat, gamma, rstd, ds_dtype=torch.float32)
    dx_ref, ds_ref, dbeta_ref, _ = impl.residual_layer_norm_backward(dy.float(), x_hat, gamma, rstd)
    assert dx.dtype == ds.dtype == torch.float32
    assert torch.equal(dx, dx_ref) and torch.equal(ds, ds_ref) and torch.equal(dbeta, dbeta_ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("lead,n", SHAPES)
@pytest.mark.parametrize("with_residual", [True, False])
@pytest.mark.parametrize("gamma_kind", ["plain", "adversarial"])
def test_forward_and_backward_match_torch(dtype, lead, n, with_residual, gamma_kind):
    x, residual, gamma, beta = make(lead, n, dtype, gamma_kind)
    residual = residual if with_residual else None
    y, x_hat, rstd = K.residual_layer_norm_forward(x, gamma, beta, EPS, residual)
    assert_as_accurate_as_torch(y, torch_ln(x, residual, gamma, beta, dtype),
                                torch_ln(x, residual, gamma, beta, torch.float64), "y")
    assert x_hat.dtype == dtype and rstd.dtype == torch.float32
    assert_rebuilds_from_x_hat(y, x_hat, gamma, beta)

    dy = torch.randn_like(y)
    dx, dres, dbeta, dx_sum = K.residual_layer_norm_backward(dy, x_hat, gamma, rstd)
    assert dx_sum is None
    assert dx is dres, "without dropout the two input gradients are one tensor"

    def ln(xp, bp, precision):
        return torch_ln(xp, residual, gamma, bp, precision)

    truth_dx, truth_db = torch_grads(ln, x, beta, dy, torch.float64)
    same_dx, same_db = torch_grads(ln, x, beta, dy, dtype)
    assert_as_accurate_as_torch(dx, same_dx, truth_dx, "dx")
    assert_as_accurate_as_torch(dbeta.to(dtype), same_db, truth_db, "dbeta")


def test_eps_is_added_to_the_variance_inside_the_square_root():
    """Rows of tiny variance, where eps counts (torch's default 1e-5 here): rstd = 1 / sqrt(var + eps), and a
    constant row gives 1 / sqrt(eps), not a division by zero."""
    eps, n = 1e-5, 37
    x = 3 + 1e-3 * torch.randn(4, n, device=DEVICE)
    x[1] = 3.0
    gamma, beta = 1 + 0.3 * torch.randn(n, device=DEVICE), torch.randn(n, device=DEVICE)
    y, _, rstd = K.residual_layer_norm_forward(x, gamma, beta, eps)
    variance = x.double().var(-1, unbiased=False)
    torch.testing.assert_close(rstd.double().view(-1), (variance + eps).rsqrt(), rtol=1e-4, atol=0)
    assert_as_accurate_as_torch(y, F.layer_norm(x, (n,), gamma, beta, eps),
                                F.layer_norm(x.double(), (n,), gamma.double(), beta.double(), eps), "y")


def test_without_a_backward_the_forward_stores_nothing_for_it():
    x, residual, gamma, beta = make((3,), 37, torch.float32)
    y, x_hat, rstd = K.residual_layer_norm_forward(x, gamma, beta, EPS, residual, store_x_hat=False)
    assert x_hat is None and rstd is None
    torch.testing.assert_close(y, K.residual_layer_norm_forward(x, gamma, beta, EPS, residual)[0], atol=0, rtol=0)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_dropout_runs_on_rows_narrower_than_a_philox_draw(n):
    """A Philox call draws four lanes: rows of 1 or 2 features get a tile of four (arange(0, BLOCK_N // 4) failed).
    One feature normalises to zero (y is beta), and beta's gradient is dy's column sums."""
    x, residual, gamma, beta = make((5,), n, torch.float32)
    y, x_hat, rstd = K.residual_layer_norm_forward(x, gamma, beta, EPS, residual, dropout_p=0.3, seed=5)
    assert torch.isfinite(y).all()
    if n == 1:
        torch.testing.assert_close(y, beta.expand_as(y), atol=0, rtol=0)
    dy = torch.randn_like(y)
    _, _, dbeta, _ = K.residual_layer_norm_backward(dy, x_hat, gamma, rstd, dropout_p=0.3, seed=5)
    torch.testing.assert_close(dbeta, dy.sum(0))


def test_dropout_mask_is_regenerated_and_gradients_follow_it():
    x, residual, gamma, beta = make((6, 5), 41, torch.float32)
    x.requires_grad_()
    residual.requires_grad_()
    beta.requires_grad_()
    y, _ = KERNELS.layer_norm(x, residual, gamma, beta, EPS, 0.2, 77)
    # Recover the mask from the kernel's backward: dx is ds through the mask, ds is nowhere zero.
    _, x_hat, rstd = K.residual_layer_norm_forward(x.detach(), gamma, beta, EPS, residual.detach(), dropout_p=0.2,
                                                   seed=77)
    dx, ds, _, _ = K.residual_layer_norm_backward(torch.randn_like(y), x_hat, gamma, rstd, dropout_p=0.2, seed=77)
    assert (ds != 0).all()
    keep = dx != 0
    assert_keep_rate(keep, 0.2)

    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, residual, beta), dy)
    leaves = [t.detach().double().requires_grad_() for t in (x, residual, beta)]
    ref = torch_ln(leaves[0], leaves[1], gamma, leaves[2], torch.float64, keep=keep)
    torch.testing.assert_close(y.double(), ref, atol=1e-5, rtol=1e-5)
    for ours, theirs in zip(grads, torch.autograd.grad(ref, leaves, dy.double())):
        torch.testing.assert_close(ours.double(), theirs, atol=1e-5, rtol=1e-5)

    again, _ = KERNELS.layer_norm(x, residual, gamma, beta, EPS, 0.2, 77)
    other, _ = KERNELS.layer_norm(x, residual, gamma, beta, EPS, 0.2, 78)
    assert torch.equal(y, again) and not torch.equal(y, other)


# Dropout masks on their own, as tests/test_kernels_linear.py checks the linear kernel's.
P = 0.3


def _forward_keep(seed, p=P, m=64, n=64):
    """The forward's keep mask, read exactly from its output: with x = 1, a zero residual, gamma 1 and beta 0,
    s = keep / (1 - p) takes two values in a row, and y is positive exactly where the kernel kept (a row kept or
    dropped whole would be all zeros, which is refused)."""
    x = torch.ones(m, n, device=DEVICE)
    y, _, _ = K.residual_layer_norm_forward(x, torch.ones(n, device=DEVICE), torch.zeros(n, device=DEVICE), EPS,
                                            torch.zeros_like(x), dropout_p=p, seed=seed, store_x_hat=False)
    assert (y != 0).any(-1).all(), "a row is kept or dropped whole"
    return y > 0


def test_dropout_keep_rate_scale_and_the_backward_mask():
    m, n, seed = 64, 64, 1234
    keep = _forward_keep(seed)
    assert_keep_rate(keep, P)

    # Kept inputs are scaled by exactly 1 / (1 - p): y is LayerNorm of x * keep / (1 - p) + residual (the scale is
    # visible only beside a residual), on the same mask, which depends on the seed and the element only.
    x, residual, gamma, beta = make((m,), n, torch.float32)
    y, x_hat, rstd = K.residual_layer_norm_forward(x, gamma, beta, EPS, residual, dropout_p=P, seed=seed)
    torch.testing.assert_close(y.double(), torch_ln(x, residual, gamma, beta, torch.float64, keep=keep, p=P),
                               atol=1e-5, rtol=1e-5)

    # The backward draws the forward's mask again: dx is ds (nowhere zero) times 1 / (1 - p) where it kept, else 0;
    # also when it walks the rows sorted by task.
    dy = torch.randn_like(y)
    dx, ds, _, _ = K.residual_layer_norm_backward(dy, x_hat, gamma, rstd, dropout_p=P, seed=seed)
    assert (ds != 0).all()
    assert torch.equal(dx != 0, keep), "the backward's mask is not the forward's"
    scale = torch.tensor(1 / (1 - P), dtype=torch.float32)
    torch.testing.assert_close(dx[keep], ds[keep] * scale, atol=0, rtol=2e-7)
    row_task = torch.randint(0, 3, (m,), device=DEVICE)
    dx_tasks, _, _, _ = K.residual_layer_norm_backward(dy, x_hat, gamma, rstd, dropout_p=P, seed=seed,
                                                       row_task=row_task, num_tasks=3)
    assert torch.equal(dx_tasks, dx), "the mask moves with the backward's row order"


def test_dropout_rows_and_columns_are_independent():
    m, n = 64, 64
    keep = _forward_keep(seed=77, m=m, n=n)
    agree = P**2 + (1 - P) ** 2  # two independent elements both kept or both dropped
    # Disjoint pairs of rows, of columns: independent comparisons.
    for what, a, b in [("rows", keep[0::2], keep[1::2]), ("columns", keep[:, 0::2], keep[:, 1::2])]:
        rate = (a == b).float().mean().item()
        assert abs(rate - agree) < 5 * (agree * (1 - agree) / a.numel()) ** 0.5, (what, rate)
    assert torch.unique(keep, dim=0).shape[0] == m, "two rows have the same mask"
    # No row repeats another's draws at a shift (counters shared between rows): any 48 consecutive elements of
    # the rows coincide with probability agree**48 ~ 5e-12 when independent.
    width = 48
    windows = keep.unfold(1, width, 1).reshape(-1, width).long()
    codes = (windows << torch.arange(width, device=DEVICE)).sum(-1)
    assert torch.unique(codes).numel() == codes.numel(), "rows share a run of draws"


def test_a_seed_tensor_draws_the_mask_of_the_int_it_holds_forward_and_backward():
    m, n = 40, 37
    seed = torch.tensor([5], device=DEVICE)  # as a CUDA graph replays it: read from memory
    keep = _forward_keep(seed, m=m, n=n)
    assert torch.equal(keep, _forward_keep(5, m=m, n=n))
    assert not torch.equal(keep, _forward_keep(torch.tensor([6], device=DEVICE), m=m, n=n))
    x, ones = torch.ones(m, n, device=DEVICE), torch.ones(n, device=DEVICE)
    _, x_hat, rstd = K.residual_layer_norm_forward(x, ones, ones * 0, EPS, x * 0, dropout_p=P, seed=seed)
    dx, ds, _, _ = K.residual_layer_norm_backward(torch.randn(m, n, device=DEVICE), x_hat, ones, rstd, dropout_p=P,
                                                  seed=seed)
    assert (ds != 0).all()
    assert torch.equal(dx != 0, keep)


def test_the_backward_regenerates_the_forwards_mask():
    m, n, seed = 40, 37, 5
    keep = _forward_keep(seed, m=m, n=n)
    x, ones = torch.ones(m, n, device=DEVICE), torch.ones(n, device=DEVICE)
    _, x_hat, rstd = K.residual_layer_norm_forward(x, ones, ones * 0, EPS, x * 0, dropout_p=P, seed=seed)
    dx, ds, _, _ = K.residual_layer_norm_backward(torch.randn(m, n, device=DEVICE), x_hat, ones, rstd, dropout_p=P,
                                                  seed=seed)
    assert (ds != 0).all()
    assert torch.equal(dx != 0, keep)


def test_dropout_mask_follows_the_seed_and_not_the_number_of_rows():
    keep = _forward_keep(seed=3, m=40, n=37)
    assert torch.equal(keep, _forward_keep(seed=3, m=40, n=37)), "same seed must give the same mask"
    assert not torch.equal(keep, _forward_keep(seed=4, m=40, n=37)), "two seeds must differ"
    assert torch.equal(keep, _forward_keep(seed=3, m=100, n=37)[:40]), "a row's mask depends on the batch size"


def test_beta_gradient_is_bit_identical_across_runs():
    x, residual, gamma, beta = make((97,), 53, torch.float16)
    y, x_hat, rstd = K.residual_layer_norm_forward(x, gamma, beta, EPS, residual)
    dy = torch.randn_like(y)
    runs = [K.residual_layer_norm_backward(dy, x_hat, gamma, rstd, dropout_p=0.1, seed=3, sum_dx=True)
            for _ in range(3)]
    for dx, _, dbeta, dx_sum in runs[1:]:
        assert torch.equal(dbeta, runs[0][2]) and torch.equal(dx, runs[0][0]) and torch.equal(dx_sum, runs[0][3])


def test_only_beta_gradient_when_inputs_need_none():
    x, _, gamma, beta = make((4,), 16, torch.float32)
    y, x_hat, rstd = K.residual_layer_norm_forward(x, gamma, beta, EPS)
    dy = torch.randn_like(y)
    dx, dres, dbeta, dx_sum = K.residual_layer_norm_backward(dy, x_hat, gamma, rstd, compute_dx=False)
    assert dx is None and dres is None and dx_sum is None
    torch.testing.assert_close(dbeta, dy.sum(0))


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: K.residual_layer_norm_forward(torch.randn(3, 5), torch.ones(4), torch.zeros(5), 1e-5),
         r"gamma must have shape \(5,\)"),
        (lambda: K.residual_layer_norm_forward(torch.randn(3, 5), torch.ones(5), torch.zeros(5), 1e-5,
                                               torch.randn(3, 4)), "residual has shape"),
        (lambda: K.residual_layer_norm_forward(torch.randn(3, 0), torch.ones(0), torch.zeros(0), 1e-5), "empty"),
        (lambda: K.residual_layer_norm_backward(torch.randn(3, 5), torch.randn(3, 5), torch.ones(5), torch.zeros(2)),
         "rstd must be the contiguous fp32"),
        (lambda: K.residual_layer_norm_backward(torch.randn(3, 5), torch.randn(3, 5), torch.ones(5),
                                                torch.ones(6)[::2]), r"rstd must be the contiguous fp32 \(3,\)"),
        (lambda: K.residual_layer_norm_backward(torch.randn(3, 5), torch.randn(3, 4), torch.ones(5), torch.zeros(3)),
         "x_hat has shape"),
        (lambda: K.residual_layer_norm_backward(torch.randn(3, 5), torch.randn(3, 5), torch.ones(5), torch.zeros(3),
                                                compute_dx=False, sum_dx=True), "needs compute_dx"),
        (lambda: K.residual_layer_norm_forward(torch.randn(3, 5), torch.ones(5), None, 1e-5),
         "beta is None: pass zeros"),
        (lambda: K.residual_layer_norm_backward(torch.randn(3, 5), torch.randn(3, 5), torch.ones(5), torch.zeros(3),
                                                row_task=torch.zeros(3, dtype=torch.long, device="meta")),
         r"row_task must be contiguous and on (cpu|cuda:0), got meta"),
        (lambda: K.residual_layer_norm_forward(torch.randn(3, 5), torch.ones(5), torch.zeros(5), 1e-5,
                                               x_table=torch.zeros(2, 5)), "x_table needs each row's task"),
        (lambda: K.residual_layer_norm_forward(torch.randn(3, 5), torch.ones(5), torch.zeros(2, 5), 1e-5,
                                               row_task=torch.zeros(3, dtype=torch.long), x_table=torch.zeros(2, 4)),
         r"x_table must have shape \(2, 5\)"),
        (lambda: K.residual_layer_norm_forward(torch.randn(3, 5), torch.ones(5), torch.zeros(5), 1e-5,
                                               y_gemm=torch.empty(5, 3)), r"y_gemm has shape \(5, 3\) but x has"),
        (lambda: K.residual_layer_norm_backward(torch.randn(3, 5), torch.randn(3, 5), torch.ones(5), torch.zeros(3),
                                                dy_gemm=torch.randn(3, 4)), "dy_gemm has shape"),
        (lambda: K.residual_layer_norm_backward(torch.randn(3, 5), torch.randn(3, 5), torch.ones(5), torch.zeros(3),
                                                dx_dtype=torch.int32), "dx_dtype is torch.int32"),
        (lambda: K.residual_layer_norm_forward(torch.randn(3, 5), torch.ones(5), torch.zeros(5), 1e-5,
                                               y_dtype=torch.float64), "y_dtype is torch.float64"),
    ],
)
def test_bad_input_gets_a_clear_error(call, message):
    with torch.device(DEVICE), pytest.raises(K.KernelInputError, match=message):  # the calls' tensors on DEVICE
        call()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n", [768, 1024])
def test_gpu_bert_shapes(dtype, n):
    x, residual, gamma, beta = make((8, 509), n, dtype, "adversarial")
    y, x_hat, rstd = K.residual_layer_norm_forward(x, gamma, beta, EPS, residual)
    assert_as_accurate_as_torch(y, torch_ln(x, residual, gamma, beta, dtype),
                                torch_ln(x, residual, gamma, beta, torch.float64), "y")
    dy = torch.randn_like(y)
    dx, _, dbeta, _ = K.residual_layer_norm_backward(dy, x_hat, gamma, rstd)
    xp, bp = x.double().requires_grad_(), beta.double().requires_grad_()
    truth = torch.autograd.grad(torch_ln(xp, residual, gamma, bp, torch.float64), (xp, bp), dy.double())
    xs, bs = x.clone().requires_grad_(), beta.to(dtype).requires_grad_()
    same = torch.autograd.grad(torch_ln(xs, residual, gamma, bs, dtype), (xs, bs), dy)
    assert_as_accurate_as_torch(dx, same[0], truth[0], "dx")
    assert_as_accurate_as_torch(dbeta.to(dtype), same[1], truth[1], "dbeta")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("lead,n", SHAPES)
@pytest.mark.parametrize("with_x_table", [False, True])
def test_per_row_task_betas_match_torch(dtype, lead, n, with_x_table):
    """beta as a table [T, N] gathered by each row's task (TaskBank's mixed batches), and its per-task gradient;
    with ``x_table``, the feeding linear's bias table added to x the same way."""
    x, residual, gamma, _ = make(lead, n, dtype, "adversarial")
    table = torch.randn(3, n, device=DEVICE)
    x_table = torch.randn(3, n, device=DEVICE) if with_x_table else None
    row_task = torch.randint(0, 3, (x[..., 0].numel(),), device=DEVICE)

    def layer_norm(xp, tp, precision):
        beta_rows = tp.to(precision)[row_task].view(*lead, n)
        if x_table is not None:
            xp = xp.to(precision) + x_table.to(precision)[row_task].view(*lead, n)
        return torch_ln(xp, residual, gamma, torch.zeros(n, device=DEVICE), precision) + beta_rows

    y, x_hat, rstd = K.residual_layer_norm_forward(x, gamma, table, EPS, residual, row_task=row_task,
                                                   x_table=x_table)
    assert_as_accurate_as_torch(y, layer_norm(x, table, dtype), layer_norm(x, table, torch.float64), "y")
    dy = torch.randn_like(y)
    dx, _, dtable, _ = K.residual_layer_norm_backward(dy, x_hat, gamma, rstd, row_task=row_task, num_tasks=3)
    truth_dx, truth_dtable = torch_grads(layer_norm, x, table, dy, torch.float64)
    same_dx, same_dtable = torch_grads(layer_norm, x, table, dy, dtype)
    assert_as_accurate_as_torch(dx, same_dx, truth_dx, "dx")
    assert dtable.dtype == torch.float32
    assert_as_accurate_as_torch(dtable.to(dtype), same_dtable, truth_dtable, "dtable")


def test_x_table_is_added_before_the_dropout_in_fp32():
    """LayerNorm(dropout(x + b[task]) + residual): the same bits as x + b[task] summed in fp32 beforehand."""
    x, residual, gamma, _ = make((4, 7), 48, torch.float32, "adversarial")
    beta, x_table = torch.randn(3, 48, device=DEVICE), torch.randn(3, 48, device=DEVICE)
    row_task = torch.randint(0, 3, (28,), device=DEVICE)
    added = x + x_table[row_task].view(4, 7, 48)
    for dropout, seed in ((0.0, None), (0.3, 11)):
        ours = K.residual_layer_norm_forward(x, gamma, beta, EPS, residual, dropout_p=dropout, seed=seed,
                                             row_task=row_task, x_table=x_table)
        theirs = K.residual_layer_norm_forward(added, gamma, beta, EPS, residual, dropout_p=dropout, seed=seed,
                                               row_task=row_task)
        for got, want in zip(ours, theirs):
            torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_x_table_rows_are_added_to_a_half_precision_x_in_fp32():
    """x at 1024 in fp16 (an ulp of 1) plus small table rows: summed in fp32 the rows keep their differences, which
    the LayerNorm normalises; x + b[task] rounded to fp16 first would make every row constant."""
    n = 48
    x = torch.full((6, n), 1024.0, device=DEVICE, dtype=torch.float16)
    x_table = 0.1 * torch.randn(2, n, device=DEVICE)
    row_task = torch.tensor([0, 1, 1, 0, 1, 0], device=DEVICE)
    gamma, beta = torch.ones(n, device=DEVICE), torch.zeros(2, n, device=DEVICE)
    y, _, _ = K.residual_layer_norm_forward(x, gamma, beta, EPS, row_task=row_task, x_table=x_table)
    want = F.layer_norm(x_table[row_task].double(), (n,), eps=EPS)
    torch.testing.assert_close(y.double(), want, atol=2e-2, rtol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("lead,n", SHAPES)
@pytest.mark.parametrize("dropout", [0.0, 0.2])
@pytest.mark.parametrize("per_task", [False, True])
def test_dx_sum_is_the_gradient_of_a_bias_added_to_x(dtype, lead, n, dropout, per_task):
    """sum_dx: the bias gradient of the linear layer whose output is x, LayerNorm(dropout(x + b) + residual),
    summed in the backward kernel (per task for a task table b [T, N])."""
    x, residual, gamma, beta = make(lead, n, dtype, "adversarial")
    seed = 5 if dropout else None
    rows = x[..., 0].numel()
    row_task = torch.randint(0, 3, (rows,), device=DEVICE) if per_task else None
    _, x_hat, rstd = K.residual_layer_norm_forward(x, gamma, beta, EPS, residual, dropout_p=dropout, seed=seed)
    dy = torch.randn_like(x)
    dx, _, _, dx_sum = K.residual_layer_norm_backward(dy, x_hat, gamma, rstd, dropout_p=dropout, seed=seed,
                                                      sum_dx=True, row_task=row_task, num_tasks=3)
    keep = dx != 0 if dropout else None  # ds is nowhere zero: dx is zero exactly where dropout dropped
    if keep is not None:
        assert_keep_rate(keep, dropout)
    bias = torch.zeros(3, n, device=DEVICE) if per_task else torch.zeros(n, device=DEVICE)

    def linear_output_ln(xp, bp, precision):
        added = bp[row_task].view(*lead, n) if per_task else bp
        return torch_ln(xp + added, residual, gamma, beta, precision, keep=keep)

    truth_dx, truth_db = torch_grads(linear_output_ln, x, bias, dy, torch.float64)
    same_dx, same_db = torch_grads(linear_output_ln, x, bias, dy, dtype)
    assert_as_accurate_as_torch(dx, same_dx, truth_dx, "dx")
    assert dx_sum.dtype == torch.float32 and dx_sum.shape == bias.shape
    assert_as_accurate_as_torch(dx_sum.to(dtype), same_db, truth_db, "dx_sum")


def test_x_hat_of_rows_of_large_mean_and_small_spread_is_accurate_to_fp32():
    """Rows of mean 300 and spread 1e-2: the mean's sum (of values near 300) is rounded by far more than the spread
    allows, and x_hat = (s - mean) * rstd magnifies that rounding 100x. The forward takes it out (the centred values'
    own mean): x_hat is as accurate as fp32 allows against float64, whatever order the sums take."""
    eps, n = 1e-5, 37
    x = 300 + 1e-2 * torch.randn(8, n, device=DEVICE)
    _, x_hat, rstd = K.residual_layer_norm_forward(x, torch.ones(n, device=DEVICE), torch.zeros(n, device=DEVICE), eps)
    s = x.double()
    centered = s - s.mean(-1, keepdim=True)
    truth = centered * (centered.square().mean(-1, keepdim=True) + eps).rsqrt()
    torch.testing.assert_close(x_hat.double(), truth, atol=1e-5 * truth.abs().max().item(), rtol=1e-5)


def _nan_padded(t: torch.Tensor, rows: int) -> torch.Tensor:
    """``t`` [M, ...] as the first M rows of a buffer whose ``rows`` rows after them are NaN: same shape, contiguous."""
    buffer = torch.full((t.shape[0] + rows, *t.shape[1:]), float("nan"), dtype=t.dtype, device=t.device)
    buffer[:t.shape[0]] = t
    return buffer[:t.shape[0]]


@pytest.mark.parametrize("per_task", [False, True])
def test_the_backward_reads_only_its_rows(per_task):
    """M = 5 rows, not a multiple of any row tile: the last row block is partly past the end. Its masked rows must
    read nothing (NaN behind dy, x_hat and rstd, a row block of it) and sum nothing: every output equals that of
    inputs with no NaN behind them, bit for bit."""
    m, n, seed = 5, 37, 11
    x, residual, gamma, beta = make((m,), n, torch.float32)
    _, x_hat, rstd = K.residual_layer_norm_forward(x, gamma, beta, EPS, residual, dropout_p=0.2, seed=seed)
    dy = torch.randn_like(x)
    row_task = torch.tensor([2, 0, 2, 1, 0], device=DEVICE) if per_task else None
    options = dict(dropout_p=0.2, seed=seed, sum_dx=True, row_task=row_task, num_tasks=3)
    expected = K.residual_layer_norm_backward(dy, x_hat, gamma, rstd, **options)
    block_m = layer_norm._row_tile(n)[0]
    padded = K.residual_layer_norm_backward(_nan_padded(dy, block_m), _nan_padded(x_hat, block_m), gamma,
                                            _nan_padded(rstd, block_m), **options)
    for name, ours, theirs in zip(["dx", "ds", "dbeta", "dx_sum"], padded, expected, strict=True):
        assert ours.isfinite().all(), f"{name}: a masked row's NaN was read"
        assert torch.equal(ours, theirs), name


def test_dropout_rows_of_a_width_not_a_multiple_of_4_draw_apart():
    """A row of 37 columns takes ceil(37 / 4) = 10 Philox counters: the next row starts at the 11th, so a row's last
    column and the next row's first are independent draws (agreeing at the rate of two independent elements, within
    5 sigma), not one counter's number twice."""
    keep = _forward_keep(seed=21, m=128, n=37)
    agree = P**2 + (1 - P) ** 2
    rate = (keep[:-1, -1] == keep[1:, 0]).float().mean().item()
    assert abs(rate - agree) < 5 * (agree * (1 - agree) / (keep.shape[0] - 1)) ** 0.5, rate


@pytest.mark.parametrize("per_task", [False, True])
def test_the_kernels_write_only_their_rows(per_task, monkeypatch):
    """M = 5 rows, not a multiple of any row tile: the last row block is partly past the end. Every tensor the host
    functions allocate (y, x_hat, rstd, ds, dx, the partial and final sums) has a row block of NaN after it, which
    the forward and the backward leave untouched."""
    m, n, seed = 5, 37, 11
    guarded = TorchWithGuardRows(rows=layer_norm._row_tile(n)[0])
    for module in (layer_norm, task_tables):
        monkeypatch.setattr(module, "torch", guarded)
    x, residual, gamma, beta = make((m,), n, torch.float32)
    row_task = torch.tensor([2, 0, 2, 1, 0], device=DEVICE) if per_task else None
    if per_task:
        beta = torch.randn(3, n, device=DEVICE)
    _, x_hat, rstd = K.residual_layer_norm_forward(x, gamma, beta, EPS, residual, dropout_p=0.2, seed=seed,
                                                   row_task=row_task)
    K.residual_layer_norm_backward(torch.randn_like(x), x_hat, gamma, rstd, dropout_p=0.2, seed=seed, sum_dx=True,
                                   row_task=row_task, num_tasks=3)
    assert guarded.guards_intact(), "a kernel wrote past the end of its output"
