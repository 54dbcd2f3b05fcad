"""The residual + LayerNorm kernels against float64 torch and torch at the same precision."""

import pytest
import torch
import torch.nn.functional as F
from kernel_checks import assert_as_accurate_as_torch, torch_grads

import bitfit_fast_kernels as K
from bitfit_fast.triton_ops import ResidualLayerNormFunction

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS = 1e-12  # BERT's
SHAPES = [((1,), 36), ((3, 7), 37), ((5,), 257), ((2, 3), 768)]


def make(lead, n, dtype, zero_gamma=False):
    x = torch.randn(*lead, n, device=DEVICE, dtype=dtype)
    residual = torch.randn(*lead, n, device=DEVICE, dtype=dtype)
    gamma = 1 + 0.3 * torch.randn(n, device=DEVICE)
    if zero_gamma:
        gamma[::3] = 0
    beta = torch.randn(n, device=DEVICE)
    return x, residual, gamma, beta


def torch_ln(x, residual, gamma, beta, precision, keep=None):
    s = x.to(precision)
    if keep is not None:
        s = s * keep.to(precision) / 0.8
    if residual is not None:
        s = s + residual.to(precision)
    return F.layer_norm(s, (s.shape[-1],), gamma.to(precision), beta.to(precision), EPS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("lead,n", SHAPES)
@pytest.mark.parametrize("with_residual", [True, False])
@pytest.mark.parametrize("zero_gamma", [False, True])
def test_forward_and_backward_match_torch(dtype, lead, n, with_residual, zero_gamma):
    x, residual, gamma, beta = make(lead, n, dtype, zero_gamma)
    residual = residual if with_residual else None
    y, s, mean, rstd = K.residual_layer_norm_forward(x, gamma, beta, EPS, residual, store_input=zero_gamma)
    assert_as_accurate_as_torch(y, torch_ln(x, residual, gamma, beta, dtype),
                                torch_ln(x, residual, gamma, beta, torch.float64), "y")
    assert (s is not None) == zero_gamma and mean.dtype == rstd.dtype == torch.float32

    dy = torch.randn_like(y)
    dx, dres, dbeta = K.residual_layer_norm_backward(
        dy, s if zero_gamma else y, gamma, beta, mean, rstd, saved_is_output=not zero_gamma)
    assert dx is dres, "without dropout the two input gradients are one tensor"

    def ln(xp, bp, precision):
        return torch_ln(xp, residual, gamma, bp, precision)

    truth_dx, truth_db = torch_grads(ln, x, beta, dy, torch.float64)
    same_dx, same_db = torch_grads(ln, x, beta, dy, dtype)
    assert_as_accurate_as_torch(dx, same_dx, truth_dx, "dx")
    assert_as_accurate_as_torch(dbeta.to(dtype), same_db, truth_db, "dbeta")


def test_dropout_mask_is_regenerated_and_gradients_follow_it():
    x, residual, gamma, beta = make((6, 5), 41, torch.float32)
    x.requires_grad_()
    residual.requires_grad_()
    beta.requires_grad_()
    y = ResidualLayerNormFunction.apply(x, residual, gamma, beta, EPS, 0.2, 77, True)
    # Recover the mask the forward used: s - residual is x * keep / 0.8.
    _, s, _, _ = K.residual_layer_norm_forward(x.detach(), gamma, beta, EPS, residual.detach(), dropout_p=0.2,
                                               seed=77, store_input=True)
    keep = (s - residual.detach()) != 0
    rate = keep.float().mean().item()
    assert 0.6 < rate < 0.95 and not keep.all()

    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, residual, beta), dy)
    leaves = [t.detach().double().requires_grad_() for t in (x, residual, beta)]
    ref = torch_ln(leaves[0], leaves[1], gamma, leaves[2], torch.float64, keep=keep)
    torch.testing.assert_close(y.double(), ref, atol=1e-5, rtol=1e-5)
    for ours, theirs in zip(grads, torch.autograd.grad(ref, leaves, dy.double())):
        torch.testing.assert_close(ours.double(), theirs, atol=1e-5, rtol=1e-5)

    again = ResidualLayerNormFunction.apply(x, residual, gamma, beta, EPS, 0.2, 77, True)
    other = ResidualLayerNormFunction.apply(x, residual, gamma, beta, EPS, 0.2, 78, True)
    assert torch.equal(y, again) and not torch.equal(y, other)


def test_beta_gradient_is_bit_identical_across_runs():
    x, residual, gamma, beta = make((97,), 53, torch.float16)
    y, _, mean, rstd = K.residual_layer_norm_forward(x, gamma, beta, EPS, residual)
    dy = torch.randn_like(y)
    runs = [K.residual_layer_norm_backward(dy, y, gamma, beta, mean, rstd) for _ in range(3)]
    for dx, _, dbeta in runs[1:]:
        assert torch.equal(dbeta, runs[0][2]) and torch.equal(dx, runs[0][0])


def test_only_beta_gradient_when_inputs_need_none():
    x, _, gamma, beta = make((4,), 16, torch.float32)
    y, _, mean, rstd = K.residual_layer_norm_forward(x, gamma, beta, EPS)
    dy = torch.randn_like(y)
    dx, dres, dbeta = K.residual_layer_norm_backward(dy, y, gamma, beta, mean, rstd, compute_dx=False)
    assert dx is None and dres is None
    torch.testing.assert_close(dbeta, dy.sum(0))


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: K.residual_layer_norm_forward(torch.randn(3, 5), torch.ones(4), torch.zeros(5), 1e-5),
         r"gamma must have shape \(5,\)"),
        (lambda: K.residual_layer_norm_forward(torch.randn(3, 5), torch.ones(5), torch.zeros(5), 1e-5,
                                               torch.randn(3, 4)), "residual has shape"),
        (lambda: K.residual_layer_norm_forward(torch.randn(3, 0), torch.ones(0), torch.zeros(0), 1e-5), "empty"),
        (lambda: K.residual_layer_norm_backward(torch.randn(3, 5), torch.randn(3, 5), torch.ones(5), torch.zeros(5),
                                                torch.zeros(3), torch.zeros(2)), "rstd must be the fp32"),
    ],
)
def test_bad_input_gets_a_clear_error(call, message):
    if DEVICE == "cuda":
        pytest.skip("the calls build CPU tensors")
    with pytest.raises(K.KernelInputError, match=message):
        call()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n", [768, 1024])
def test_gpu_bert_shapes(dtype, n):
    x, residual, gamma, beta = make((8, 509), n, dtype)
    y, _, mean, rstd = K.residual_layer_norm_forward(x, gamma, beta, EPS, residual)
    assert_as_accurate_as_torch(y, torch_ln(x, residual, gamma, beta, dtype),
                                torch_ln(x, residual, gamma, beta, torch.float64), "y")
    dy = torch.randn_like(y)
    dx, _, dbeta = K.residual_layer_norm_backward(dy, y, gamma, beta, mean, rstd)
    xp, bp = x.double().requires_grad_(), beta.double().requires_grad_()
    truth = torch.autograd.grad(torch_ln(xp, residual, gamma, bp, torch.float64), (xp, bp), dy.double())
    xs, bs = x.clone().requires_grad_(), beta.to(dtype).requires_grad_()
    same = torch.autograd.grad(torch_ln(xs, residual, gamma, bs, dtype), (xs, bs), dy)
    assert_as_accurate_as_torch(dx, same[0], truth[0], "dx")
    assert_as_accurate_as_torch(dbeta.to(dtype), same[1], truth[1], "dbeta")
