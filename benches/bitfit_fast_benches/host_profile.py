"""Where a training step's host (Python) time goes on a GPU: cProfile over synchronised steps.

    python -m bitfit_fast_benches.host_profile --runs reference:fixed fast:fixed fast:bbc --out DIR

On the H200 at aaf637a the fused default's step took 52.6 ms of wall time but kept the GPU busy for ~35.8 ms
(``profile_step``'s 37.1 ms counted the optimizer's profiler annotation, 1.3 ms over kernels already counted): a step
the host cannot issue as fast as the GPU runs it. Each run is PROVIDER:LENGTHS on
BERT-base, batch 256, at most 128 tokens, as in ``profile_step``. Writes ``DIR/host-profile.json`` (per run: the
median wall time of a synchronised step; the host milliseconds per step inside the top functions, self and
cumulative) and ``DIR/host-profile.txt`` (pstats' tables). The profiled backward runs on the calling thread, so
that cProfile sees it. A sync inside the step shows as time in the call that waits (``item``, ``__bool__``); the
wait for the GPU after each step is not profiled.
"""

import cProfile
import io
import pstats
import statistics
from pathlib import Path

import torch

from .measurement import timed
from .presets import Workload, build_base_model, make_batches
from .profile_step import profiles_main
from .providers import build_provider


def _function_name(key: tuple) -> str:
    filename, line, name = key
    return f"{Path(filename).name}:{line}({name})" if line else name


def profile(provider: str, workload: Workload, steps: int = 10, warmup: int = 3, top: int = 40, device="cuda"):
    """(record, pstats tables) for ``steps`` synchronised steps of ``provider`` after ``warmup`` steps."""
    base = build_base_model(workload, device)
    trainer = build_provider(provider, base, device, copy_base=False)
    batches = make_batches(workload, warmup + 2 * steps, base.config.vocab_size, device)
    for batch in batches[:warmup]:
        trainer.step(batch)
    wall = [timed(trainer.step, batch, device)[0] * 1e3 for batch in batches[warmup:warmup + steps]]
    profiler = cProfile.Profile()
    # On a GPU the autograd engine runs the backward on a thread of its own, which cProfile would not see.
    with torch.autograd.set_multithreading_enabled(False):
        for batch in batches[warmup + steps:]:
            profiler.enable()
            trainer.step(batch)
            profiler.disable()
            if device == "cuda":  # the GPU finishing the step is not host time
                torch.cuda.synchronize()
    stats = pstats.Stats(profiler)
    entries = stats.stats  # {(file, line, name): (primitive calls, calls, self s, cumulative s, callers)}
    by_self = sorted(entries.items(), key=lambda item: -item[1][2])[:top]
    by_cumulative = sorted(entries.items(), key=lambda item: -item[1][3])[:top]

    def rows(items):
        return [dict(function=_function_name(key), calls_per_step=value[1] / steps,
                     self_ms_per_step=value[2] / steps * 1e3, cumulative_ms_per_step=value[3] / steps * 1e3)
                for key, value in items]

    tables = []
    for order in ("tottime", "cumulative"):
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats(order).print_stats(top)
        tables.append(text.getvalue())
    del trainer, base
    record = dict(wall_ms_median=statistics.median(wall), host_ms_per_step=stats.total_tt / steps * 1e3,
                  by_self_time=rows(by_self), by_cumulative_time=rows(by_cumulative))
    return record, "\n".join(tables)


def main(argv: list[str] | None = None) -> int:
    return profiles_main(argv, "host_profile", __doc__.split("\n")[0], profile,
                         lambda name, run: f"== {name}: wall {run['wall_ms_median']:.1f} ms per synchronised step, "
                                           f"{run['host_ms_per_step']:.1f} ms of profiled host time", "host-profile")


if __name__ == "__main__":
    raise SystemExit(main())
