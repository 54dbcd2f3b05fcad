"""The autograd functions, written once over either implementation: the torch ops match the kernels' host
functions' signatures, and the linear + LayerNorm function equals the two functions it fuses."""

import inspect

import pytest
import torch
import torch.nn.functional as F
from bitfit_reference import DEVICE, padded_batch, tiny_bert
from kernel_checks import assert_as_accurate_as_torch

import bitfit_fast
import bitfit_fast_kernels
import bitfit_fast_kernels as K
from bitfit_fast import torch_ops
from bitfit_fast.functions import Ops

IMPLS = {"torch": Ops(torch_ops), "triton": Ops(bitfit_fast_kernels)}
HOST_FUNCTIONS = ("linear_forward", "linear_backward", "residual_layer_norm_forward", "residual_layer_norm_backward",
                  "rows_to_heads", "heads_to_rows", "task_sums")
# Kernel-only parameters: the choice of GEMM has no meaning in torch ops.
KERNEL_ONLY = {"gemm"}


@pytest.mark.parametrize("name", HOST_FUNCTIONS)
def test_torch_ops_take_the_kernels_parameters(name):
    kernel = inspect.signature(getattr(bitfit_fast_kernels, name)).parameters
    ours = inspect.signature(getattr(torch_ops, name)).parameters
    expected = [(p.name, p.kind, p.default) for p in kernel.values() if p.name not in KERNEL_ONLY]
    assert [(p.name, p.kind, p.default) for p in ours.values()] == expected


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("tables", ["none", "both", "bias", "beta"])
@pytest.mark.parametrize("dtype,dropout,frozen_inputs", [
    (torch.float32, 0.0, False), (torch.float32, 0.3, False), (torch.float16, 0.0, False), (torch.float16, 0.3, False),
    (torch.float32, 0.3, True)])
def test_linear_layer_norm_equals_linear_then_layer_norm(impl, dtype, tables, dropout, frozen_inputs):
    """Same outputs and gradients as LinearFunction then LayerNormFunction, whose LayerNorm backward does not sum
    the linear's bias gradient; with task tables for b, beta, both or neither (then b's and beta's per-task sums
    differ in kind, and the linear sums its own). With both tables the kernels add b's rows in the LayerNorm, to
    the GEMM's output as stored: one rounding of h apart from the GEMM that adds them, so the two agree to it.
    ``frozen_inputs``: only b and beta train (a first layer's input, a frozen residual), where the linear's
    backward runs for b's sums alone."""
    ops = IMPLS[impl]
    rows, k, n, tasks = 13, 11, 37, 3
    x = torch.randn(rows, k, device=DEVICE, dtype=dtype)
    weight = torch.randn(n, k, device=DEVICE, dtype=dtype) / k**0.5
    residual = torch.randn(rows, n, device=DEVICE, dtype=dtype)
    gamma = 1 + 0.3 * torch.randn(n, device=DEVICE)
    bias = torch.randn(tasks, n, device=DEVICE) if tables in ("both", "bias") else torch.randn(n, device=DEVICE)
    beta = torch.randn(tasks, n, device=DEVICE) if tables in ("both", "beta") else torch.randn(n, device=DEVICE)
    row_task = torch.randint(0, tasks, (rows,), device=DEVICE) if tables != "none" else None
    dy = torch.randn(rows, n, device=DEVICE, dtype=dtype)
    seed = 7 if dropout else None

    def run(fused: bool):
        leaves = [_leaf(t) for t in (x, bias, residual, beta)]
        xl, bl, rl, betal = leaves
        if frozen_inputs:
            xl.requires_grad_(False), rl.requires_grad_(False)
            leaves = [bl, betal]
        if fused:
            y, _, _ = ops.linear_layer_norm(xl, weight, bl, rl, gamma, betal, 1e-12, dropout, seed, row_task)
        else:
            h = ops.linear(xl, weight, bl, row_task=row_task)
            y, _ = ops.layer_norm(h, rl, gamma, betal, 1e-12, dropout, seed, row_task)
        return y, torch.autograd.grad(y, leaves, dy)

    y, grads = run(fused=True)
    y_ref, grads_ref = run(fused=False)
    # Only the linear's bias gradient is summed otherwise: from dx in fp32 here, from dx rounded to its dtype there.
    tolerance = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-3)
    h_rounded_apart = impl == "triton" and tables == "both"
    if h_rounded_apart:
        ulp = y_ref.abs().max().item() * torch.finfo(dtype).eps  # an ulp of the largest output
        torch.testing.assert_close(y, y_ref, atol=ulp, rtol=0)
    else:
        assert torch.equal(y, y_ref)
    names = ("dbias", "dbeta") if frozen_inputs else ("dx", "dbias", "dresidual", "dbeta")
    for name, ours, theirs in zip(names, grads, grads_ref, strict=True):
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape, name
        if name == "dbias" or h_rounded_apart:
            torch.testing.assert_close(ours, theirs, **tolerance, msg=name)
        else:
            assert torch.equal(ours, theirs), name


@pytest.mark.parametrize("impl", IMPLS)
def test_linear_layer_norm_computes_only_the_gradients_asked_for(impl):
    ops = IMPLS[impl]
    x = torch.randn(5, 8, device=DEVICE)
    weight = torch.randn(6, 8, device=DEVICE)
    bias, beta = torch.randn(6, device=DEVICE, requires_grad=True), torch.randn(6, device=DEVICE, requires_grad=True)
    y, x_hat, _ = ops.linear_layer_norm(x, weight, bias, None, torch.ones(6, device=DEVICE), beta, 1e-5)
    assert not x_hat.requires_grad
    dbias, dbeta = torch.autograd.grad(y, (bias, beta), torch.ones_like(y))
    torch.testing.assert_close(dbeta, torch.full_like(beta, 5.0))
    # LayerNorm's output is invariant to a constant added to its input's row: sum over features of dx is 0 per row.
    torch.testing.assert_close(dbias.sum(), torch.zeros((), device=DEVICE), atol=1e-4, rtol=0)
    with pytest.raises(RuntimeError, match="no weight gradient"):
        ops.linear_layer_norm(x, weight.requires_grad_(), bias, None, torch.ones(6, device=DEVICE), beta, 1e-5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("lengths", [(5, 1, 3), (4, 4)])
@pytest.mark.parametrize("parts", [3, 2])
@pytest.mark.parametrize("table", [False, True])
def test_linear_heads_equals_linear_then_the_attention_layout(impl, lengths, parts, table, bucketed_rows):
    """LinearHeadsFunction against LinearFunction then Tokens' own split into heads (the path ModernBERT keeps): the
    same [S, H, L, D] parts and the same input and bias gradients, on padded and unpadded batches with bucket rows,
    for biases and task tables, a part's bias gradient contiguous (autograd copies a strided one)."""
    from bitfit_fast.unpadding import Tokens

    ops, heads, dim, tasks = IMPLS[impl], 3, 4, 3
    width = parts * heads * dim
    mask = torch.zeros(len(lengths), max(lengths), dtype=torch.bool, device=DEVICE)
    for row, length in enumerate(lengths):
        mask[row, :length] = True
    tokens = Tokens.of_batch(torch.zeros(*mask.shape, 1, device=DEVICE), mask[:, None, None, :])
    assert tokens.num_rows > tokens.real_rows, "the bucket adds rows (fixture bucketed_rows)"
    x = torch.randn(tokens.num_rows, 7, device=DEVICE)
    weight = torch.randn(width, 7, device=DEVICE)
    biases = [torch.randn(*((tasks,) if table else ()), heads * dim, device=DEVICE) for _ in range(parts)]
    row_task = torch.randint(0, tasks, (tokens.num_rows,), device=DEVICE) if table else None
    cotangents = [torch.randn(tokens.num_sequences, heads, tokens.max_len, dim, device=DEVICE) for _ in range(parts)]

    def run(fused: bool):
        xl, bls = _leaf(x), [_leaf(bias) for bias in biases]
        if fused:
            outs = ops.linear_heads(xl, weight, bls, tokens, heads, row_task)
        else:
            rows = tokens._to_sequences(ops.linear(xl, weight, torch.cat(bls, dim=-1), row_task=row_task))
            outs = rows.view(*rows.shape[:2], parts, heads, dim).permute(2, 0, 3, 1, 4).unbind(0)
        # Padding slots carry no gradient in attention (their keys are masked, their outputs dropped).
        real = tokens.key_mask[:, :, 0, :, None] if tokens.key_mask is not None else True
        loss = sum((out * c * real).sum() for out, c in zip(outs, cotangents))
        return [out.detach() for out in outs], torch.autograd.grad(loss, (xl, *bls))

    outs, grads = run(fused=True)
    outs_ref, grads_ref = run(fused=False)
    for ours, theirs in zip(outs, outs_ref):
        assert torch.equal(ours, theirs)
    for name, ours, theirs in zip(["dx"] + [f"dbias {part}" for part in range(parts)], grads, grads_ref, strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5, msg=name)
    assert all(grad.is_contiguous() for grad in grads[1:]), "a part's bias gradient is strided"
    assert not grads[0][tokens.real_rows:].any(), "bucket rows get no gradient"


def _spy(monkeypatch, seen: dict, name: str, argument: str) -> None:
    """Record in ``seen[argument]`` what each call of the kernels' host function ``name`` gets as ``argument``."""
    real = getattr(K, name)
    signature = inspect.signature(real)

    def spy(*args, **kwargs):
        call = signature.bind(*args, **kwargs)
        call.apply_defaults()
        seen[argument] = call.arguments[argument]
        return real(*args, **kwargs)

    monkeypatch.setattr(K, name, spy)


@pytest.mark.parametrize("tables", ["bias", "beta", "both"])
def test_the_kernels_layer_norm_adds_the_linears_table_where_beta_is_one_too(tables, monkeypatch):
    """b and beta both task tables: the GEMM runs without b and the LayerNorm adds b's rows as it reads h
    (x_table); with one table b stays in the GEMM."""
    seen = {}
    _spy(monkeypatch, seen, "linear_forward", "bias")
    _spy(monkeypatch, seen, "residual_layer_norm_forward", "x_table")
    rows, k, n, tasks = 7, 5, 6, 3
    bias = torch.randn(tasks, n, device=DEVICE) if tables != "beta" else torch.randn(n, device=DEVICE)
    beta = torch.randn(tasks, n, device=DEVICE) if tables != "bias" else torch.randn(n, device=DEVICE)
    row_task = torch.randint(0, tasks, (rows,), device=DEVICE)
    IMPLS["triton"].linear_layer_norm(torch.randn(rows, k, device=DEVICE), torch.randn(n, k, device=DEVICE), bias,
                                      None, torch.ones(n, device=DEVICE), beta, 1e-5, row_task=row_task)
    if tables == "both":
        assert seen["bias"] is None and seen["x_table"] is bias
    else:
        assert seen["bias"] is bias and seen["x_table"] is None


@pytest.mark.parametrize("table", [False, True])
def test_the_kernels_scatter_adds_a_tables_rows_into_padded_sequences(table, monkeypatch):
    """Padded sequences with a task table: the GEMM runs without it and rows_to_heads adds its rows as it writes the
    layout; a plain bias stays in the GEMM."""
    from bitfit_fast.unpadding import Tokens

    seen = {}
    _spy(monkeypatch, seen, "linear_forward", "bias")
    _spy(monkeypatch, seen, "rows_to_heads", "table")
    mask = torch.tensor([[True, True, True], [True, False, False]], device=DEVICE)
    tokens = Tokens.of_batch(torch.zeros(*mask.shape, 1, device=DEVICE), mask[:, None, None, :])
    assert tokens.slots is not None
    biases = [torch.randn(*((3,) if table else ()), 4, device=DEVICE) for _ in range(3)]
    row_task = torch.randint(0, 3, (tokens.num_rows,), device=DEVICE) if table else None
    IMPLS["triton"].linear_heads(torch.randn(tokens.num_rows, 5, device=DEVICE), torch.randn(12, 5, device=DEVICE),
                                 biases, tokens, 2, row_task)
    assert seen["bias" if table else "table"] is None
    assert torch.equal(seen["table" if table else "bias"], torch.cat(biases, dim=-1))


def test_torch_layer_norm_adds_x_table_rows_to_x_before_the_dropout():
    x, x_table, beta = (torch.randn(*shape, device=DEVICE) for shape in ((7, 6), (3, 6), (3, 6)))
    row_task = torch.randint(0, 3, (7,), device=DEVICE)
    kwargs = dict(dropout_p=0.3, seed=5, row_task=row_task)
    ours = torch_ops.residual_layer_norm_forward(x, torch.ones(6, device=DEVICE), beta, 1e-5, x_table=x_table, **kwargs)
    theirs = torch_ops.residual_layer_norm_forward(x + x_table[row_task], torch.ones(6, device=DEVICE), beta, 1e-5,
                                                   **kwargs)
    for got, want in zip(ours, theirs):
        assert torch.equal(got, want)


def _interleaved_parts(parts: int, sequences=3, heads=2, length=5, dim=4):
    """A projection's rows [S, L, P, H, D] and its P parts [S, H, L, D] as views of them (how
    ``unpadding._GroupViews`` hands q, k, v gradients back)."""
    rows = torch.randn(sequences, length, parts, heads, dim, dtype=torch.float64, device=DEVICE)
    return rows, [rows[:, :, part].transpose(1, 2) for part in range(parts)]


def _rows_of(grads):
    return torch.cat([grad.transpose(1, 2).flatten(2) for grad in grads], dim=-1)


@pytest.mark.parametrize("parts", [2, 3])
def test_packed_heads_takes_gradients_already_in_the_rows_without_a_copy(parts):
    rows, grads = _interleaved_parts(parts)
    packed = torch_ops.packed_heads(grads)
    assert packed.data_ptr() == rows.data_ptr(), "the interleaved parts must be used as they are"
    assert torch.equal(packed, _rows_of(grads))


@pytest.mark.parametrize("case", ["separate buffers", "swapped", "two parts of three", "contiguous", "a None part"])
def test_packed_heads_copies_gradients_that_only_look_interleaved(case):
    rows, grads = _interleaved_parts(2)
    if case == "separate buffers":  # each at the right strides and offset, but of another buffer
        grads = [grads[0], _interleaved_parts(2)[1][1]]
    elif case == "swapped":
        grads = grads[::-1]
    elif case == "two parts of three":
        rows, three = _interleaved_parts(3)
        grads = three[1:]
    elif case == "contiguous":
        grads = [grad.contiguous() for grad in grads]
    else:
        grads = [grads[0], None]
    packed = torch_ops.packed_heads(grads)
    assert packed.untyped_storage().data_ptr() != rows.untyped_storage().data_ptr()
    expected = _rows_of([torch.zeros_like(grads[0]) if grad is None else grad for grad in grads])
    assert torch.equal(packed, expected)


# Only an activation's pre-activation is recomputed.
@pytest.mark.parametrize("activation,recompute", [(None, False), ("gelu", False), ("geglu", False), ("gelu", True),
                                                  ("geglu", True)])
@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_torch_linear_equals_float64_autograd_on_the_same_mask(activation, dropout, recompute):
    """The torch backend's LinearFunction in float64 against plain autograd on the mask it drew: the exact GELU's
    derivative, GeGLU's two halves, the backward's mask redrawn from the same seed and scaled as the forward's,
    the bias gradient after the activation; with ``recompute``, h rebuilt in the backward from the LayerNorm
    output x = gamma * x_hat + beta (lean mode), random gamma and beta, so x_hat in its place would show."""
    ops, k, n = IMPLS["torch"], 33, 29
    width = 2 * n if activation == "geglu" else n
    x_hat = torch.randn(5, 7, k, device=DEVICE, dtype=torch.float64)
    gamma = 1 + 0.3 * torch.randn(k, device=DEVICE)
    beta = torch.randn(k, device=DEVICE)
    x = torch_ops.layer_norm_output(x_hat, gamma, beta)
    weight = torch.randn(width, k, device=DEVICE, dtype=torch.float64) / k**0.5
    bias = torch.randn(width, device=DEVICE, dtype=torch.float64)
    seed = 2024 if dropout else None
    xl, bl = _leaf(x), _leaf(bias)
    y = ops.linear(xl, weight, bl, activation, dropout, seed,
                   recompute_from=(x_hat, gamma, beta, None) if recompute else None)
    dy = torch.randn_like(y)
    dx, db = torch.autograd.grad(y, (xl, bl), dy)

    xr, br = _leaf(x), _leaf(bias)
    yr = torch_ops.activation_forward(activation, torch.nn.functional.linear(xr, weight, br))
    if dropout:
        yr = yr * torch_ops.dropout_scale(yr, dropout, seed)
        assert (yr == 0).any()
    torch.testing.assert_close(y, yr, rtol=1e-12, atol=1e-12)
    dxr, dbr = torch.autograd.grad(yr, (xr, br), dy)
    torch.testing.assert_close(dx, dxr, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(db, dbr, rtol=1e-5, atol=1e-5)  # column sums in fp32, by design


@pytest.mark.parametrize("eps", [1e-12, 0.3])
@pytest.mark.parametrize("dropout", [0.0, 0.25])
@pytest.mark.parametrize("fused", [False, True], ids=["layer_norm", "linear_layer_norm"])
def test_torch_residual_layer_norm_equals_float64_autograd_on_the_same_mask(eps, dropout, fused):
    """LayerNorm(dropout(x) + residual) (x = h @ W^T + b with ``fused``) on the torch backend, float64 inputs, against
    F.layer_norm on the mask it drew, for every input's gradient (fp32 tolerances: the backend normalises in fp32 by
    design): eps where torch puts it (0.3, against rows of variance ~1, moves every value), dropout on x alone, the
    backward's mask redrawn from the same seed, residual and beta gradients without it, x_hat and rstd kept at full
    precision."""
    ops, rows, k, n = IMPLS["torch"], 13, 11, 37
    f64 = dict(device=DEVICE, dtype=torch.float64)
    h_in = torch.randn(rows, k, **f64)
    weight = torch.randn(n, k, **f64) / k**0.5
    bias = torch.randn(n, **f64)
    x = torch.randn(rows, n, **f64) * 3
    residual = torch.randn(rows, n, **f64)
    gamma = 1 + 0.3 * torch.randn(n, **f64)
    beta = torch.randn(n, **f64)
    seed = 99 if dropout else None
    leaves = [_leaf(t) for t in ((h_in, bias) if fused else (x,)) + (residual, beta)]
    if fused:
        y, x_hat, _ = ops.linear_layer_norm(leaves[0], weight, leaves[1], leaves[2], gamma, leaves[3], eps, dropout,
                                            seed)
    else:
        y, x_hat = ops.layer_norm(leaves[0], leaves[1], gamma, leaves[2], eps, dropout, seed)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, leaves, dy)

    ref_leaves = [_leaf(t) for t in ((h_in, bias) if fused else (x,)) + (residual, beta)]
    s = torch.nn.functional.linear(ref_leaves[0], weight, ref_leaves[1]) if fused else ref_leaves[0]
    if dropout:
        s = s * torch_ops.dropout_scale(s, dropout, seed)
        assert (s == 0).any()
    s = s + ref_leaves[-2]
    y_ref = torch.nn.functional.layer_norm(s, (n,), gamma, ref_leaves[-1], eps)
    x_hat_ref = torch.nn.functional.layer_norm(s.detach(), (n,), None, None, eps)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_hat, x_hat_ref, rtol=1e-5, atol=1e-5)
    names = ("dx", "dbias", "dresidual", "dbeta") if fused else ("dx", "dresidual", "dbeta")
    for name, ours, theirs in zip(names, grads, torch.autograd.grad(y_ref, ref_leaves, dy), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5, msg=name)


# bf16 on the kernels is GPU-only: the interpreter has no bf16 tl.dot (triton#11584).
@pytest.mark.parametrize("impl,dtype", [("torch", torch.float16), ("torch", torch.bfloat16),
                                        ("triton", torch.float16)])
@pytest.mark.parametrize("op", ["linear", "layer_norm", "linear_layer_norm"])
def test_dropout_in_half_precision_is_as_accurate_as_torch_on_the_same_mask(impl, dtype, op):
    """Dropout on half-precision activations (fp32 biases, gamma and beta, as under autocast): the forward's mask is
    the one the op draws in fp32 from the same seed, the backward draws it again and scales as the forward did, and
    the output and every gradient obey flash-attention's rule against float64 on that mask: err(ours) <=
    2 err(torch in ``dtype`` on the same mask) + atol. A backward mask or scale other than the forward's would be
    off by whole values."""
    ops, rows, k, n, p, seed, eps = IMPLS[impl], 13, 11, 37, 0.25, 2024, 1e-12
    fused_linear = op != "layer_norm"
    x = torch.randn(rows, k if fused_linear else n, device=DEVICE)
    weight = torch.randn(n, k, device=DEVICE) / k**0.5
    bias, residual = torch.randn(n, device=DEVICE), torch.randn(rows, n, device=DEVICE)
    gamma, beta = 1 + 0.3 * torch.randn(n, device=DEVICE), torch.randn(n, device=DEVICE)
    dy = torch.randn(rows, n, device=DEVICE)
    # Trained inputs by op: x and the biases, and for the LayerNorms the residual.
    inputs = {"linear": (x, bias), "layer_norm": (x, residual, beta),
              "linear_layer_norm": (x, bias, residual, beta)}[op]

    def ours(precision):
        leaves = [_leaf(t.to(precision) if t.dim() == 2 else t) for t in inputs]  # fp32 biases
        w = weight.to(precision)
        if op == "linear":
            y = ops.linear(*leaves[:1], w, leaves[1], "gelu", p, seed)
        elif op == "layer_norm":
            y, _ = ops.layer_norm(leaves[0], leaves[1], gamma, leaves[2], eps, p, seed)
        else:
            y, _, _ = ops.linear_layer_norm(leaves[0], w, leaves[1], leaves[2], gamma, leaves[3], eps, p, seed)
        return y, torch.autograd.grad(y, leaves, dy.to(precision))

    # The mask the op draws, read in fp32: the linear's output is nowhere zero where kept (GELU reaches 0 in fp32
    # only below -13); a LayerNorm's dx is ds through its mask, ds nowhere zero (linear_layer_norm draws the same).
    if op == "linear":
        keep = ops.linear(x, weight, bias, "gelu", p, seed) != 0
    else:
        s = _leaf(residual)
        keep = torch.autograd.grad(ops.layer_norm(s, residual, gamma, beta, eps, p, seed)[0], s, dy)[0] != 0
    assert 0 < keep.sum() < keep.numel()

    def torch_on_the_mask(precision):
        leaves = [_leaf(t.to(precision)) for t in inputs]

        def dropped(t):
            return (t * torch_ops.keep_scale(p)) * keep.to(precision)  # kept values scaled in one rounding

        if op == "layer_norm":
            s = dropped(leaves[0]) + leaves[1]
        else:
            h = F.linear(leaves[0], weight.to(precision), leaves[1])
            s = dropped(F.gelu(h)) if op == "linear" else dropped(h) + leaves[2]
        y = s if op == "linear" else F.layer_norm(s, (n,), gamma.to(precision), leaves[-1], eps)
        return y, torch.autograd.grad(y, leaves, dy.to(precision))

    y, grads = ours(dtype)
    truth, truth_grads = torch_on_the_mask(torch.float64)
    same, same_grads = torch_on_the_mask(dtype)
    assert_as_accurate_as_torch(y, same, truth, "y")
    for index, (grad, same_grad, truth_grad) in enumerate(zip(grads, same_grads, truth_grads, strict=True)):
        assert_as_accurate_as_torch(grad.to(dtype), same_grad, truth_grad, f"gradient of input {index}")


@pytest.mark.parametrize("impl", IMPLS)
def test_a_half_precision_input_beside_an_fp32_residual_keeps_the_residuals_gradient_in_fp32(impl):
    """y = LayerNorm(x + residual) with x fp16 and the residual stream fp32, as under autocast: x_hat is kept in x's
    dtype, and the backward computes the residual's gradient from it in fp32 and leaves it so, to fp32's rounding
    of ds = rstd·(g - x_hat·mean(g·x_hat) - mean(g)), g = gamma·dy (rounded to fp16 it would be ~5e-4 off); x's
    gradient comes in fp16."""
    ops, rows, n = IMPLS[impl], 13, 37
    x = torch.randn(rows, n, device=DEVICE).half()
    residual = torch.randn(rows, n, device=DEVICE)
    gamma, beta = 1 + 0.3 * torch.randn(n, device=DEVICE), torch.randn(n, device=DEVICE)
    dy = torch.randn(rows, n, device=DEVICE)
    leaves = (_leaf(x), _leaf(residual))
    y, x_hat = ops.layer_norm(*leaves, gamma, beta, 1e-12)
    dx, dresidual = torch.autograd.grad(y, leaves, dy)
    assert (y.dtype, x_hat.dtype, dx.dtype, dresidual.dtype) == (torch.float32, torch.float16, torch.float16,
                                                                 torch.float32)
    s = x.double() + residual.double()
    rstd = (s.var(-1, unbiased=False, keepdim=True) + 1e-12).rsqrt()
    g, kept = gamma.double() * dy.double(), x_hat.double()
    expected = rstd * (g - kept * (g * kept).mean(-1, keepdim=True) - g.mean(-1, keepdim=True))
    torch.testing.assert_close(dresidual.double(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("op", ["layer_norm", "linear_layer_norm"])
def test_a_layer_norm_keeps_no_x_hat_under_grad_mode_off(impl, op):
    """x_hat and rstd are what a backward reads: inference (no_grad, inference_mode) writes neither, and its y is the
    training forward's, bit for bit. With grad mode on they are kept even where the function's own inputs need no
    gradient: a later function may recompute from x_hat (the memory modes)."""
    ops, rows, n = IMPLS[impl], 7, 13
    x, residual, weight = (torch.randn(rows, n, device=DEVICE), torch.randn(rows, n, device=DEVICE),
                           torch.randn(n, n, device=DEVICE))
    gamma, beta, bias = (torch.randn(n, device=DEVICE), torch.randn(n, device=DEVICE),
                         torch.randn(n, device=DEVICE))

    def forward(trained):
        b, bt = (_leaf(bias), _leaf(beta)) if trained else (bias, beta)
        if op == "layer_norm":
            return ops.layer_norm(x, residual, gamma, bt, 1e-12)
        return ops.linear_layer_norm(x, weight, b, residual, gamma, bt, 1e-12)[:2]

    y, x_hat = forward(trained=True)
    assert x_hat is not None and y.requires_grad
    y_frozen, kept = forward(trained=False)
    assert kept is not None and torch.equal(kept, x_hat) and torch.equal(y_frozen, y.detach())
    for inference in (torch.no_grad(), torch.inference_mode()):
        with inference:
            y_inference, no_x_hat = forward(trained=True)
        assert no_x_hat is None and torch.equal(y_inference, y.detach())


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("used", ["copy", "both"])
def test_the_gemm_copy_alone_takes_the_gradient_of_a_cast_of_y(impl, used):
    """With ``gemm_copy`` (a half-precision GEMM output beside an fp32 residual stream), y_gemm is y rounded to the
    GEMM dtype: its gradient is that of ``y.half()``, bit for bit, whether y itself is used too or not at all (its
    gradient then None)."""
    ops, rows, k, n = IMPLS[impl], 7, 5, 13
    x, weight = torch.randn(rows, k, device=DEVICE).half(), torch.randn(n, k, device=DEVICE).half()
    residual = _leaf(torch.randn(rows, n, device=DEVICE))
    gamma, bias, beta = (1 + 0.3 * torch.randn(n, device=DEVICE), _leaf(torch.randn(n, device=DEVICE)),
                         _leaf(torch.randn(n, device=DEVICE)))
    dy, dy_gemm = torch.randn(rows, n, device=DEVICE), torch.randn(rows, n, device=DEVICE).half()
    leaves = (residual, bias, beta)

    def gradients(gemm_copy):
        y, _, y_gemm = ops.linear_layer_norm(x, weight, bias, residual, gamma, beta, 1e-12, gemm_copy=gemm_copy)
        if not gemm_copy:
            y_gemm = y.half()
        loss = (y_gemm.float() * dy_gemm.float()).sum() + ((y * dy).sum() if used == "both" else 0)
        return torch.autograd.grad(loss, leaves)

    for ours, cast in zip(gradients(True), gradients(False), strict=True):
        assert torch.equal(ours, cast)


@pytest.mark.parametrize("op", ["linear", "layer_norm", "linear_layer_norm"])
def test_a_seed_tensor_changed_before_the_backward_is_refused(op):
    """The kernels take a dropout seed as a tensor (drawn on the device, a CUDA graph's replays draw it anew), which
    the backward reads again to draw the mask again: a seed changed in place in between would silently give the
    gradient of another mask. It is saved for the backward, so autograd's version check refuses it; untouched, the
    gradient is that of the forward's mask (the tensor seed equals the int seed it holds)."""
    ops, rows, n, p = IMPLS["triton"], 5, 7, 0.5
    x, residual = _leaf(torch.randn(rows, n, device=DEVICE)), torch.randn(rows, n, device=DEVICE)
    weight, bias = torch.randn(n, n, device=DEVICE), _leaf(torch.randn(n, device=DEVICE))
    gamma, beta = torch.ones(n, device=DEVICE), _leaf(torch.zeros(n, device=DEVICE))

    def forward(seed):
        if op == "linear":
            return ops.linear(x, weight, bias, "gelu", p, seed)
        if op == "layer_norm":
            return ops.layer_norm(x, residual, gamma, beta, 1e-12, p, seed)[0]
        return ops.linear_layer_norm(x, weight, bias, residual, gamma, beta, 1e-12, p, seed)[0]

    leaves = (x, bias) if op == "linear" else (x, beta) if op == "layer_norm" else (x, bias, beta)
    expected = torch.autograd.grad(forward(11).sum(), leaves)
    seed = torch.tensor([11], device=DEVICE)
    y = forward(seed)
    for grad, expected_grad in zip(torch.autograd.grad(y.sum(), leaves, retain_graph=True), expected, strict=True):
        assert torch.equal(grad, expected_grad)
    seed.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(y.sum(), leaves)


@pytest.mark.parametrize("activation", [None, "gelu"])
def test_torch_half_precision_bias_gradients_are_fp32_column_sums(activation):
    """In fp16, the bias and beta gradients of the torch backend are the fp32 column sums of the (fp16) gradient of
    what they were added to, not sums rounded to fp16 (~1e-3 off at these sizes)."""
    ops, rows, k, n = IMPLS["torch"], 67, 19, 41
    x = torch.randn(rows, k, device=DEVICE, dtype=torch.float16)
    weight = (torch.randn(n, k, device=DEVICE) / k**0.5).half()
    bias, beta = _leaf(torch.randn(n, device=DEVICE)), _leaf(torch.randn(n, device=DEVICE))
    y = ops.linear(x, weight, bias, activation)
    dy = torch.randn_like(y)
    (db,) = torch.autograd.grad(y, (bias,), dy)
    h = torch.nn.functional.linear(x, weight, bias.detach().half())
    g = torch.ops.aten.gelu_backward(dy, h) if activation else dy
    assert db.dtype == torch.float32
    torch.testing.assert_close(db, g.float().sum(0), rtol=1e-6, atol=1e-5)

    residual = torch.randn(rows, n, device=DEVICE, dtype=torch.float16)
    y, _ = ops.layer_norm(_leaf(y.detach()), residual, torch.ones(n, device=DEVICE), beta, 1e-12)
    dy = torch.randn_like(y)
    (dbeta,) = torch.autograd.grad(y, (beta,), dy)
    torch.testing.assert_close(dbeta, dy.float().sum(0), rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("activation", [None, "gelu"])
def test_torch_linear_with_a_task_table_under_autocast_equals_f_linear_with_each_rows_bias(activation):
    """Under autocast the torch backend's GEMM runs in autocast's dtype, as F.linear would, for a task table too
    (its rows gathered and added to that GEMM's output, not an fp32 GEMM): each row equals F.linear under the same
    autocast with its task's bias, in the same dtype, and so do the input's and the table's gradients."""
    ops, rows, k, n, tasks = IMPLS["torch"], 12, 19, 23, 3
    x = torch.randn(rows, k, device=DEVICE)
    weight = torch.randn(n, k, device=DEVICE) / k**0.5
    table = torch.randn(tasks, n, device=DEVICE)
    row_task = torch.randint(0, tasks, (rows,), device=DEVICE)
    row_task[:tasks] = torch.arange(tasks, device=DEVICE)  # every task has rows
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        xl, tl = _leaf(x), _leaf(table)
        y = ops.linear(xl, weight, tl, activation, row_task=row_task)
        xr, tr = _leaf(x), _leaf(table)
        order = torch.cat([(row_task == t).nonzero().flatten() for t in range(tasks)])
        parts = [torch.nn.functional.linear(xr[row_task == t], weight, tr[t]) for t in range(tasks)]
        y_ref = torch_ops.activation_forward(activation, torch.cat(parts)[torch.argsort(order)])
    assert y.dtype == y_ref.dtype == torch.bfloat16
    torch.testing.assert_close(y, y_ref)
    dy = torch.randn_like(y)
    ours, theirs = torch.autograd.grad(y, (xl, tl), dy), torch.autograd.grad(y_ref, (xr, tr), dy)
    assert all(a.dtype == b.dtype == torch.float32 for a, b in zip(ours, theirs))
    assert torch.equal(ours[0], theirs[0]), "dx: the same bf16 GEMM"
    # The table's gradient: our fp32 column sums of the bf16 gradient against F.linear's bf16 ones, a bf16 rounding.
    torch.testing.assert_close(ours[1], theirs[1], rtol=2**-8, atol=2**-8 * theirs[1].abs().max().item())


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("fused", [False, True], ids=["layer_norm", "linear_layer_norm"])
def test_a_residual_alone_gets_its_gradient(impl, fused):
    """Only the residual needs a gradient (the sum's other input, and the linear's bias, frozen): it still gets the
    gradient through the LayerNorm, which the backward computes as the sum's (dx before dropout's mask)."""
    ops, rows, k, n = IMPLS[impl], 7, 5, 12
    h = torch.randn(rows, k, device=DEVICE)
    weight = torch.randn(n, k, device=DEVICE) / k**0.5
    bias = torch.randn(n, device=DEVICE)
    x = torch.nn.functional.linear(h, weight, bias) if fused else torch.randn(rows, n, device=DEVICE)
    gamma, beta = 1 + 0.3 * torch.randn(n, device=DEVICE), torch.randn(n, device=DEVICE)
    residual = _leaf(torch.randn(rows, n, device=DEVICE))
    if fused:
        y, _, _ = ops.linear_layer_norm(h, weight, bias, residual, gamma, beta, 1e-12)
    else:
        y, _ = ops.layer_norm(x, residual, gamma, beta, 1e-12)
    dy = torch.randn_like(y)
    (dresidual,) = torch.autograd.grad(y, (residual,), dy)
    expected_residual = _leaf(residual)
    y_ref = torch.nn.functional.layer_norm(x + expected_residual, (n,), gamma, beta, 1e-12)
    (expected,) = torch.autograd.grad(y_ref, (expected_residual,), dy)
    torch.testing.assert_close(dresidual, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("table", [False, True])
def test_linear_heads_gives_a_trained_part_its_bias_gradient_beside_frozen_parts(impl, table):
    """biases="subset": the query's bias (or task table) trains, the key's and value's are frozen vectors (expanded
    to tables in a TaskBank). The query's gradient is the column sums of its part's gradient, the frozen parts get
    none."""
    from bitfit_fast.unpadding import Tokens

    ops, heads, dim, tasks = IMPLS[impl], 2, 4, 3
    mask = torch.tensor([[True, True, True], [True, False, False]], device=DEVICE)
    tokens = Tokens.of_batch(torch.zeros(*mask.shape, 1, device=DEVICE), mask[:, None, None, :])
    x = torch.randn(tokens.num_rows, 5, device=DEVICE)
    weight = torch.randn(3 * heads * dim, 5, device=DEVICE)
    row_task = torch.randint(0, tasks, (tokens.num_rows,), device=DEVICE) if table else None
    query = torch.randn(*((tasks,) if table else ()), heads * dim, device=DEVICE, requires_grad=True)
    frozen = [torch.randn(heads * dim, device=DEVICE) for _ in range(2)]
    frozen = [b.expand(tasks, -1) for b in frozen] if table else frozen
    q, k, v = ops.linear_heads(x, weight, [query, *frozen], tokens, heads, row_task)
    cotangent = torch.randn_like(q)
    real = tokens.key_mask[:, :, 0, :, None] if tokens.key_mask is not None else True
    (q * cotangent * real).sum().backward()
    rows = (cotangent * real).permute(0, 2, 1, 3).reshape(-1, heads * dim)  # [S * L, H * D] in the layout's order
    slots = tokens.slots if tokens.slots is not None else torch.arange(tokens.real_rows, device=DEVICE)
    per_row = torch.zeros(tokens.num_rows, heads * dim, device=DEVICE)
    per_row[:tokens.real_rows] = rows.index_select(0, slots)
    if table:
        want = torch.zeros(tasks, heads * dim, device=DEVICE).index_add_(0, row_task, per_row)
    else:
        want = per_row.sum(0)
    assert query.grad is not None, "the trained part lost its gradient beside frozen ones"
    torch.testing.assert_close(query.grad, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("memory,fuse_layers", [("default", True), ("lean", True), ("minimal", True),
                                                ("default", False)])
def test_a_second_derivative_through_the_functions_is_refused_not_wrong(backend, memory, fuse_layers):
    """Their backwards are not differentiable (kernels, and values saved without a graph): a gradient penalty over
    input gradients taken with create_graph=True got silently wrong bias gradients (on the kernels, without the
    penalty's part). It is refused where it would be differentiated, as autograd refuses @once_differentiable
    functions; the first derivative is the same as without create_graph."""
    torch.manual_seed(0)
    model = bitfit_fast.apply(tiny_bert(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1), backend=backend,
                              memory=memory, fuse_layers=fuse_layers).train()
    batch = padded_batch(model, (5, 3))
    embeds = model.get_input_embeddings()(batch.pop("input_ids")).detach().requires_grad_()

    def input_gradient(create_graph: bool) -> torch.Tensor:
        torch.manual_seed(1)  # the same dropout masks
        loss = model(inputs_embeds=embeds, **batch).loss
        return torch.autograd.grad(loss, embeds, create_graph=create_graph)[0]

    plain = input_gradient(create_graph=False)
    with_graph = input_gradient(create_graph=True)
    torch.testing.assert_close(with_graph, plain, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="marked with @once_differentiable"):
        with_graph.square().sum().backward()


def test_the_one_hot_task_sums_keep_an_overflow_in_its_own_tasks_sum():
    """The torch ops' per-task sums on CUDA (one_hot_task_sums, run here on CPU) against index_add_'s: a task whose
    rows hold an inf, a -inf, both, or a NaN gets a sum that is not finite (NaN) where its own sum is not, and
    every other task its finite sum (the one-hot product made them all NaN: inf · 0, and a loss scaler skipped
    every task's step)."""
    torch.manual_seed(0)
    grad = torch.randn(11, 6)
    row_task = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 4])
    grad[1, 0] = float("inf")  # task 1: +inf in column 0
    grad[3, 1] = float("-inf")  # task 3: -inf in column 1
    grad[2, 2], grad[7, 2] = float("inf"), float("-inf")  # task 2: both in column 2, NaN
    grad[4, 3] = float("nan")  # task 4: NaN in column 3
    expected = torch.zeros(6, 6).index_add_(0, row_task, grad)  # the CPU path's, and each task's own sum
    got = torch_ops.one_hot_task_sums(grad, row_task, 6)
    assert torch.equal(got.isfinite(), expected.isfinite()) and expected.isfinite().sum() == 36 - 4
    torch.testing.assert_close(got[expected.isfinite()], expected[expected.isfinite()], rtol=1e-6, atol=1e-6)
