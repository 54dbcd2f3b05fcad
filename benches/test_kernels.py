"""Fused kernels against the torch ops they replace, eager and under ``torch.compile``, at BERT shapes (32,768
tokens), bf16 on a GPU. pytest-benchmark times each block's fwd+bwd from the host (what a step pays); the GPU's own
time per call (its kernels, without the host's gaps between launches) goes to ``extra_info["gpu_busy_ms"]``, so a
block's host overhead and its kernels' speed can be told apart. The compiled variants compile per shape (minutes
in all): select them with ``-k compiled`` or leave them out with ``-k "not compiled"``.

Under the CPU interpreter the kernels run in numpy: their timings mean nothing, so these need CUDA.
"""

import pytest
import torch
import torch.nn.functional as F

import bitfit_fast_kernels as K
from bitfit_fast.functions import Ops
from bitfit_fast_benches.profile_step import gpu_busy_ms

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


def _run(benchmark, step, group: str) -> None:
    benchmark.group = group
    benchmark.pedantic(step, rounds=30, warmup_rounds=5, iterations=1)
    benchmark.extra_info.update(device=torch.cuda.get_device_name(), tokens=TOKENS, gpu_busy_ms=gpu_busy_ms(step))


@pytest.mark.parametrize("impl", ["torch", "torch-compiled", "fused", "fused-triton-gemm"])
@pytest.mark.parametrize("k,n,epilogue", LINEARS, ids=[f"{k}x{n}-{e}" for k, n, e in LINEARS])
def test_linear_forward_backward(benchmark, impl, k, n, epilogue):
    x, w, b = _inputs(k, n)
    dy = torch.randn(TOKENS, n, device="cuda", dtype=torch.bfloat16)
    fn = {"torch": _torch_linear, "torch-compiled": torch.compile(_torch_linear, dynamic=False),
          "fused": _fused_linear, "fused-triton-gemm": _fused_triton_gemm_linear}[impl]

    def step():
        y = fn(x, w, b, epilogue)
        torch.autograd.grad(y, (x, b), dy)
        torch.cuda.synchronize()

    _run(benchmark, step, f"linear {k}->{n} {epilogue or 'bias'} fwd+bwd")


def _torch_residual_layer_norm(x, residual, gamma, beta):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        return F.layer_norm(F.dropout(x, 0.1) + residual, (x.shape[-1],), gamma, beta, 1e-12)


@pytest.mark.parametrize("impl", ["torch", "torch-compiled", "fused"])
@pytest.mark.parametrize("n", [768, 1024])
def test_residual_layer_norm_forward_backward(benchmark, impl, n):
    x = torch.randn(TOKENS, n, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    # The residual stream in fp32, as both torch's and the fused layers carry it under autocast (since 237a7c5).
    residual = torch.randn(TOKENS, n, device="cuda", requires_grad=True)
    gamma = torch.ones(n, device="cuda")
    beta = torch.zeros(n, device="cuda", requires_grad=True)
    torch_block = torch.compile(_torch_residual_layer_norm, dynamic=False) if impl == "torch-compiled" else \
        _torch_residual_layer_norm

    def forward():
        if impl == "fused":
            return FUSED.layer_norm(x, residual, gamma, beta, 1e-12, 0.1, 99)[0]
        return torch_block(x, residual, gamma, beta)

    # In the output's dtype (fp32 for both, from the fp32 residual), made before the timed steps.
    dy = torch.randn_like(forward())

    def step():
        torch.autograd.grad(forward(), (x, residual, beta), dy)
        torch.cuda.synchronize()

    _run(benchmark, step, f"dropout+residual+LayerNorm {n} fwd+bwd")
