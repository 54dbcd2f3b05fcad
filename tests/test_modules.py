"""BitFitLinear / BitFitLayerNorm: what they save for backward, which path runs, fallbacks and AMP."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from bitfit_reference import BACKENDS, DEVICE
from kernel_checks import assert_as_accurate_as_torch, assert_gemms_ran_in

import bitfit_fast_kernels
from bitfit_fast import BitFitLayerNorm, BitFitLinear, torch_ops
from bitfit_fast.functions import TORCH, LinearFunction


def saved_tensors(fn):
    """Every tensor autograd keeps for the backward while ``fn`` runs."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


def frozen_linear(backend, features=(19, 23)):
    linear = nn.Linear(*features).to(DEVICE)
    linear.weight.requires_grad_(False)
    return BitFitLinear.from_linear(linear, backend)


def frozen_layer_norm(backend, n=29):
    ln = nn.LayerNorm(n).to(DEVICE)
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5)
        ln.bias.normal_()
    ln.weight.requires_grad_(False)
    return BitFitLayerNorm.from_layer_norm(ln, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_saves_no_input_and_layer_norm_saves_its_normalised_input(backend):
    linear = frozen_linear(backend)
    x = torch.randn(4, 5, 19, device=DEVICE, requires_grad=True)
    y, saved = saved_tensors(lambda: linear(x))
    assert all(t is linear.weight or t is linear.bias for t in saved), "only parameters, no activation"
    assert y.grad_fn._forward_cls is LinearFunction
    assert y.grad_fn.impl is {"triton": bitfit_fast_kernels, "torch": torch_ops}[backend]

    ln = frozen_layer_norm(backend)
    h = torch.randn(4, 5, 29, device=DEVICE, requires_grad=True)
    y, saved = saved_tensors(lambda: ln(h))
    activations = [t for t in saved if t is not ln.weight and t is not ln.bias]
    assert all(t.data_ptr() not in (h.data_ptr(), y.data_ptr()) for t in activations), "no input, no output"
    assert sum(t.numel() for t in activations) == y.numel() + 4 * 5, "x_hat plus one rstd per row"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("with_zeros", [False, True])
def test_layer_norm_is_exact_for_adversarial_gamma(backend, dtype, with_zeros):
    # gamma as pretrained models have it: near 1e-33, negative, tiny, with |beta / gamma| >> 1, with or without
    # exact zeros. A backward that rebuilt x_hat = (y - beta) / gamma from the output fails here in fp32 already.
    ln = frozen_layer_norm(backend)
    with torch.no_grad():
        ln.weight.copy_(1 + 0.3 * torch.randn(29))
        for start, value in enumerate([4.8e-33, -0.7, 1e-4, -2e-6] + [0.0] * with_zeros):
            ln.weight[start::6] = value
        ln.bias.copy_(5 * torch.randn(29))
    x = torch.randn(6, 29, device=DEVICE, dtype=dtype, requires_grad=True)
    dy = torch.randn(6, 29, device=DEVICE, dtype=dtype)
    dx, dbeta = torch.autograd.grad(ln(x), (x, ln.bias), dy)

    def reference(precision):
        xr = x.detach().to(precision).requires_grad_()
        br = ln.bias.detach().to(precision).requires_grad_()
        yr = F.layer_norm(xr, (29,), ln.weight.to(precision), br, ln.eps)
        return torch.autograd.grad(yr, (xr, br), dy.to(precision))

    truth, same = reference(torch.float64), reference(torch.float32)
    for name, ours, exact, torch_fp32 in zip(("dx", "dbeta"), (dx, dbeta), truth, same):
        # No worse than twice torch's fp32 error (plus the rounding of the activation dtype).
        allowed = 2 * (torch_fp32.double() - exact).abs().max() + 4 * torch.finfo(dtype).eps * exact.abs().max()
        assert (ours.double() - exact).abs().max() <= allowed, name


@pytest.mark.parametrize("backend", BACKENDS)
def test_outputs_may_be_changed_in_place_as_nn_linear_and_nn_layer_norm_outputs_may(backend):
    """A model may scale a projection in place, through a view of it (DeBERTa: ``pos_query_layer /= scale`` on its
    heads' view); the gradients are those of the same code on torch's modules."""
    for module, width in ((frozen_linear(backend), 19), (frozen_layer_norm(backend), 29)):
        plain = module.to_vanilla() if isinstance(module, BitFitLinear) else nn.LayerNorm(29).to(DEVICE)
        if isinstance(module, BitFitLayerNorm):
            plain.load_state_dict(module.state_dict())
            plain.weight.requires_grad_(False)
        x = torch.randn(4, 5, width, device=DEVICE)
        grads = []
        for m in (module, plain):
            m.zero_grad()
            y = m(x)
            heads = y.view(4, 5, -1, 1).permute(0, 2, 1, 3)
            heads /= 3.0
            (heads.square().sum() + y[:, 0].sum()).backward()
            grads.append(m.bias.grad)
        torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("torch_version", ["2.11.0", torch.__version__])
def test_compiled_outputs_may_be_changed_in_place(torch_version, monkeypatch):
    """As uncompiled (XLM's ``tensor *= mask`` on a LayerNorm's output): under torch.compile the functions return
    their outputs as tensors of their own, also where torch 2.11's compile bug has them copied (returned as views,
    autograd refused the write)."""
    monkeypatch.setattr(torch_ops, "_COMPILE_MISROUTES_IN_PLACE_OUTPUTS",
                        torch.torch_version.TorchVersion(torch_version) < (2, 13))

    def step(m, x):
        y = m(x)
        y *= 0.5
        heads = y.view(4, 5, -1, 1).permute(0, 2, 1, 3)
        heads /= 3.0
        return heads.square().sum() + y[:, 0].sum()

    for module, width in ((frozen_linear("torch"), 19), (frozen_layer_norm("torch"), 29)):
        x = torch.randn(4, 5, width, device=DEVICE)
        grads = []
        for run in (step, torch.compile(step, backend="aot_eager", fullgraph=True)):
            module.zero_grad()
            run(module, x).backward()
            grads.append(module.bias.grad.clone())
        torch._dynamo.reset()
        torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-6)


def test_a_task_tables_layer_norm_output_may_be_changed_in_place():
    """As a bias [N]'s: the output of a LayerNorm whose beta is a TaskBank's table (rows gathered per task)."""
    x, gamma = torch.randn(2, 3, 8, device=DEVICE), torch.rand(8, device=DEVICE) + 0.5
    table = torch.randn(2, 8, device=DEVICE, requires_grad=True)
    row_task = torch.tensor([0, 0, 0, 1, 1, 1], device=DEVICE)
    y, _ = TORCH.layer_norm(x, None, gamma, table, 1e-5, row_task=row_task)
    y.view(2, 3, 2, 4).permute(0, 2, 1, 3).div_(3.0)  # a heads' view scaled in place
    y.square().sum().backward()
    plain = table.detach().clone().requires_grad_()
    ((F.layer_norm(x, (8,), gamma) + plain[row_task].view(2, 3, 8)) / 3.0).square().sum().backward()
    torch.testing.assert_close(table.grad, plain.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unfrozen_weight_falls_back_to_plain_autograd(backend):
    linear = frozen_linear(backend)
    linear.weight.requires_grad_(True)
    x = torch.randn(3, 19, device=DEVICE)
    linear(x).sum().backward()
    torch.testing.assert_close(linear.weight.grad, torch.ones(23, 3, device=DEVICE) @ x)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_module_given_no_rows_answers_as_torchs_and_its_bias_gets_a_zero_gradient(backend):
    """A model may route no row to a module (X-MOD's adapter of a language not in the batch): an empty output of
    torch's shape and dtype, and a zero bias gradient, as reference BitFit's, which AdamW then steps alike."""
    for module, shape in ((frozen_linear(backend), (0, 7, 19)), (frozen_layer_norm(backend), (2, 0, 29))):
        reference = copy.deepcopy(module).to_vanilla()
        x = torch.randn(shape, device=DEVICE, requires_grad=True)
        out, ref_out = module(x), reference(x)
        assert out.shape == ref_out.shape and out.dtype == ref_out.dtype
        out.sum().backward()
        ref_out.sum().backward()
        assert torch.equal(module.bias.grad, reference.bias.grad) and not module.bias.grad.any()


@pytest.mark.skipif(DEVICE == "cuda", reason="the interpreter's bf16 limitation")
def test_bf16_on_the_triton_backend_under_the_interpreter_is_refused():
    linear = frozen_linear("triton").to(torch.bfloat16)
    with pytest.raises(ValueError, match="triton#11584"):
        linear(torch.randn(2, 19, dtype=torch.bfloat16))


def test_torch_backend_under_autocast_matches_nn_linear_and_returns_input_dtype_gradients():
    linear = frozen_linear("torch")
    plain = nn.Linear(19, 23).to(DEVICE)
    plain.load_state_dict(linear.state_dict())
    plain.weight.requires_grad_(False)
    x = torch.randn(8, 19, device=DEVICE, requires_grad=True)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        y, y_ref = linear(x), plain(x)
    assert y.dtype == y_ref.dtype == torch.bfloat16
    torch.testing.assert_close(y, y_ref)
    dy = torch.randn_like(y)
    ours = torch.autograd.grad(y, (x, linear.bias), dy)
    theirs = torch.autograd.grad(y_ref, (x, plain.bias), dy)
    for a, b in zip(ours, theirs):
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)


def _under_autocast(forward, x, bias, dy, precision) -> tuple:
    """forward(x) under autocast in ``precision``: (output, its input's gradient, ``bias``'s gradient) for ``dy``."""
    xl = x.clone().requires_grad_()
    with torch.autocast(DEVICE, dtype=precision):
        y = forward(xl)
    return (y, *torch.autograd.grad(y, (xl, bias), dy.to(y.dtype)))


@pytest.mark.parametrize("precision,backend", [
    (torch.float16, "torch"), (torch.float16, "triton"), (torch.bfloat16, "torch"),
    pytest.param(torch.bfloat16, "triton", marks=pytest.mark.gpu)], ids=lambda v: str(v).removeprefix("torch."))
def test_a_linear_under_autocast_is_as_accurate_as_torch_at_the_same_precision(precision, backend, gemm_dtypes):
    """BitFitLinear (an awkward shape: 3 x 7 rows of 19 features into 23) under autocast: its output and its input
    and bias gradients by flash-attention's rule against float64, F.linear under the same autocast the baseline;
    the GEMMs in the autocast dtype."""
    linear = frozen_linear(backend)
    x, dy = torch.randn(3, 7, 19, device=DEVICE), torch.randn(3, 7, 23, device=DEVICE)
    x64, weight64, bias64 = (t.detach().double().requires_grad_() for t in (x, linear.weight, linear.bias))
    truth = F.linear(x64, weight64, bias64)
    truths = (truth, *torch.autograd.grad(truth, (x64, bias64), dy.double()))

    plain_bias = linear.bias.detach().clone().requires_grad_()
    theirs = _under_autocast(lambda xl: F.linear(xl, linear.weight, plain_bias), x, plain_bias, dy, precision)
    gemm_dtypes.clear()
    ours = _under_autocast(linear, x, linear.bias, dy, precision)
    assert_gemms_ran_in(precision, gemm_dtypes)
    for name, mine, same, exact in zip(("output", "dx", "dbias"), ours, theirs, truths, strict=True):
        assert_as_accurate_as_torch(mine, same, exact, f"{name} on {backend}")


@pytest.mark.parametrize("precision,backend", [
    (torch.float16, "torch"), (torch.float16, "triton"), (torch.bfloat16, "torch"),
    pytest.param(torch.bfloat16, "triton", marks=pytest.mark.gpu)], ids=lambda v: str(v).removeprefix("torch."))
def test_a_layer_norm_under_autocast_is_as_accurate_as_torch_at_the_same_precision(precision, backend):
    """BitFitLayerNorm (3 x 7 rows of 29 features, gamma and beta not 1 and 0) under autocast, on an input in the
    autocast dtype as the layer before it gives one: nn.LayerNorm's output dtype there, and its output and its input
    and beta gradients by flash-attention's rule against float64, nn.LayerNorm under the same autocast the
    baseline."""
    ln = frozen_layer_norm(backend)
    x, dy = torch.randn(3, 7, 29, device=DEVICE).to(precision), torch.randn(3, 7, 29, device=DEVICE)
    x64, beta64 = (t.detach().double().requires_grad_() for t in (x, ln.bias))
    truth = F.layer_norm(x64, (29,), ln.weight.double(), beta64, ln.eps)
    truths = (truth, *torch.autograd.grad(truth, (x64, beta64), dy.double()))

    plain = nn.LayerNorm(29, device=DEVICE)
    plain.load_state_dict(ln.state_dict())
    plain.weight.requires_grad_(False)
    theirs = _under_autocast(plain, x, plain.bias, dy, precision)
    ours = _under_autocast(ln, x, ln.bias, dy, precision)
    assert ours[0].dtype == theirs[0].dtype, "the dtype nn.LayerNorm returns under this autocast"
    for name, mine, same, exact in zip(("output", "dx", "dbeta"), ours, theirs, truths, strict=True):
        assert_as_accurate_as_torch(mine, same, exact, f"{name} on {backend}")


@pytest.mark.gpu
def test_triton_backend_under_autocast_matches_nn_linear():
    linear = frozen_linear("triton", (768, 3072))
    plain = nn.Linear(768, 3072).cuda()
    plain.load_state_dict(linear.state_dict())
    plain.weight.requires_grad_(False)
    x = torch.randn(4, 128, 768, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y, y_ref = linear(x), plain(x)
    assert y.dtype == torch.bfloat16
    y_fp32 = plain(x)  # the truth the rule measures both against: fp32, no autocast
    assert_as_accurate_as_torch(y, y_ref, y_fp32.double(), "y")
    dy = torch.randn_like(y)
    ours = torch.autograd.grad(y, (x, linear.bias), dy)
    theirs = torch.autograd.grad(y_ref, (x, plain.bias), dy)
    truth = torch.autograd.grad(y_fp32, (x, plain.bias), dy.float())
    for name, a, b, exact in zip(("dx", "dbias"), ours, theirs, truth):
        assert a.dtype == b.dtype
        assert_as_accurate_as_torch(a, b, exact.double(), name)
