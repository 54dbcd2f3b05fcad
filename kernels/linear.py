"""Frozen linear layer fused with its epilogue, and its BitFit backward.

Forward:   y = dropout(act(x @ W^T + b))          one GEMM; bias, exact GELU and dropout applied in registers.
Backward:  g = dy * keep / (1 - p) * act'(h)
           dx = g @ W                              one GEMM over the same tiles of g,
           db = sum_rows(g)                        reduced from those tiles: no weight gradient, no saved x.

The dropout mask is never stored: both kernels draw it from Philox with the same seed and the counter
``philox_offset + row * N + col``.
"""

import torch
import triton
import triton.language as tl

from .utils import (
    INTERPRETER,
    KernelInputError,
    check_compute_tensor,
    check_dropout,
    check_rows,
    check_vector,
    dot_precision,
    row_bucket,
)

ACTIVATIONS = (None, "gelu")

# Under the interpreter every program is a Python loop over numpy blocks: one small config keeps tests fast.
# On Hopper the autotuner picks among tile shapes that keep the tensor cores fed for BERT-sized N and K.
if INTERPRETER:
    _FWD_CONFIGS = [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4})]
    _BWD_BLOCK_M = 32
    _BWD_CONFIGS = [triton.Config({"BLOCK_N": 32, "BLOCK_K": 32})]
else:
    _FWD_CONFIGS = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_stages=s, num_warps=w)
        for bm, bn, bk, s, w in [
            (128, 256, 64, 3, 8),
            (256, 128, 64, 3, 8),
            (128, 128, 64, 4, 8),
            (128, 128, 32, 4, 4),
            (64, 256, 32, 4, 4),
            (128, 64, 32, 4, 4),
            (64, 128, 64, 4, 4),
            (64, 64, 64, 4, 4),
        ]
    ]
    # The bias-gradient partial sums are indexed by row block, so every backward config shares one BLOCK_M:
    # the buffer can then be sized before the autotuner has chosen.
    _BWD_BLOCK_M = 128
    _BWD_CONFIGS = [
        triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_stages=s, num_warps=w)
        for bn, bk, s, w in [
            (64, 128, 3, 8),
            (64, 256, 3, 8),
            (32, 128, 4, 4),
            (64, 64, 4, 4),
            (32, 256, 4, 8),
            (128, 128, 3, 8),
        ]
    ]


@triton.jit
def _gelu(h):
    # Exact (erf) GELU, as BERT uses; the tanh approximation would change the model.
    return 0.5 * h * (1.0 + tl.erf(h * 0.7071067811865476))


@triton.jit
def _gelu_grad(h):
    cdf = 0.5 * (1.0 + tl.erf(h * 0.7071067811865476))
    pdf = tl.exp(-0.5 * h * h) * 0.3989422804014327
    return cdf + h * pdf


@triton.jit
def _dropout_keep(seed, philox_offset, rows, cols, N, p):
    # Same counters in forward and backward, so the backward regenerates the forward's mask exactly.
    return tl.rand(seed, philox_offset + rows[:, None] * N + cols[None, :]) >= p


@triton.autotune(configs=_FWD_CONFIGS, key=["N", "K", "M_BUCKET"])
@triton.jit
def _linear_fwd_kernel(
    # Pointers
    x_ptr,  # [M, K] input, row-major
    w_ptr,  # [N, K] frozen weight (nn.Linear layout), same dtype as x
    b_ptr,  # [N] bias, any float dtype, read as fp32 (unused without HAS_BIAS)
    y_ptr,  # [M, N] output, dtype of x
    h_ptr,  # [M, N] pre-activation x @ W^T + b, written only with STORE_PREACT
    # Sizes
    M,
    N,
    K,
    M_BUCKET,  # autotuning key only
    # Dropout
    p,  # drop probability
    scale,  # 1 / (1 - p)
    seed,
    philox_offset,
    # Features
    HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,  # "" or "gelu"
    HAS_DROPOUT: tl.constexpr,
    STORE_PREACT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    # Tiles
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # Grouped program order: GROUP_M row blocks share each column block of W while it is in L2.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group_size = GROUP_M * num_pid_n
    first_pid_m = (pid // group_size) * GROUP_M
    group_rows = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % group_size) % group_rows
    pid_n = (pid % group_size) // group_rows

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_ok = rows < M
    col_ok = cols < N
    x_ptrs = x_ptr + rows[:, None] * K + ks[None, :]  # [BLOCK_M, BLOCK_K]
    w_ptrs = w_ptr + cols[None, :] * K + ks[:, None]  # [BLOCK_K, BLOCK_N], a tile of W^T

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_ok = ks < K - k * BLOCK_K
        x = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K

    # Epilogue, still in fp32 registers.
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    out_mask = row_ok[:, None] & col_ok[None, :]
    out_offsets = rows[:, None] * N + cols[None, :]
    if STORE_PREACT:
        tl.store(h_ptr + out_offsets, acc.to(h_ptr.dtype.element_ty), mask=out_mask)
    if ACTIVATION == "gelu":
        acc = _gelu(acc)
    if HAS_DROPOUT:
        keep = _dropout_keep(seed, philox_offset, rows, cols, N, p)
        acc = tl.where(keep, acc * scale, 0.0)
    tl.store(y_ptr + out_offsets, acc.to(y_ptr.dtype.element_ty), mask=out_mask)


@triton.autotune(configs=_BWD_CONFIGS, key=["N", "K", "M_BUCKET"])
@triton.jit
def _linear_bwd_kernel(
    # Pointers
    dy_ptr,  # [M, N] gradient of the output
    h_ptr,  # [M, N] pre-activation saved by the forward (read only with an ACTIVATION)
    w_ptr,  # [N, K] frozen weight
    dx_ptr,  # [M, K] input gradient, written only with COMPUTE_DX
    db_partial_ptr,  # [cdiv(M, BLOCK_M), N] fp32 per-row-block bias-gradient sums, written with COMPUTE_DB
    # Sizes
    M,
    N,
    K,
    M_BUCKET,  # autotuning key only
    # Dropout
    p,
    scale,
    seed,
    philox_offset,
    # Features
    ACTIVATION: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    COMPUTE_DX: tl.constexpr,
    COMPUTE_DB: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    # Tiles
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # One program per [BLOCK_M, BLOCK_K] tile of dx, walking the reduction dimension N. Programs in the first
    # column of K tiles also sum g over their rows for the bias gradient: g is in registers already.
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    ns = tl.arange(0, BLOCK_N)
    row_ok = rows < M
    k_ok = ks < K

    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n in range(0, tl.cdiv(N, BLOCK_N)):
        cols = n * BLOCK_N + ns
        col_ok = cols < N
        tile_mask = row_ok[:, None] & col_ok[None, :]
        tile_offsets = rows[:, None] * N + cols[None, :]
        g = tl.load(dy_ptr + tile_offsets, mask=tile_mask, other=0.0).to(tl.float32)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, philox_offset, rows, cols, N, p)
            g = tl.where(keep, g * scale, 0.0)
        if ACTIVATION == "gelu":
            h = tl.load(h_ptr + tile_offsets, mask=tile_mask, other=0.0).to(tl.float32)
            g = g * _gelu_grad(h)
        if COMPUTE_DB:
            if pid_k == 0:
                tl.store(db_partial_ptr + pid_m * N + cols, tl.sum(g, axis=0), mask=col_ok)
        if COMPUTE_DX:
            w = tl.load(w_ptr + cols[:, None] * K + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
            acc = tl.dot(g.to(w.dtype), w, acc, input_precision=DOT_PRECISION)

    if COMPUTE_DX:
        tl.store(dx_ptr + rows[:, None] * K + ks[None, :], acc.to(dx_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & k_ok[None, :])


def _check_activation(activation: str | None) -> None:
    if activation not in ACTIVATIONS:
        raise KernelInputError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def linear_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    activation: str | None = None,
    dropout_p: float = 0.0,
    seed: int | None = None,
    philox_offset: int = 0,
    store_preact: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """y = dropout(activation(x @ weight^T + bias)) for x of shape (..., K) and weight (N, K).

    Returns (y, h): h is the pre-activation x @ W^T + b when ``store_preact`` (the GELU backward needs it),
    else None. x and weight share one dtype (fp32/fp16/bf16); the bias is read as fp32 whatever its dtype.
    """
    check_compute_tensor("x", x)
    check_compute_tensor("weight", weight, ndim=2)
    _check_activation(activation)
    N, K = weight.shape
    if x.shape[-1] != K:
        raise KernelInputError(f"x has {x.shape[-1]} features but weight expects {K} (weight shape {tuple(weight.shape)})")
    if x.dtype != weight.dtype:
        raise KernelInputError(
            f"x is {x.dtype} but weight is {weight.dtype}; cast them to one dtype or run under torch.autocast"
        )
    if x.device != weight.device:
        raise KernelInputError(f"x is on {x.device} but weight is on {weight.device}")
    check_vector("bias", bias, N, x.device)
    M = check_rows("x", x)
    if M * max(N, K) > 2**31 - 1:  # element offsets are int32 in these kernels
        raise KernelInputError(f"x has {M:,} rows of up to {max(N, K):,} features: over the 2**31 - 1 elements the "
                               "linear kernels address with int32 offsets; use smaller batches (or micro-batches)")
    check_dropout(dropout_p, seed)

    x2d = x.reshape(M, K)
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    h = torch.empty_like(y) if store_preact else None
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
    _linear_fwd_kernel[grid](
        x2d, weight, bias if bias is not None else y, y, h if h is not None else y,
        M, N, K, row_bucket(M),
        dropout_p, 1.0 / (1.0 - dropout_p), seed or 0, philox_offset,
        HAS_BIAS=bias is not None,
        ACTIVATION=activation or "",
        HAS_DROPOUT=dropout_p > 0.0,
        STORE_PREACT=store_preact,
        DOT_PRECISION=dot_precision(x.dtype),
    )
    out_shape = (*x.shape[:-1], N)
    return y.view(out_shape), (h.view(out_shape) if h is not None else None)


def linear_backward(
    dy: torch.Tensor,
    weight: torch.Tensor,
    preact: torch.Tensor | None = None,
    *,
    activation: str | None = None,
    dropout_p: float = 0.0,
    seed: int | None = None,
    philox_offset: int = 0,
    compute_dx: bool = True,
    compute_db: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of :func:`linear_forward` with respect to x and the bias; never the weight.

    dy has shape (..., N). With an activation, ``preact`` is the h returned by the forward. Dropout arguments
    must equal the forward's. Returns (dx in dy's dtype or None, db in fp32 or None).
    """
    check_compute_tensor("dy", dy)
    check_compute_tensor("weight", weight, ndim=2)
    _check_activation(activation)
    N, K = weight.shape
    if dy.shape[-1] != N:
        raise KernelInputError(f"dy has {dy.shape[-1]} features but weight produces {N}")
    if dy.dtype != weight.dtype:
        raise KernelInputError(f"dy is {dy.dtype} but weight is {weight.dtype}; cast them to one dtype")
    M = check_rows("dy", dy)
    if M * max(N, K) > 2**31 - 1:  # element offsets are int32 in these kernels
        raise KernelInputError(f"dy has {M:,} rows of up to {max(N, K):,} features: over the 2**31 - 1 elements the "
                               "linear kernels address with int32 offsets; use smaller batches (or micro-batches)")
    check_dropout(dropout_p, seed)
    if activation is not None:
        if preact is None:
            raise KernelInputError(f"activation={activation!r} needs the pre-activation saved by the forward")
        check_compute_tensor("preact", preact)
        if preact.shape != dy.shape:
            raise KernelInputError(f"preact has shape {tuple(preact.shape)} but dy has {tuple(dy.shape)}")
    if not (compute_dx or compute_db):
        return None, None

    dx = torch.empty((M, K), dtype=dy.dtype, device=dy.device) if compute_dx else None
    row_blocks = triton.cdiv(M, _BWD_BLOCK_M)
    db_partial = torch.empty((row_blocks, N), dtype=torch.float32, device=dy.device) if compute_db else None
    grid = lambda meta: (row_blocks, triton.cdiv(K, meta["BLOCK_K"]) if compute_dx else 1)
    dy2d = dy.reshape(M, N)
    _linear_bwd_kernel[grid](
        dy2d, preact if preact is not None else dy2d, weight,
        dx if dx is not None else dy2d, db_partial if db_partial is not None else dy2d,
        M, N, K, row_bucket(M),
        dropout_p, 1.0 / (1.0 - dropout_p), seed or 0, philox_offset,
        ACTIVATION=activation or "",
        HAS_DROPOUT=dropout_p > 0.0,
        COMPUTE_DX=compute_dx,
        COMPUTE_DB=compute_db,
        DOT_PRECISION=dot_precision(dy.dtype),
        BLOCK_M=_BWD_BLOCK_M,
    )
    # One deterministic reduction of the per-row-block partial sums: no float atomics, same bits every run.
    db = db_partial.sum(dim=0) if compute_db else None
    return (dx.view(*dy.shape[:-1], K) if dx is not None else None), db
