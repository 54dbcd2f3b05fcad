"""Tile and host-time probes for one GPU call: which tiles the bandwidth-bound kernels should take, and where a
fused step's host time goes (issue 16: the fused step was host-bound on an H200).

    python -m bitfit_fast_benches.sweep --out DIR

Kernels, at BERT-base's shapes in bf16 (256 x 128 = 32768 tokens): every candidate tile of the LayerNorm forward and
backward (with dropout, as BERT runs them), of the linear layers' gradient pass (FC1: GELU, 3072 columns) and of the
q/k/v gather and scatter, each set through the module constants its host function reads and timed as its kernel's
own GPU time under torch.profiler (median over rounds). Host: a step's time at a tiny batch (2 x 128 tokens: the GPU
idles, so the step takes the host's time) for the reference and the fused default, then the fused default with fused
AdamW and under each SDPA backend; whether a step waits for the GPU (torch.cuda.set_sync_debug_mode); the
host time of one launch through a host function, through triton alone and of a torch op. Writes DIR/sweep.json.
"""

import argparse
import contextlib
import itertools
import json
import shlex
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

from bitfit_fast.files import write_json

from .measurement import timed
from .presets import Workload, build_base_model, make_batches
from .profile_step import profiled_kernels
from .providers import build_provider
from .runner import environment

TOKENS, HIDDEN, INTERMEDIATE, HEADS = 32768, 768, 3072, 12


def kernel_ms(run, name: str, rounds: int = 10) -> float:
    """GPU milliseconds of kernel ``name`` per ``run()``."""
    run()  # compiles this tile
    kernels, _ = profiled_kernels(run, rounds, with_host=False)
    return sum(e.self_device_time_total for e in kernels if name in e.key) / rounds / 1e3


@contextlib.contextmanager
def patched(module, **values):
    """Module constants set for the duration."""
    saved = {key: getattr(module, key) for key in values}
    for key, value in values.items():
        setattr(module, key, value)
    try:
        yield
    finally:
        for key, value in saved.items():
            setattr(module, key, value)


def layer_norm_tiles() -> list[dict]:
    from bitfit_fast_kernels import layer_norm, utils

    x, residual, dy = (torch.randn(TOKENS, HIDDEN, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    gamma, beta = torch.rand(HIDDEN, device="cuda") + 0.5, torch.randn(HIDDEN, device="cuda")
    rows = []
    eager = lambda: torch.nn.functional.layer_norm(torch.nn.functional.dropout(x, 0.1) + residual, (HIDDEN,),
                                                   gamma.to(x.dtype), beta.to(x.dtype), 1e-12)
    rows.append(dict(kernel="layer_norm eager forward (dropout, add, F.layer_norm)",
                     ms=kernel_ms(eager, "", rounds=10)))
    for tile, per_thread in itertools.product((1024, 2048, 4096, 8192), (4, 8, 16)):
        with patched(layer_norm, TILE_ELEMENTS=tile, ELEMENTS_PER_THREAD=per_thread):
            block_m, _, warps = layer_norm._row_tile(HIDDEN)
            forward = lambda: layer_norm.residual_layer_norm_forward(x, gamma, beta, 1e-12, residual, dropout_p=0.1,
                                                                     seed=1)
            rows.append(dict(kernel="layer_norm forward", block_m=block_m, warps=warps,
                             ms=kernel_ms(forward, "_residual_layer_norm_fwd_kernel")))
            _, x_hat, rstd = forward()
            for per_sm in (4, 8, 16):
                with patched(utils, PROGRAMS_PER_SM=per_sm):
                    backward = lambda x_hat=x_hat, rstd=rstd: layer_norm.residual_layer_norm_backward(
                        dy, x_hat, gamma, rstd, dropout_p=0.1, seed=1, sum_dx=True)
                    rows.append(dict(kernel="layer_norm backward", block_m=block_m, warps=warps,
                                     programs_per_sm=per_sm, ms=kernel_ms(backward, "_residual_layer_norm_bwd_kernel")))
    return rows


def gradient_pass_tiles() -> list[dict]:
    from bitfit_fast_kernels import heads, linear, utils

    dy, h = (torch.randn(TOKENS, INTERMEDIATE, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    weight = torch.randn(INTERMEDIATE, HIDDEN, device="cuda", dtype=torch.bfloat16) * 0.02
    parts = tuple(torch.randn(256, HEADS, 128, HIDDEN // HEADS, device="cuda", dtype=torch.bfloat16)
                  for _ in range(3))
    # The q/k/v scatter of 256 sequences of 96 real tokens into a [256 x 128] layout.
    slots = (torch.arange(256, device="cuda")[:, None] * 128 + torch.arange(96, device="cuda")).flatten()
    projected = torch.randn(slots.shape[0], 3 * HIDDEN, device="cuda", dtype=torch.bfloat16)
    rows = []
    tiles = [(16, 128, 4), (8, 256, 4), (16, 256, 4), (32, 128, 4), (16, 128, 2), (32, 256, 8), (64, 128, 8)]
    for (block_m, block_n, warps), per_sm in itertools.product(tiles, (4, 8, 16)):
        with patched(utils, PROGRAMS_PER_SM=per_sm):
            with patched(linear, _GRAD_BLOCK_M=block_m, _GRAD_BLOCK_N=block_n, _GRAD_WARPS=warps):
                run = lambda: linear.linear_backward(dy, weight, h, activation="gelu")
                rows.append(dict(kernel="linear gradient pass (GELU)", block_m=block_m, block_n=block_n, warps=warps,
                                 programs_per_sm=per_sm, ms=kernel_ms(run, "_linear_grad_kernel")))
            with patched(heads, _BLOCK_M=block_m, _BLOCK_N=block_n, _WARPS=warps):
                run = lambda: heads.heads_to_rows(parts, None, TOKENS)
                rows.append(dict(kernel="q/k/v gather", block_m=block_m, block_n=block_n, warps=warps,
                                 programs_per_sm=per_sm, ms=kernel_ms(run, "_heads_to_rows_kernel")))
                if per_sm == 4:  # one program per tile: the row loop's program count does not apply
                    run = lambda: heads.rows_to_heads(projected, slots, TOKENS)
                    rows.append(dict(kernel="q/k/v scatter", block_m=block_m, block_n=block_n, warps=warps,
                                     ms=kernel_ms(run, "_rows_to_heads_kernel")))
    return rows


def step_ms(step, batches: list[dict], warmup: int = 3) -> float:
    """Median milliseconds of a synchronised step over ``batches`` after ``warmup`` of them."""
    for batch in batches[:warmup]:
        step(batch)
    return statistics.median(timed(step, batch, "cuda")[0] * 1e3 for batch in batches[warmup:])


def host_probes() -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    tiny, full = Workload("bert-base", 128, 2), Workload("bert-base", 128, 256)
    base = build_base_model(tiny, "cuda")
    batches = {w.batch: make_batches(w, 13, base.config.vocab_size, "cuda") for w in (tiny, full)}
    result = {}
    for name in ("reference", "fast"):
        trainer = build_provider(name, base, "cuda")
        result[f"{name} tiny-batch step ms"] = step_ms(trainer.step, batches[2])
        result[f"{name} full-batch step ms"] = step_ms(trainer.step, batches[256])
    trainer = build_provider("fast", base, "cuda", fused_optimizer=True)
    result["fast, fused AdamW: tiny-batch step ms"] = step_ms(trainer.step, batches[2])
    result["fast, fused AdamW: full-batch step ms"] = step_ms(trainer.step, batches[256])
    trainer = build_provider("fast", base, "cuda")
    for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        def step(batch, backend=backend):
            with sdpa_kernel(backend):
                return trainer.step(batch)
        for size in (2, 256):
            try:
                result[f"fast, SDPA {backend.name}: batch {size} step ms"] = step_ms(step, batches[size])
            except RuntimeError as error:
                result[f"fast, SDPA {backend.name}: batch {size} step ms"] = f"failed: {error}"[:300]
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            trainer.step(batches[256][0])
        finally:
            torch.cuda.set_sync_debug_mode("default")
    result["fast: syncs in one step"] = sorted({str(w.message)[:200] for w in caught})
    return result


def launch_probes(calls: int = 2000) -> dict:
    from bitfit_fast_kernels import layer_norm

    x = torch.randn(8, HIDDEN, device="cuda", dtype=torch.bfloat16)
    gamma, beta = torch.ones(HIDDEN, device="cuda"), torch.zeros(HIDDEN, device="cuda")
    y, x_hat, rstd = torch.empty_like(x), torch.empty_like(x), torch.empty(8, device="cuda")
    block_m, block_n, warps = layer_norm._row_tile(HIDDEN)

    def host_function():
        layer_norm.residual_layer_norm_forward(x, gamma, beta, 1e-12, x)

    def triton_alone():
        layer_norm._residual_layer_norm_fwd_kernel[(1,)](
            x, x, gamma, beta, beta, gamma, y, x_hat, rstd, 8, HIDDEN, 1e-12, 0.0, 1.0, gamma, 0,
            HAS_RESIDUAL=True, HAS_DROPOUT=False, BETA_PER_ROW=False, X_TABLE=False, STORE_X_HAT=True,
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps)

    def torch_op():
        torch.add(x, x)

    result = {}
    for name, run in (("host function", host_function), ("triton launch alone", triton_alone),
                      ("torch.add", torch_op)):
        for _ in range(50):
            run()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            run()
        result[f"{name}: host us per call"] = (time.perf_counter() - start) / calls * 1e6
        torch.cuda.synchronize()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bitfit_fast_benches.sweep", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--parts", nargs="+", default=["launch", "host", "layer_norm", "gradient"],
                        choices=["launch", "host", "layer_norm", "gradient"])
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("the sweep times GPU kernels: run it on a CUDA machine")
    args.out.mkdir(parents=True, exist_ok=True)
    parts = dict(launch=launch_probes, host=host_probes, layer_norm=layer_norm_tiles, gradient=gradient_pass_tiles)
    argv = sys.argv[1:] if argv is None else argv
    record = dict(environment=environment(" ".join(["python -m bitfit_fast_benches.sweep", *map(shlex.quote, argv)])))
    for part in args.parts:
        record[part] = parts[part]()
        write_json(args.out / "sweep.json", record)
        print(json.dumps({part: record[part]}, indent=1), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
