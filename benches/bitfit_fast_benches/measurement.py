"""How a benchmark measures: step time between device synchronisations, peak memory, model FLOPs, the matmul
peak that MFU is relative to, and the largest batch that fits.

Memory on a GPU is resident state plus the step's peak allocation; on CPU it is the peak RSS of a fresh
process (``python -m bitfit_fast_benches.measurement --rss-probe SPEC``) that builds one provider alone.
"""

import copy
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from .presets import SHAPES, Workload, build_base_model, make_batches
from .providers import Trainer, build_provider


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(step: Callable[[dict], torch.Tensor], batch: dict, device: str) -> tuple[float, torch.Tensor]:
    """Seconds of one step between two device synchronisations (all queued work included)."""
    synchronize(device)
    start = time.perf_counter()
    loss = step(batch)
    synchronize(device)
    return time.perf_counter() - start, loss


def quartiles(values: list[float]) -> tuple[float, float, float]:
    """(first quartile, median, third quartile) of ``values``, interpolated between the sorted values as NumPy's
    default does (one value: itself three times)."""
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, median, q3


def spread(times: list[float]) -> dict:
    """Median, quartiles and minimum of step times, in milliseconds."""
    q1, median, q3 = quartiles(times)
    return dict(median_ms=1e3 * median, q1_ms=1e3 * q1, q3_ms=1e3 * q3, min_ms=1e3 * min(times), steps=len(times))


def paired_ratios(numerators: list[float], denominators: list[float]) -> dict:
    """Quartiles of the per-step ratios numerators[i] / denominators[i], each pair timed on the same batch in the
    same round. A ratio of medians hides how far a shared machine's drift moves it (a 2-core VM's speed swings by
    20% within a run); the spread of the paired ratios shows it."""
    q1, median, q3 = quartiles([a / b for a, b in zip(numerators, denominators, strict=True)])
    return dict(q1=q1, median=median, q3=q3)


# ---------------------------------------------------------------------------------------------------- memory


def resident_bytes(trainer: Trainer) -> int:
    """Distinct storages of the provider's parameters, buffers and optimizer state."""
    storages = {}
    tensors = list(trainer.model.parameters()) + list(trainer.model.buffers())
    tensors += [t for state in trainer.optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
    tensors += [m._packed_qkv for m in trainer.model.modules() if getattr(m, "_packed_qkv", None) is not None]
    for t in tensors:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


def gpu_peak_bytes(trainer: Trainer, batch: dict) -> int:
    """Resident state plus the highest allocation above it during one step, the step's gradients included (the last
    step's are freed first: the step would free them at its start, and the peak above them would net them out)."""
    trainer.optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    trainer.step(batch)
    torch.cuda.synchronize()
    return resident_bytes(trainer) + torch.cuda.max_memory_allocated() - before


def cpu_peak_rss(provider: str, workload: Workload, steps: int = 2) -> dict:
    """Peak RSS of a fresh process that builds the model and trains ``steps`` steps with this provider."""
    spec = json.dumps(dict(provider=provider, workload=dataclasses.asdict(workload), steps=steps))
    # A fixed mmap threshold makes glibc return every freed tensor to the OS at once (the default threshold
    # adapts upwards and keeps freed blocks in the heap), so the peak RSS follows live memory, not fragmentation.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, "-m", "bitfit_fast_benches.measurement", "--rss-probe", spec],
                         capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"memory probe for {provider} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _proc_status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _rss_probe(spec: str) -> None:
    """Child process of :func:`cpu_peak_rss`: RSS when idle, then the peak while training.

    One step on a tiny model first loads everything imported lazily (modeling code, kernels); the kernel's
    high-water mark is then reset (``/proc/self/clear_refs``), so only the workload's own peak is measured.
    """
    args = json.loads(spec)
    workload = Workload(**args["workload"])
    warmup = dataclasses.replace(workload, model="bert-tiny", seq=8, batch=1, lengths="fixed")
    trainer = build_provider(args["provider"], build_base_model(warmup, "cpu"), "cpu", copy_base=False)
    trainer.step(make_batches(warmup, 1, trainer.model.config.vocab_size, "cpu")[0])
    vocab = trainer.model.config.vocab_size
    del trainer
    batches = make_batches(workload, args["steps"], vocab, "cpu")  # a corpus's tokenizer stays out of the peak
    Path("/proc/self/clear_refs").write_text("5")
    idle = _proc_status_bytes("VmRSS")
    trainer = build_provider(args["provider"], build_base_model(workload, "cpu"), "cpu", copy_base=False)
    for batch in batches:
        trainer.step(batch)
    peak = _proc_status_bytes("VmHWM")
    print(json.dumps(dict(idle_rss=idle, peak_rss=peak, above_idle=peak - idle)))


# ------------------------------------------------------------------------------------------ largest batch


def largest_fitting(fits: Callable[[int], bool], start: int, limit: int) -> int:
    """Largest size in [1, limit] for which ``fits`` holds, assuming it holds below some threshold: doubling from
    ``start`` up to ``limit`` itself, then bisection to within 1/16 of the answer. 0 if not even size 1 fits;
    ``limit`` if it fits (larger sizes are not tried)."""
    good, size = 0, min(start, limit)
    while fits(size):
        good = size
        if size == limit:
            return good
        size = min(2 * size, limit)
    bad = size
    while bad - good > max(1, good // 16):
        middle = (good + bad) // 2
        good, bad = (middle, bad) if fits(middle) else (good, middle)
    return good


def max_batch(provider: str, workload: Workload, device: str, limit: int = 8192,
              memory_gib: float | None = None) -> tuple[int, list[str]]:
    """(largest batch, padded to ``workload.seq``, whose training step runs, what other than running out of memory
    stopped larger ones: errors, or the search's ``limit``), within ``memory_gib`` of GPU memory when given (the
    whole card otherwise).

    Every probe trains a fresh copy of one base model, so a probe that failed part-way through its backward leaves
    nothing behind for the next. A step may fail with another error than running out of memory: PyTorch's CUDA
    LayerNorm backward, for more than 64 Ki rows, takes a path that sizes the weight's gradient by a weight that
    has none when it is frozen, as reference BitFit freezes it (on an H200 at aaf637a: "NativeLayerNormBackward0
    returned an invalid gradient ... got [0]" from batch 544 of 128 tokens on, 512 passing). Such a batch does not
    train either, and its error is returned to be reported: the largest batch is then not a memory limit.
    """
    errors = []
    base = build_base_model(workload, "cpu")
    if memory_gib is not None:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, memory_gib * 2**30 / total))

    def fits(batch_size: int) -> bool:
        trainer = build_provider(provider, copy.deepcopy(base).to(device), device, copy_base=False)
        batch = make_batches(dataclasses.replace(workload, batch=batch_size, lengths="fixed"), 1,
                             trainer.model.config.vocab_size, device)[0]
        try:
            trainer.step(batch)
            torch.cuda.synchronize()
            return True
        except torch.cuda.OutOfMemoryError:
            return False
        except RuntimeError as error:
            errors.append(f"batch {batch_size}: {str(error).splitlines()[0]}")
            return False
        finally:
            del trainer, batch
            torch.cuda.empty_cache()

    try:
        largest = largest_fitting(fits, workload.batch, limit)
        if largest == limit:
            errors.append(f"batch {limit}, the search's limit (larger batches were not tried)")
        return largest, errors
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------- FLOPs, MFU


def matmul_peak_tflops(device: str) -> float:
    """Measured dense-matmul throughput: bf16 on a GPU, fp32 on CPU (the dtype the models compute in there)."""
    n, dtype, reps = (8192, torch.bfloat16, 20) if device == "cuda" else (1024, torch.float32, 20)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    times = []
    for _ in range(reps):
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        times.append(time.perf_counter() - start)
    return 2 * n**3 / min(times) / 1e12


def step_flops(workload: Workload, batch: dict, method: str) -> float:
    """Model FLOPs of one step on the padded batch: the method's own work, recomputation not counted.

    BitFit: forward plus input-gradient GEMMs (no weight gradients); full fine-tuning adds the weight gradients.
    Attention: QK^T and PV forward, twice that backward. Embeddings, pooler and head are negligible.
    """
    hidden, layers, _, inter = SHAPES[workload.model]
    batch_size, width = batch["input_ids"].shape
    tokens = batch_size * width
    gemm = 2 * tokens * layers * (4 * hidden * hidden + 2 * hidden * inter)
    attention = 2 * 2 * tokens * width * hidden * layers
    return (2 if method == "bitfit" else 3) * gemm + 3 * attention


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--rss-probe":
    _rss_probe(sys.argv[2])
