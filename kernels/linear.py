"""Frozen linear layer fused with its epilogue, and its BitFit backward.

Forward, one Triton GEMM with its epilogue applied while the fp32 accumulator sits in registers:
    h = x @ W^T + b;   y = dropout(act(h))                 h is stored only when the GELU backward needs it
On a GPU a bias-only or GELU epilogue runs as cuBLAS's GEMM instead (bias in cuBLASLt's epilogue, the GELU one
elementwise pass after it): measured on an H200, this kernel reached ~400 TFLOP/s at BERT-base's shapes and
cuBLAS ~725 (see ``linear_forward``'s ``gemm``). The fused kernel runs what cuBLAS has no epilogue for, dropout
and the GeGLU, and every GEMM under the interpreter.
Backward, no weight gradient and no saved x:
    1. _linear_grad_kernel, ONE elementwise pass:  g = dy * keep / (1 - p) * act'(h), written in dy's dtype (only
       when an activation or dropout makes it differ from dy and dx is wanted), and per-program fp32 column
       sums of g in a [programs, N] buffer (for a task table, pieces per task: the program walks rows sorted
       by task, see ``task_tables``)
    2. db = partials.sum(0)                                one small deterministic reduction: no float atomics
                                                           (per task: ``task_tables``)
    3. dx = g @ W                                          a plain GEMM, cuBLAS through torch.mm: with nothing to
                                                           fuse into it, cuBLAS is the fastest GEMM on Hopper

The dropout mask is never stored: forward and backward draw it from its seed (``dropout.keep_mask``). Row
offsets are int64 (M * N may pass 2**31). fp32 GEMMs use TF32 only when torch's
``torch.backends.cuda.matmul.allow_tf32`` is on (torch's default is off, so both backends round alike); without
it they run as FMA GEMMs on the CUDA cores, about 1/15 of the bf16 tensor-core rate: train in bf16 on a GPU.

Performance model: BERT-base (d = 768, 4d = 3072), batch 256 x seq 128 = M = 32768 tokens, bf16, one encoder
block, against the H100 roofline (~800 TFLOP/s dense bf16 as measured, ~3.35 TB/s HBM; ridge ~240 FLOP/B).
A model, not a measurement: time of a kernel = max(FLOPs / 800 T, bytes / 3.35 T), MB = 1e6 bytes (an M x d
bf16 tensor is 50 MB), the old design's rereads taken from HBM (its worst case: no L2 reuse).

  forward (old and new alike)      GFLOP   bytes moved                           ms
  QKV GEMM + bias                   116    x 50, W 4, y 151 MB                   0.145
  attention (SDPA, flash)            13    q, k, v 151, out 50 MB                0.060
  attn-out GEMM + bias               39    50 + 1 + 50 MB                        0.048
  residual + LayerNorm 1              -    x, res 100, y, x_hat 100 MB           0.060
  FC1 GEMM + bias + GELU            155    x 50, W 5, y 201, h 201 MB            0.193
  FC2 GEMM + bias                   155    201 + 5 + 50 MB                       0.193
  residual + LayerNorm 2              -    200 MB                                0.060
  block forward                     478    ~1.6 GB                               0.76  (GEMMs compute-bound)
  Measured on an H200 the fused FC1 GEMM ran at ~400 TFLOP/s, not 800: cuBLAS's GEMM (~725) plus a GELU pass
  (h 201 MB read, y 201 MB written: +0.1 ms) is faster, and is what a GPU runs (``linear_forward``'s ``gemm``).

  backward, kernel sequence of one block (BitFit: 464 GFLOP of dX GEMMs, half of full fine-tuning's)
                                   GFLOP   new design: bytes                ms     old design (fused prologue)
  LN2 backward (dbeta, FC2's db)      -    dy, x_hat 100, ds, dx 100 MB   0.060   + FC2 db: dy re-read 3072/128 =
  FC2: dx = dy @ W2 (cuBLAS)        155    50 + 5 + 201 MB                0.193   24x: 1.2 GB -> 0.36 ms, HBM-bound
  FC1: g = dy*gelu'(h), db pass       -    dy, h 402 read, g 201 written  0.180   dy, h re-read up to 768/64 = 12x,
  FC1: dx = g @ W1 (cuBLAS)         155    201 + 5 + 50 MB                0.193   erf/exp redone 12x: ~1.4 ms
  residual gradient add (autograd)    -    150 MB                         0.045   same
  LN1 backward (dbeta, attn-out db)   -    200 MB                         0.060   same
  attn-out: dx GEMM                  39    101 MB                         0.048   + db, dy re-read 6x: 0.09 ms
  SDPA backward                      32    ~400 MB                        0.120   same
  QKV: heads_to_rows (gather + db)    -    151 read, 151 MB written       0.090   pack + gather passes: 0.18 ms
  QKV: dx = g @ Wqkv (cuBLAS)       116    151 + 4 + 50 MB                0.145   + db, dy re-read 6x: 0.27 ms
  block backward                    497    ~2.7 GB                        1.13    ~2.7 ms

The old kernel recomputed g as the prologue of the dX GEMM: every one of the K/BLOCK_K programs sharing a row
block reread dy and h and redid erf/exp (and Philox), and with pid_m fastest those programs ran far apart, so
the rereads came from HBM. The new sequence reads each gradient tensor once, in the pass that produces it or in
the GEMM: FC2's and attn-out's bias gradients are summed by the LayerNorm backward that writes their gradients
(``bitfit_fast.functions.LinearLayerNormFunction``), FC1's by the g pass, the QKV bias's by the one pass that
gathers dq, dk and dv back into rows (``heads.heads_to_rows``, ``LinearHeadsFunction``; before it, a pack into a
[S, L, 3d] buffer, a gather of the real rows and a db pass: three passes over 151 MB). No bias-gradient pass of its
own remains. The GEMMs run at the compute roof and the elementwise passes at the bandwidth roof. Left on the
table: FC1's g pass fused into the epilogue of FC2's dX GEMM (~0.13 ms, cuBLASLt's DGELU_BGRAD), which on an
H200 only pays with a Triton GEMM as fast as cuBLAS.
"""

import inspect

import torch
import triton
import triton.language as tl

from . import task_tables
from .dropout import keep_mask, load_seed
from .utils import (
    INTERPRETER,
    KernelInputError,
    cdiv,
    check_bias,
    check_compute_tensor,
    check_dropout,
    check_row_task,
    check_rows,
    check_same_device,
    dot_precision,
    launches_on_input_device,
    reduction_programs,
    row_bucket,
    seed_pointer,
)

# "geglu": gelu(h[:, :N/2]) * h[:, N/2:], the GLU of ModernBERT (its up-projection stacks the input and gate halves).
ACTIVATIONS = (None, "gelu", "geglu")


def _gemm_config(bm, bn, bk, stages, warps):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_stages=stages,
                         num_warps=warps)


# GEMM tile shapes per operand family. Every one compiles for sm_90 within its shared memory and without register
# spills (checked by `python -m bitfit_fast_kernels.aot`): 128 x 128 tiles on 4 warps hit 255 registers and spill
# 0.5-1.2 KB per thread in the GELU epilogue, so they take 8 warps; fp32 operands take twice the shared memory, so
# half the K depth, and TF32's 128 x 64 tile takes 8 warps too (on 4, the per-row bias gather with the dropout
# epilogue spilled 32 B under triton 3.6); FMA ("ieee") tiles stay small. Under the interpreter one small tile
# keeps the tests fast.
# The GeGLU epilogue holds two accumulators (input and gate columns), so its tiles hold half the columns per warp:
# the plain tiles with both accumulators use all 255 registers and spill 128-368 B.
if INTERPRETER:
    _GEMM_CONFIGS = dict.fromkeys(("16-bit", "tf32", "ieee"), [_gemm_config(64, 64, 64, 1, 4)])
    _GEGLU_CONFIGS = _GEMM_CONFIGS
else:
    _GEMM_CONFIGS = {
        # fp16 / bf16: wgmma tiles; 64 x 64 for small batches, where larger tiles leave SMs idle
        "16-bit": [_gemm_config(*c) for c in [(128, 128, 64, 4, 8), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4),
                                              (64, 64, 64, 4, 4)]],
        # fp32 with TF32 tensor cores
        "tf32": [_gemm_config(*c) for c in [(128, 128, 32, 3, 8), (64, 128, 32, 4, 4), (128, 64, 32, 4, 8)]],
        # fp32 FMA ("ieee"): no tensor cores, the operands go through registers
        "ieee": [_gemm_config(*c) for c in [(64, 64, 16, 4, 4), (64, 128, 16, 3, 8)]],
    }
    _GEGLU_CONFIGS = {
        "16-bit": [_gemm_config(*c) for c in [(128, 64, 64, 4, 8), (64, 128, 64, 4, 8), (64, 64, 64, 4, 4)]],
        "tf32": [_gemm_config(*c) for c in [(128, 64, 32, 3, 8), (64, 64, 32, 4, 4)]],
        "ieee": [_gemm_config(*c) for c in [(64, 64, 16, 4, 8)]],
    }

# The gradient pass is bandwidth-bound: a 16 x 128 tile on 2 warps, 32 elements per thread, timed best of seven tiles
# on an H200 (bitfit_fast_benches.sweep: FC1's GELU pass 0.229 ms, against 0.353 ms on 4 warps). Its interpreter
# tile, 32 x 32, is narrower and shorter than the GEMM's 64 x 64, so the tests see the dropout mask drawn under two
# tilings, in columns as in rows; it holds as many values as 16 x 64 did (the interpreter's time goes by programs:
# 16 x 32 made the real-MiniLM Triton tests ~10% slower).
_GRAD_BLOCK_M, _GRAD_BLOCK_N, _GRAD_WARPS = (32, 32, 1) if INTERPRETER else (16, 128, 2)


def gemm_configs(dtype: torch.dtype, precision: str, activation: str | None = None) -> list[triton.Config]:
    """The forward GEMM's candidate tiles for operands of ``dtype``, the ``dot_precision`` it runs with and its
    epilogue's activation."""
    family = "16-bit" if dtype != torch.float32 else precision
    return (_GEGLU_CONFIGS if activation == "geglu" else _GEMM_CONFIGS)[family]


def _prune_gemm_configs(configs, named_args, **kwargs):
    # The autotuner holds every family's configs; time only this dtype's, and only those whose pipelined operand
    # tiles fit the device's shared memory (all do on sm_90; smaller GPUs lose the deepest ones).
    x = named_args["x_ptr"]
    candidates = gemm_configs(x.dtype, kwargs["DOT_PRECISION"], kwargs["ACTIVATION"])
    if INTERPRETER:
        return candidates
    limit = torch.cuda.get_device_properties(x.device).shared_memory_per_block_optin
    w_tiles = 2 if kwargs["ACTIVATION"] == "geglu" else 1  # the GeGLU loads an input and a gate tile of W
    fitting = [c for c in candidates
               if c.num_stages * (c.kwargs["BLOCK_M"] + w_tiles * c.kwargs["BLOCK_N"]) * c.kwargs["BLOCK_K"]
               * x.element_size() <= limit]
    return fitting or [min(candidates, key=lambda c: c.num_stages * c.kwargs["BLOCK_K"])]


def _autotune(**kwargs):
    # Timings persist across processes where triton can (cache_results, triton >= 3.2): no re-tuning every run.
    if "cache_results" in inspect.signature(triton.autotune).parameters:
        kwargs["cache_results"] = True
    return triton.autotune(**kwargs)


@triton.jit
def _gelu(h):
    # Exact (erf) GELU, as BERT uses; the tanh approximation would change the model.
    return 0.5 * h * (1.0 + tl.erf(h * 0.7071067811865476))


@triton.jit
def _gelu_grad(h):
    cdf = 0.5 * (1.0 + tl.erf(h * 0.7071067811865476))
    pdf = tl.exp(-0.5 * h * h) * 0.3989422804014327
    return cdf + h * pdf


@_autotune(
    # One entry per distinct config: with a single one (the interpreter) triton neither prunes nor benchmarks.
    configs=list(dict.fromkeys(c for table in (_GEMM_CONFIGS, _GEGLU_CONFIGS) for family in table.values()
                               for c in family)),
    # Everything that changes the best tile: sizes, the epilogue and the precision (triton adds the dtypes).
    key=["N", "K", "M_BUCKET", "HAS_BIAS", "BIAS_PER_ROW", "ACTIVATION", "HAS_DROPOUT", "STORE_PREACT",
         "DOT_PRECISION"],
    prune_configs_by={"early_config_prune": _prune_gemm_configs},
)
@triton.jit(do_not_specialize=["M"])  # the rows change per batch: no recompiles
def _linear_fwd_kernel(
    # Pointers
    x_ptr,  # [M, K] input, row-major
    w_ptr,  # [N, K] frozen weight (nn.Linear layout), same dtype as x
    b_ptr,  # [N] bias, any float dtype, read as fp32 (unused without HAS_BIAS); [T, N] with BIAS_PER_ROW
    task_ptr,  # [M] integer: the row of b each row adds (read only with BIAS_PER_ROW: per-example task biases)
    y_ptr,  # [M, N] output, dtype of x; [M, N / 2] with the GeGLU
    h_ptr,  # [M, N] pre-activation x @ W^T + b, written only with STORE_PREACT
    # Sizes
    M,
    N,
    K,
    M_BUCKET,  # autotuning key only: a power of 4, so always specialised alike
    # Dropout
    p,  # drop probability
    scale,  # 1 / (1 - p)
    seed_ptr,  # [1] int64 dropout seed (read only with HAS_DROPOUT), see dropout.py
    # Features
    HAS_BIAS: tl.constexpr,
    BIAS_PER_ROW: tl.constexpr,
    ACTIVATION: tl.constexpr,  # "", "gelu" or "geglu"
    HAS_DROPOUT: tl.constexpr,
    STORE_PREACT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "tf32" or "ieee", see utils.dot_precision
    # Tiles
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # With the GeGLU a program computes output columns cols from two accumulators: the input half (rows cols of W)
    # and the gate half (rows cols + N / 2), so the product is formed in registers and only y is written.
    if ACTIVATION == "geglu":
        n_out = N // 2
    else:
        n_out = N
    # Grouped program order: GROUP_M row blocks share each column block of W while it is in L2.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(n_out, BLOCK_N)
    group_size = GROUP_M * num_pid_n
    first_pid_m = (pid // group_size) * GROUP_M
    group_rows = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % group_size) % group_rows
    pid_n = (pid % group_size) // group_rows

    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_ok = rows < M
    col_ok = cols < n_out
    x_ptrs = x_ptr + rows[:, None] * K + ks[None, :]  # [BLOCK_M, BLOCK_K]
    w_ptrs = w_ptr + cols[None, :] * K + ks[:, None]  # [BLOCK_K, BLOCK_N], a tile of W^T

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if ACTIVATION == "geglu":
        gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(tl.cdiv(K, BLOCK_K)):
        k_ok = ks < K - k * BLOCK_K
        x = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)
        if ACTIVATION == "geglu":
            w_gate = tl.load(w_ptrs + n_out * K, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            gate = tl.dot(x, w_gate, gate, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K

    # Epilogue, still in fp32 registers.
    out_mask = row_ok[:, None] & col_ok[None, :]
    if HAS_BIAS and BIAS_PER_ROW:
        # Each row adds its own task's bias row: a gather from the [T, N] table, which stays in L2.
        task = tl.load(task_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        b_ptrs = b_ptr + task[:, None] * N + cols[None, :]
        acc += tl.load(b_ptrs, mask=out_mask, other=0.0).to(tl.float32)
        if ACTIVATION == "geglu":
            gate += tl.load(b_ptrs + n_out, mask=out_mask, other=0.0).to(tl.float32)
    elif HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if ACTIVATION == "geglu":
            gate += tl.load(b_ptr + n_out + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    h_offsets = rows[:, None] * N + cols[None, :]
    if STORE_PREACT:
        tl.store(h_ptr + h_offsets, acc.to(h_ptr.dtype.element_ty), mask=out_mask)
        if ACTIVATION == "geglu":
            tl.store(h_ptr + n_out + h_offsets, gate.to(h_ptr.dtype.element_ty), mask=out_mask)
    if ACTIVATION == "gelu":
        acc = _gelu(acc)
    if ACTIVATION == "geglu":
        acc = _gelu(acc) * gate
    if HAS_DROPOUT:
        keep = keep_mask(load_seed(seed_ptr), rows, pid_n * BLOCK_N, n_out, p, BLOCK_M, BLOCK_N)
        acc = tl.where(keep, acc * scale, 0.0)
    tl.store(y_ptr + rows[:, None] * n_out + cols[None, :], acc.to(y_ptr.dtype.element_ty), mask=out_mask)


# Rows change with every batch: no recompiles.
@triton.jit(do_not_specialize=["M"])
def _task_bias_gelu_kernel(
    # Pointers
    h_ptr,  # [M, N] x @ W^T from cuBLAS; h + b[task] is written back with STORE_H (the GELU backward reads it)
    b_ptr,  # [T, N] task table, read as fp32
    task_ptr,  # [M] integer: the row of b each row adds
    y_ptr,  # [M, N] gelu(h + b[task]); h_ptr itself without STORE_H
    # Sizes
    M,
    N,
    # Features
    STORE_H: tl.constexpr,
    # Tile
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    mask = row_ok[:, None] & (cols < N)[None, :]
    offsets = rows[:, None] * N + cols[None, :]
    h = tl.load(h_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    h += task_tables.table_rows(b_ptr, task_ptr, rows, row_ok, cols, mask, N)
    # Rounded first: the GELU of h as stored, which its backward reads, as torch's GELU after the GEMM takes it.
    h = h.to(h_ptr.dtype.element_ty)
    if STORE_H:
        tl.store(h_ptr + offsets, h, mask=mask)
    tl.store(y_ptr + offsets, _gelu(h.to(tl.float32)).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grad_rows(dy_ptr, h_ptr, g_ptr, rows, row_ok, cols, col_ok, N, n_out, p, scale, seed,
               ACTIVATION: tl.constexpr, HAS_DROPOUT: tl.constexpr, STORE_G: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(g, g_gate) of rows ``rows`` [BLOCK_M] (int64) and columns ``cols``, fp32, zero where masked; g_gate is the
    GeGLU gate's gradient (columns + N / 2), g again otherwise. With STORE_G both are written to g."""
    mask = row_ok[:, None] & col_ok[None, :]
    h_offsets = rows[:, None] * N + cols[None, :]
    g = tl.load(dy_ptr + rows[:, None] * n_out + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_DROPOUT:
        keep = keep_mask(seed, rows, tl.program_id(1) * BLOCK_N, n_out, p, BLOCK_M, BLOCK_N)
        g = tl.where(keep, g * scale, 0.0)
    g_gate = g
    if ACTIVATION == "gelu":
        g *= _gelu_grad(tl.load(h_ptr + h_offsets, mask=mask, other=0.0).to(tl.float32))
    if ACTIVATION == "geglu":
        value = tl.load(h_ptr + h_offsets, mask=mask, other=0.0).to(tl.float32)
        g_gate = g * _gelu(value)
        g *= tl.load(h_ptr + n_out + h_offsets, mask=mask, other=0.0).to(tl.float32) * _gelu_grad(value)
        if STORE_G:
            tl.store(g_ptr + n_out + h_offsets, g_gate.to(g_ptr.dtype.element_ty), mask=mask)
    if STORE_G:
        tl.store(g_ptr + h_offsets, g.to(g_ptr.dtype.element_ty), mask=mask)
    return g, g_gate


@triton.jit(do_not_specialize=["M", "T", "chunk_rows"])
def _linear_grad_kernel(
    # Pointers
    dy_ptr,  # [M, N] gradient of the output y; [M, N / 2] with the GeGLU
    h_ptr,  # [M, N] pre-activation saved by the forward (read only with an ACTIVATION)
    g_ptr,  # [M, N] gradient of h, dtype of dy (written only with STORE_G)
    db_partial_ptr,  # fp32 column sums of g (written with COMPUTE_DB): [num_programs(0), N], one row per program;
    #                  with PER_TASK the pieces [num_programs(0) + T - 1, N] of task_tables
    order_ptr,  # [M] int64: the rows sorted by task (read only with PER_TASK, as the next two)
    sorted_task_ptr,  # [M] int64: each sorted row's task number in the batch
    # Sizes
    M,
    N,
    T,  # with PER_TASK, the bound on the batch's task numbers (task_tables.TaskOrder)
    chunk_rows,  # sorted rows per program with PER_TASK
    # Dropout
    p,
    scale,
    seed_ptr,  # [1] int64 dropout seed (read only with HAS_DROPOUT), see dropout.py
    # Features
    ACTIVATION: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    STORE_G: tl.constexpr,
    COMPUTE_DB: tl.constexpr,
    PER_TASK: tl.constexpr,  # the bias is a task table: sum g per task (needs COMPUTE_DB)
    # Tiles
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # Each element of dy and h is read once, its erf/exp and Philox computed once, and the column sums of g
    # accumulate in registers until one store. With the GeGLU, column j of dy gives the gradients of both h
    # columns j (input) and j + N / 2 (gate).
    if ACTIVATION == "geglu":
        n_out = N // 2
    else:
        n_out = N
    pid_m = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < n_out
    seed = load_seed(seed_ptr) if HAS_DROPOUT else 0
    db = tl.zeros((BLOCK_N,), dtype=tl.float32)
    db_gate = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if PER_TASK:
        # Program (c, j) walks chunk c of the rows sorted by task, in row blocks: g is computed once per row, and
        # each task met adds its rows of the block to the running piece (task_tables' step 1).
        lo, hi, piece_task = task_tables.chunk_bounds(pid_m, chunk_rows, M, sorted_task_ptr, T)
        for start in range(lo, hi, BLOCK_M):
            rows, ok, tasks = task_tables.sorted_block(order_ptr, sorted_task_ptr, start, hi, BLOCK_M)
            g, g_gate = _grad_rows(dy_ptr, h_ptr, g_ptr, rows, ok, cols, col_ok, N, n_out, p, scale, seed,
                                   ACTIVATION, HAS_DROPOUT, STORE_G, BLOCK_M, BLOCK_N)
            block_last = task_tables.block_last_task(sorted_task_ptr, start, hi, T, BLOCK_M)
            db = task_tables.add_block(db_partial_ptr, pid_m, piece_task, block_last, db, g, tasks, cols, col_ok, N, T)
            if ACTIVATION == "geglu":
                db_gate = task_tables.add_block(db_partial_ptr + n_out, pid_m, piece_task, block_last, db_gate, g_gate,
                                                tasks, cols, col_ok, N, T)
            piece_task = block_last
        task_tables.store_piece(db_partial_ptr, pid_m, piece_task, db, cols, col_ok, N, T)
        if ACTIVATION == "geglu":
            task_tables.store_piece(db_partial_ptr + n_out, pid_m, piece_task, db_gate, cols, col_ok, N, T)
    else:
        # Program (i, j) walks row blocks i, i + P, ... of column block j.
        for start in range(pid_m * BLOCK_M, M, tl.num_programs(0) * BLOCK_M):
            rows = tl.cast(start, tl.int64) + tl.arange(0, BLOCK_M)  # the loop variable is a plain int when interpreted
            g, g_gate = _grad_rows(dy_ptr, h_ptr, g_ptr, rows, rows < M, cols, col_ok, N, n_out, p, scale, seed,
                                   ACTIVATION, HAS_DROPOUT, STORE_G, BLOCK_M, BLOCK_N)
            if COMPUTE_DB:
                db += tl.sum(g, axis=0)  # masked elements are 0
                if ACTIVATION == "geglu":
                    db_gate += tl.sum(g_gate, axis=0)
        if COMPUTE_DB:
            tl.store(db_partial_ptr + pid_m * N + cols, db, mask=col_ok)
            if ACTIVATION == "geglu":
                tl.store(db_partial_ptr + pid_m * N + n_out + cols, db_gate, mask=col_ok)


def _output_features(activation: str | None, weight: torch.Tensor) -> int:
    """Columns of y for a weight of N rows: N, or N / 2 with the GeGLU (N must then be even)."""
    if activation not in ACTIVATIONS:
        raise KernelInputError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    rows = weight.shape[0]
    if activation == "geglu":
        if rows % 2:
            raise KernelInputError(f"activation='geglu' needs an even number of weight rows (input | gate), got {rows}")
        return rows // 2
    return rows


@launches_on_input_device
def linear_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    activation: str | None = None,
    dropout_p: float = 0.0,
    seed: int | torch.Tensor | None = None,
    store_preact: bool = False,
    row_task: torch.Tensor | None = None,
    gemm: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """y = dropout(activation(x @ weight^T + bias)) for x of shape (..., K) and weight (N, K); y has N columns,
    N / 2 with ``activation="geglu"`` (gelu of h's first half times its second half, both from one GEMM).

    Returns (y, h): h is the pre-activation x @ W^T + b, N columns, when ``store_preact`` (the GELU and GeGLU
    backwards need it), else None. x and weight share one dtype (fp32/fp16/bf16); the bias is read as fp32
    whatever its dtype. With ``row_task`` ([M] integers, one per row of x), the bias is a table [T, N] and row i
    adds its row ``row_task[i]``: per-example task biases.

    ``gemm``: "triton", the GEMM with its epilogue fused (this module's kernel); "cublas", torch.addmm with the
    bias in cuBLASLt's epilogue (a task table's rows gathered into the GEMM's C matrix), then the GELU as one
    elementwise pass (only for a bias or GELU epilogue; the bias is rounded to x's dtype first, as F.linear
    under autocast does); with a task table and the GELU, torch.mm and one pass that adds each row's bias in fp32
    and applies the GELU (``_task_bias_gelu``); "auto", cuBLAS for those epilogues on a GPU and Triton otherwise.
    Measured on an H200 (benches/results/gpu/profile-triton-gemm.json), cuBLAS ran BERT-base's four GEMMs at
    ~725 TFLOP/s and this kernel at ~400, which an elementwise GELU pass after the GEMM does not outweigh.
    """
    check_compute_tensor("x", x)
    check_compute_tensor("weight", weight, ndim=2)
    N, K = weight.shape
    n_out = _output_features(activation, weight)
    if x.shape[-1] != K:
        raise KernelInputError(
            f"x has {x.shape[-1]} features but weight expects {K} (weight shape {tuple(weight.shape)})"
        )
    if x.dtype != weight.dtype:
        raise KernelInputError(
            f"x is {x.dtype} but weight is {weight.dtype}; cast them to one dtype or run under torch.autocast"
        )
    if x.device != weight.device:
        raise KernelInputError(f"x is on {x.device} but weight is on {weight.device}")
    M = check_rows("x", x)
    check_bias("bias", bias, N, M, row_task, x.device)
    check_dropout(dropout_p, seed)
    # Outputs are allocated in x's leading shape and written through [M, N] views of them: a view returned from a
    # custom autograd Function may not be changed in place, and models change their projections so (DeBERTa).
    x2d = x.reshape(M, K)
    if _gemm_choice(gemm, x, activation, dropout_p) == "cublas":
        h = torch.empty((*x.shape[:-1], N), dtype=x.dtype, device=x.device)
        rows = h.view(M, N)
        if bias is None or (row_task is not None and activation == "gelu"):  # a table's rows come with the GELU
            torch.mm(x2d, weight.t(), out=rows)
        elif row_task is None:
            torch.addmm(bias.to(x.dtype), x2d, weight.t(), out=rows)
        else:
            # The rows' biases [M, N] gathered into the output, the GEMM's C matrix, which it adds into in place:
            # out of place, torch first copies C into the output (a device copy of [M, N], 0.39 ms of a bank's
            # 10.5 ms BERT-base training step on an H200 at 960342b).
            torch.index_select(bias.to(x.dtype), 0, row_task, out=rows).addmm_(x2d, weight.t())
        if activation != "gelu":
            y = h
        elif bias is not None and row_task is not None:
            y = _task_bias_gelu(h, bias, row_task, store_preact)
        else:
            y = torch.nn.functional.gelu(h)
        return y, (h if store_preact else None)

    y = torch.empty((*x.shape[:-1], n_out), dtype=x.dtype, device=x.device)
    h = torch.empty((*x.shape[:-1], N), dtype=x.dtype, device=x.device) if store_preact else None
    grid = lambda meta: (cdiv(M, meta["BLOCK_M"]) * cdiv(n_out, meta["BLOCK_N"]),)
    _linear_fwd_kernel[grid](
        x2d, weight, bias if bias is not None else y, row_task if row_task is not None else y, y,
        h if h is not None else y,
        M, N, K, row_bucket(M),
        dropout_p, 1.0 / (1.0 - dropout_p), seed_pointer(seed, dropout_p, x.device, y),
        HAS_BIAS=bias is not None,
        BIAS_PER_ROW=bias is not None and row_task is not None,
        ACTIVATION=activation or "",
        HAS_DROPOUT=dropout_p > 0.0,
        STORE_PREACT=store_preact,
        DOT_PRECISION=dot_precision(x.dtype),
    )
    return y, h


def _task_bias_gelu(h: torch.Tensor, table: torch.Tensor, row_task: torch.Tensor, store_preact: bool) -> torch.Tensor:
    """gelu(h + table[row_task]) for cuBLAS's rows h [..., N] (M rows), in one pass that also leaves
    h + table[row_task] in h with ``store_preact`` (and writes the GELU over h without). It replaces the gather of
    the rows' biases into cuBLAS's C matrix, the GEMM's read of it and torch's GELU pass: four passes over [M, N] by
    three, or by two."""
    y = torch.empty_like(h) if store_preact else h
    N = h.shape[-1]
    M = h.numel() // N
    _task_bias_gelu_kernel[(cdiv(M, _GRAD_BLOCK_M), cdiv(N, _GRAD_BLOCK_N))](
        h, table, row_task, y, M, N,
        STORE_H=store_preact,
        BLOCK_M=_GRAD_BLOCK_M,
        BLOCK_N=_GRAD_BLOCK_N,
        num_warps=_GRAD_WARPS,
    )
    return y


GEMMS = ("auto", "triton", "cublas")


def _gemm_choice(gemm: str, x: torch.Tensor, activation: str | None, dropout_p: float) -> str:
    """Which GEMM :func:`linear_forward` runs: cuBLAS adds a bias (per-row task biases as a gathered [M, N]
    matrix) and runs a GELU as a pass after; dropout and the GeGLU need the fused Triton kernel."""
    if gemm not in GEMMS:
        raise KernelInputError(f"gemm must be one of {GEMMS}, got {gemm!r}")
    cublas_can = activation in (None, "gelu") and dropout_p == 0.0
    if gemm == "cublas" and not cublas_can:
        raise KernelInputError("gemm='cublas' takes a bias or GELU epilogue only: dropout and the GeGLU run in "
                               "the Triton GEMM (gemm='triton' or 'auto')")
    if gemm == "auto":
        return "cublas" if cublas_can and x.is_cuda else "triton"
    return gemm


@launches_on_input_device
def linear_backward(
    dy: torch.Tensor,
    weight: torch.Tensor,
    preact: torch.Tensor | None = None,
    *,
    activation: str | None = None,
    dropout_p: float = 0.0,
    seed: int | torch.Tensor | None = None,
    compute_dx: bool = True,
    compute_db: bool = True,
    row_task: torch.Tensor | None = None,
    num_tasks: int = 1,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of :func:`linear_forward` with respect to x and the bias; never the weight.

    dy has y's shape (..., N), or (..., N / 2) with the GeGLU. With an activation, ``preact`` is the h returned by
    the forward, (..., N). Dropout arguments must equal the forward's. Returns (dx in dy's dtype or None, db [N]
    in fp32 or None). With the forward's ``row_task``, db is the table's gradient [num_tasks, N]: each task's sum
    over its rows, taken in the pass that computes the gradient of h (``task_tables``).
    """
    check_compute_tensor("dy", dy)
    check_compute_tensor("weight", weight, ndim=2)
    N, K = weight.shape
    n_out = _output_features(activation, weight)
    if dy.shape[-1] != n_out:
        raise KernelInputError(f"dy has {dy.shape[-1]} features but the layer produces {n_out}")
    if dy.dtype != weight.dtype:
        raise KernelInputError(f"dy is {dy.dtype} but weight is {weight.dtype}; cast them to one dtype")
    M = check_rows("dy", dy)
    check_same_device(dy.device, weight=weight, preact=preact)
    check_row_task(row_task, M, dy.device)
    check_dropout(dropout_p, seed)
    if activation is not None:
        if preact is None:
            raise KernelInputError(f"activation={activation!r} needs the pre-activation saved by the forward")
        check_compute_tensor("preact", preact)
        if preact.shape != (*dy.shape[:-1], N):
            raise KernelInputError(f"preact has shape {tuple(preact.shape)} but dy has {tuple(dy.shape)}")

    dy2d = dy.reshape(M, n_out)
    g, db = dy2d, None
    transforms = activation is not None or dropout_p > 0.0
    per_task = compute_db and row_task is not None
    store_g = compute_dx and transforms
    if per_task and not transforms:
        db = task_tables.task_sums(dy2d, row_task, num_tasks)  # g is dy: nothing to compute, one pass that only sums
    elif store_g or compute_db:
        g = torch.empty((M, N), dtype=dy.dtype, device=dy.device) if store_g else dy2d
        col_blocks = cdiv(n_out, _GRAD_BLOCK_N)
        row_programs = max(1, min(cdiv(M, _GRAD_BLOCK_M), reduction_programs(M, dy.device) // col_blocks))
        reduction = task_tables.bias_reduction(row_task if per_task else None, num_tasks, M, row_programs)
        db_partial = reduction.partials(N, dy.device) if compute_db else None
        order, sorted_numbers, numbers, chunk_rows = reduction.walk(dy2d)
        _linear_grad_kernel[(reduction.programs, col_blocks)](
            dy2d, preact if preact is not None else dy2d, g, db_partial if db_partial is not None else dy2d,
            order, sorted_numbers, M, N, numbers, chunk_rows,
            dropout_p, 1.0 / (1.0 - dropout_p), seed_pointer(seed, dropout_p, dy.device, dy2d),
            ACTIVATION=activation or "",
            HAS_DROPOUT=dropout_p > 0.0,
            STORE_G=store_g,
            COMPUTE_DB=compute_db,
            PER_TASK=reduction.per_task,
            BLOCK_M=_GRAD_BLOCK_M,
            BLOCK_N=_GRAD_BLOCK_N,
            num_warps=_GRAD_WARPS,
        )
        # One deterministic reduction of the per-program partial sums: no float atomics, same bits every run.
        if compute_db:
            db = reduction.total(db_partial)[0]
    # torch.mm rounds fp32 like dot_precision: TF32 exactly when torch.backends.cuda.matmul.allow_tf32 is on.
    dx = torch.mm(g, weight).view(*dy.shape[:-1], K) if compute_dx else None
    return dx, db
