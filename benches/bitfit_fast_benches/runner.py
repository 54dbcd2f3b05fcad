"""A preset run end to end: reference BitFit (eager, compiled), full fine-tuning and bitfit_fast on one model
and data.

Every provider trains the same randomly initialised model on the same fresh batches, in one process: in blocks of
steps it runs back to back, the providers' order rotating by block so that drift (clocks, thermals, other load)
spreads over all of them (``time_in_blocks``); each step is timed between device synchronisations. Memory is
measured per provider on its own (see ``measurement``). A time ratio is the median of each step's own ratio (the
two steps ran the same batch in the same round), measured here, never assumed.
"""

import argparse
import dataclasses
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from bitfit_fast.files import atomic_write, write_json

from .measurement import (
    cpu_peak_rss,
    gpu_peak_bytes,
    matmul_peak_tflops,
    max_batch,
    paired_ratios,
    spread,
    step_flops,
    timed,
)
from .presets import PRESETS, Preset, Workload, build_base_model, make_batches, padded_tokens, real_tokens
from .providers import GRAPHED, PROVIDERS, build_provider
from .report import TIME_GOALS_RELATIVE_TO, check_goals, format_workload

REPOSITORY = Path(__file__).resolve().parents[2]


def environment(command: str) -> dict:
    """Device, library versions, the repository's commit (``-dirty`` with uncommitted changes), command, date."""
    import transformers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return dict(device=_device_name(), torch=torch.__version__, triton=triton_version,
                transformers=transformers.__version__, python=platform.python_version(), commit=_commit(),
                command=command, date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))


def preset_command(module: str, doc: str, presets: dict, run, markdown, argv: list[str] | None) -> int:
    """The command line of a benchmark module with presets of its own: ``python -m MODULE [--preset P] [--out DIR]``
    runs ``run(P, command)``, prints ``markdown(record)`` and writes DIR/P.json and DIR/P.md. A preset whose
    ``device`` is cuda on a machine without one ends with one line."""
    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=doc.split("\n")[0])
    parser.add_argument("--preset", choices=presets, default="cpu")
    parser.add_argument("--out", type=Path, help="directory for PRESET.json and PRESET.md (default: print only)")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if presets[args.preset].device == "cuda" and not torch.cuda.is_available():
        print(f"preset {args.preset} needs a CUDA GPU", file=sys.stderr)
        return 2
    record = run(args.preset, " ".join([f"python -m {module}", *map(shlex.quote, argv)]))
    print(markdown(record))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        write_json(args.out / f"{args.preset}.json", record)
        atomic_write(args.out / f"{args.preset}.md", lambda tmp: tmp.write_text(markdown(record)))
    return 0


def _commit() -> str:
    """The repository's commit, ``-dirty`` with uncommitted changes. A GPU machine is sent the working tree, not
    its history: there the caller names the commit in BITFIT_FAST_COMMIT."""
    if os.environ.get("BITFIT_FAST_COMMIT"):
        return os.environ["BITFIT_FAST_COMMIT"]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPOSITORY, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPOSITORY,
                               capture_output=True, text=True, check=True).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    cpu = platform.processor() or platform.machine()
    return f"CPU: {cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"


def mfu(stats: dict, peak_tflops: float) -> float:
    """Model FLOPs utilisation of a provider's median step against a measured matmul peak."""
    return stats["model_flops_per_step"] / (stats["median_ms"] / 1e3) / (peak_tflops * 1e12)


def run_workload(workload: Workload, preset: Preset, peak_tflops: float, log=print) -> dict:
    """Every provider of ``preset`` on ``workload``: step-time spread, throughput, MFU, peak memory, ratios."""
    device = preset.device
    base = build_base_model(workload, device)
    vocab = base.config.vocab_size
    names = [name for name in preset.providers if not (workload.variable_lengths and name in GRAPHED)]
    trainers = {name: build_provider(name, base, device) for name in names}
    del base
    batches = make_batches(workload, preset.warmup + preset.repeats, vocab, device)
    failed = {}
    for name in [name for name in names if name in GRAPHED]:
        try:  # the capture, on the first warm-up batch: a model that cannot be captured is recorded, not fatal
            trainers[name].step(batches[0])
        except Exception as error:  # noqa: BLE001 - whatever the capture raises is recorded with its message
            failed[name] = str(error).splitlines()[0][:300]
            log(f"{name} failed on {workload.name}: {failed[name]}")
            del trainers[name]
            names.remove(name)
    times, losses = time_in_blocks(trainers, batches, preset.warmup, preset.block, device)
    for name, loss in losses.items():
        if not torch.isfinite(loss):
            raise RuntimeError(f"{name} produced a non-finite loss on {workload.name}: the timing is void")

    timed_batches = batches[preset.warmup:]
    real = sum(real_tokens(b) for b in timed_batches) / len(timed_batches)
    padded = sum(padded_tokens(b) for b in timed_batches) / len(timed_batches)
    results = {}
    for name, trainer in trainers.items():
        stats = spread(times[name])
        if "reference" in times:
            stats["speedup_per_step"] = paired_ratios(times["reference"], times[name])
        timed_against = [other for other in TIME_GOALS_RELATIVE_TO if other in times and other != name]
        if timed_against:  # the step time over another provider's, for a goal on it
            stats["time_vs_per_step"] = {other: paired_ratios(times[name], times[other]) for other in timed_against}
        seconds = stats["median_ms"] / 1e3
        flops = statistics.mean(step_flops(workload, b, trainer.method) for b in timed_batches)
        stats.update(tokens_per_s=padded / seconds, real_tokens_per_s=real / seconds, model_flops_per_step=flops)
        stats["mfu"] = mfu(stats, peak_tflops)
        if device == "cuda" and name not in GRAPHED:
            stats["peak_memory_bytes"] = gpu_peak_bytes(trainer, batches[-1])
        results[name] = stats
    del trainers, trainer, batches, timed_batches, losses  # none of them stays on the GPU through the probes below
    if device == "cuda":
        torch.cuda.empty_cache()
    else:
        for name in names:
            probe = cpu_peak_rss(name, workload)
            results[name].update(peak_rss_bytes=probe["peak_rss"], peak_memory_bytes=probe["above_idle"])
    if preset.max_batch and device == "cuda" and not workload.variable_lengths and workload == preset.workloads[0]:
        for name in (name for name in names if name not in GRAPHED):
            size, errors = max_batch(name, workload, device, memory_gib=preset.max_batch_memory_gib)
            results[name]["max_batch"] = size
            if errors:
                results[name]["max_batch_errors"] = errors
    add_ratios(results)
    log(format_workload(workload.name, results))
    record = dict(workload=workload.name, spec=dataclasses.asdict(workload), real_tokens_per_step=real,
                  padded_tokens_per_step=padded, providers=results)
    if failed:
        record["failed_providers"] = failed
    return record


def time_in_blocks(trainers: dict, batches: list[dict], warmup: int, block: int, device: str):
    """({provider: step seconds per timed batch}, {provider: last loss}). Every provider first runs the ``warmup``
    batches untimed (compilation, autotuning, the allocator's pool); the rest are timed in blocks of ``block``
    batches, each provider running a block back to back after one untimed step on the first batch (a warm-up
    batch, so that no timed step runs a batch its provider has seen; none without one), so that no timed step
    follows another model's. The order of providers rotates by block, so that no provider always runs first and
    drift spreads over all; every provider times the same batches, and ratios pair them."""
    names = list(trainers)
    for name in names:
        for batch in batches[:warmup]:
            trainers[name].step(batch)
    timed_batches = batches[warmup:]
    times: dict[str, list[float]] = {name: [] for name in names}
    losses = {}
    for index, start in enumerate(range(0, len(timed_batches), block)):
        chunk = timed_batches[start:start + block]
        for name in names[index % len(names):] + names[: index % len(names)]:
            if warmup:
                trainers[name].step(batches[0])
            for batch in chunk:
                seconds, losses[name] = timed(trainers[name].step, batch, device)
                times[name].append(seconds)
    return times, losses


def add_ratios(results: dict) -> None:
    """Every provider against the reference eager: speedup (>1 is faster), memory and max-batch ratios. The speedup
    is the median of each step's own ratio where the steps were paired (same batch, same round): on a machine whose
    speed drifts, two providers' medians can come from different phases, and their ratio then left the per-step
    ratios' interquartile range. Both ran the same batches, so the real-token throughput ratio is the same."""
    ref = results.get("reference")
    if ref is None:
        return
    for stats in results.values():
        paired = stats.get("speedup_per_step")
        stats["speedup_vs_reference"] = paired["median"] if paired else ref["median_ms"] / stats["median_ms"]
        if "real_tokens_per_s" in stats and ref.get("real_tokens_per_s"):
            stats["real_tokens_vs_reference"] = (paired["median"] if paired else
                                                 stats["real_tokens_per_s"] / ref["real_tokens_per_s"])
        if "peak_memory_bytes" in stats and ref.get("peak_memory_bytes"):
            stats["memory_vs_reference"] = stats["peak_memory_bytes"] / ref["peak_memory_bytes"]
        if "max_batch" in stats and ref.get("max_batch"):
            stats["max_batch_vs_reference"] = stats["max_batch"] / ref["max_batch"]


def run(preset_name: str, command: str, providers: list[str] | None = None, log=print, checkpoint=None) -> dict:
    """The record of a whole preset run (environment, every workload, the goals), as ``report.write`` saves it.
    ``checkpoint(record)``, if given, sees the record after every workload, marked ``partial`` (how many workloads
    it holds), so a run cut short keeps what it measured."""
    preset = PRESETS[preset_name]
    if providers:
        unknown = sorted(set(providers) - set(PROVIDERS))
        if unknown:
            raise ValueError(f"unknown providers {unknown}; known: {sorted(PROVIDERS)}")
        preset = dataclasses.replace(preset, providers=list(providers))
    if preset.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"preset {preset_name!r} needs a CUDA GPU; use --preset cpu-small on this machine")
    record = environment(command)
    record.update(preset=preset_name, providers={p: PROVIDERS[p] for p in preset.providers},
                  matmul_peak_tflops=matmul_peak_tflops(preset.device),
                  matmul_peak_dtype="bfloat16" if preset.device == "cuda" else "float32",
                  memory_method=(
                      "resident state (parameters, buffers, optimizer state) + the step's peak allocation above it; "
                      "the bitfit_fast providers' frozen weights are bf16, the others' fp32"
                      if preset.device == "cuda" else
                      "peak RSS above the idle process (after imports), one fresh process per provider"))
    if preset.max_batch_memory_gib is not None:
        record["memory_method"] += f"; max batch searched within {preset.max_batch_memory_gib:g} GiB of GPU memory"
    log(f"{record['device']} | matmul peak {record['matmul_peak_tflops']:.2f} TFLOP/s ({record['matmul_peak_dtype']})")
    record["workloads"] = []
    for workload in preset.workloads:
        record["workloads"].append(run_workload(workload, preset, record["matmul_peak_tflops"], log))
        record["goals"] = check_goals(record, preset.device)
        if checkpoint is not None:
            checkpoint({**record, "partial": f"{len(record['workloads'])} of {len(preset.workloads)} workloads"})
    # Probed again at the end, MFU against the faster probe: a probe taken in a slow phase of a shared machine
    # (a CPU VM's throughput swings by 20%) would put a fixed-length step above 100%.
    probes = [record["matmul_peak_tflops"], matmul_peak_tflops(preset.device)]
    record.update(matmul_peak_tflops=max(probes), matmul_peak_probes_tflops=probes)
    for workload in record["workloads"]:
        for stats in workload["providers"].values():
            stats["mfu"] = mfu(stats, max(probes))
    record["goals"] = check_goals(record, preset.device)
    log(f"matmul peak probed again: {probes[1]:.2f} TFLOP/s; MFU and goals against {max(probes):.2f}")
    return record
