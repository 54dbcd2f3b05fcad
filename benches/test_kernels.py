"""Fused kernels against the torch ops they replace, at BERT shapes (32,768 tokens), bf16 on a GPU.

Under the CPU interpreter the kernels run in numpy: their timings mean nothing, so these need CUDA.
"""

import pytest
import torch
import torch.nn.functional as F

import bitfit_fast_kernels as K
from bitfit_fast.functions import Ops

FUSED = Ops(K)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="kernel timings need a CUDA GPU")

TOKENS = 32768
LINEARS = [(768, 2304, None), (768, 768, "dropout"), (768, 3072, "gelu"), (3072, 768, "dropout"),
           (1024, 3072, None), (1024, 1024, "dropout"), (1024, 4096, "gelu"), (4096, 1024, "dropout")]


def _inputs(k, n):
    x = torch.randn(TOKENS, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
    b = torch.zeros(n, device="cuda", requires_grad=True)
    return x, w, b


def _torch_linear(x, w, b, epilogue):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = F.linear(x, w, b)
        if epilogue == "gelu":
            y = F.gelu(y)
        elif epilogue == "dropout":
            y = F.dropout(y, 0.1)
    return y


def _fused_linear(x, w, b, epilogue):
    return FUSED.linear(x, w, b, "gelu" if epilogue == "gelu" else None, 0.1 if epilogue == "dropout" else 0.0, 1234)


class _TritonGemmLinear(torch.autograd.Function):
    """The fused path with its forward GEMM forced to the Triton kernel (the fused linear lets ``gemm="auto"``
    choose cuBLAS for bias and GELU epilogues): what that choice saves."""

    @staticmethod
    def forward(ctx, x, w, b, activation, p):
        y, h = K.linear_forward(x, w, b, activation=activation, dropout_p=p, seed=1234 if p else None,
                                store_preact=activation is not None, gemm="triton")
        ctx.save_for_backward(w, h)
        ctx.options = activation, p
        return y

    @staticmethod
    def backward(ctx, dy):
        w, h = ctx.saved_tensors
        activation, p = ctx.options
        dx, db = K.linear_backward(dy.contiguous(), w, h, activation=activation, dropout_p=p,
                                   seed=1234 if p else None)
        return dx, None, db, None, None


def _fused_triton_gemm_linear(x, w, b, epilogue):
    return _TritonGemmLinear.apply(x, w, b, "gelu" if epilogue == "gelu" else None,
                                   0.1 if epilogue == "dropout" else 0.0)


@pytest.mark.parametrize("impl", ["torch", "fused", "fused-triton-gemm"])
@pytest.mark.parametrize("k,n,epilogue", LINEARS, ids=[f"{k}x{n}-{e}" for k, n, e in LINEARS])
def test_linear_forward_backward(benchmark, impl, k, n, epilogue):
    x, w, b = _inputs(k, n)
    dy = torch.randn(TOKENS, n, device="cuda", dtype=torch.bfloat16)
    fn = {"torch": _torch_linear, "fused": _fused_linear, "fused-triton-gemm": _fused_triton_gemm_linear}[impl]

    def step():
        y = fn(x, w, b, epilogue)
        torch.autograd.grad(y, (x, b), dy)
        torch.cuda.synchronize()

    benchmark.group = f"linear {k}->{n} {epilogue or 'bias'} fwd+bwd"
    benchmark.pedantic(step, rounds=30, warmup_rounds=5, iterations=1)
    benchmark.extra_info.update(device=torch.cuda.get_device_name(), tokens=TOKENS)


@pytest.mark.parametrize("impl", ["torch", "fused"])
@pytest.mark.parametrize("n", [768, 1024])
def test_residual_layer_norm_forward_backward(benchmark, impl, n):
    x = torch.randn(TOKENS, n, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    residual = torch.randn_like(x, requires_grad=True)
    gamma = torch.ones(n, device="cuda")
    beta = torch.zeros(n, device="cuda", requires_grad=True)
    dy = torch.randn_like(x)

    def step():
        if impl == "fused":
            y, _ = FUSED.layer_norm(x, residual, gamma, beta, 1e-12, 0.1, 99)
        else:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                y = F.layer_norm(F.dropout(x, 0.1) + residual, (n,), gamma, beta, 1e-12)
        torch.autograd.grad(y, (x, residual, beta), dy.to(y.dtype))
        torch.cuda.synchronize()

    benchmark.group = f"dropout+residual+LayerNorm {n} fwd+bwd"
    benchmark.pedantic(step, rounds=30, warmup_rounds=5, iterations=1)
    benchmark.extra_info.update(device=torch.cuda.get_device_name(), tokens=TOKENS)
