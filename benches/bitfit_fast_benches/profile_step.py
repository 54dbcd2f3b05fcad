"""Training steps under torch.profiler on a GPU: which kernels take a provider's step time.

    python -m bitfit_fast_benches.profile_step --runs reference:fixed fast:fixed fast:bbc --out DIR

Each run is PROVIDER:LENGTHS on BERT-base, batch 256, at most 128 tokens ("fixed": every sequence 128 tokens;
"bbc": real BBC News paragraph lengths, padded to the batch's longest). Writes ``DIR/profile.json`` (per run: the
top kernels by self GPU time, per step) and ``DIR/profile.txt`` (torch's tables). Steps run after a warm-up, so
Triton's autotuning and compilation stay out of the profile.
"""

import argparse
import json
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from bitfit_fast.files import atomic_write

from .presets import Workload, build_base_model, make_batches
from .providers import PROVIDERS, build_provider
from .runner import environment


def profiled_kernels(run: Callable[[], object], rounds: int, with_host: bool = True):
    """``run()`` ``rounds`` times under torch.profiler: (its GPU kernels' events, by self GPU time, and every
    event). ``with_host=False`` records the GPU alone (less overhead on the host)."""
    activities = [torch.profiler.ProfilerActivity.CUDA]
    if with_host:
        activities.append(torch.profiler.ProfilerActivity.CPU)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(rounds):
            run()
        torch.cuda.synchronize()
    events = prof.key_averages()
    # GPU kernels only: an operator's row repeats the time of the kernels it launched, and a user annotation's
    # GPU row (the optimizer's "Optimizer.step#AdamW.step") spans kernels already counted.
    kernels = sorted((e for e in events
                      if e.device_type == torch.autograd.DeviceType.CUDA and not e.is_user_annotation),
                     key=lambda e: -e.self_device_time_total)
    return kernels, events


# The linear layers' GEMMs on the CPU path (torch's ops): attention and the elementwise passes are other ops.
CPU_GEMM_OPS = ("aten::mm", "aten::addmm", "aten::addmm_")


def cpu_gemm_ms(steps: list[Callable[[], object]]) -> float:
    """Milliseconds per step of torch's GEMMs (self CPU time under torch.profiler), each of ``steps`` run once."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for step in steps:
            step()
    return sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in CPU_GEMM_OPS) / len(steps) / 1e3


def gpu_busy_ms(run: Callable[[], object], rounds: int = 5) -> float:
    """Milliseconds of GPU kernels per ``run()``: its time without the host's gaps between launches."""
    kernels, _ = profiled_kernels(run, rounds, with_host=False)
    return sum(e.self_device_time_total for e in kernels) / rounds / 1e3


def kernel_rows(kernels, rounds: int, top: int) -> list[dict]:
    """The ``top`` kernels of :func:`profiled_kernels` as dicts: name, calls and milliseconds per round, share."""
    total_us = sum(e.self_device_time_total for e in kernels)
    return [dict(name=e.key, calls_per_step=e.count / rounds, ms_per_step=e.self_device_time_total / rounds / 1e3,
                 share=e.self_device_time_total / total_us) for e in kernels[:top]]


def top_kernels(run: Callable[[], object], rounds: int = 3, top: int = 15) -> list[dict]:
    """``run()``'s ``top`` GPU kernels by self time (see :func:`kernel_rows`)."""
    return kernel_rows(profiled_kernels(run, rounds, with_host=False)[0], rounds, top)


def profile(provider: str, workload: Workload, steps: int = 2, warmup: int = 3, top: int = 25):
    """``provider``'s ``steps`` profiled training steps: (top kernels as dicts, torch's table)."""
    base = build_base_model(workload, "cuda")
    trainer = build_provider(provider, base, "cuda", copy_base=False)
    batches = make_batches(workload, warmup + steps, base.config.vocab_size, "cuda")
    for batch in batches[:warmup]:
        trainer.step(batch)
    kernels, events = profiled_kernels(map(trainer.step, batches[warmup:]).__next__, steps)
    total_us = sum(e.self_device_time_total for e in kernels)
    rows = kernel_rows(kernels, steps, top)
    table = events.table(sort_by="self_device_time_total", row_limit=top, max_name_column_width=90)
    del trainer, base
    torch.cuda.empty_cache()
    return dict(gpu_ms_per_step=total_us / steps / 1e3, top_kernels=rows), table


def parse_runs(parser: argparse.ArgumentParser, runs: list[str]) -> list[tuple[str, Workload]]:
    """(provider, BERT-base batch-256 workload) of each PROVIDER:LENGTHS run; a parser error for any other."""
    parts = [run.split(":") for run in runs]
    bad = [run for run, part in zip(runs, parts)
           if len(part) != 2 or part[0] not in PROVIDERS or part[1] not in ("fixed", "bbc")]
    if bad:
        parser.error(f"runs are PROVIDER:LENGTHS with a provider of {sorted(PROVIDERS)} and fixed or bbc: got {bad}")
    return [(provider, Workload("bert-base", 128, 256, lengths=lengths)) for provider, lengths in parts]


def profiles_main(argv: list[str] | None, module: str, description: str, profile, headline, stem: str) -> int:
    """The command line of a profiler of BERT-base steps: ``--runs PROVIDER:LENGTHS ... --out DIR``, each run
    profiled by ``profile(provider, workload)`` -> (record, table) and its table printed under ``headline(name,
    record)``; writes ``DIR/{stem}.json`` and ``DIR/{stem}.txt``."""
    parser = argparse.ArgumentParser(prog=f"python -m bitfit_fast_benches.{module}", description=description)
    parser.add_argument("--runs", nargs="+", default=["reference:fixed", "fast:fixed"], metavar="PROVIDER:LENGTHS")
    parser.add_argument("--out", type=Path, required=True)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(f"{module} needs a CUDA GPU", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    command = " ".join([f"python -m bitfit_fast_benches.{module}", *map(shlex.quote, argv)])
    record, tables = dict(environment(command), runs={}), []
    for provider, workload in parse_runs(parser, args.runs):
        name = f"{provider} {workload.name}"
        record["runs"][name], table = profile(provider, workload)
        tables.append(f"{headline(name, record['runs'][name])}\n{table}")
        print(tables[-1][:6000], flush=True)
        # After each run: a later run that fails (or a stage's time limit) keeps the ones profiled.
        atomic_write(args.out / f"{stem}.json", lambda tmp: tmp.write_text(json.dumps(record, indent=1) + "\n"))
        atomic_write(args.out / f"{stem}.txt", lambda tmp: tmp.write_text("\n".join(tables)))
    return 0


def main(argv: list[str] | None = None) -> int:
    return profiles_main(argv, "profile_step", __doc__.split("\n")[0], profile,
                         lambda name, run: f"== {name}: {run['gpu_ms_per_step']:.1f} GPU ms per step", "profile")


if __name__ == "__main__":
    raise SystemExit(main())
