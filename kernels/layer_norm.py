"""Residual + LayerNorm with a frozen gamma, and its BitFit backward.

Forward:   s = dropout(x) + residual;  y = (s - mean(s)) * rstd * gamma + beta
Backward:  x_hat is rebuilt from the output, x_hat = (y - beta) / gamma, so the forward saves y (the next
           block's input, kept anyway) and rstd instead of its input. gamma is frozen: only d(beta) and the
           input gradients are computed. Where gamma has zeros y carries no information about x_hat there; the
           caller then asks the forward to store s and the backward rebuilds x_hat = (s - mean) * rstd.
"""

import torch
import triton
import triton.language as tl

from .utils import (
    KernelInputError,
    check_compute_tensor,
    check_dropout,
    check_rows,
    check_vector,
    reduction_programs,
)

# A whole row lives in registers; 64K fp32 values is far beyond any encoder's hidden size.
MAX_FEATURES = 65536


@triton.jit
def _residual_layer_norm_fwd_kernel(
    # Pointers
    x_ptr,  # [M, N] sublayer output
    res_ptr,  # [M, N] residual (read only with HAS_RESIDUAL)
    gamma_ptr,  # [N] frozen scale, read as fp32
    beta_ptr,  # [N] shift, read as fp32
    y_ptr,  # [M, N] output
    s_ptr,  # [M, N] normalised input s, written only with STORE_INPUT
    mean_ptr,  # [M] fp32
    rstd_ptr,  # [M] fp32
    # Sizes and scalars
    N,
    eps,
    p,
    scale,
    seed,
    philox_offset,
    # Features
    HAS_RESIDUAL: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    STORE_INPUT: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    offsets = row * N + cols

    s = tl.load(x_ptr + offsets, mask=col_ok, other=0.0).to(tl.float32)
    if HAS_DROPOUT:
        keep = tl.rand(seed, philox_offset + offsets) >= p
        s = tl.where(keep, s * scale, 0.0)
    if HAS_RESIDUAL:
        s += tl.load(res_ptr + offsets, mask=col_ok, other=0.0).to(tl.float32)
    if STORE_INPUT:
        tl.store(s_ptr + offsets, s.to(s_ptr.dtype.element_ty), mask=col_ok)

    mean = tl.sum(s, axis=0) / N
    centered = tl.where(col_ok, s - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=0) / N + eps)
    gamma = tl.load(gamma_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    beta = tl.load(beta_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    y = centered * rstd * gamma + beta
    tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=col_ok)
    tl.store(mean_ptr + row, mean)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _residual_layer_norm_bwd_kernel(
    # Pointers
    dy_ptr,  # [M, N] gradient of the output
    saved_ptr,  # [M, N] the output y, or the input s when the forward stored it (FROM_OUTPUT=False)
    gamma_ptr,  # [N] frozen scale
    beta_ptr,  # [N] shift
    mean_ptr,  # [M] fp32 (read only without FROM_OUTPUT)
    rstd_ptr,  # [M] fp32
    ds_ptr,  # [M, N] gradient of s, which is the residual's gradient (written with COMPUTE_DX)
    dx_ptr,  # [M, N] gradient of x: ds through the dropout mask (written with COMPUTE_DX and HAS_DROPOUT)
    dbeta_partial_ptr,  # [num_programs, N] fp32 per-program sums of dy
    # Sizes and scalars
    M,
    N,
    p,
    scale,
    seed,
    philox_offset,
    # Features
    FROM_OUTPUT: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    COMPUTE_DX: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # A persistent loop over rows pid, pid + P, ...: d(beta) accumulates in registers and is written once.
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    gamma = tl.load(gamma_ptr + cols, mask=col_ok, other=1.0).to(tl.float32)
    beta = tl.load(beta_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    dbeta = tl.zeros((BLOCK_N,), dtype=tl.float32)

    for row in range(pid, M, num_programs):
        offsets = row * N + cols
        dy = tl.load(dy_ptr + offsets, mask=col_ok, other=0.0).to(tl.float32)
        dbeta += dy
        if COMPUTE_DX:
            saved = tl.load(saved_ptr + offsets, mask=col_ok, other=0.0).to(tl.float32)
            rstd = tl.load(rstd_ptr + row)
            if FROM_OUTPUT:
                x_hat = tl.where(col_ok, (saved - beta) / gamma, 0.0)
            else:
                x_hat = tl.where(col_ok, (saved - tl.load(mean_ptr + row)) * rstd, 0.0)
            g = dy * gamma
            c1 = tl.sum(x_hat * g, axis=0) / N
            c2 = tl.sum(g, axis=0) / N
            ds = (g - x_hat * c1 - c2) * rstd
            tl.store(ds_ptr + offsets, ds.to(ds_ptr.dtype.element_ty), mask=col_ok)
            if HAS_DROPOUT:
                keep = tl.rand(seed, philox_offset + offsets) >= p
                tl.store(dx_ptr + offsets, tl.where(keep, ds * scale, 0.0).to(dx_ptr.dtype.element_ty), mask=col_ok)

    tl.store(dbeta_partial_ptr + pid * N + cols, dbeta, mask=col_ok)


def _check_features(N: int) -> int:
    if N > MAX_FEATURES:
        raise KernelInputError(f"LayerNorm over {N} features exceeds the kernel's limit of {MAX_FEATURES}")
    return triton.next_power_of_2(N)


def _warps(block_n: int) -> int:
    return min(max(block_n // 256, 1), 16)


def residual_layer_norm_forward(
    x: torch.Tensor,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    *,
    dropout_p: float = 0.0,
    seed: int | None = None,
    philox_offset: int = 0,
    store_input: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """LayerNorm(dropout(x) + residual) over the last dimension.

    Returns (y, s, mean, rstd): s, the normalised input, only when ``store_input`` (needed for the backward
    when gamma has zeros), else None. mean and rstd are fp32 with one value per row.
    """
    check_compute_tensor("x", x)
    N = x.shape[-1]
    M = check_rows("x", x)
    if residual is not None:
        check_compute_tensor("residual", residual)
        if residual.shape != x.shape:
            raise KernelInputError(f"residual has shape {tuple(residual.shape)} but x has {tuple(x.shape)}")
        if residual.device != x.device:
            raise KernelInputError(f"residual is on {residual.device} but x is on {x.device}")
    check_vector("gamma", gamma, N, x.device)
    check_vector("beta", beta, N, x.device)
    check_dropout(dropout_p, seed, M * N)
    block_n = _check_features(N)

    y = torch.empty_like(x)
    s = torch.empty_like(x) if store_input else None
    mean = torch.empty(M, dtype=torch.float32, device=x.device)
    rstd = torch.empty(M, dtype=torch.float32, device=x.device)
    _residual_layer_norm_fwd_kernel[(M,)](
        x, residual if residual is not None else x, gamma, beta, y, s if s is not None else y, mean, rstd,
        N, eps, dropout_p, 1.0 / (1.0 - dropout_p), seed or 0, philox_offset,
        HAS_RESIDUAL=residual is not None,
        HAS_DROPOUT=dropout_p > 0.0,
        STORE_INPUT=store_input,
        BLOCK_N=block_n,
        num_warps=_warps(block_n),
    )
    return y, s, mean, rstd


def residual_layer_norm_backward(
    dy: torch.Tensor,
    saved: torch.Tensor,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    mean: torch.Tensor | None,
    rstd: torch.Tensor,
    *,
    saved_is_output: bool = True,
    dropout_p: float = 0.0,
    seed: int | None = None,
    philox_offset: int = 0,
    compute_dx: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """Gradients of :func:`residual_layer_norm_forward`; never gamma's.

    ``saved`` is the forward's y (``saved_is_output=True``, gamma must have no zeros) or its s, which also
    needs the forward's mean (unused otherwise: pass None). Returns
    (dx, dresidual, dbeta): dresidual is the gradient of s (None without ``compute_dx``); dx equals it without
    dropout and is then the same tensor; dbeta is fp32.
    """
    check_compute_tensor("dy", dy)
    check_compute_tensor("saved", saved)
    if saved.shape != dy.shape:
        raise KernelInputError(f"saved has shape {tuple(saved.shape)} but dy has {tuple(dy.shape)}")
    N = dy.shape[-1]
    M = check_rows("dy", dy)
    check_vector("gamma", gamma, N, dy.device)
    check_vector("beta", beta, N, dy.device)
    if not saved_is_output and mean is None:
        raise KernelInputError("rebuilding x_hat from the saved input needs the forward's mean")
    for name, stat in (("mean", mean), ("rstd", rstd)):
        if stat is not None and (stat.dtype != torch.float32 or tuple(stat.shape) != (M,)):
            raise KernelInputError(f"{name} must be the fp32 ({M},) tensor returned by the forward")
    check_dropout(dropout_p, seed, M * N)
    block_n = _check_features(N)

    programs = reduction_programs(M, dy.device)
    ds = torch.empty_like(dy) if compute_dx else None
    dx = torch.empty_like(dy) if compute_dx and dropout_p > 0.0 else ds
    dbeta_partial = torch.empty((programs, N), dtype=torch.float32, device=dy.device)
    _residual_layer_norm_bwd_kernel[(programs,)](
        dy, saved, gamma, beta, mean if mean is not None else rstd, rstd,
        ds if ds is not None else dy, dx if dx is not None else dy, dbeta_partial,
        M, N, dropout_p, 1.0 / (1.0 - dropout_p), seed or 0, philox_offset,
        FROM_OUTPUT=saved_is_output,
        HAS_DROPOUT=dropout_p > 0.0,
        COMPUTE_DX=compute_dx,
        BLOCK_N=block_n,
        num_warps=_warps(block_n),
    )
    return dx, ds, dbeta_partial.sum(dim=0)
