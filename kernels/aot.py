"""Ahead-of-time compile check: every Triton kernel variant bitfit_fast launches, compiled for sm_90 (H100/H200)
on any machine, with or without a GPU (triton ships ptxas).

    python -m bitfit_fast_kernels.aot [--only SUBSTRING ...] [--jobs N] [--dump DIR] [--compare FILE]

A variant is a kernel x tile config x dtype x the constexpr flag set that bitfit_fast's autograd functions pass
(bitfit_fast/functions.py: BERT's linears run without dropout, ModernBERT's Wo and GeGLU with it when its
config asks; LayerNorm always stores x_hat). Argument types and
16-byte divisibility are what the JIT derives from a BERT launch: torch allocations are aligned, N, K and the
hidden size are multiples of 16, biases / gamma / beta / statistics are fp32, arguments named in a kernel's
``do_not_specialize`` get no alignment hint, and the dropout seed is a [1] int64 tensor (``seed_ptr``).

One line per variant: status, registers per thread, spill bytes (stores + loads, from ptxas -v), shared memory
(compiler metadata) and the MMA instructions in the PTX (wgmma = Hopper warpgroup MMA, mma.sync = Ampere-style,
fma = none). Then ``aot: N/M variants compiled for sm_90``; the exit status is 1 when any variant fails to compile
(FAIL), needs more shared memory than sm_90 gives a block (SMEM) or spills more than SPILL_BUDGET (SPILL).
On a machine with a Hopper GPU each variant is also loaded by the CUDA driver, as the JIT would, and its line
adds the registers and local memory the driver reports (LOAD when the driver refuses it or disagrees with
ptxas): run there and here, the two outputs compare the ahead-of-time check with the real compile.

Runs with TRITON_INTERPRET=1 in the environment too: the kernel modules then declared their interpreter configs,
so the check re-executes itself without it. The same code runs on triton 3.6 and 3.9 (ASTSource, GPUTarget,
triton.compile and the TRITON_DUMP_PTXAS_LOG knob are the same in both).
"""

import argparse
import contextlib
import io
import itertools
import os
import re
import shutil
import sys
import tempfile
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import torch
import triton
from triton.backends.compiler import GPUTarget

from . import heads, layer_norm, linear, task_tables
from .utils import INTERPRETER, dot_precision

TARGET = GPUTarget("cuda", 90, 32)
SM90_SHARED_MEMORY = 232448  # cudaDevAttrMaxSharedMemoryPerBlockOptin on H100 and H200 (227 KiB)
# Spill budget: zero. A spill is a local-memory round trip per thread; in these kernels the only candidates are
# the GEMM epilogues (GELU, Philox on a 128-value fp32 accumulator) and the LayerNorm rows, which are bandwidth-
# bound: spilled bytes compete with the very HBM/L1 traffic the fusion exists to save. Every config that spilled
# (16-bit 128 x 128 tiles on 4 warps: 0.5-1.2 KB; fp32 FMA 64 x 64 x 32 on triton 3.6: 12 B) was removed instead,
# so a new spill is a regression to look at, not noise to tolerate.
SPILL_BUDGET = 0

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
FLOAT_ARGS = {"p", "scale", "eps"}
HIDDEN_SIZES = (384, 768)  # MiniLM (BLOCK_N 512) and BERT-base (1024; BERT-large's 1024 compiles alike)
# Integer arguments of a BERT-base launch (32768 tokens); only their divisibility by 16 reaches the compiler.
INTS = {"M": 32768, "N": 3072, "K": 768, "M_BUCKET": 65536, "T": 64}
TASK_POINTERS = {"order_ptr", "sorted_task_ptr"}  # int64: the rows sorted by task and their tasks


@dataclass
class Variant:
    """One launch to compile: the kernel, its constexprs and compile options, and its pointer and integer arguments."""
    kernel: str
    label: str
    fn: object  # the JITFunction
    dtype: str  # element type of the activation tensors
    consts: dict
    options: dict
    fp32_pointers: set = field(default_factory=set)
    int_pointers: set = field(default_factory=set)  # int64 (per-row task indices)
    ints: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        """The variant's label in the output: kernel, dtype and config (what ``--only`` matches)."""
        return f"{self.kernel} {self.dtype} {self.label}"


def _flags(**flags) -> str:
    # Names select variants by substring (--only): a flag that only some variants have comes first, so that a name
    # without it is not part of the name with it.
    return " ".join(name for name, on in flags.items() if on) or "plain"


def linear_variants():
    """Every variant of the fused linear forward (tile x dtype x bias x epilogue) and of its gradient kernel."""
    fn = linear._linear_fwd_kernel.fn
    # (dtype, DOT_PRECISION): 16-bit operands always pass "tf32"; fp32 passes either, see utils.dot_precision.
    families = [("bf16", "tf32"), ("fp16", "tf32"), ("fp32", "tf32"), ("fp32", "ieee")]
    # functions.LinearFunction: bias or not; plain, GELU or GeGLU (ModernBERT's Wi) storing its pre-activation (default
    # memory) or not (recompute); with dropout, ModernBERT's Wo and GeGLU (attention_dropout, mlp_dropout).
    epilogues = [("", False, False), ("gelu", True, False), ("gelu", False, False), ("geglu", True, False),
                 ("geglu", False, False), ("", False, True), ("geglu", True, True), ("geglu", False, True)]
    # Biases: none, shared, or per row (a task table gathered by each row's task, TaskBank's mixed batches).
    for (dt, precision), bias, (act, preact, dropout) in itertools.product(families, ("", "shared", "per-row"),
                                                                           epilogues):
        for cfg in linear.gemm_configs(DTYPES[dt], precision, act or None):
            tile = "x".join(str(cfg.kwargs[b]) for b in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
            flags = _flags(bias=bias == "shared", row_bias=bias == "per-row", gelu=act == "gelu",
                           geglu=act == "geglu", preact=preact, dropout=dropout)
            label = f"{tile} s{cfg.num_stages} w{cfg.num_warps} {flags}"
            yield Variant(
                "linear_fwd", f"{precision} {label}" if dt == "fp32" else label, fn, dt,
                consts=dict(HAS_BIAS=bias != "", BIAS_PER_ROW=bias == "per-row", ACTIVATION=act,
                            HAS_DROPOUT=dropout, STORE_PREACT=preact, DOT_PRECISION=precision, **cfg.kwargs),
                options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages},
                fp32_pointers={"b_ptr"} if bias else set(), int_pointers={"task_ptr", "seed_ptr"}, ints=INTS,
            )
    # linear_backward: g with the GELU or GeGLU (stored for dx, column-summed for db), or db alone from dy; with
    # dropout (ModernBERT's Wo and GeGLU), g = dy through the mask with or without the GeGLU.
    outputs = [(True, True), (True, False), (False, True)]  # (store_g, db)
    passes = [(act, False, *out) for act in ("gelu", "geglu") for out in outputs] + [("", False, False, True)]
    passes += [(act, True, *out) for act in ("", "geglu") for out in outputs]
    passes = [(*entry, False) for entry in passes]
    # A task table's sums (TaskBank's mixed batches) in every pass that transforms dy; without a transform g is
    # dy and task_sums sums it.
    passes += [(*entry[:4], True) for entry in passes if entry[3] and (entry[0] or entry[1])]
    for dt, (act, dropout, store_g, db, per_task) in itertools.product(DTYPES, passes):
        yield Variant(
            "linear_grad", _flags(per_task=per_task, gelu=act == "gelu", geglu=act == "geglu", dropout=dropout,
                                  store_g=store_g, db=db),
            linear._linear_grad_kernel, dt,
            consts={"ACTIVATION": act, "HAS_DROPOUT": dropout, "STORE_G": store_g, "COMPUTE_DB": db,
                    "PER_TASK": per_task, "BLOCK_M": linear._GRAD_BLOCK_M, "BLOCK_N": linear._GRAD_BLOCK_N},
            options={"num_warps": linear._GRAD_WARPS},
            fp32_pointers={"db_partial_ptr"} if db else set(), int_pointers={"seed_ptr", *TASK_POINTERS}, ints=INTS,
        )
    # cuBLAS's rows plus a task table's rows, then the GELU (TaskBank's FC1 on a GPU), keeping h + b or not.
    for dt, store_h in itertools.product(DTYPES, (True, False)):
        yield Variant(
            "task_bias_gelu", _flags(store_h=store_h), linear._task_bias_gelu_kernel, dt,
            consts={"STORE_H": store_h, "BLOCK_M": linear._GRAD_BLOCK_M, "BLOCK_N": linear._GRAD_BLOCK_N},
            options={"num_warps": linear._GRAD_WARPS},
            fp32_pointers={"b_ptr"}, int_pointers={"task_ptr"}, ints=INTS,
        )


def layer_norm_variants():
    """Every variant of the residual LayerNorm forward and backward kernels, per dtype and hidden size."""
    # Beta shared, a task table, or a task table with the feeding linear's table added to x (TaskBank on a GPU).
    betas = [(False, False), (True, False), (True, True)]  # (row_beta, x_table)
    # Under autocast a fused layer's residual stream is fp32 beside its half-precision GEMM output (fp32_stream),
    # and the fused encoder layers write y again in the GEMM dtype (y_gemm); a module's LayerNorm does not.
    streams = [(True, False, False), (True, True, False), (True, True, True), (False, False, False)]
    # With grad mode on x_hat and rstd are kept for a backward; without (inference, or dropout's forward alone in
    # training mode under no_grad) they are not.
    modes = list(itertools.product((True, False), (True, False)))  # (dropout, store_x_hat)
    for dt, hidden, (residual, fp32_stream, y_gemm), (dropout, store_x_hat), (row_beta, x_table) in itertools.product(
            DTYPES, HIDDEN_SIZES, streams, modes, betas):
        if fp32_stream and dt == "fp32":
            continue
        block_m, block_n, warps = layer_norm._row_tile(hidden)
        flags = _flags(no_x_hat=not store_x_hat, fp32_stream=fp32_stream, y_gemm=y_gemm, x_table=x_table,
                       row_beta=row_beta, residual=residual, dropout=dropout)
        yield Variant(
            "ln_fwd", f"N={hidden} {flags}", layer_norm._residual_layer_norm_fwd_kernel, dt,
            consts={"HAS_RESIDUAL": residual, "HAS_DROPOUT": dropout, "BETA_PER_ROW": row_beta, "X_TABLE": x_table,
                    "STORE_X_HAT": store_x_hat, "STORE_Y_GEMM": y_gemm, "BLOCK_M": block_m, "BLOCK_N": block_n},
            options={"num_warps": warps},
            fp32_pointers={"gamma_ptr", "beta_ptr", "x_table_ptr", "rstd_ptr", *(("res_ptr", "y_ptr") if fp32_stream
                                                                                  else ())},
            int_pointers={"task_ptr", "seed_ptr"}, ints=dict(INTS, N=hidden),
        )
    # dx with or without its column sums (functions.LinearLayerNormFunction sums the feeding linear's bias
    # gradient there), or d(beta) alone.
    gradients = [(True, True), (True, False), (False, False)]
    # An fp32 residual stream's gradient dy, and so ds, beside the half-precision x_hat: a module's LayerNorm keeps
    # dx in fp32, a fused encoder layer's writes it in the GEMM dtype (gemm_dx), with y_gemm's gradient (dy_gemm)
    # but in the last layer.
    streams = [(False, False, False), (True, False, False), (True, False, True), (True, True, True)]
    for dt, hidden, dropout, (dx, sum_dx), per_task, (fp32_stream, dy_gemm, gemm_dx) in itertools.product(
            DTYPES, HIDDEN_SIZES, (True, False), gradients, (False, True), streams):
        if fp32_stream and dt == "fp32" or gemm_dx and not dx:
            continue
        block_m, block_n, warps = layer_norm._row_tile(hidden)
        flags = _flags(fp32_stream=fp32_stream, dy_gemm=dy_gemm, gemm_dx=gemm_dx, per_task=per_task, dropout=dropout,
                       dx=dx, sum_dx=sum_dx)
        yield Variant(
            "ln_bwd", f"N={hidden} {flags}", layer_norm._residual_layer_norm_bwd_kernel, dt,
            consts={"HAS_DY_GEMM": dy_gemm, "HAS_DROPOUT": dropout, "COMPUTE_DX": dx,
                    "STORE_DX": dx and (dropout or gemm_dx), "SUM_DX": sum_dx, "PER_TASK": per_task,
                    "BLOCK_M": block_m, "BLOCK_N": block_n},
            options={"num_warps": warps},
            fp32_pointers={"gamma_ptr", "rstd_ptr", "dbeta_partial_ptr", "dx_partial_ptr",
                           *(("dy_ptr", "ds_ptr") if fp32_stream else ()),
                           *(("dx_ptr",) if fp32_stream and not gemm_dx else ())},
            int_pointers={"seed_ptr", *TASK_POINTERS}, ints=dict(INTS, N=hidden),
        )
    # A pre-norm layer (ModernBERT) under autocast: LayerNorms of the fp32 stream whose output only GEMMs read, in
    # their dtype, and its gradient read so; x, x_hat, ds and dx are fp32.
    for dt, hidden, per_task in itertools.product(("bf16", "fp16"), HIDDEN_SIZES, (False, True)):
        block_m, block_n, warps = layer_norm._row_tile(hidden)
        flags = _flags(pre_norm=True, row_beta=per_task)
        yield Variant(
            "ln_fwd", f"N={hidden} {flags}", layer_norm._residual_layer_norm_fwd_kernel, dt,
            consts={"HAS_RESIDUAL": False, "HAS_DROPOUT": False, "BETA_PER_ROW": per_task, "X_TABLE": False,
                    "STORE_X_HAT": True, "STORE_Y_GEMM": False, "BLOCK_M": block_m, "BLOCK_N": block_n},
            options={"num_warps": warps},
            fp32_pointers={"x_ptr", "res_ptr", "gamma_ptr", "beta_ptr", "x_table_ptr", "x_hat_ptr", "rstd_ptr"},
            int_pointers={"task_ptr", "seed_ptr"}, ints=dict(INTS, N=hidden),
        )
        flags = _flags(pre_norm=True, per_task=per_task, dx=True)
        yield Variant(
            "ln_bwd", f"N={hidden} {flags}", layer_norm._residual_layer_norm_bwd_kernel, dt,
            consts={"HAS_DY_GEMM": False, "HAS_DROPOUT": False, "COMPUTE_DX": True, "STORE_DX": False,
                    "SUM_DX": False, "PER_TASK": per_task, "BLOCK_M": block_m, "BLOCK_N": block_n},
            options={"num_warps": warps},
            fp32_pointers={"x_hat_ptr", "gamma_ptr", "rstd_ptr", "ds_ptr", "dx_ptr", "dbeta_partial_ptr",
                           "dx_partial_ptr"},
            int_pointers={"seed_ptr", *TASK_POINTERS}, ints=dict(INTS, N=hidden),
        )


def heads_variants():
    """Every variant of the rows-to-heads scatter (with a task table's rows or without) and of the heads-to-rows
    gradient gather, per dtype: padded or packed batches (slots) or batches with every token real, with or without
    the bias-gradient sums (a frozen or per-task projection bias)."""
    for dt, table in itertools.product(DTYPES, (False, True)):
        yield Variant(
            "rows_to_heads", _flags(table=table), heads._rows_to_heads_kernel, dt,
            consts={"HAS_TABLE": table, "BLOCK_M": heads._BLOCK_M, "BLOCK_N": heads._BLOCK_N},
            options={"num_warps": heads._WARPS},
            fp32_pointers={"b_ptr"} if table else set(), int_pointers={"slot_row_ptr", "task_ptr"},
            ints=dict(num_slots=32768, W=2304),
        )
    # BERT-base's q/k/v gradients as a GPU's SDPA backward leaves them: [S, H, L, D] views of [S, L, H, D].
    ints = dict(M=32768, R=32768, L=128, N=768, D=64, T=INTS["T"], row_stride=2304, col_offset=768,
                stride_s=128 * 768, stride_h=64, stride_l=768, stride_d=1)
    sums = [(True, False), (False, False), (True, True)]  # (db, per task)
    for dt, slots, (db, per_task) in itertools.product(DTYPES, (True, False), sums):
        yield Variant(
            "heads_to_rows", _flags(per_task=per_task, slots=slots, db=db), heads._heads_to_rows_kernel, dt,
            consts={"HAS_SLOTS": slots, "COMPUTE_DB": db, "PER_TASK": per_task, "BLOCK_M": heads._BLOCK_M,
                    "BLOCK_N": heads._BLOCK_N},
            options={"num_warps": heads._WARPS},
            fp32_pointers={"db_partial_ptr"} if db else set(), int_pointers={"slot_ptr", *TASK_POINTERS}, ints=ints,
        )


def task_sums_variants():
    """The per-task column sums of a task table's gradient in memory: its chunk sums per dtype of the gradient;
    then the fp32 reduction of the pieces, which every pass summing per task shares."""
    sizes = dict(M=32768, N=3072, T=INTS["T"])
    for dt in DTYPES:
        yield Variant(
            "task_sums", "chunks", task_tables._task_chunk_sums_kernel, dt,
            consts={"BLOCK_M": task_tables._BLOCK_M, "BLOCK_N": task_tables._BLOCK_N},
            options={"num_warps": task_tables._WARPS},
            fp32_pointers={"partial_ptr"}, int_pointers={"starts_ptr", *TASK_POINTERS}, ints=sizes,
        )
    yield Variant(
        "task_sums", "pieces", task_tables._task_pieces_sum_kernel, "fp32",
        consts={"BLOCK_PIECES": task_tables._BLOCK_PIECES, "BLOCK_N": task_tables._BLOCK_N},
        options={"num_warps": task_tables._WARPS},
        fp32_pointers={"partial_ptr", "sums_ptr"}, int_pointers={"starts_ptr", "number_ptr"},
        # An H200's LayerNorm backward: 16 programs x 132 SMs, and the T + 2 task numbers' slots.
        ints=dict(sizes, table_slots=2112 + INTS["T"] + 1),
    )


def all_variants() -> list[Variant]:
    """All variants, in a fixed order: the worker processes find theirs by index."""
    return [*linear_variants(), *layer_norm_variants(), *heads_variants(), *task_sums_variants()]


def source(v: Variant) -> triton.compiler.ASTSource:
    """The ASTSource the JIT would build for this launch: types and 16-divisibility per argument."""
    signature, attrs = {}, {}
    for index, param in enumerate(v.fn.params):
        name = param.name
        if name in v.consts:
            signature[name] = "constexpr"
            continue
        if name.endswith("_ptr"):
            signature[name] = "*" + ("fp32" if name in v.fp32_pointers else "i64" if name in v.int_pointers
                                     else v.dtype)
            aligned = True
        elif name in FLOAT_ARGS:
            signature[name] = "fp32"
            aligned = False
        else:
            signature[name] = "i32"
            aligned = not param.do_not_specialize and v.ints[name] % 16 == 0
        if aligned:
            attrs[(index,)] = [["tt.divisibility", 16]]
    return triton.compiler.ASTSource(fn=v.fn, signature=signature, constexprs=v.consts, attrs=attrs)


def compile_variant(v: Variant, dump: str | None = None) -> dict:
    """Compile ``v`` for sm_90: its name with registers, spill bytes, shared memory and MMA kind, or the error;
    with ``dump``, also write its TTIR and PTX there."""
    result = {"name": v.name}
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):  # the ptxas -v log is printed by triton
            compiled = triton.compile(source(v), target=TARGET, options=v.options)
    except Exception as e:  # noqa: BLE001 - whatever triton or ptxas raise is a FAIL line with their message
        result["error"] = " | ".join(line.strip() for line in str(e).splitlines()[:4] if line.strip())
        return result
    ptx = compiled.asm["ptx"]
    regs = re.search(r"Used (\d+) registers", log.getvalue())
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log.getvalue())
    result.update(
        regs=int(regs.group(1)) if regs else -1,
        spill=int(spills.group(1)) + int(spills.group(2)) if spills else -1,
        smem=compiled.metadata.shared,
        mma="wgmma" if "wgmma.mma_async" in ptx else "mma.sync" if "mma.sync" in ptx else "no MMA",
    )
    result.update(_loaded_resources(compiled))
    if dump:
        stem = os.path.join(dump, re.sub(r"[^A-Za-z0-9]+", "_", v.name).strip("_"))
        for ext in ("ttir", "ptx"):
            with open(f"{stem}.{ext}", "w") as f:
                f.write(compiled.asm[ext])
    return result


def _loaded_resources(compiled) -> dict:
    """On a Hopper GPU, the variant loaded by the CUDA driver as the JIT would load it: its registers per thread
    and local memory (the spills' home) as the driver reports them, to hold against ptxas's log. Empty without
    one."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
        return {}
    try:
        compiled._init_handles()
    except Exception as e:  # noqa: BLE001 - a variant the driver refuses is a finding, reported on its line
        return {"load_error": str(e).splitlines()[0]}
    return {"loaded_regs": compiled.n_regs, "loaded_local_bytes": compiled.n_spills}


def verdict(result: dict) -> str:
    """OK, or FAIL (no compile), SMEM (over sm_90's shared memory), SPILL (over SPILL_BUDGET, or unknown) or LOAD
    (the GPU's driver refused it or reports other registers than ptxas)."""
    if "error" in result:
        return "FAIL"
    if result["smem"] > SM90_SHARED_MEMORY:
        return "SMEM"
    if result["spill"] < 0 or result["spill"] > SPILL_BUDGET:  # -1: no ptxas log, the spill is unknown
        return "SPILL"
    if "load_error" in result or result.get("loaded_regs", result["regs"]) != result["regs"]:
        return "LOAD"  # the GPU's driver refused the variant, or disagrees with ptxas
    return "OK"


def format_result(result: dict) -> str:
    """The variant's output line: verdict, name and resources, or the compile error."""
    head = f"{verdict(result):<5} {result['name']:<62}"
    if "error" in result:
        return f"{head} | {result['error']}"
    line = (f"{head} | regs {result['regs']:>3} | spill {result['spill']:>4} B | smem {result['smem']:>6} B | "
            f"{result['mma']}")
    if "load_error" in result:
        return f"{line} | load: {result['load_error']}"
    if "loaded_regs" in result:
        return f"{line} | loaded: regs {result['loaded_regs']:>3}, local {result['loaded_local_bytes']} B"
    return line


RESOURCES = ("regs", "spill", "smem", "mma")


def parse_line(line: str) -> tuple[str, dict] | None:
    """A variant's name and resources from a line :func:`format_result` wrote; None for any other line."""
    fields = [field.strip() for field in line.split(" | ")]
    if len(fields) < 5 or not fields[1].startswith("regs "):
        return None
    name = fields[0].split(None, 1)[1].strip()
    numbers = [int(field.split()[1]) for field in fields[1:4]]
    return name, dict(zip(RESOURCES, [*numbers, fields[4]]))


def differences(results: list[dict], reference: str) -> list[str]:
    """Each variant whose resources differ from the same variant's line in the output file ``reference`` (another
    machine's run of this check), or that the file lacks."""
    with open(reference) as f:
        known = dict(parsed for parsed in map(parse_line, f) if parsed)
    lines = []
    for result in results:
        if "error" in result:
            continue
        theirs = known.get(result["name"])
        if theirs is None:
            lines.append(f"{result['name']}: not in {reference}")
            continue
        changed = [f"{key} {theirs[key]} -> {result[key]}" for key in RESOURCES if theirs[key] != result[key]]
        if changed:
            lines.append(f"{result['name']}: {', '.join(changed)}")
    return lines


def _compile_indexed(args):
    index, dump = args
    return compile_variant(all_variants()[index], dump)


def main(argv: list[str] | None = None) -> int:
    """The command line (see the module docstring); returns the exit status: 0 all OK, 1 any failure, 2 no match."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", default=[], metavar="SUBSTRING",
                        help="compile the variants whose name contains this (repeatable: any of them)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles (processes)")
    parser.add_argument("--dump", metavar="DIR", help="write each variant's TTIR and PTX into DIR")
    parser.add_argument("--compare", metavar="FILE",
                        help="another run's output (another machine's): list the variants whose resources differ")
    args = parser.parse_args(argv)
    if INTERPRETER:  # the modules declared their interpreter configs: start again without the interpreter
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return os.execve(sys.executable, [sys.executable, "-m", __spec__.name, *(argv or sys.argv[1:])], env)

    variants = all_variants()
    selected = [i for i, v in enumerate(variants) if not args.only or any(s in v.name for s in args.only)]
    if not selected:
        print("aot: no variant matches --only", file=sys.stderr)
        return 2
    if args.dump:
        os.makedirs(args.dump, exist_ok=True)
    # A fresh cache, so that every variant runs ptxas and prints its resource log.
    cache = tempfile.mkdtemp(prefix="bitfit_aot_")
    os.environ.update(TRITON_CACHE_DIR=cache, TRITON_DUMP_PTXAS_LOG="1")
    # triton 3.9 warns that its FP-fusion default will change; the check compiles with the default the runtime uses.
    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")
    print(f"triton {triton.__version__}: {len(selected)} variants for sm_90, spill budget {SPILL_BUDGET} B, shared "
          f"memory limit {SM90_SHARED_MEMORY} B; fp32 GEMMs run {dot_precision(torch.float32)!r} here", flush=True)
    try:
        with ProcessPoolExecutor(max(1, min(args.jobs, len(selected)))) as pool:
            results = []
            for result in pool.map(_compile_indexed, [(i, args.dump) for i in selected]):
                print(format_result(result), flush=True)
                results.append(result)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    passed = sum(verdict(r) == "OK" for r in results)
    differing = differences(results, args.compare) if args.compare else []
    for line in differing:
        print(f"DIFF  {line}")
    if args.compare:
        print(f"aot: {len(results) - len(differing)}/{len(results)} variants as in {args.compare}")
    print(f"aot: {passed}/{len(results)} variants compiled for sm_90")
    return 0 if passed == len(results) and not differing else 1


if __name__ == "__main__":
    sys.exit(main())
