"""One training step per provider and workload (`pytest benches/ --benchmark-only`), grouped per workload.

The same code as `bitfit-fast bench`: fresh batches in setup (never timed), a device synchronisation inside
the timed call, memory and throughput in extra_info.
"""

import itertools

import pytest
import torch
from conftest import PRESET, PRESET_NAME

from bitfit_fast_benches.measurement import cpu_peak_rss, gpu_peak_bytes, synchronize
from bitfit_fast_benches.presets import build_base_model, make_batches, padded_tokens
from bitfit_fast_benches.providers import GRAPHED, build_provider
from bitfit_fast_benches.runner import environment

# As the runner: a CUDA graph per batch shape does not suit real lengths, so the graphed providers run fixed ones.
CASES = [(workload, provider) for workload, provider in itertools.product(PRESET.workloads, PRESET.providers)
         if not (workload.variable_lengths and provider in GRAPHED)]


@pytest.mark.parametrize("workload,provider", CASES, ids=[f"{w.name}-{p}" for w, p in CASES])
def test_training_step(benchmark, preset, workload, provider):
    device = preset.device
    trainer = build_provider(provider, build_base_model(workload, device), device, copy_base=False)
    drawn = make_batches(workload, preset.warmup + preset.repeats + 1, trainer.model.config.vocab_size, device)
    timed = drawn[preset.warmup:preset.warmup + preset.repeats]  # setup hands them out in order, warmup first
    batches = iter(drawn)

    def step(batch):
        loss = trainer.step(batch)
        synchronize(device)
        return loss

    benchmark.group = f"{PRESET_NAME}: {workload.name}"
    loss = benchmark.pedantic(step, setup=lambda: ((next(batches),), {}), rounds=preset.repeats,
                              warmup_rounds=preset.warmup, iterations=1)
    assert torch.isfinite(loss)
    batch = next(batches)  # untimed: for the peak-memory measurement only
    median = benchmark.stats.stats.median
    benchmark.extra_info.update(
        device=environment("pytest benches/")["device"],
        tokens_per_s=sum(padded_tokens(b) for b in timed) / len(timed) / median,  # the timed batches' tokens
        # A graph's replay allocates nothing new (its memory is the capture's): no peak to measure there.
        peak_memory_bytes=(None if provider in GRAPHED else gpu_peak_bytes(trainer, batch) if device == "cuda"
                           else cpu_peak_rss(provider, workload)["above_idle"]),
    )
